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
                     system_prompt: str | None, temperature: float = 1.0, chunk_size: int = 1024) -> torch.Tensor:
    """Log-probs ``(B, R)`` (float32, CPU) of every sampled response under ``model``, in micro-batches.

    Grad mode is the caller's: wrap in ``torch.no_grad()`` for scoring.
    """
    device = next(model.parameters()).device
    out = torch.zeros(rollouts.response_ids.shape, dtype=torch.float32)  # (B, R)
    for start in range(0, rollouts.size, micro_batch_size):
        idx = torch.arange(start, min(start + micro_batch_size, rollouts.size))
        part = rollouts.select(idx)
        inputs = encode_prompts(processor, repeat_for_samples(part.records, part.prompt_index), suffix=suffix,
                                system_prompt=system_prompt, device=device)
        lp, _ = response_logprobs(model, inputs, part.response_ids.to(device), part.response_mask.to(device),
                                  temperature=temperature, chunk_size=chunk_size)
        out[idx, :lp.shape[1]] = lp.float().cpu()
    return out
