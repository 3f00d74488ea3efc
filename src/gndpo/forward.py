"""Model-facing glue shared by the sampler, the student and the teacher.

- :func:`encode_prompts`: records -> left-padded prompt tensors (chat template, images via the processor).
- :func:`response_logprobs`: one forward over prompt + response, returning the log-probs (and entropy) of
  the response tokens only. The LM head is applied in chunks to the response positions, so neither the
  prompt's nor the response's full ``(T, V)`` logits are ever materialized.
"""
from __future__ import annotations

import contextlib

import inspect
from typing import Any, Sequence

import torch

from gndpo.core.logprobs import TokenStats, hidden_token_stats, token_entropy, token_logprobs
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
    how every Hugging Face VLM processor batches them. A prompt without images has no image tensors: the
    batch holds those of the prompts that have them, in prompt order, as the model consumes them.
    """
    P = max(e["input_ids"].shape[1] for e in encoded)
    keys = list(dict.fromkeys(k for e in encoded for k in e))  # union, first-seen order
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        present = [e for e in encoded if key in e]
        first = present[0][key]
        if not isinstance(first, torch.Tensor):
            out[key] = first
            continue
        seq_aligned = first.dim() >= 2 and first.shape[:2] == present[0]["input_ids"].shape
        if seq_aligned:
            fill = pad_id if key == "input_ids" else 0
            parts = []
            for e in encoded:
                x = e[key] if key in e else torch.zeros_like(e["input_ids"], dtype=first.dtype)
                pad = (P - x.shape[1], 0) if x.dim() == 2 else (0, 0) * (x.dim() - 2) + (P - x.shape[1], 0)
                parts.append(torch.nn.functional.pad(x, pad, value=fill))
        else:
            parts = [e[key] for e in present]
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


def cache_kwarg(module) -> str:
    """Name of ``module.forward``'s KV-cache argument: ``cache`` since transformers 5.24, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def returned_cache(out):
    """The KV cache of a model output, under either name (renamed in transformers 5.24)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def uses_rope_index(base) -> bool:
    # Qwen-VL style multimodal RoPE: positions come from the model's get_rope_index (one row per axis).
    return hasattr(base, "get_rope_index")


def rope_base(model):
    """The module holding ``get_rope_index`` (the inner model of Qwen-VL), or None for 1-D positions."""
    for candidate in (getattr(model, "model", None), model):
        if candidate is not None and uses_rope_index(candidate):
            return candidate
    return None


def prompt_positions(model, prompt_inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Position ids of left-padded prompts and the position of the first token after each.

    Returns ``(positions, next_position)``: ``(U, P)`` and ``(U,)`` for the usual 1-D RoPE, where positions
    count the real tokens (``cumsum(mask) - 1``); ``(K, U, P)`` and ``(U,)`` for multimodal RoPE (Qwen-VL:
    K = 3 axes), from the model's ``get_rope_index``. Text after the prompt advances every axis by one per
    token from ``next_position``, which is how those models continue a sequence: a response's positions are
    ``next_position + arange(R)`` on every axis (:func:`continue_positions`).
    """
    attn = prompt_inputs["attention_mask"]
    base = rope_base(model)
    if base is None:
        return (attn.long().cumsum(-1) - 1).clamp(min=0), attn.long().sum(-1)
    ids = prompt_inputs["input_ids"]
    types = prompt_inputs.get("mm_token_type_ids")
    if types is None:  # no multimodal tokens (a tokenizer-only prompt): text positions on every axis
        flat = (attn.long().cumsum(-1) - 1).clamp(min=0)
        return flat[None].expand(3, -1, -1), attn.long().sum(-1)
    positions, delta = base.get_rope_index(ids, mm_token_type_ids=types,
                                           image_grid_thw=prompt_inputs.get("image_grid_thw"),
                                           video_grid_thw=prompt_inputs.get("video_grid_thw"),
                                           attention_mask=attn)
    # delta = (largest position + 1) - (real tokens), so the next text position is real tokens + delta
    return positions, attn.long().sum(-1) + delta.reshape(-1).to(attn.device)


def continue_positions(prompt_pos: torch.Tensor, next_pos: torch.Tensor, length: int) -> torch.Tensor:
    """Positions ``(B, length)`` (or ``(K, B, length)`` when ``prompt_pos`` is multimodal) of text that
    follows prompts whose next position is ``next_pos`` ``(B,)``."""
    pos = next_pos[:, None] + torch.arange(length, device=next_pos.device)  # (B, L)
    return pos[None].expand(prompt_pos.shape[0], -1, -1) if prompt_pos.dim() == 3 else pos


def _seq_aligned_extra(prompt_inputs: dict[str, Any], rows: torch.Tensor | None = None, pad: int = 0) -> dict:
    """Model inputs beyond ids and mask; token-aligned ones (e.g. Qwen-VL's ``mm_token_type_ids``) are
    selected by ``rows`` and right-extended by ``pad`` text positions, since the response is text."""
    shape = prompt_inputs["input_ids"].shape
    out = {}
    for key, value in prompt_inputs.items():
        if key in ("input_ids", "attention_mask"):
            continue
        if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape == shape:
            value = value if rows is None else value[rows]
            value = torch.nn.functional.pad(value, (0, pad)) if pad else value
        out[key] = value
    return out


def _head(model):
    """``(base model, LM head)`` when the head is a plain linear layer on the base's last hidden state."""
    base = getattr(model, "model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    if base is None or softcap is not None or not isinstance(head, torch.nn.Linear):
        return None, None
    return base, head


def shares_prefixes(model) -> bool:
    """Whether :func:`response_logprobs` can run each prompt once for all its samples (KV cache reuse)."""
    base, _ = _head(model)
    checkpointing = getattr(model, "is_activation_checkpointing", None)
    if checkpointing is None:  # transformers < 5.24
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    return base is not None and not checkpointing


class ResponseScorer(torch.nn.Module):
    """The module every scoring pass (old log-probs, teacher, update) enters: its forward is
    :func:`response_logprobs` on the wrapped Hugging Face model.

    gndpo's paths call the inner model and the LM head's weight directly (chunked log-probs, shared prefixes),
    which bypasses the HF model's own forward. Under FSDP2 this wrapper is the root that ``fully_shard`` wraps
    (:func:`gndpo.dist.apply_fsdp`): entering it gathers the parameters outside the per-layer units (embeddings,
    final norm, LM head, projector) and its backward reduces their gradients.

    ``autocast``: mixed precision in one process (float32 weights, ``model.compute_dtype=bfloat16``): every pass
    through the scorer, and every sampling pass inside :meth:`compute`, runs under ``torch.autocast`` in that
    dtype. Under FSDP2 it stays None: the MixedPrecisionPolicy gathers the weights in the compute dtype instead.
    """

    def __init__(self, model, *, autocast: torch.dtype | None = None):
        super().__init__()
        self.model = model
        self.autocast = autocast

    def compute(self):
        """The context every pass of the student runs in: autocast to the compute dtype, or nothing."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(next(self.model.parameters()).device.type, dtype=self.autocast)

    def forward(self, *args, **kwargs) -> TokenStats:
        with self.compute():
            return _response_stats(self.model, *args, **kwargs)


def hf_model(model):
    """The Hugging Face model inside a :class:`ResponseScorer` (or ``model`` itself)."""
    return model.model if isinstance(model, ResponseScorer) else model


def response_logprobs(model, prompt_inputs: dict[str, Any], response_ids: torch.Tensor, response_mask: torch.Tensor,
                      *, prompt_index: torch.Tensor | None = None, temperature: float = 1.0,
                      with_entropy: bool = False, chunk_size: int = 1024):
    """Log-probs ``(B, R)`` of ``response_ids`` given the prompts, and optionally token entropies ``(B, R)``.

    ``model``: a Hugging Face model or a :class:`ResponseScorer` (entered through its forward).
    ``prompt_inputs`` are left-padded ``(U, P)``; responses are right-padded ``(B, R)``; response ``b``
    answers prompt ``prompt_index[b]`` (default: ``U == B``, row b). With ``U < B`` (only when
    :func:`shares_prefixes`), each prompt runs once and its KV cache serves all its samples. Positions outside
    ``response_mask`` hold 0. Gradients flow when called under grad mode.
    """
    stats = response_stats(model, prompt_inputs, response_ids, response_mask, prompt_index=prompt_index,
                           temperature=temperature, with_entropy=with_entropy, chunk_size=chunk_size)
    return stats.logprobs, stats.entropy


def response_stats(model, prompt_inputs: dict[str, Any], response_ids: torch.Tensor, response_mask: torch.Tensor,
                   *, prompt_index: torch.Tensor | None = None, temperature: float = 1.0, with_entropy: bool = False,
                   chunk_size: int = 1024, gather: torch.Tensor | None = None, topk: int = 0) -> TokenStats:
    """:func:`response_logprobs` with everything :class:`gndpo.core.logprobs.TokenStats` holds: ``gather`` (B, R, K)
    ids scored at each position with the tail's log-mass (a teacher's top-k, under the student), and the model's
    own ``topk`` tokens (a teacher's). All (B, R, ...) and 0 outside ``response_mask``."""
    kwargs = dict(prompt_index=prompt_index, temperature=temperature, with_entropy=with_entropy,
                  chunk_size=chunk_size, gather=gather, topk=topk)
    if isinstance(model, ResponseScorer):
        return model(prompt_inputs, response_ids, response_mask, **kwargs)
    return _response_stats(model, prompt_inputs, response_ids, response_mask, **kwargs)


def _response_stats(model, prompt_inputs, response_ids, response_mask, *, prompt_index, temperature,
                    with_entropy, chunk_size, gather=None, topk=0) -> TokenStats:
    B, R = response_ids.shape
    rows = torch.arange(B, device=response_ids.device) if prompt_index is None else prompt_index
    base, head = _head(model)
    if base is not None and shares_prefixes(model) and prompt_inputs["input_ids"].shape[0] < B:
        positions = prompt_positions(model, prompt_inputs)
        if _packable(model, prompt_inputs, rows, R):
            h = _packed_prefix_hidden(base, prompt_inputs, rows, response_ids, positions)
        else:
            h = _shared_prefix_hidden(base, prompt_inputs, rows, response_ids, response_mask, positions)
    elif prompt_inputs["input_ids"].shape[0] != B:
        raise ValueError("prompt_inputs must hold one row per response unless the model shares prefixes")
    elif base is not None:
        P = prompt_inputs["input_ids"].shape[1]
        input_ids, attention, extra = _joint_inputs(model, prompt_inputs, response_ids, response_mask)
        hidden = base(input_ids=input_ids, attention_mask=attention, use_cache=False, **extra).last_hidden_state
        h = hidden[:, P - 1:P + R - 1]  # (B, R, H): the state that predicts each response token
    else:  # generic path: logits of the response positions only
        input_ids, attention, extra = _joint_inputs(model, prompt_inputs, response_ids, response_mask)
        logits = model(input_ids=input_ids, attention_mask=attention, use_cache=False, logits_to_keep=R + 1,
                       **extra).logits[:, :-1]  # (B, R, V)
        stats = _logits_stats(logits, response_ids, temperature=temperature, with_entropy=with_entropy,
                              gather=gather, topk=topk)
        return _masked_stats(stats, response_mask)
    stats = hidden_token_stats(h, head.weight, response_ids, bias=head.bias, temperature=temperature,
                               chunk_size=chunk_size, with_entropy=with_entropy, gather=gather, topk=topk)
    return _masked_stats(stats, response_mask)


def _logits_stats(logits, ids, *, temperature, with_entropy, gather, topk) -> TokenStats:
    """TokenStats from full logits (B, R, V): the generic path of models gndpo cannot split before the head."""
    lp = token_logprobs(logits, ids, temperature=temperature)
    ent = token_entropy(logits.detach(), temperature=temperature) if with_entropy else None
    gathered = rest = top_lp = top_ids = None
    if gather is not None or topk:
        logp = torch.log_softmax(logits.float() / temperature, -1)  # (B, R, V)
        if gather is not None:
            gathered = logp.gather(-1, gather)  # (B, R, K)
            rest = torch.logsumexp(logp.scatter(-1, gather, float("-inf")), -1)  # (B, R)
        if topk:
            top_lp, top_ids = logp.detach().topk(topk, dim=-1)  # (B, R, k)
    return TokenStats(lp, ent, gathered, rest, top_lp, top_ids)


def _masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.bool().view(*mask.shape, *([1] * (x.dim() - mask.dim())))
    return torch.where(mask, x if not x.is_floating_point() else x.float(), torch.zeros((), dtype=x.dtype
                       if not x.is_floating_point() else torch.float32, device=x.device))


def _masked_stats(stats: TokenStats, mask: torch.Tensor) -> TokenStats:
    return TokenStats(*(None if x is None else _masked(x, mask) for x in (
        stats.logprobs, stats.entropy, stats.gathered, stats.rest, stats.topk_logprobs, stats.topk_ids)))


def _joint_inputs(model, prompt_inputs, response_ids, response_mask):
    """Prompt + response as one left/right-padded sequence ``(B, P+R)`` with left-padding-aware positions
    (multimodal ones for Qwen-VL, continuing each prompt's)."""
    R = response_ids.shape[1]
    input_ids = torch.cat([prompt_inputs["input_ids"], response_ids], dim=1)  # (B, P+R)
    attention = torch.cat([prompt_inputs["attention_mask"], response_mask.to(prompt_inputs["attention_mask"].dtype)], 1)
    extra = _seq_aligned_extra(prompt_inputs, pad=R)
    pos_p, next_p = prompt_positions(model, prompt_inputs)
    extra["position_ids"] = torch.cat([pos_p, continue_positions(pos_p, next_p, R)], -1)  # (B, P+R) or (K, B, P+R)
    return input_ids, attention, extra


def _shared_prefix_hidden(base, prompt_inputs, rows, response_ids, response_mask, positions) -> torch.Tensor:
    """Hidden states ``(B, R, H)`` predicting each response token, running each of the U prompts once."""
    attn_p = prompt_inputs["attention_mask"]  # (U, P)
    extra = _seq_aligned_extra(prompt_inputs)
    pos_p, next_p = positions
    out_p = base(input_ids=prompt_inputs["input_ids"], attention_mask=attn_p, position_ids=pos_p, use_cache=True,
                 **extra)
    cache = returned_cache(out_p)
    cache.batch_select_indices(rows)  # (U, ...) -> (B, ...): each sample reads its prompt's keys/values
    R = response_ids.shape[1]
    attention = torch.cat([attn_p[rows], response_mask.to(attn_p.dtype)], 1)  # (B, P+R)
    pos_r = continue_positions(pos_p, next_p[rows], R)  # (B, R) or (K, B, R)
    out_r = base(input_ids=response_ids, attention_mask=attention, position_ids=pos_r, use_cache=True,
                 **{cache_kwarg(base): cache})
    # the prompt's last state predicts the first response token; response states predict the rest
    return torch.cat([out_p.last_hidden_state[rows, -1:], out_r.last_hidden_state[:, :-1]], 1)


# Longest row of the packed shared-prefix path (one prompt followed by all its samples). Attention in a packed
# row is quadratic in its length, so long responses take the KV-cache path instead.
PACK_TOKENS = 1024


def _packable(model, prompt_inputs, rows: torch.Tensor, R: int) -> bool:
    """Whether every prompt and its samples fit one row of at most PACK_TOKENS tokens, and the model takes a
    custom 4-D additive mask (eager or SDPA attention, no sliding-window layers)."""
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", None) or config
    if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager") or \
            getattr(text, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        return False
    if getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True):
        return False
    if any(t != "full_attention" for t in getattr(text, "layer_types", None) or ()):
        return False
    counts = torch.bincount(rows, minlength=prompt_inputs["input_ids"].shape[0])
    return prompt_inputs["input_ids"].shape[1] + int(counts.max()) * R <= PACK_TOKENS


def _packed_prefix_hidden(base, prompt_inputs, rows, response_ids, positions) -> torch.Tensor:
    """Hidden states ``(B, R, H)`` predicting each response token, from one forward over ``U`` rows that each
    hold a (left-padded) prompt followed by all its samples ``[prompt | response 1 | response 2 | ...]``.

    A 4-D mask lets every response token see the prompt and the earlier tokens of its own response only, and
    each response's positions continue from its prompt's, so every state equals the one of a separate
    prompt + response sequence. Bigger matrix products and one model call instead of two make this faster
    than the KV-cache path when rows are short.
    """
    ids_p, attn_p = prompt_inputs["input_ids"], prompt_inputs["attention_mask"]  # (U, P)
    U, P = ids_p.shape
    B, R = response_ids.shape
    device = ids_p.device
    # slot of each response within its prompt's row, in order of appearance
    order = torch.argsort(rows, stable=True)
    slot = torch.empty_like(rows)
    first = torch.searchsorted(rows[order], torch.arange(U, device=device))
    slot[order] = torch.arange(B, device=device) - first[rows[order]]
    slots = int(slot.max()) + 1  # samples of the most-sampled prompt
    L = P + slots * R
    ids = ids_p.new_full((U, L), 0)
    ids[:, :P] = ids_p
    starts = P + slot * R  # (B,) where each response begins in its row
    cols = starts[:, None] + torch.arange(R, device=device)  # (B, R)
    ids[rows[:, None], cols] = response_ids
    segment = torch.full((U, L), -1, dtype=torch.long, device=device)  # -1 empty, 0 prompt, s + 1 response
    segment[:, :P] = torch.where(attn_p.bool(), 0, -1)
    segment[rows[:, None], cols] = (slot + 1)[:, None]
    pos_p, next_p = positions  # (U, P) or (K, U, P) for multimodal RoPE
    position = pos_p.new_zeros(*pos_p.shape[:-1], L)  # (U, L) or (K, U, L)
    position[..., :P] = pos_p
    position[..., rows[:, None], cols] = continue_positions(pos_p, next_p[rows], R)
    index = torch.arange(L, device=device)
    seg_q, seg_k = segment[:, :, None], segment[:, None, :]  # (U, L, 1), (U, 1, L)
    allowed = (index[:, None] >= index[None, :]) & (seg_k >= 0) & ((seg_k == 0) | (seg_k == seg_q))
    allowed |= torch.eye(L, dtype=torch.bool, device=device)  # empty slots attend to themselves (no NaN rows)
    dtype = next(base.parameters()).dtype
    mask = torch.zeros(U, 1, L, L, dtype=dtype, device=device).masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    extra = _seq_aligned_extra(prompt_inputs, pad=L - P)
    hidden = base(input_ids=ids, attention_mask=mask, position_ids=position, use_cache=False,
                  **extra).last_hidden_state  # (U, L, H)
    # the prompt's last state predicts a response's first token; its own states predict the rest
    src = torch.cat([torch.full((B, 1), P - 1, device=device, dtype=torch.long), cols[:, :-1]], 1)  # (B, R)
    return hidden[rows[:, None], src]


def micro_batch_inputs(model, encoded: Sequence[dict], prompt_index: torch.Tensor, *, pad_id: int,
                       device) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Prompt inputs for a micro-batch of responses: unique prompts + row map when prefixes are shared."""
    if shares_prefixes(hf_model(model)):
        unique, rows = torch.unique(prompt_index, return_inverse=True)
        if len(unique) < len(prompt_index):
            return collate_prompts([encoded[int(u)] for u in unique], pad_id=pad_id, device=device), rows.to(device)
    return collate_prompts([encoded[int(i)] for i in prompt_index], pad_id=pad_id, device=device), None


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
    return rollout_stats(model, processor, rollouts, micro_batch_size=micro_batch_size, suffix=suffix,
                         system_prompt=system_prompt, temperature=temperature, chunk_size=chunk_size,
                         encoded=encoded).logprobs


def rollout_stats(model, processor, rollouts, *, micro_batch_size: int, suffix: str | None,
                  system_prompt: str | None, temperature: float = 1.0, chunk_size: int = 1024,
                  encoded: Sequence[dict] | None = None, gather: torch.Tensor | None = None,
                  topk: int = 0) -> TokenStats:
    """:func:`rollout_logprobs` with the :class:`TokenStats` a top-k divergence needs (on the CPU, (B, R, ...)):
    ``gather`` (B, R, K) ids scored with their tail, the model's own ``topk``. The log-probs carry the graph when
    grad is enabled (as :func:`rollout_logprobs` documents); the top-k statistics are detached."""
    device = next(model.parameters()).device
    if encoded is None:
        encoded = encode_each(processor, rollouts.records, suffix=suffix, system_prompt=system_prompt)
    pad_id = pad_token_id(processor)
    B, R = rollouts.response_ids.shape
    lp = torch.zeros(B, R, dtype=torch.float32)  # (B, R)
    gathered = None if gather is None else torch.zeros(B, R, gather.shape[-1], dtype=torch.float32)  # (B, R, K)
    rest = None if gather is None else torch.zeros(B, R, dtype=torch.float32)  # (B, R)
    top_lp = torch.zeros(B, R, topk, dtype=torch.float32) if topk else None  # (B, R, k)
    top_ids = torch.zeros(B, R, topk, dtype=torch.long) if topk else None  # (B, R, k)
    for start in range(0, rollouts.size, micro_batch_size):
        idx = torch.arange(start, min(start + micro_batch_size, rollouts.size))
        part = rollouts.select(idx)
        inputs, rows = micro_batch_inputs(model, encoded, part.prompt_index, pad_id=pad_id, device=device)
        L = part.response_ids.shape[1]
        stats = response_stats(model, inputs, part.response_ids.to(device), part.response_mask.to(device),
                               prompt_index=rows, temperature=temperature, chunk_size=chunk_size, topk=topk,
                               gather=None if gather is None else gather[idx, :L].to(device))
        lp[idx, :L] = stats.logprobs.float().cpu()
        for out, x in ((gathered, stats.gathered), (rest, stats.rest), (top_lp, stats.topk_logprobs),
                       (top_ids, stats.topk_ids)):
            if out is not None:
                out[idx, :L] = x.detach().cpu().to(out.dtype)
    return TokenStats(lp, None, gathered, rest, top_lp, top_ids)


def pad_token_id(processor) -> int:
    tok = tokenizer_of(processor)
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
