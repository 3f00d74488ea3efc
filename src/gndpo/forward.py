"""Model-facing glue shared by the sampler, the student and the teacher.

- :func:`encode_prompts`: records -> left-padded prompt tensors (chat template, images via the processor).
- :func:`response_logprobs`: one forward over prompt + response, returning the log-probs (and entropy) of
  the response tokens only. The LM head is applied in chunks to the response positions, so neither the
  prompt's nor the response's full ``(T, V)`` logits are ever materialized.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from gndpo.core.logprobs import hidden_logprobs, token_entropy, token_logprobs
from gndpo.data.records import PromptRecord
from gndpo.data.templates import build_messages
from gndpo.models import tokenizer_of


def render_prompts(processor, records: Sequence[PromptRecord], *, suffix: str | None,
                   system_prompt: str | None) -> list[str]:
    """Chat-template text of each prompt, ending with the assistant turn's opening."""
    target = processor if getattr(processor, "chat_template", None) else tokenizer_of(processor)
    return [target.apply_chat_template(build_messages(r, suffix=suffix, system_prompt=system_prompt),
                                       tokenize=False, add_generation_prompt=True) for r in records]


def encode_prompts(processor, records: Sequence[PromptRecord], *, suffix: str | None,
                   system_prompt: str | None, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Left-padded model inputs for ``records``: input_ids/attention_mask ``(B, P)`` plus image tensors."""
    texts = render_prompts(processor, records, suffix=suffix, system_prompt=system_prompt)
    tok = tokenizer_of(processor)
    tok.padding_side = "left"
    if processor is tok:
        batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    else:
        images = [list(r.images) for r in records] if any(r.images for r in records) else None
        batch = processor(text=texts, images=images, return_tensors="pt", padding=True, add_special_tokens=False)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def encode_each(processor, records: Sequence[PromptRecord], *, suffix: str | None,
                system_prompt: str | None) -> list[dict[str, torch.Tensor]]:
    """Each record's prompt encoded on its own (batch of 1), for :func:`collate_prompts` to reuse.

    The processor (chat template, image resizing) then runs once per prompt and step, not once per sampled
    response and pass.
    """
    return [encode_prompts(processor, [r], suffix=suffix, system_prompt=system_prompt) for r in records]


def collate_prompts(encoded: Sequence[dict[str, torch.Tensor]], *, pad_id: int,
                    device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Left-padded batch from single-prompt encodings, equal to encoding the prompts together.

    Tensors aligned with the token sequence are left-padded (``input_ids`` with ``pad_id``, the rest with
    0); image tensors (pixel values, grids, sizes) are concatenated along their first dimension, which is
    how every Hugging Face VLM processor batches them.
    """
    P = max(e["input_ids"].shape[1] for e in encoded)
    out: dict[str, torch.Tensor] = {}
    for key, first in encoded[0].items():
        if not isinstance(first, torch.Tensor):
            out[key] = first
            continue
        seq_aligned = first.dim() >= 2 and first.shape[:2] == encoded[0]["input_ids"].shape
        if seq_aligned:
            fill = pad_id if key == "input_ids" else 0
            parts = [torch.nn.functional.pad(e[key], (P - e[key].shape[1], 0) if e[key].dim() == 2 else
                                             (0, 0) * (e[key].dim() - 2) + (P - e[key].shape[1], 0), value=fill)
                     for e in encoded]
        else:
            parts = [e[key] for e in encoded]
        out[key] = torch.cat(parts, 0).to(device)
    return out


def prompt_lengths(processor, records: Sequence[PromptRecord], *, suffix: str | None,
                   system_prompt: str | None, batch_size: int = 64) -> list[int]:
    """Token length of each rendered prompt (image tokens included)."""
    lengths: list[int] = []
    for i in range(0, len(records), batch_size):
        enc = encode_prompts(processor, records[i:i + batch_size], suffix=suffix, system_prompt=system_prompt)
        lengths.extend(int(n) for n in enc["attention_mask"].sum(-1))
    return lengths


def _uses_rope_index(base) -> bool:
    # Qwen-VL style multimodal RoPE computes its own 3-D positions from input_ids and attention_mask.
    return hasattr(base, "get_rope_index")


def response_logprobs(model, prompt_inputs: dict[str, Any], response_ids: torch.Tensor, response_mask: torch.Tensor,
                      *, temperature: float = 1.0, with_entropy: bool = False, chunk_size: int = 1024):
    """Log-probs ``(B, R)`` of ``response_ids`` given the prompts, and optionally token entropies ``(B, R)``.

    ``prompt_inputs`` are left-padded ``(B, P)``; responses are right-padded ``(B, R)``. Positions outside
    ``response_mask`` hold 0. Gradients flow when called under grad mode.
    """
    input_ids = torch.cat([prompt_inputs["input_ids"], response_ids], dim=1)  # (B, P+R)
    attention = torch.cat([prompt_inputs["attention_mask"], response_mask.to(prompt_inputs["attention_mask"].dtype)], 1)
    extra = {k: v for k, v in prompt_inputs.items() if k not in ("input_ids", "attention_mask")}
    P, R = prompt_inputs["input_ids"].shape[1], response_ids.shape[1]
    base = getattr(model, "model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    if not _uses_rope_index(base if base is not None else model):
        extra["position_ids"] = (attention.long().cumsum(-1) - 1).clamp(min=0)  # left padding aware
    if base is not None and head is not None and softcap is None and isinstance(head, torch.nn.Linear):
        hidden = base(input_ids=input_ids, attention_mask=attention, use_cache=False, **extra).last_hidden_state
        h = hidden[:, P - 1:P + R - 1]  # (B, R, H): the state that predicts each response token
        lp, ent = hidden_logprobs(h, head.weight, response_ids, bias=head.bias, temperature=temperature,
                                  chunk_size=chunk_size, with_entropy=with_entropy)
    else:  # generic path: logits of the response positions only
        logits = model(input_ids=input_ids, attention_mask=attention, use_cache=False, logits_to_keep=R + 1,
                       **extra).logits[:, :-1]  # (B, R, V)
        lp = token_logprobs(logits, response_ids, temperature=temperature)
        ent = token_entropy(logits.detach(), temperature=temperature) if with_entropy else None
    mask = response_mask.bool()
    lp = torch.where(mask, lp.float(), torch.zeros_like(lp, dtype=torch.float32))
    if ent is not None:
        ent = torch.where(mask, ent.float(), torch.zeros_like(ent, dtype=torch.float32))
    return lp, ent


def repeat_for_samples(records: Sequence[PromptRecord], prompt_index: torch.Tensor) -> list[PromptRecord]:
    """The prompt record of every sampled response."""
    return [records[int(i)] for i in prompt_index]


def rollout_logprobs(model, processor, rollouts, *, micro_batch_size: int, suffix: str | None,
                     system_prompt: str | None, temperature: float = 1.0, chunk_size: int = 1024,
                     encoded: Sequence[dict] | None = None) -> torch.Tensor:
    """Log-probs ``(B, R)`` (float32, CPU) of every sampled response under ``model``, in micro-batches.

    ``encoded``: :func:`encode_each` of ``rollouts.records`` with this processor, when the caller has it.
    Grad mode is the caller's: wrap in ``torch.no_grad()`` for scoring.
    """
    device = next(model.parameters()).device
    if encoded is None:
        encoded = encode_each(processor, rollouts.records, suffix=suffix, system_prompt=system_prompt)
    pad_id = pad_token_id(processor)
    out = torch.zeros(rollouts.response_ids.shape, dtype=torch.float32)  # (B, R)
    for start in range(0, rollouts.size, micro_batch_size):
        idx = torch.arange(start, min(start + micro_batch_size, rollouts.size))
        part = rollouts.select(idx)
        inputs = collate_prompts([encoded[int(i)] for i in part.prompt_index], pad_id=pad_id, device=device)
        lp, _ = response_logprobs(model, inputs, part.response_ids.to(device), part.response_mask.to(device),
                                  temperature=temperature, chunk_size=chunk_size)
        out[idx, :lp.shape[1]] = lp.float().cpu()
    return out


def pad_token_id(processor) -> int:
    tok = tokenizer_of(processor)
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
