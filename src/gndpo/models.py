"""Loading students and teachers (causal LMs and image-text-to-text models) and checking they agree.

The compatibility check exists because on-policy distillation scores the student's token ids with the
teacher: if the two tokenize differently, every reward is silently wrong.
"""
from __future__ import annotations

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
    p = Path(path).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelError(f"{what} directory {p} has no config.json; point it at a save_pretrained() directory")
        return
    if path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise ModelError(f"{what} path not found: {path}; give an existing directory or a Hugging Face id like org/name")


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
        model = auto.from_pretrained(path, **kwargs)
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
    """The model's config (hub id or local directory), or a one-line ModelError."""
    from transformers import AutoConfig

    _check_path(path, what)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:
        if Path(path).expanduser().is_dir():
            raise ModelError(f"cannot read the {what} config in {path}: {_first_line(exc)}") from None
        raise ModelError(f"{what} path not found: {path} is not a local directory and could not be loaded from the "
                         f"Hugging Face hub ({_first_line(exc)})") from None


def load_processor(path: str, *, what: str = "model", trust_remote_code: bool = False, config=None):
    """The processor (VLMs) or tokenizer (text models) of a model, left-padding, with a pad token and a chat
    template (a one-line ModelError otherwise). Loads no weights."""
    from transformers import AutoProcessor, AutoTokenizer

    config = config if config is not None else load_config(path, what=what, trust_remote_code=trust_remote_code)
    try:
        auto = AutoProcessor if is_vision_language(config) else AutoTokenizer
        processor = auto.from_pretrained(path, trust_remote_code=trust_remote_code)
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
            moved = sum(1 for k in set(sv) & set(tv) if sv[k] != tv[k])
            detail = (f"{len(set(sv) - set(tv))} only in the student, {len(set(tv) - set(sv))} only in the teacher, "
                      f"{moved} with different ids")
        raise ModelError(f"student and teacher vocabularies differ ({s['vocab_size']} vs {t['vocab_size']} tokens; "
                         f"{detail}); distillation needs the same tokenizer")
    if s["eos_token"] != t["eos_token"] or s["eos_token_id"] != t["eos_token_id"]:
        raise ModelError(f"student and teacher EOS tokens differ ({s['eos_token']!r} vs {t['eos_token']!r})")
    if s["special_tokens"] != t["special_tokens"]:
        diff = sorted(set(s["special_tokens"].items()) ^ set(t["special_tokens"].items()))
        raise ModelError(f"student and teacher special tokens differ (e.g. {diff[0][0]!r}); use the same tokenizer family")
    sp, tp = s["probe_prompt"], t["probe_prompt"]
    if sp != tp:
        raise ModelError(f"student and teacher chat templates render a probe prompt differently ({sp[:60]!r}... vs {tp[:60]!r}...)")
    if s["probe_ids"] != t["probe_ids"]:
        raise ModelError("student and teacher tokenize the same text differently (merges or normalization differ)")


def check_compatible(student_processor, teacher_processor) -> None:
    """Raise ModelError naming the first difference between the student's and teacher's tokenization."""
    compare_fingerprints(tokenizer_fingerprint(student_processor, vocab=True),
                         tokenizer_fingerprint(teacher_processor, vocab=True))
