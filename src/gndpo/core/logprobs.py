"""Token log-probabilities and entropies, chunked so a full ``[T, V]`` float32 tensor is never built.

For logits ``z`` (temperature ``tau`` already applied, ``x = z / tau``) and sampled ids ``o``:

    log p(o_t) = x_t[o_t] - logsumexp(x_t)
    H_t        = -sum_v p_t(v) log p_t(v)
    d log p(o_t) / d x_t = onehot(o_t) - p_t
    d H_t / d x_t        = -p_t * (log p_t + H_t)

Every function walks the tokens in chunks, upcasts each chunk to at least float32 (float64 stays
float64), and keeps only per-token results, reusing two ``[chunk, V]`` scratch buffers. The gradients
come from custom autograd functions that recompute each chunk's softmax in backward, so backward
holds no ``[T, V]`` float32 intermediate either (the gradient w.r.t. the logits is itself ``[T, V]``,
in the logits' dtype, and is written chunk by chunk).

``hidden_logprobs`` goes one step earlier: from final hidden states and the LM-head weight it builds
each chunk's logits ``h_chunk @ W.T (+ b)`` on the fly, so the logits are never materialized at all;
its backward recomputes each chunk's logits and accumulates the weight gradient in float32.

These are the selective log-softmax / entropy of verl's ``torch_functional.py`` (the GNDPO reference
code, arXiv 2606.09091) with the same values; only the memory schedule differs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Chunks of at most this many float32 logits (128 MiB) when ``chunk_size`` is None.
_CHUNK_ELEMENTS = 2**25


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for bf16/fp16/fp32 inputs, float64 for float64 (so gradcheck stays exact)."""
    return torch.promote_types(dtype, torch.float32)


def _chunk_bounds(num_tokens: int, vocab: int, chunk_size: int | None) -> list[tuple[int, int]]:
    if chunk_size is None:
        chunk_size = max(1, _CHUNK_ELEMENTS // max(vocab, 1))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return [(s, min(s + chunk_size, num_tokens)) for s in range(0, num_tokens, chunk_size)]


class _Scratch:
    """Two ``[chunk, V]`` buffers reused by every chunk.

    Allocating fresh chunk tensors costs a page fault per 4 KiB on CPU (large blocks go back to the
    OS on free), which made the chunked path slower than one big allocation; reuse removes that.
    """

    def __init__(self, rows: int, vocab: int, dtype: torch.dtype, device: torch.device):
        self.a = torch.empty(rows, vocab, dtype=dtype, device=device)
        self.b = torch.empty(rows, vocab, dtype=dtype, device=device)

    def log_softmax(self, z: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (log_softmax(z / tau) upcast, a free buffer), both (C, V) views of the scratch."""
        c = z.shape[0]
        a, b = self.a[:c], self.b[:c]  # (C, V)
        x = z
        if temperature != 1.0 or z.dtype != a.dtype:
            if z.data_ptr() != b.data_ptr():
                b.copy_(z)
            x = b.div_(temperature) if temperature != 1.0 else b
        torch.log_softmax(x, dim=-1, out=a)
        return a, b


def _entropy_(logp: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """-sum p log p per row; overwrites ``buf``."""
    torch.exp(logp, out=buf)  # (C, V)
    return -buf.mul_(logp).sum(-1)  # (C,)


class _LogitsStats(torch.autograd.Function):
    """(logits (N, V), ids (N,)) -> (log p(ids) (N,), entropy (N,)), chunked in forward and backward."""

    @staticmethod
    def forward(ctx, logits, ids, chunk_size, temperature, need_lp, need_ent):
        n, vocab = logits.shape
        dtype = _compute_dtype(logits.dtype)
        bounds = _chunk_bounds(n, vocab, chunk_size)
        lp = torch.zeros(n, dtype=dtype, device=logits.device)  # (N,)
        ent = torch.zeros(n, dtype=dtype, device=logits.device)  # (N,)
        scratch = _Scratch(bounds[0][1] if bounds else 0, vocab, dtype, logits.device)
        for s, e in bounds:
            logp, buf = scratch.log_softmax(logits[s:e], temperature)  # (C, V), (C, V)
            if need_lp:
                lp[s:e] = logp.gather(1, ids[s:e, None]).squeeze(1)
            if need_ent:
                ent[s:e] = _entropy_(logp, buf)
        ctx.save_for_backward(logits, ids, ent)
        ctx.chunk_size, ctx.temperature = chunk_size, temperature
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None: skip its work
        return lp, ent

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_lp, g_ent):
        logits, ids, ent = ctx.saved_tensors
        if g_lp is None and g_ent is None:
            return None, None, None, None, None, None
        n, vocab = logits.shape
        dtype = _compute_dtype(logits.dtype)
        tau = ctx.temperature
        bounds = _chunk_bounds(n, vocab, ctx.chunk_size)
        scratch = _Scratch(bounds[0][1] if bounds else 0, vocab, dtype, logits.device)
        grad = torch.empty_like(logits)  # (N, V), logits dtype
        for s, e in bounds:
            dx, p = scratch.log_softmax(logits[s:e], tau)  # (C, V) log p, (C, V) free
            g = None if g_lp is None else g_lp[s:e, None].to(dtype)  # (C, 1)
            if g_ent is None:
                dx.exp_().mul_(-g)  # -p * g
            else:
                torch.exp(dx, out=p)
                dx.add_(ent[s:e, None]).mul_(p).mul_(-g_ent[s:e, None].to(dtype))  # -p (log p + H) g_H
                if g is not None:
                    dx.sub_(p.mul_(g))
            if g is not None:
                dx.scatter_add_(1, ids[s:e, None], g)  # + onehot * g
            if tau != 1.0:
                dx /= tau
            grad[s:e] = dx
        return grad, None, None, None, None, None


def _flatten(logits: torch.Tensor, ids: torch.Tensor | None):
    if ids is not None and logits.shape[:-1] != ids.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and ids {tuple(ids.shape)} disagree on the token dims")
    flat = logits.reshape(-1, logits.shape[-1])  # (N, V)
    flat_ids = None if ids is None else ids.reshape(-1).long()  # (N,)
    return flat, flat_ids


def token_logprobs(
    logits: torch.Tensor, ids: torch.Tensor, *, chunk_size: int | None = None, temperature: float = 1.0
) -> torch.Tensor:
    """log softmax(logits / temperature)[ids], shaped like ``ids`` (e.g. (B, L)); differentiable.

    ``chunk_size`` is tokens per chunk; None picks the largest chunk whose float32 logits fit in
    128 MiB. Logits of any float dtype are upcast per chunk; the result is float32 (float64 for
    float64 logits).
    """
    flat, flat_ids = _flatten(logits, ids)
    lp, _ = _LogitsStats.apply(flat, flat_ids, chunk_size, float(temperature), True, False)
    return lp.view(ids.shape)  # (B, L)


def token_entropy(logits: torch.Tensor, *, chunk_size: int | None = None, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) per token, shaped like ``logits[..., 0]``; differentiable."""
    flat, _ = _flatten(logits, None)
    dummy = torch.zeros(flat.shape[0], dtype=torch.long, device=flat.device)
    _, ent = _LogitsStats.apply(flat, dummy, chunk_size, float(temperature), False, True)
    return ent.view(logits.shape[:-1])  # (B, L)


def token_logprobs_and_entropy(
    logits: torch.Tensor, ids: torch.Tensor, *, chunk_size: int | None = None, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both in one pass over the logits (one log-softmax per chunk instead of two); both differentiable."""
    flat, flat_ids = _flatten(logits, ids)
    lp, ent = _LogitsStats.apply(flat, flat_ids, chunk_size, float(temperature), True, True)
    return lp.view(ids.shape), ent.view(ids.shape)  # (B, L), (B, L)


class _HiddenLogprobs(torch.autograd.Function):
    """(hidden (N, H), weight (V, H), bias (V,) | None, ids (N,), gather (N, K) | None) ->
    log p(ids) (N,), entropy (N,), log p(gather) (N, K), log p(rest) (N,), top-k log p (N, k), top-k ids (N, k).

    ``rest`` is the log of the probability mass outside ``gather`` (the tail bucket of a top-k divergence);
    ``gather`` ids of a row must be distinct. The top-k outputs (the distribution's own most likely tokens) are
    for a teacher: not differentiable, as the entropy. Differentiable: log p(ids), log p(gather), log p(rest).

    Each chunk's logits are computed in the weight's dtype, exactly as the model's LM head would
    (so bf16 results match ``lm_head(h).float()``), then upcast for the softmax statistics.
    Autocast is switched off inside so the matmul dtype is the weight's: :func:`hidden_logprobs` casts the
    weight to the autocast dtype before it enters.
    """

    @staticmethod
    def _logits(hidden, weight, bias, zbuf):
        z = torch.mm(hidden.to(weight.dtype), weight.t(), out=zbuf[: hidden.shape[0]])  # (C, V), model dtype
        return z if bias is None else z.add_(bias)

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, gather, chunk_size, temperature, need_ent, topk):
        n, vocab = hidden.shape[0], weight.shape[0]
        dtype = _compute_dtype(weight.dtype)
        bounds = _chunk_bounds(n, vocab, chunk_size)
        rows = bounds[0][1] if bounds else 0
        lp = torch.empty(n, dtype=dtype, device=hidden.device)  # (N,)
        ent = torch.zeros(n, dtype=dtype, device=hidden.device)  # (N,), left at 0 unless need_ent
        k = 0 if gather is None else gather.shape[1]
        gathered = torch.empty(n, k, dtype=dtype, device=hidden.device)  # (N, K)
        rest = torch.zeros(n, dtype=dtype, device=hidden.device)  # (N,)
        top_lp = torch.empty(n, topk, dtype=dtype, device=hidden.device)  # (N, k)
        top_ids = torch.empty(n, topk, dtype=torch.long, device=hidden.device)  # (N, k)
        scratch = _Scratch(rows, vocab, dtype, hidden.device)
        zbuf = scratch.b if weight.dtype == dtype else torch.empty_like(scratch.b, dtype=weight.dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            for s, e in bounds:
                z = _HiddenLogprobs._logits(hidden[s:e], weight, bias, zbuf)  # (C, V)
                logp, buf = scratch.log_softmax(z, temperature)  # (C, V), (C, V)
                lp[s:e] = logp.gather(1, ids[s:e, None]).squeeze(1)
                if topk:
                    top_lp[s:e], top_ids[s:e] = logp.topk(topk, dim=1)
                if k:
                    gathered[s:e] = logp.gather(1, gather[s:e])
                    outside = buf.copy_(logp).scatter_(1, gather[s:e], float("-inf"))  # (C, V)
                    rest[s:e] = torch.logsumexp(outside, dim=1)
                if need_ent:
                    ent[s:e] = _entropy_(logp, buf)
        ctx.save_for_backward(hidden, weight, bias, ids, gather, rest)
        ctx.chunk_size, ctx.temperature = chunk_size, temperature
        ctx.mark_non_differentiable(ent, top_lp, top_ids)
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None: skip its work
        return lp, ent, gathered, rest, top_lp, top_ids

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_lp, _g_ent, g_gath, g_rest, _g_top, _g_ids):
        hidden, weight, bias, ids, gather, rest = ctx.saved_tensors
        n, vocab = hidden.shape[0], weight.shape[0]
        dtype = _compute_dtype(weight.dtype)
        tau = ctx.temperature
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        bounds = _chunk_bounds(n, vocab, ctx.chunk_size)
        rows = bounds[0][1] if bounds else 0
        scratch = _Scratch(rows, vocab, dtype, hidden.device)
        zbuf = scratch.b if weight.dtype == dtype else torch.empty_like(scratch.b, dtype=weight.dtype)
        grad_h = torch.empty_like(hidden) if need_h else None  # (N, H)
        # Accumulated over chunks in float32: summing many bf16 partial products would lose bits.
        grad_w = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_w else None  # (V, H)
        grad_b = torch.zeros(vocab, dtype=dtype, device=weight.device) if need_b else None  # (V,)
        if gather is None or gather.shape[1] == 0:
            g_gath = g_rest = None
        zeros = torch.zeros(n, dtype=dtype, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for s, e in bounds:
                g = (g_lp[s:e] if g_lp is not None else zeros[s:e]).to(dtype)  # (C,)
                total = g.clone()  # (C,) sum of the upstream gradients: the -p term's weight
                if g_gath is not None:
                    total += g_gath[s:e].to(dtype).sum(1)
                if g_rest is not None:
                    total += g_rest[s:e].to(dtype)
                z = _HiddenLogprobs._logits(hidden[s:e], weight, bias, zbuf)  # (C, V)
                dz, p = scratch.log_softmax(z, tau)  # (C, V) log p; (C, V) free once z is consumed
                if g_rest is not None:  # d log p(rest) / dz = p restricted to the rest, renormalized, - p
                    torch.exp(dz, out=p)
                    dz.sub_(rest[s:e, None]).exp_().scatter_(1, gather[s:e], 0.0).mul_(g_rest[s:e, None].to(dtype))
                    dz.sub_(p.mul_(total[:, None]))
                else:
                    dz.exp_().mul_(-total[:, None])  # -p * (sum of upstream gradients)
                dz.scatter_add_(1, ids[s:e, None], g[:, None])  # + onehot(ids) * g
                if g_gath is not None:
                    dz.scatter_add_(1, gather[s:e], g_gath[s:e].to(dtype))  # + onehot(gather) * g_gather
                if tau != 1.0:
                    dz /= tau
                if need_h:
                    grad_h[s:e] = dz.to(weight.dtype) @ weight
                if need_w:
                    grad_w.addmm_(dz.t(), hidden[s:e].to(dtype))
                if need_b:
                    grad_b += dz.sum(0)
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        grad_b = None if grad_b is None else grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None


@dataclass(frozen=True)
class TokenStats:
    """Per-token statistics of the response positions, shaped like the ids they score (e.g. (B, L)).

    ``logprobs``: log p of the scored ids. ``entropy``: or None. ``gathered`` (B, L, K) and ``rest`` (B, L):
    log p of each id in ``gather`` and of the mass outside them (the tail bucket), or None. ``topk_logprobs`` /
    ``topk_ids`` (B, L, k): the distribution's own k most likely tokens, descending, or None."""

    logprobs: torch.Tensor
    entropy: torch.Tensor | None = None
    gathered: torch.Tensor | None = None
    rest: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None
    topk_ids: torch.Tensor | None = None


def hidden_token_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = False,
    gather: torch.Tensor | None = None,
    topk: int = 0,
) -> TokenStats:
    """:class:`TokenStats` of ``softmax((hidden @ weight.T + bias) / temperature)`` without full logits.

    hidden (N, H) or (B, L, H); weight (V, H); ids (N,) or (B, L); ``gather`` (N, K) or (B, L, K) distinct ids
    per position (a teacher's top-k, scored under this distribution with its tail). Differentiable w.r.t.
    hidden, weight and bias: logprobs, gathered, rest. Peak extra memory is a few ``[chunk_size, V]`` float32
    buffers in forward and in backward, plus a float32 ``[V, H]`` weight-gradient accumulator in backward. Under
    ``torch.autocast`` a wider weight is cast to the autocast dtype first (a copy of it), so the head computes
    in that dtype as a ``Linear`` would.
    """
    if hidden.shape[:-1] != ids.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and ids {tuple(ids.shape)} disagree on the token dims")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight {tuple(weight.shape)} does not match hidden size {hidden.shape[-1]}")
    if gather is not None and gather.shape[:-1] != ids.shape:
        raise ValueError(f"gather {tuple(gather.shape)} and ids {tuple(ids.shape)} disagree on the token dims")
    if not 0 <= topk <= weight.shape[0]:
        raise ValueError(f"topk must be in [0, {weight.shape[0]}] (the vocabulary), got {topk}")
    device = hidden.device.type
    if torch.is_autocast_enabled(device):  # mixed precision: the head computes in the autocast dtype, as a Linear
        low = torch.get_autocast_dtype(device)
        if weight.dtype.itemsize > low.itemsize:  # (the cast's backward returns the gradient in the weight's dtype)
            weight, bias = weight.to(low), None if bias is None else bias.to(low)
    flat_h = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    flat_ids = ids.reshape(-1).long()  # (N,)
    flat_gather = None if gather is None else gather.reshape(-1, gather.shape[-1]).long()  # (N, K)
    lp, ent, gathered, rest, top_lp, top_ids = _HiddenLogprobs.apply(
        flat_h, weight, bias, flat_ids, flat_gather, chunk_size, float(temperature), with_entropy, topk)
    shape = ids.shape
    return TokenStats(lp.view(shape), ent.view(shape) if with_entropy else None,
                      None if gather is None else gathered.view(*shape, -1), None if gather is None else rest.view(shape),
                      top_lp.view(*shape, topk) if topk else None, top_ids.view(*shape, topk) if topk else None)


def hidden_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of ``ids`` under ``softmax((hidden @ weight.T + bias) / temperature)`` without full logits, and
    the entropy (detached) when asked: :func:`hidden_token_stats`'s first two."""
    stats = hidden_token_stats(hidden, weight, ids, bias=bias, temperature=temperature, chunk_size=chunk_size,
                               with_entropy=with_entropy)
    return stats.logprobs, stats.entropy


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over positions where the 0/1 ``mask`` is set; 0 where nothing is set.

    Values at masked-out positions are never read (they may be inf or NaN).
    """
    keep = mask.bool()
    m = keep.to(x.dtype)
    total = torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))
    if dim is None:
        return total.sum() / m.sum().clamp_min(1)
    return total.sum(dim) / m.sum(dim).clamp_min(1)
