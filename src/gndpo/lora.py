"""LoRA adapters on the student through PEFT, an optional dependency (``pip install 'gndpo[lora]'``).

The adapters are injected into the Hugging Face model in place. Every forward path of gndpo (the trainer's
packed and KV-cache scoring paths, the decode loop, ``transformers.generate``) keeps calling that same model
object, so each sees the adapters without knowing about PEFT; the PEFT wrapper is kept only to save, load and
merge them.

Which modules get adapters (``model.lora.target_modules``):

- a list of names (the default: the attention and MLP projections) is matched with PEFT's suffix rule
  *inside the language model only*: vision towers reuse the same names (InternVL's vision attention has
  ``q_proj``/``k_proj``/``v_proj``, Qwen2.5-VL's vision MLP ``gate_proj``/``up_proj``/``down_proj``), and a
  recipe written for a text model must not silently adapt them;
- a string is PEFT's: ``'all-linear'`` (every linear layer but the LM head, vision tower and projector
  included) or a regular expression matched against full module names.

``modules_to_save`` follows PEFT's rules over the whole model (e.g. ``multi_modal_projector`` or ``lm_head``).
"""
from __future__ import annotations

import contextlib
import logging
import re
import warnings
from pathlib import Path

import torch

from gndpo.errors import GndpoError, ModelError

INSTALL_HINT = "pip install 'gndpo[lora]'"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

log = logging.getLogger("gndpo")


def import_peft():
    try:
        import peft
    except ImportError:
        raise ModelError(f"LoRA (model.lora.rank > 0) needs PEFT, which is not installed: {INSTALL_HINT}") from None
    return peft


@contextlib.contextmanager
def _quiet_peft():
    # PEFT probes transformers' deprecated is_gradient_checkpointing; the warning is not the user's to act on.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def is_adapter_checkpoint(path: str | Path) -> bool:
    """Whether a checkpoint directory holds LoRA adapters (PEFT's layout) rather than a full model."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def language_model_prefix(model) -> str:
    """Dotted name of the language model inside ``model``: ``model`` for causal LMs, ``model.language_model``
    for the VLMs of transformers 5; ``""`` when the model is its own language model."""
    try:
        decoder = model.get_decoder()
    except (AttributeError, NotImplementedError, ValueError):
        decoder = getattr(model, "model", model)
    for name, module in model.named_modules():
        if module is decoder:
            return name
    return ""


def resolve_target_modules(model, target_modules) -> str:
    """PEFT's ``target_modules`` for the configured value. A list of names becomes a regular expression for the
    language model's modules whose name ends with ``.`` + one of them (PEFT's suffix rule, scoped); a regular
    expression must match some layers, and only layers (not blocks such as ``mlp``)."""
    if isinstance(target_modules, str) and target_modules.lower() == "all-linear":
        return target_modules
    prefix = language_model_prefix(model)
    if isinstance(target_modules, str):
        pattern, shown, where = target_modules, repr(target_modules), "the model"
    else:
        names = "|".join(re.escape(t) for t in target_modules)
        pattern = ((re.escape(prefix) + r"\.") if prefix else "") + rf"(?:.*\.)?(?:{names})"
        shown, where = str(list(target_modules)), f"the language model ({prefix or type(model).__name__})"
    matched = [(name, m) for name, m in model.named_modules() if re.fullmatch(pattern, name)]
    if not matched:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                         if isinstance(m, torch.nn.Linear) and n.startswith(prefix)})
        raise ModelError(f"model.lora.target_modules={shown} matches no module of {where}; its linear layers are "
                         f"named: {', '.join(linear)}")
    blocks = [(name, m) for name, m in matched if next(m.children(), None) is not None]
    if blocks:
        name, m = blocks[0]
        raise ModelError(f"model.lora.target_modules={shown} matches {name} ({type(m).__name__}), a block, not a "
                         "layer; name its linear layers (e.g. q_proj, down_proj)")
    return pattern


def _check_modules_to_save(model, modules_to_save) -> None:
    names = [name for name, _ in model.named_modules()]
    missing = [m for m in modules_to_save if not any(n.endswith(m) for n in names)]  # PEFT's suffix rule
    if missing:
        raise ModelError(f"model.lora.modules_to_save entry {missing[0]!r} matches no module of the model "
                         "(e.g. lm_head, embed_tokens, multi_modal_projector)")


def _ties_saved_embedding(model, modules_to_save) -> bool:
    """Whether a module to save is the input or output embedding of a model that ties the two: PEFT must then
    train one shared copy, or the merged model would reload with the untrained one."""
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if inp is None or out is None or getattr(out, "weight", None) is not getattr(inp, "weight", None):
        return False
    names = {name for name, module in model.named_modules() if module is inp or module is out}
    return any(n.endswith(m) for n in names for m in modules_to_save)  # PEFT matches modules_to_save by suffix


def apply_lora(model, lora):
    """Inject LoRA adapters (``lora``: the ``model.lora`` config section) into ``model`` in place and freeze
    everything else; returns the PEFT wrapper (used to save, load and merge), or None when ``lora.rank == 0``."""
    if lora.rank == 0:
        return None
    peft = import_peft()
    modules_to_save = list(lora.modules_to_save) or None
    _check_modules_to_save(model, modules_to_save or ())
    tie = bool(modules_to_save) and _ties_saved_embedding(model, modules_to_save)
    config = peft.LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none",
                             target_modules=resolve_target_modules(model, lora.target_modules),
                             modules_to_save=modules_to_save, ensure_weight_tying=tie)
    try:
        with _quiet_peft():
            wrapped = peft.get_peft_model(model, config)
    except (ValueError, TypeError, KeyError) as exc:  # PEFT's message for unmatched or unsupported modules
        raise ModelError(f"cannot apply LoRA with model.lora.*: {_first_line(exc)}") from None
    checkpointing = getattr(model, "is_activation_checkpointing", None)
    if checkpointing is None:  # transformers < 5.24
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    if checkpointing:
        # Checkpointed blocks whose inputs need no grad would pass none to the adapters inside them (reentrant
        # checkpointing); the embeddings are frozen, so make their output require grad.
        model.enable_input_require_grads()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("LoRA rank %d: %d trainable parameters (%.2f%% of %d)", lora.rank, trainable, 100 * trainable / total,
             total)
    return wrapped


def load_adapter_state(wrapped, ckpt_dir: str | Path) -> None:
    """Load the adapter (and modules_to_save) weights of a checkpoint into ``wrapped`` (from :func:`apply_lora`)."""
    from safetensors.torch import load_file

    ckpt_dir = Path(ckpt_dir)
    peft = import_peft()
    if not isinstance(wrapped, peft.PeftModel):
        raise GndpoError(f"checkpoint {ckpt_dir} holds LoRA adapters; load it into a model with the run's "
                         "model.lora.* settings")
    if not (ckpt_dir / ADAPTER_WEIGHTS).is_file():
        raise GndpoError(f"checkpoint {ckpt_dir} holds no {ADAPTER_WEIGHTS}; it is a full-model checkpoint: "
                         "load it with model.lora.rank=0")
    saved = load_file(ckpt_dir / ADAPTER_WEIGHTS)
    expected = set(peft.get_peft_model_state_dict(wrapped))
    if set(saved) != expected:
        diff = sorted(set(saved) ^ expected)
        raise GndpoError(f"checkpoint {ckpt_dir} does not fit these adapters (e.g. {diff[0]}); resume with the "
                         "run's model.path and model.lora.* settings")
    peft.set_peft_model_state_dict(wrapped, saved)


def merge_adapters(ckpt_dir: str | Path, out_dir: str | Path, *, base_path: str,
                   trust_remote_code: bool = False, dtype: str | None = None) -> None:
    """Write the base model with a checkpoint's adapters merged in, as a plain ``save_pretrained`` model in
    ``out_dir`` (loadable without PEFT). The merge runs in float32; the weights are saved in ``dtype``, by
    default the dtype the base model was saved in."""
    from transformers import AutoConfig

    from gndpo.models import load_model

    peft = import_peft()
    try:
        saved_dtype = getattr(AutoConfig.from_pretrained(base_path, trust_remote_code=trust_remote_code), "dtype", None)
    except Exception:
        saved_dtype = None  # load_model below names the problem
    base = load_model(base_path, what="base model", dtype="float32", device="cpu",
                      trust_remote_code=trust_remote_code).model
    try:
        with _quiet_peft():
            merged = peft.PeftModel.from_pretrained(base, str(ckpt_dir)).merge_and_unload()
    except Exception as exc:
        raise GndpoError(f"cannot merge the adapters of {ckpt_dir} into {base_path}: {_first_line(exc)}") from None
    if dtype is not None:
        saved_dtype = getattr(torch, dtype)
    if isinstance(saved_dtype, torch.dtype) and saved_dtype != torch.float32:
        merged.to(saved_dtype)
    merged.save_pretrained(out_dir)


def _first_line(exc: Exception) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
