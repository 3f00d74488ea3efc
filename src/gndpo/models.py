"""Loading students and teachers (causal LMs and image-text-to-text models) and checking they agree.

The compatibility check exists because on-policy distillation scores the student's token ids with the
teacher: if the two tokenize differently, every reward is silently wrong.
"""
from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gndpo.errors import ModelError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"trainer.device={name} but no CUDA device is available; use trainer.device=cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in _DTYPES.items()}[dtype]


def student_dtypes(dtype: str, compute_dtype: str, device: torch.device, *, lora: bool = False
                   ) -> tuple[torch.dtype, torch.dtype]:
    """The student's (stored, compute) dtypes from ``model.dtype`` and ``model.compute_dtype``.

    Stored ``auto`` is float32: the optimizer updates float32 masters (an AdamW step of ~lr rounds away on a
    bfloat16 weight, whose half-ulp is ~4e-4 of its size), as verl's FSDP actor and torchtitan keep them. A LoRA
    run's frozen base needs no master, so it stays in bfloat16 on GPUs (PEFT keeps the adapters in float32).
    Compute ``auto`` is bfloat16 over float32 weights on GPUs (mixed precision), the stored dtype otherwise.
    """
    device = torch.device(device)
    if dtype == "auto":
        stored = torch.bfloat16 if lora and device.type == "cuda" else torch.float32
    else:
        stored = _DTYPES[dtype]
    if compute_dtype == "auto":
        compute = torch.bfloat16 if device.type == "cuda" and stored == torch.float32 else stored
    else:
        compute = _DTYPES[compute_dtype]
    return stored, compute


def _check_path(path: str, what: str) -> None:
    """A one-line ModelError, at once, for a path that cannot be a model: an existing directory without
    ``config.json``, or a missing path that is local by its look (``.``, ``/``, ``~``), by its shape (a hub id is
    ``org/name``) or by its parent (``models/qwen3_studnet`` where ``models/`` exists here). Anything else may be
    a hub id."""
    p = Path(path).expanduser()
    if p.exists():
        if p.is_file():
            raise ModelError(f"{what} path {p} is a file; give the model's directory (the one holding config.json)")
        if not (p / "config.json").is_file():
            raise ModelError(f"{what} directory {p} has no config.json; {_model_dir_hint(p)}")
        return
    local_parent = p.parent != Path(".") and p.parent.is_dir()
    if path.startswith((".", "/", "~")) or path.count("/") != 1 or local_parent:
        raise ModelError(f"{what} path not found: {path}{_near_misses(p) if local_parent else ''}; give an existing "
                         f"directory or a Hugging Face id like org/name")


def _model_dir_hint(p: Path) -> str:
    """What to pass instead of a directory without config.json: a run directory's checkpoint, or a model below."""
    from gndpo.checkpoint import CHECKPOINTS_DIR, latest_checkpoint

    if (p / CHECKPOINTS_DIR).is_dir() or (p / "run_config.yaml").is_file():
        newest = latest_checkpoint(p)
        where = (f"its newest checkpoint is {newest}" if newest is not None else
                 "it holds no complete checkpoint yet")
        return (f"it is a training run directory, not a model: {where} (a Hugging Face directory), or write a "
                f"standalone model with gndpo export {p}")
    if (p / "adapter_config.json").is_file():
        return "it holds LoRA adapters only; gndpo export RUN_DIR --merge writes a full model"
    below = sorted(c.parent for c in p.glob("*/config.json"))
    if below:
        return f"point it at a save_pretrained() directory, such as {below[0]}"
    return "point it at a save_pretrained() directory"


def _near_misses(p: Path) -> str:
    import difflib

    try:
        names = sorted(c.name for c in p.parent.iterdir() if c.is_dir())
    except OSError:
        return ""
    close = difflib.get_close_matches(p.name, names, n=2, cutoff=0.6)
    if close:
        return f" (did you mean {' or '.join(str(p.parent / c) for c in close)}?)"
    return f" ({p.parent} holds {', '.join(names[:5])}{', ...' if len(names) > 5 else ''})" if names else \
        f" ({p.parent} is empty)"


_HUB_PROBE_TIMEOUT = 1.5  # seconds; a hub that answers slower than this is treated as unreachable


@functools.lru_cache(maxsize=None)
def hub_unreachable() -> str | None:
    """None when the Hugging Face hub answers a HEAD request within ~1.5 s (through the user's proxy settings);
    otherwise why not, in a few words (offline mode, no route, a timeout). Asked once per process."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if getattr(constants, "is_offline_mode", lambda: constants.HF_HUB_OFFLINE)():
        return "HF_HUB_OFFLINE is set"
    try:
        get_session().head(constants.ENDPOINT, timeout=_HUB_PROBE_TIMEOUT)
    except Exception as exc:  # noqa: BLE001 - any failure to answer means "unreachable" here
        return f"{constants.ENDPOINT} did not answer: {_first_line(exc)[:160]}"
    return None


def context_limit(config) -> int | None:
    """The model's context length in tokens (its text model's, for a VLM); None when its config does not say."""
    return getattr(getattr(config, "text_config", None) or config, "max_position_embeddings", None)


def is_vision_language(config) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES or hasattr(config, "vision_config")


@dataclass
class LoadedModel:
    model: Any
    processor: Any  # a ProcessorMixin for VLMs, a tokenizer for text models
    is_vlm: bool
    source_dtype: str | None = None  # the dtype its config.json names (what `gndpo export` writes by default)

    @property
    def tokenizer(self):
        return tokenizer_of(self.processor)


def tokenizer_of(processor):
    return getattr(processor, "tokenizer", processor)


def load_model(path: str, *, what: str = "model", dtype: str = "auto", device: torch.device | str = "cpu",
               trust_remote_code: bool = False, attn_implementation: str | None = None,
               allow_pickle: bool = False) -> LoadedModel:
    """Model + processor/tokenizer from a hub id or local directory, on ``device``.

    Weights load from safetensors only: pickled ``.bin``/``.pt`` weights can run code when unpickled, and are
    refused unless ``allow_pickle``. Every failure (missing path, offline hub, unsupported architecture, pickled
    weights) becomes a one-line ModelError.
    """
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    device = torch.device(device)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "dtype": resolve_dtype(dtype, device)}
    local = Path(path).expanduser()
    if not allow_pickle:
        kwargs["use_safetensors"] = True
        if local.is_dir() and not any(local.glob("*.safetensors")) and \
                any(f.suffix in (".bin", ".pt", ".pth") for f in local.iterdir()):
            raise ModelError(f"{what} {path} holds only pickled weights (.bin/.pt), which can run code when loaded; "
                             f"convert them to safetensors, or set {'teacher' if what == 'teacher' else 'model'}"
                             f".allow_pickle=true if you trust their source")
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    config = load_config(path, what=what, trust_remote_code=trust_remote_code)
    vlm = is_vision_language(config)
    try:
        auto = AutoModelForImageTextToText if vlm else AutoModelForCausalLM
        offline = hub_kwargs(path)
        if offline:  # transformers (5.25) asks the hub for a PEFT adapter without passing local_files_only on
            offline = {**offline, "adapter_kwargs": dict(offline)}
        model = auto.from_pretrained(path, **kwargs, **offline)
    except Exception as exc:
        raise ModelError(f"cannot load {what} from {path}: {_first_line(exc)}") from None
    processor = load_processor(path, what=what, trust_remote_code=trust_remote_code, config=config)
    model.to(device)
    return LoadedModel(model=model, processor=processor, is_vlm=vlm, source_dtype=config_dtype(config))


def config_dtype(config) -> str | None:
    """The weights dtype a model's config names (``dtype``, formerly ``torch_dtype``), as a name; None if none."""
    value = getattr(config, "dtype", None) or getattr(getattr(config, "text_config", None), "dtype", None)
    if isinstance(value, torch.dtype):
        value = {v: k for k, v in _DTYPES.items()}.get(value)
    return value if value in _DTYPES else None


def load_config(path: str, *, what: str = "model", trust_remote_code: bool = False):
    """The model's config (hub id or local directory), or a one-line ModelError.

    A hub id is read from the local Hugging Face cache first; the hub is asked only when it answers at all
    (:func:`hub_unreachable`), so an unknown id fails in about a second with no retries, instead of after
    huggingface_hub's half-minute of retries, and prints nothing but the error."""
    from transformers import AutoConfig

    _check_path(path, what)
    if Path(path).expanduser().is_dir():
        try:
            return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        except Exception as exc:
            raise ModelError(f"cannot read the {what} config in {path}: {_first_line(exc)}") from None
    try:  # offline for this one call only: the cache answers without touching the network
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached (or a cached copy that does not read): ask the hub below
        pass
    why = hub_unreachable()
    if why is not None:
        raise ModelError(f"{what} path not found: {path} is not a local directory, not in the Hugging Face cache, and "
                         f"the hub is unreachable ({why}); check the path, or download the model where the hub is "
                         f"reachable (hf download {path}) and pass its directory")
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ModelError(f"{what} path not found: {path} is not a local directory and could not be loaded from the "
                         f"Hugging Face hub ({_first_line(exc)})") from None


def hub_kwargs(path: str) -> dict:
    """``from_pretrained`` arguments for ``path`` after :func:`load_config` found it: a hub id whose hub does not
    answer reads from the cache alone (no retries per file); anything else as usual."""
    if Path(path).expanduser().is_dir() or hub_unreachable() is None:
        return {}
    return {"local_files_only": True}


def load_processor(path: str, *, what: str = "model", trust_remote_code: bool = False, config=None):
    """The processor (VLMs) or tokenizer (text models) of a model, left-padding, with a pad token and a chat
    template (a one-line ModelError otherwise). Loads no weights."""
    from transformers import AutoProcessor, AutoTokenizer

    config = config if config is not None else load_config(path, what=what, trust_remote_code=trust_remote_code)
    try:
        auto = AutoProcessor if is_vision_language(config) else AutoTokenizer
        processor = auto.from_pretrained(path, trust_remote_code=trust_remote_code, **hub_kwargs(path))
    except Exception as exc:
        raise ModelError(f"cannot load {what} from {path}: {_first_line(exc)}") from None
    tok = tokenizer_of(processor)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    if getattr(tok, "chat_template", None) is None and getattr(processor, "chat_template", None) is None:
        raise ModelError(f"{what} at {path} has no chat template; use an instruct/chat model or add chat_template")
    return processor


def _first_line(exc: Exception) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def eos_token_ids(model, processor) -> list[int]:
    """All ids that end a response: the generation config's EOS ids plus the tokenizer's."""
    ids: list[int] = []
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    if isinstance(eos, int):
        ids.append(eos)
    elif eos:
        ids.extend(eos)
    tok_eos = tokenizer_of(processor).eos_token_id
    if tok_eos is not None and tok_eos not in ids:
        ids.append(tok_eos)
    return ids


def special_placeholder_ids(processor) -> list[int]:
    """Token ids the sampler must never emit: image/video placeholders and padding."""
    tok = tokenizer_of(processor)
    ids = set()
    for attr in ("image_token_id", "video_token_id"):
        value = getattr(processor, attr, None) or getattr(tok, attr, None)
        if isinstance(value, int):
            ids.add(value)
    for attr in ("image_token", "video_token", "boi_token", "eoi_token"):
        token = getattr(processor, attr, None) or getattr(tok, attr, None)
        if isinstance(token, str):
            tid = tok.convert_tokens_to_ids(token)
            if isinstance(tid, int) and tid != tok.unk_token_id:
                ids.add(tid)
    if tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id:
        ids.add(tok.pad_token_id)
    return sorted(ids)


def configure_images(processor, *, max_tiles: int | None = None, min_pixels: int | None = None,
                     max_pixels: int | None = None) -> None:
    """Set how images become tokens, in place: the tile budget of tiling processors (InternVL's GotOcr2:
    ``max_patches``) and the pixel bounds of dynamic-resolution ones (Qwen-VL: ``size``'s shortest/longest
    edge, counted in pixels). A setting the processor has no such knob for is an error, not ignored."""
    images = getattr(processor, "image_processor", None)
    if max_tiles is not None:
        if not hasattr(images, "max_patches"):
            raise ModelError(f"data.max_image_tiles applies to tiling image processors (InternVL); "
                             f"{type(images).__name__} does not tile; remove data.max_image_tiles")
        images.max_patches = max_tiles
    if min_pixels is not None or max_pixels is not None:
        size = getattr(images, "size", None)
        if getattr(size, "shortest_edge", None) is None or getattr(size, "longest_edge", None) is None or \
                not hasattr(images, "merge_size"):
            name = "data.min_pixels" if min_pixels is not None else "data.max_pixels"
            raise ModelError(f"{name} applies to dynamic-resolution image processors (Qwen-VL); "
                             f"{type(images).__name__} has no pixel bounds; remove {name}")
        images.size = type(size)(shortest_edge=min_pixels if min_pixels is not None else size.shortest_edge,
                                 longest_edge=max_pixels if max_pixels is not None else size.longest_edge)


# ---------------------------------------------------------------- compatibility


PROBE_MESSAGES = [{"role": "user", "content": "What is 12 + 30? Think step by step, answer in \\boxed{}."}]
PROBE_TEXT = "<think> 12 + 30 = 42 </think> The answer is \\boxed{42}. Ünïcödé ∑ 数学"


def _render(processor, messages) -> str:
    target = processor if getattr(processor, "chat_template", None) else tokenizer_of(processor)
    return target.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def tokenizer_fingerprint(processor, *, vocab: bool = False) -> dict:
    """What the compatibility check compares, as JSON-ready data: a teacher server sends its own, and clients
    compare it with the student's. The vocabulary travels as a hash (plus the whole table when ``vocab``)."""
    tok = tokenizer_of(processor)
    table = tok.get_vocab()
    digest = hashlib.sha256(json.dumps(sorted(table.items()), ensure_ascii=True).encode()).hexdigest()
    fp = {"vocab_size": len(table), "vocab_sha256": digest, "eos_token": tok.eos_token,
          "eos_token_id": tok.eos_token_id, "special_tokens": dict(zip(tok.all_special_tokens, tok.all_special_ids)),
          "probe_prompt": _render(processor, PROBE_MESSAGES),
          "probe_ids": tok(PROBE_TEXT, add_special_tokens=False)["input_ids"]}
    if vocab:
        fp["vocab"] = table
    return fp


def compare_fingerprints(student: dict, teacher: dict) -> None:
    """Raise ModelError naming the first difference between two :func:`tokenizer_fingerprint` results."""
    s, t = student, teacher
    if s["vocab_sha256"] != t["vocab_sha256"]:
        detail = "different contents"
        if "vocab" in s and "vocab" in t:
            sv, tv = s["vocab"], t["vocab"]
            only_s, only_t = sorted(set(sv) - set(tv), key=sv.get), sorted(set(tv) - set(sv), key=tv.get)
            moved = sorted((k for k in set(sv) & set(tv) if sv[k] != tv[k]), key=sv.get)
            detail = ", ".join((_tokens(only_s, "only in the student", lambda k: f"{k!r} id {sv[k]}"),
                                _tokens(only_t, "only in the teacher", lambda k: f"{k!r} id {tv[k]}"),
                                _tokens(moved, "with different ids", lambda k: f"{k!r} {sv[k]} vs {tv[k]}")))
        raise ModelError(f"student and teacher vocabularies differ ({s['vocab_size']} vs {t['vocab_size']} tokens; "
                         f"{detail}); distillation needs the same tokenizer")
    if s["eos_token"] != t["eos_token"] or s["eos_token_id"] != t["eos_token_id"]:
        raise ModelError(f"student and teacher EOS tokens differ ({s['eos_token']!r} id {s['eos_token_id']} vs "
                         f"{t['eos_token']!r} id {t['eos_token_id']}); distillation needs the same tokenizer")
    if s["special_tokens"] != t["special_tokens"]:
        ss, ts = s["special_tokens"], t["special_tokens"]
        name = sorted(k for k in set(ss) | set(ts) if ss.get(k) != ts.get(k))[0]
        side = lambda table: f"id {table[name]}" if name in table else "absent"  # noqa: E731
        raise ModelError(f"student and teacher special tokens differ ({name!r}: {side(ss)} in the student, "
                         f"{side(ts)} in the teacher); use the same tokenizer family")
    sp, tp = s["probe_prompt"], t["probe_prompt"]
    if sp != tp:
        at = next((i for i, (a, b) in enumerate(zip(sp, tp)) if a != b), min(len(sp), len(tp)))
        start = max(0, at - 20)
        raise ModelError(f"student and teacher chat templates render a probe prompt differently from character {at} "
                         f"(...{sp[start:at + 30]!r} vs ...{tp[start:at + 30]!r}); use the same chat template")
    if s["probe_ids"] != t["probe_ids"]:
        si, ti = s["probe_ids"], t["probe_ids"]
        at = next((i for i, (a, b) in enumerate(zip(si, ti)) if a != b), min(len(si), len(ti)))
        pieces = ""
        if "vocab" in s and "vocab" in t:
            sn, tn = ({i: k for k, i in fp["vocab"].items()} for fp in (s, t))
            pieces = (f": the student reads {[sn.get(i, i) for i in si[at:at + 3]]}, the teacher "
                      f"{[tn.get(i, i) for i in ti[at:at + 3]]}")
        raise ModelError(f"student and teacher tokenize the same text differently from token {at}{pieces} (merges or "
                         f"normalization differ); distillation needs the same tokenizer")


def _tokens(names: list, what: str, show, most: int = 3) -> str:
    """``"2 only in the student (e.g. 'a' id 5, 'b' id 9)"``, or ``"0 only in the student"``."""
    examples = f" (e.g. {', '.join(show(k) for k in names[:most])})" if names else ""
    return f"{len(names)} {what}{examples}"


def check_compatible(student_processor, teacher_processor) -> None:
    """Raise ModelError naming the first difference between the student's and teacher's tokenization."""
    compare_fingerprints(tokenizer_fingerprint(student_processor, vocab=True),
                         tokenizer_fingerprint(teacher_processor, vocab=True))
