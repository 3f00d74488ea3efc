"""Loading students and teachers (causal LMs and image-text-to-text models) and checking they agree.

The compatibility check exists because on-policy distillation scores the student's token ids with the
teacher: if the two tokenize differently, every reward is silently wrong.
"""
from __future__ import annotations

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


def _check_path(path: str, what: str) -> None:
    p = Path(path).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelError(f"{what} directory {p} has no config.json; point it at a save_pretrained() directory")
        return
    if path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise ModelError(f"{what} path not found: {path}; give an existing directory or a Hugging Face id like org/name")


def is_vision_language(config) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES or hasattr(config, "vision_config")


@dataclass
class LoadedModel:
    model: Any
    processor: Any  # a ProcessorMixin for VLMs, a tokenizer for text models
    is_vlm: bool

    @property
    def tokenizer(self):
        return tokenizer_of(self.processor)


def tokenizer_of(processor):
    return getattr(processor, "tokenizer", processor)


def load_model(path: str, *, what: str = "model", dtype: str = "auto", device: torch.device | str = "cpu",
               trust_remote_code: bool = False, attn_implementation: str | None = None) -> LoadedModel:
    """Model + processor/tokenizer from a hub id or local directory, on ``device``.

    Every failure (missing path, offline hub, unsupported architecture) becomes a one-line ModelError.
    """
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor,
                              AutoTokenizer)

    _check_path(path, what)
    device = torch.device(device)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "dtype": resolve_dtype(dtype, device)}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ModelError(f"{what} path not found: {path} is not a local directory and could not be loaded from the "
                         f"Hugging Face hub ({_first_line(exc)})") from None
    vlm = is_vision_language(config)
    try:
        if vlm:
            model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
            processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
            processor = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ModelError(f"cannot load {what} from {path}: {_first_line(exc)}") from None
    tok = tokenizer_of(processor)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    if getattr(tok, "chat_template", None) is None and getattr(processor, "chat_template", None) is None:
        raise ModelError(f"{what} at {path} has no chat template; use an instruct/chat model or add chat_template")
    model.to(device)
    return LoadedModel(model=model, processor=processor, is_vlm=vlm)


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


_PROBE = [{"role": "user", "content": "What is 12 + 30? Think step by step, answer in \\boxed{}."}]
_PROBE_TEXT = "<think> 12 + 30 = 42 </think> The answer is \\boxed{42}. Ünïcödé ∑ 数学"


def _render(processor, messages) -> str:
    target = processor if getattr(processor, "chat_template", None) else tokenizer_of(processor)
    return target.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def check_compatible(student_processor, teacher_processor) -> None:
    """Raise ModelError naming the first difference between the student's and teacher's tokenization."""
    s, t = tokenizer_of(student_processor), tokenizer_of(teacher_processor)
    sv, tv = s.get_vocab(), t.get_vocab()
    if sv != tv:
        only_s = len(set(sv) - set(tv))
        only_t = len(set(tv) - set(sv))
        moved = sum(1 for k in set(sv) & set(tv) if sv[k] != tv[k])
        raise ModelError(
            f"student and teacher vocabularies differ ({len(sv)} vs {len(tv)} tokens; {only_s} only in the student, "
            f"{only_t} only in the teacher, {moved} with different ids); distillation needs the same tokenizer")
    if s.eos_token != t.eos_token or s.eos_token_id != t.eos_token_id:
        raise ModelError(f"student and teacher EOS tokens differ ({s.eos_token!r} vs {t.eos_token!r})")
    s_special = dict(zip(s.all_special_tokens, s.all_special_ids))
    t_special = dict(zip(t.all_special_tokens, t.all_special_ids))
    if s_special != t_special:
        diff = sorted(set(s_special.items()) ^ set(t_special.items()))
        raise ModelError(f"student and teacher special tokens differ (e.g. {diff[0][0]!r}); use the same tokenizer family")
    sp, tp = _render(student_processor, _PROBE), _render(teacher_processor, _PROBE)
    if sp != tp:
        raise ModelError(f"student and teacher chat templates render a probe prompt differently ({sp[:60]!r}... vs {tp[:60]!r}...)")
    if s(_PROBE_TEXT, add_special_tokens=False)["input_ids"] != t(_PROBE_TEXT, add_special_tokens=False)["input_ids"]:
        raise ModelError("student and teacher tokenize the same text differently (merges or normalization differ)")
