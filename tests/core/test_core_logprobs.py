"""Chunked token log-probs / entropy against the naive full log-softmax, values and gradients."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gndpo.core.logprobs import (
    hidden_logprobs,
    masked_mean,
    token_entropy,
    token_logprobs,
    token_logprobs_and_entropy,
)

FAST = settings(max_examples=50, deadline=None)


def naive(logits, ids, temperature=1.0):
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature, dim=-1)
    return logp.gather(-1, ids[..., None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


def test_hand_computed_uniform_and_two_token():
    # Uniform logits over V=4: log p = -log 4 = -1.386294, entropy = log 4.
    # Logits [0, log 3] over V=2: p = [1/4, 3/4]; log p(1) = log 0.75 = -0.287682;
    # entropy = -(0.25 log 0.25 + 0.75 log 0.75) = 0.346574 + 0.215762 = 0.562335.
    logits = torch.zeros(1, 1, 4)
    assert token_logprobs(logits, torch.tensor([[2]])).item() == pytest.approx(-math.log(4), abs=1e-6)
    assert token_entropy(logits).item() == pytest.approx(math.log(4), abs=1e-6)
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    lp, ent = token_logprobs_and_entropy(logits, torch.tensor([[1]]))
    assert lp.item() == pytest.approx(-0.287682, abs=1e-6)
    assert ent.item() == pytest.approx(0.562335, abs=1e-6)
    # Temperature 2 halves the logits: [0, log 3 / 2] -> p(1) = sqrt3 / (1 + sqrt3) = 0.633975.
    p1 = token_logprobs(logits, torch.tensor([[1]]), temperature=2.0).exp()
    assert p1.item() == pytest.approx(0.633975, abs=1e-6)


@FAST
@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 3),
    length=st.integers(1, 7),
    vocab=st.integers(1, 13),
    chunk=st.one_of(st.none(), st.integers(1, 25)),
    temperature=st.sampled_from([1.0, 0.6, 1.7]),
)
def test_chunked_equals_naive_values_and_grads(seed, batch, length, vocab, chunk, temperature):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(batch, length, vocab, generator=g)).requires_grad_()
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    w_lp, w_ent = torch.randn(batch, length, generator=g), torch.randn(batch, length, generator=g)

    lp, ent = token_logprobs_and_entropy(logits, ids, chunk_size=chunk, temperature=temperature)
    ref_lp, ref_ent = naive(logits, ids, temperature)
    torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=1e-5)
    grad = torch.autograd.grad((lp * w_lp).sum() + (ent * w_ent).sum(), logits)[0]
    ref_grad = torch.autograd.grad((ref_lp * w_lp).sum() + (ref_ent * w_ent).sum(), logits)[0]
    torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-5)

    # The single-output functions agree with the fused one, gradients included.
    lp_only = token_logprobs(logits, ids, chunk_size=chunk, temperature=temperature)
    torch.testing.assert_close(lp_only, ref_lp, atol=1e-5, rtol=1e-5)
    grad = torch.autograd.grad((lp_only * w_lp).sum(), logits)[0]
    ref_grad = torch.autograd.grad((naive(logits, ids, temperature)[0] * w_lp).sum(), logits)[0]
    torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-5)
    ent_only = token_entropy(logits, chunk_size=chunk, temperature=temperature)
    grad = torch.autograd.grad((ent_only * w_ent).sum(), logits)[0]
    ref_grad = torch.autograd.grad((naive(logits, ids, temperature)[1] * w_ent).sum(), logits)[0]
    torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-5)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    ids = torch.randint(0, 5, (2, 3), generator=g)
    assert torch.autograd.gradcheck(
        lambda x: token_logprobs_and_entropy(x, ids, chunk_size=2, temperature=0.7), (logits,)
    )
    assert torch.autograd.gradcheck(lambda x: token_logprobs(x, ids, chunk_size=4), (logits,))
    assert torch.autograd.gradcheck(lambda x: token_entropy(x, chunk_size=1), (logits,))


def test_bf16_logits_upcast_per_chunk():
    g = torch.Generator().manual_seed(1)
    logits = (4 * torch.randn(2, 5, 33, generator=g)).bfloat16().requires_grad_()
    ids = torch.randint(0, 33, (2, 5), generator=g)
    lp, ent = token_logprobs_and_entropy(logits, ids, chunk_size=3)
    ref_lp, ref_ent = naive(logits.float(), ids)
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=1e-5)
    lp.sum().backward()
    assert logits.grad.dtype == torch.bfloat16


def test_shape_mismatch_and_bad_chunk_raise():
    with pytest.raises(ValueError, match="disagree"):
        token_logprobs(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_size"):
        token_logprobs(torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long), chunk_size=0)


def naive_hidden(hidden, weight, ids, bias=None, temperature=1.0):
    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    return naive(logits, ids, temperature)


@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.8])
@pytest.mark.parametrize("chunk", [1, 3, 1024])
def test_hidden_logprobs_matches_naive_fp32(use_bias, temperature, chunk):
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 5, 8, generator=g, requires_grad=True)  # (B, L, H)
    weight = torch.randn(19, 8, generator=g, requires_grad=True)  # (V, H)
    bias = torch.randn(19, generator=g, requires_grad=True) if use_bias else None
    ids = torch.randint(0, 19, (2, 5), generator=g)
    w = torch.randn(2, 5, generator=g)

    lp, ent = hidden_logprobs(
        hidden, weight, ids, bias=bias, temperature=temperature, chunk_size=chunk, with_entropy=True
    )
    ref_lp, ref_ent = naive_hidden(hidden, weight, ids, bias, temperature)
    torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=1e-5)
    assert not ent.requires_grad
    inputs = (hidden, weight) + ((bias,) if use_bias else ())
    grads = torch.autograd.grad((lp * w).sum(), inputs)
    ref_grads = torch.autograd.grad((ref_lp * w).sum(), inputs)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    _, no_ent = hidden_logprobs(hidden, weight, ids)
    assert no_ent is None


def test_hidden_logprobs_gradcheck_float64():
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(7, 4, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(7, dtype=torch.float64, generator=g, requires_grad=True)
    ids = torch.randint(0, 7, (5,), generator=g)
    assert torch.autograd.gradcheck(
        lambda h, w, b: hidden_logprobs(h, w, ids, bias=b, chunk_size=2, temperature=0.9)[0], (hidden, weight, bias)
    )


def test_hidden_logprobs_bf16_matches_model_head():
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(6, 16, generator=g).bfloat16().requires_grad_()
    weight = (0.3 * torch.randn(40, 16, generator=g)).bfloat16().requires_grad_()
    ids = torch.randint(0, 40, (6,), generator=g)
    lp, ent = hidden_logprobs(hidden, weight, ids, chunk_size=4, with_entropy=True)
    # Reference: what a bf16 model does, lm_head in bf16 then the log-softmax in float32.
    ref_lp, ref_ent = naive_hidden(hidden, weight, ids)
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=1e-5)
    lp.sum().backward()
    ref_h, ref_w = torch.autograd.grad(ref_lp.sum(), (hidden, weight))
    assert hidden.grad.dtype == weight.grad.dtype == torch.bfloat16
    torch.testing.assert_close(hidden.grad.float(), ref_h.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(weight.grad.float(), ref_w.float(), atol=2e-2, rtol=2e-2)


def test_masked_mean_ignores_padding_values():
    # valid values 1, 2, 6 -> mean 3; per row: [1.5, 6]; an empty row gives 0, not NaN.
    x = torch.tensor([[1.0, 2.0, float("nan")], [6.0, float("inf"), -float("inf")], [float("nan")] * 3])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    assert masked_mean(x, mask).item() == pytest.approx(3.0)
    torch.testing.assert_close(masked_mean(x, mask, dim=-1), torch.tensor([1.5, 6.0, 0.0]))


# ---------------------------------------------------------------- top-k: gathered ids, the tail, a teacher's top-k


def _dense_stats(hidden, weight, ids, gather):
    logp = torch.log_softmax(hidden @ weight.t(), -1)  # (N, V)
    outside = logp.scatter(1, gather, float("-inf"))
    return logp.gather(1, ids[:, None])[:, 0], logp.gather(1, gather), torch.logsumexp(outside, 1)


def test_gathered_ids_and_rest_equal_a_full_softmax_and_their_gradients_check():
    from gndpo.core.logprobs import hidden_token_stats

    torch.manual_seed(0)
    N, H, V, K = 7, 5, 13, 3
    hidden = torch.randn(N, H, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, V, (N,))
    gather = torch.stack([torch.randperm(V)[:K] for _ in range(N)])  # distinct per row
    stats = hidden_token_stats(hidden, weight, ids, gather=gather, topk=4, chunk_size=3)
    lp, gathered, rest = _dense_stats(hidden, weight, ids, gather)
    torch.testing.assert_close(stats.logprobs, lp)
    torch.testing.assert_close(stats.gathered, gathered)
    torch.testing.assert_close(stats.rest, rest)
    # the buckets are a distribution: the K gathered probabilities and the rest sum to 1 wherever ids fall
    torch.testing.assert_close(stats.gathered.exp().sum(1) + stats.rest.exp(), torch.ones(N, dtype=torch.float64))
    full = torch.log_softmax(hidden @ weight.t(), -1).detach()
    top_lp, top_ids = full.topk(4, dim=1)
    torch.testing.assert_close(stats.topk_logprobs, top_lp) and torch.testing.assert_close(stats.topk_ids, top_ids)

    def fn(h, w):
        s = hidden_token_stats(h, w, ids, gather=gather, chunk_size=3)
        return s.logprobs, s.gathered, s.rest

    assert torch.autograd.gradcheck(fn, (hidden, weight))
    # one output at a time (the others' gradients arrive as None)
    for pick in range(3):
        assert torch.autograd.gradcheck(lambda h, w, i=pick: fn(h, w)[i], (hidden, weight))


def test_topk_on_a_batch_shape_and_without_gather():
    from gndpo.core.logprobs import hidden_token_stats

    torch.manual_seed(1)
    hidden, weight = torch.randn(2, 3, 4), torch.randn(9, 4)
    ids = torch.randint(0, 9, (2, 3))
    stats = hidden_token_stats(hidden, weight, ids, topk=2)
    assert stats.gathered is None and stats.rest is None and stats.topk_ids.shape == (2, 3, 2)
    full = torch.log_softmax(hidden @ weight.t(), -1)
    torch.testing.assert_close(stats.topk_logprobs, full.topk(2, -1).values)
    with pytest.raises(ValueError, match="topk must be in"):
        hidden_token_stats(hidden, weight, ids, topk=10)
