"""gndpo's own KV-cache decode loop for Hugging Face causal LMs and VLMs.

Compared with ``transformers.generate`` for the same sampling distribution:

- each prompt is prefilled once and its KV cache is shared by its ``n`` samples (``generate`` prefills
  every sample's copy of the prompt);
- a token is drawn by inverse-CDF sampling (one uniform and a binary search per row, the CDF summed in
  float64) instead of ``torch.multinomial``, which on CPU costs ~9x more at a 152k vocabulary;
- rows that have emitted EOS leave the batch (``generate`` keeps computing them to the end);
- no per-step logits-processor, stopping-criteria or streaming machinery.

The distribution is the one the trainer scores: ``softmax(logits / T)`` restricted by top-k then top-p,
with the placeholder/padding tokens suppressed. Greedy decoding takes the argmax, as ``generate`` does.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Sequence

import torch

from gndpo.forward import cache_kwarg, continue_positions, prompt_positions, returned_cache
from gndpo.rollout.base import SamplingParams

# Spare KV-cache positions reserved after the prompt; the room doubles whenever it runs out.
INITIAL_ROOM = 256
# Inputs a decode step can go without: the prompt's images are in the KV cache, and the positions they shape
# (Qwen-VL's multimodal RoPE, from the token types and image grids) are computed once at prefill.
_PREFILL_ONLY = ("pixel_values", "image_sizes", "image_grid_thw", "pixel_attention_mask", "image_attention_mask",
                 "mm_token_type_ids")


def supports_decode_loop(model, prompt_inputs: dict[str, Any] | None = None) -> bool:
    """Whether :func:`decode` can drive ``model``: a decoder-only model that takes explicit positions
    (1-D, or Qwen-VL's multimodal ones from its ``get_rope_index``) and a KV cache, and whose inputs beyond
    ids and mask are only consumed at prefill (images and what places them)."""
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return False
    params = inspect.signature(model.forward).parameters
    if "position_ids" not in params or not ({"cache", "past_key_values"} & set(params)):
        return False
    extra = set(prompt_inputs or ()) - {"input_ids", "attention_mask"}
    return extra <= set(_PREFILL_ONLY)


def filter_logits(logits: torch.Tensor, sampling: SamplingParams, suppress: Sequence[int] = ()) -> torch.Tensor:
    """``(B, V)`` float32 logits of the sampling distribution: suppressed ids, temperature, top-k, top-p.

    Removed tokens hold ``-inf``. Top-k keeps every token tied with the k-th; top-p keeps the smallest set of
    most likely tokens whose mass reaches ``top_p`` (always at least one), as transformers' warpers do.
    """
    logits = logits.float()
    if suppress:
        logits = logits.index_fill(-1, torch.as_tensor(list(suppress), device=logits.device), float("-inf"))
    if sampling.greedy:
        return logits
    if sampling.temperature != 1.0:
        logits = logits / sampling.temperature
    if 0 < sampling.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # mass of the strictly more likely tokens
        drop_sorted = mass_before >= sampling.top_p
        drop_sorted[:, 0] = False
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return logits


def _int64(x: int) -> int:
    """``x`` modulo 2^64 as a signed 64-bit value (torch's int64 products wrap the same way)."""
    return (x + 2**63) % 2**64 - 2**63


_GAMMA = 0x9E3779B97F4A7C15  # splitmix64's constants
_MIX1 = _int64(0xBF58476D1CE4E5B9)
_MIX2 = _int64(0x94D049BB133111EB)


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    return (x >> k) & ((1 << (64 - k)) - 1)  # logical shift of an int64


def keyed_uniforms(keys: torch.Tensor, step: int) -> torch.Tensor:
    """Uniforms in [0, 1) ``(B,)`` float64, one per row, a function of the row's 63-bit key ``(B,)`` int64 and the
    token index alone: splitmix64 (Steele et al. 2014) of ``key + (step + 1) * gamma``. So a sample's tokens do
    not depend on which other rows share its batch, as vLLM's per-request seeds do not."""
    z = keys + _int64((step + 1) * _GAMMA)
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    z = z ^ _shr(z, 31)
    return _shr(z, 11).double() * 2.0**-53


def sample_tokens(logits: torch.Tensor, *, greedy: bool = False, generator: torch.Generator | None = None,
                  uniforms: torch.Tensor | None = None) -> torch.Tensor:
    """One token id per row ``(B,)`` from ``softmax(logits)`` (already filtered), or the argmax when greedy.

    Inverse-CDF: the CDF is accumulated in float64, so a token's chance of being drawn equals its float32
    probability to ~1e-16 even at a 152k vocabulary; a token of probability zero is never drawn. ``uniforms``
    ``(B,)``: the draws to use (:func:`keyed_uniforms`); else drawn from ``generator`` (torch's global one).
    """
    if greedy:
        return logits.argmax(-1)
    cdf = logits.softmax(-1).double().cumsum_(-1)  # (B, V)
    if uniforms is None:
        uniforms = torch.rand(cdf.shape[0], dtype=torch.float64, device=cdf.device, generator=generator)
    u = uniforms.to(cdf.device, torch.float64)[:, None] * cdf[:, -1:]
    # right=True: the first token whose CDF exceeds u, so zero-probability tokens (flat CDF) are skipped.
    idx = torch.searchsorted(cdf, u, right=True).squeeze(1)
    # u < cdf[-1] always, barring a rounding tie at the very top: fall back to the most likely token there.
    overflow = idx >= cdf.shape[-1]
    if bool(overflow.any()):
        idx = torch.where(overflow, logits.argmax(-1), idx)
    return idx


@functools.cache
def _reserved_layer_class():
    from transformers.cache_utils import DynamicLayer

    class ReservedLayer(DynamicLayer):
        """A DynamicLayer whose keys/values live in a buffer with spare room: a step writes one position
        instead of concatenating onto a fresh copy of the whole cache. The room doubles when full (up to
        ``limit`` positions), so memory stays within 2x of what is held and copies are amortized O(1)."""

        def setup(self, keys, values, limit: int, room: int | None = None) -> None:
            room = INITIAL_ROOM if room is None else room
            self.limit, self.length = limit, 0
            self.key_buf = self.value_buf = None
            self._grow(keys.shape[0], keys.shape[1], keys.shape[-1], values.shape[-1], keys,
                       min(limit, keys.shape[-2] + room))
            self.update(keys, values)

        def _grow(self, batch, heads, dk, dv, like, capacity) -> None:
            key_buf = like.new_empty(batch, heads, capacity, dk)
            value_buf = like.new_empty(batch, heads, capacity, dv)
            if self.key_buf is not None:
                key_buf[:, :, :self.length] = self.keys
                value_buf[:, :, :self.length] = self.values
            self.key_buf, self.value_buf = key_buf, value_buf

        def update(self, key_states, value_states, *args, **kwargs):
            end = self.length + key_states.shape[-2]
            if end > self.key_buf.shape[2]:
                b, h, _, dk = self.key_buf.shape
                self._grow(b, h, dk, self.value_buf.shape[-1], self.key_buf,
                           max(end, min(self.limit, 2 * self.key_buf.shape[2])))
            self.key_buf[:, :, self.length:end] = key_states
            self.value_buf[:, :, self.length:end] = value_states
            self.length = end
            self.keys, self.values = self.key_buf[:, :, :end], self.value_buf[:, :, :end]
            return self.keys, self.values

        def batch_select_indices(self, indices):
            room = self.key_buf.shape[2] - self.length
            keys, values = self.keys[indices], self.values[indices]
            self.key_buf = self.value_buf = None
            self.setup(keys, values, self.limit, room=room)

    return ReservedLayer


def _reserve(cache, rows: torch.Tensor, limit: int):
    """Expand ``cache`` to the batch rows ``rows`` (B,) and, when every layer is a plain dynamic layer, turn
    each into a ReservedLayer holding at most ``limit`` positions. Caches with other layer kinds
    (sliding-window, linear-attention) are only expanded."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if not layers or not all(type(x) is DynamicLayer and x.is_initialized and x.keys.dim() == 4 for x in layers):
        if not torch.equal(rows, torch.arange(rows.numel(), device=rows.device)):
            cache.batch_select_indices(rows)
        return cache
    cls = _reserved_layer_class()
    for i, layer in enumerate(layers):
        new = cls()
        new.__dict__.update(layer.__dict__)
        new.setup(layer.keys[rows], layer.values[rows], limit)
        layers[i] = new
    return cache


def decode(model, prompt_inputs: dict[str, Any], sampling: SamplingParams, *, eos_ids: Sequence[int],
           pad_id: int, suppress: Sequence[int] = (), generator: torch.Generator | None = None,
           keys: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``sampling.n`` responses for each of the ``U`` left-padded prompts in ``prompt_inputs``.

    Returns ids ``(U * n, R)``, prompt-major (the samples of prompt 0 first), ``R <= max_new_tokens``: each
    row holds its tokens up to and including its first EOS, then ``pad_id``; and the float32 log-prob
    ``(U * n, R)`` of each token under ``softmax(logits / temperature)`` (the distribution the trainer
    scores, before top-k/top-p), 0 after EOS. Both on CPU. The model runs in the caller's mode (use eval()).
    ``keys`` ``(U * n,)`` int64: one key per sample row, which alone decides its draws (:func:`keyed_uniforms`);
    None: ``generator``.
    """
    with torch.inference_mode():  # lighter than no_grad for the many small ops of a decode step
        ids, logprobs = _decode(model, prompt_inputs, sampling, eos_ids=eos_ids, pad_id=pad_id, suppress=suppress,
                                generator=generator, keys=keys)
    return ids.clone(), logprobs.clone()  # normal tensors: the trainer embeds the ids under autograd


def _decode(model, prompt_inputs, sampling, *, eos_ids, pad_id, suppress, generator, keys):
    ids_p, mask_p = prompt_inputs["input_ids"], prompt_inputs["attention_mask"]  # (U, P)
    extra = {k: v for k, v in prompt_inputs.items() if k not in ("input_ids", "attention_mask")}
    U, P = ids_p.shape
    n, R = max(sampling.n, 1), sampling.max_new_tokens
    device = ids_p.device
    keep_last = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    cache_kw = cache_kwarg(model)

    pos_p, next_p = prompt_positions(model, prompt_inputs)  # (U, P) or (K, U, P); (U,)
    out = model(input_ids=ids_p, attention_mask=mask_p, position_ids=pos_p, use_cache=True, **keep_last, **extra)
    cache = returned_cache(out)
    rows = torch.arange(U, device=device).repeat_interleave(n)  # (B,) prompt of each sample
    cache = _reserve(cache, rows, P + R)
    logits = out.logits[:, -1][rows]  # (B, V)
    B = U * n
    attention = torch.zeros(B, P + R, dtype=mask_p.dtype, device=device)  # grows into columns P, P+1, ...
    attention[:, :P] = mask_p[rows]
    position = next_p[rows]  # (B,) position of the next token (on every axis for multimodal RoPE)
    result = torch.full((B, R), pad_id, dtype=torch.long)
    logprobs = torch.zeros(B, R, dtype=torch.float32)
    live = torch.arange(B)  # result row of each row still decoding
    eos = torch.as_tensor(list(eos_ids), device=device)
    suppress_early = [*suppress, *eos_ids]  # while t < min_new_tokens
    steps = 0
    for t in range(R):
        banned = suppress_early if t < sampling.min_new_tokens else suppress
        draws = None if keys is None else keyed_uniforms(keys[live], t)
        token = sample_tokens(filter_logits(logits, sampling, banned), greedy=sampling.greedy, generator=generator,
                              uniforms=draws)
        result[live, t] = token.cpu()
        scaled = logits.float() / sampling.temperature
        logprobs[live, t] = (scaled.gather(-1, token[:, None]).squeeze(1) - scaled.logsumexp(-1)).cpu()
        steps = t + 1
        done = torch.isin(token, eos)
        if t == R - 1 or bool(done.all()):
            break
        attention[:, P + t] = 1
        if bool(done.any()):  # finished rows leave the batch: one cache copy, then every step is cheaper
            keep = torch.nonzero(~done).flatten()
            cache.batch_select_indices(keep)
            live, token, attention, position = live[keep.cpu()], token[keep], attention[keep], position[keep]
        out = model(input_ids=token[:, None], attention_mask=attention[:, :P + t + 1],
                    position_ids=continue_positions(pos_p, position, 1), use_cache=True, **{cache_kw: cache},
                    **keep_last)
        cache = returned_cache(out)
        logits = out.logits[:, -1]
        position = position + 1
    return result[:, :max(steps, 1)], logprobs[:, :max(steps, 1)]
