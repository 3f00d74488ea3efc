"""Greedy benchmark evaluation: batched, left-padded ``generate`` and a per-response reward.

The paper evaluates with temperature 0.6 / top-p 0.95 (arXiv 2606.09091, Table 3); this module is the
deterministic greedy variant, used by the lab to measure checkpoints and by tests.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from gndpo.data.records import PromptRecord
from gndpo.data.templates import PAPER_SUFFIX, build_messages
from gndpo.rewards.math import format_reward, math_reward

def _as_list(x) -> list[int]:
    if x is None:
        return []
    return [int(i) for i in x] if isinstance(x, (list, tuple)) else [int(x)]


def suppressed_token_ids(model, processor) -> list[int]:
    """Token ids generation must never emit: multimodal placeholders and padding (unless padding is an EOS)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    eos = set(_as_list(model.generation_config.eos_token_id)) | set(_as_list(tokenizer.eos_token_id))
    ids = set()
    for name in ("image_token_id", "video_token_id"):
        for owner in (processor, tokenizer, model.config):
            ids.update(_as_list(getattr(owner, name, None)))
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id not in eos:
        ids.add(tokenizer.pad_token_id)
    return sorted(ids - eos)


def encode_prompts(processor, records: Sequence[PromptRecord], *, suffix: str | None, system_prompt: str | None):
    """Chat-templated, left-padded model inputs (input_ids, attention_mask, pixel_values when there are images)."""
    texts = [
        processor.apply_chat_template(
            build_messages(r, suffix=suffix, system_prompt=system_prompt), add_generation_prompt=True, tokenize=False
        )
        for r in records
    ]
    images = [image for r in records for image in r.images]
    kwargs = dict(padding=True, padding_side="left", add_special_tokens=False, return_tensors="pt")
    if images:
        if not hasattr(processor, "image_processor"):
            raise ValueError("records carry images but the processor is a text-only tokenizer")
        return processor(text=texts, images=images, **kwargs)
    if hasattr(processor, "image_processor"):
        return processor(text=texts, **kwargs)
    return processor(texts, **kwargs)


@torch.inference_mode()
def greedy_accuracy(
    model,
    processor,
    records: Sequence[PromptRecord],
    *,
    batch_size: int = 64,
    max_new_tokens: int = 1024,
    suffix: str | None = PAPER_SUFFIX,
    system_prompt: str | None = None,
    reward: Callable[[str, str], float] = math_reward,
    progress: bool = True,
) -> dict:
    """Greedy-decode every record and score it with ``reward(response_text, record.answer)``.

    Returns ``accuracy`` (mean reward), ``format_rate`` (``<think>...</think>`` then a ``\\boxed{}``), ``mean_response_length``
    (generated tokens, EOS included), ``truncated_rate`` (no EOS within ``max_new_tokens``), ``n``, and the
    per-item lists ``correct``, ``rewards`` and ``responses`` (generated part only, special tokens skipped).
    ``processor`` may be a multimodal processor or a plain tokenizer.
    """
    tokenizer = getattr(processor, "tokenizer", processor)
    eos_ids = sorted(set(_as_list(model.generation_config.eos_token_id)) | set(_as_list(tokenizer.eos_token_id)))
    if not eos_ids:
        raise ValueError("neither the model's generation config nor the tokenizer names an EOS token")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    suppress = suppressed_token_ids(model, processor)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()

    rewards: list[float] = []
    responses: list[str] = []
    lengths: list[int] = []
    truncated: list[bool] = []
    batches = range(0, len(records), batch_size)
    for start in tqdm(batches, desc="eval", unit="batch", disable=not progress, leave=False):
        batch = records[start:start + batch_size]
        inputs = encode_prompts(processor, batch, suffix=suffix, system_prompt=system_prompt).to(device)
        out_BT = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_ids, pad_token_id=pad_id,
            suppress_tokens=suppress or None,
        )
        new_BT = out_BT[:, inputs["input_ids"].shape[1]:].cpu()
        for row, record in zip(new_BT.tolist(), batch):
            end = next((i + 1 for i, t in enumerate(row) if t in eos_ids), None)
            truncated.append(end is None)
            tokens = row[:end] if end is not None else row
            lengths.append(len(tokens))
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            responses.append(text)
            rewards.append(float(reward(text, record.answer)))
    if was_training:
        model.train()

    n = len(records)
    return {
        "accuracy": sum(rewards) / max(n, 1),
        "format_rate": sum(map(format_reward, responses)) / max(n, 1),
        "mean_response_length": sum(lengths) / max(n, 1),
        "truncated_rate": sum(truncated) / max(n, 1),
        "n": n,
        "correct": [r >= 1.0 for r in rewards],
        "rewards": rewards,
        "responses": responses,
    }
