"""Policy losses and aggregation modes: hand-computed values, gradients, invariants, accumulation."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gndpo.core.losses import AGG_MODES, aggregate_loss, compute_policy_loss

FAST = settings(max_examples=50, deadline=None)
LOSSES = ("gspo_token", "ppo", "reinforce")
NAN, INF = float("nan"), float("inf")

LOSS_MAT = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, NAN]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
# token-mean: (1+2+3+4+5)/5 = 3; seq-mean-token-sum: (6 + 9)/2 = 7.5;
# seq-mean-token-mean: (6/3 + 9/2)/2 = 3.25; seq-mean-token-sum-norm (L = 3): (6/3 + 9/3)/2 = 2.5.
EXPECTED = {"token-mean": 3.0, "seq-mean-token-sum": 7.5, "seq-mean-token-mean": 3.25, "seq-mean-token-sum-norm": 2.5}


@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregate_loss_hand_computed(mode):
    assert aggregate_loss(LOSS_MAT, MASK, mode).item() == pytest.approx(EXPECTED[mode])
    # A sequence with no valid tokens changes nothing (and gives no NaN).
    loss_mat = torch.cat([LOSS_MAT, torch.full((1, 3), INF)])
    mask = torch.cat([MASK, torch.zeros(1, 3, dtype=MASK.dtype)])
    assert aggregate_loss(loss_mat, mask, mode).item() == pytest.approx(EXPECTED[mode])


def test_aggregate_options_hand_computed():
    # norm_length 5: (6/5 + 9/5)/2 = 1.5; total_tokens 10: 15/10; total_seqs 5: seq-mean-token-mean 6.5/5.
    assert aggregate_loss(LOSS_MAT, MASK, "seq-mean-token-sum-norm", norm_length=5).item() == pytest.approx(1.5)
    assert aggregate_loss(LOSS_MAT, MASK, "token-mean", total_tokens=10).item() == pytest.approx(1.5)
    assert aggregate_loss(LOSS_MAT, MASK, "seq-mean-token-mean", total_seqs=5).item() == pytest.approx(1.3)
    assert aggregate_loss(LOSS_MAT, MASK, "seq-mean-token-sum", total_seqs=5).item() == pytest.approx(3.0)
    # All padding: 0, not NaN.
    assert aggregate_loss(LOSS_MAT, torch.zeros_like(MASK), "seq-mean-token-mean").item() == 0.0
    assert aggregate_loss(LOSS_MAT, torch.zeros_like(MASK), "token-mean").item() == 0.0


def test_unknown_names_list_valid_ones():
    with pytest.raises(ValueError, match="valid modes: token-mean, seq-mean-token-sum"):
        aggregate_loss(LOSS_MAT, MASK, "sum")
    lp = torch.zeros(2, 3)
    kw = dict(old_logprobs=lp, logprobs=lp, advantages=lp, response_mask=MASK)
    with pytest.raises(ValueError, match="valid modes"):
        compute_policy_loss("ppo", agg_mode="seq-sum", **kw)
    with pytest.raises(ValueError, match="valid names: gspo_token, ppo, reinforce"):
        compute_policy_loss("dpo", **kw)
    with pytest.raises(ValueError, match="does not take option"):
        compute_policy_loss("gspo_token", clip_ratio_c=3.0, **kw)
    with pytest.raises(ValueError, match="clip_ratio_c must be > 1"):
        compute_policy_loss("ppo", clip_ratio_c=0.5, **kw)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("mode", AGG_MODES)
def test_every_loss_honours_every_mode(name, mode):
    # On-policy (lp == old) with lp = -1: gspo and ppo have ratio 1 and loss -A; reinforce -A * lp = A.
    # So A = -LOSS_MAT (gspo, ppo) or A = LOSS_MAT (reinforce) reproduces LOSS_MAT; padding holds NaN.
    lp = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, -1.0, NAN]])
    adv = LOSS_MAT if name == "reinforce" else -LOSS_MAT
    # (ppo's dual clip min(-A, -3A) keeps -A for A < 0.)
    loss, _ = compute_policy_loss(name, old_logprobs=lp, logprobs=lp, advantages=adv, response_mask=MASK, agg_mode=mode)
    assert loss.item() == pytest.approx(EXPECTED[mode])


def test_gspo_token_hand_computed_with_gradient():
    # lp - old = [0.2, 0.2] -> sequence log-ratio 0.2, s = e^0.2 = 1.221403; clip(s) = 1.2.
    # token 1, A = +1: max(-1.221403, -1.2) = -1.2 (clipped, no gradient);
    # token 2, A = -1: max(1.221403, 1.2) = 1.221403 (gradient A*s... d/dlp = +s).
    # token-mean: (-1.2 + 1.221403)/2 = 0.0107014; d loss / d lp = [0, 1.221403/2].
    lp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    old = torch.tensor([[-1.2, -2.2]])
    adv = torch.tensor([[1.0, -1.0]])
    loss, metrics = compute_policy_loss("gspo_token", old_logprobs=old, logprobs=lp, advantages=adv,
                                        response_mask=torch.ones(1, 2))
    assert loss.item() == pytest.approx(0.0107014, abs=1e-6)
    loss.backward()
    torch.testing.assert_close(lp.grad, torch.tensor([[0.0, 0.6107014]]))
    assert metrics["clip_frac"] == 0.5
    assert metrics["ratio_mean"] == pytest.approx(math.exp(0.2), abs=1e-6)
    assert metrics["ratio_max"] == pytest.approx(math.exp(0.2), abs=1e-6)
    assert metrics["approx_kl"] == pytest.approx(-0.2, abs=1e-6)  # k1 = mean(old - lp)
    assert metrics["approx_kl_k3"] == pytest.approx(math.exp(0.2) - 1 - 0.2, abs=1e-6)
    # clip_high changes the result: with 0.3 nothing is clipped: (-1.221403 + 1.221403)/2 = 0.
    loss, metrics = compute_policy_loss("gspo_token", old_logprobs=old, logprobs=lp, advantages=adv,
                                        response_mask=torch.ones(1, 2), clip_high=0.3)
    assert loss.item() == pytest.approx(0.0, abs=1e-6) and metrics["clip_frac"] == 0.0


def test_gspo_token_clip_low_and_log_ratio_clamp():
    # lp - old = -0.5 -> s = e^-0.5 = 0.606531 < 1 - 0.2; A = +1: max(-0.606531, -0.8) = -0.606531 (not clipped);
    # A = -1: max(0.606531, 0.8) = 0.8 (clipped). clip_low 0.5: max(0.606531, 0.5) -> unclipped.
    lp, old = torch.tensor([[-1.0], [-1.0]]), torch.tensor([[-0.5], [-0.5]])
    adv, mask = torch.tensor([[1.0], [-1.0]]), torch.ones(2, 1)
    loss, metrics = compute_policy_loss("gspo_token", old_logprobs=old, logprobs=lp, advantages=adv, response_mask=mask)
    assert loss.item() == pytest.approx((-0.606531 + 0.8) / 2, abs=1e-6) and metrics["clip_frac"] == 0.5
    loss, _ = compute_policy_loss("gspo_token", old_logprobs=old, logprobs=lp, advantages=adv, response_mask=mask,
                                  clip_low=0.5)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    # log s is clamped at 10: lp - old = 50 gives s = e^10, not e^50.
    _, metrics = compute_policy_loss("gspo_token", old_logprobs=old - 50, logprobs=lp, advantages=adv,
                                     response_mask=mask, clip_low=1e9, clip_high=1e9)
    assert metrics["ratio_max"] == pytest.approx(math.exp(10.0), rel=1e-6)


def test_ppo_hand_computed_dual_clip():
    # lp - old = [0.5, 0, 1.5] -> r = [1.648721, 1, 4.481689]; A = [1, 1, -1].
    # t1: max(-1.648721, -1.2) = -1.2 (clipped); t2: -1; t3: max(4.481689, 1.2) = 4.481689, dual: min(., 3) = 3.
    # token-mean (-1.2 - 1 + 3)/3 = 0.266667; clip_frac 1/3; clip_frac_lower 1/3.
    lp = torch.tensor([[-1.0, -2.0, -0.5]])
    old = torch.tensor([[-1.5, -2.0, -2.0]])
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    kw = dict(old_logprobs=old, logprobs=lp, advantages=adv, response_mask=torch.ones(1, 3))
    loss, metrics = compute_policy_loss("ppo", **kw)
    assert loss.item() == pytest.approx(0.8 / 3, abs=1e-6)
    assert metrics["clip_frac"] == pytest.approx(1 / 3)
    assert metrics["clip_frac_lower"] == pytest.approx(1 / 3)
    assert metrics["ratio_max"] == pytest.approx(math.exp(1.5), abs=1e-5)
    # clip_ratio_c = 5 lets t3 through: (-1.2 - 1 + 4.481689)/3 = 0.760563.
    loss, metrics = compute_policy_loss("ppo", clip_ratio_c=5.0, **kw)
    assert loss.item() == pytest.approx(0.760563, abs=1e-6) and metrics["clip_frac_lower"] == 0.0


def test_reinforce_hand_computed():
    # loss = -A * lp = [-(2)(-1), -(-1)(-2)] = [2, -2]; token-mean 0; d/dlp = -A/2 = [-1, 0.5].
    lp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss, metrics = compute_policy_loss("reinforce", old_logprobs=lp.detach(), logprobs=lp,
                                        advantages=torch.tensor([[2.0, -1.0]]), response_mask=torch.ones(1, 2))
    assert loss.item() == pytest.approx(0.0)
    loss.backward()
    torch.testing.assert_close(lp.grad, torch.tensor([[-1.0, 0.5]]))
    assert metrics["clip_frac"] == 0.0 and metrics["ratio_mean"] == 1.0


def random_inputs(seed, batch=4, length=5, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    old = -3 * torch.rand(batch, length, generator=g, dtype=dtype)
    lp = old + 0.3 * torch.randn(batch, length, generator=g, dtype=dtype)
    adv = torch.randn(batch, length, generator=g, dtype=dtype)
    lengths = torch.randint(0, length + 1, (batch,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).to(dtype)
    return old, lp, adv, mask


def grad_of(name, old, lp, adv, mask, **kw):
    lp = lp.clone().requires_grad_()
    loss, metrics = compute_policy_loss(name, old_logprobs=old, logprobs=lp, advantages=adv, response_mask=mask, **kw)
    (grad,) = torch.autograd.grad(loss, lp)
    return loss.detach(), grad, metrics


@FAST
@given(seed=st.integers(0, 2**31 - 1), mode=st.sampled_from(AGG_MODES))
def test_gspo_token_gradient_matches_sequence_objective_finite_difference(seed, mode):
    # With one advantage per sequence and no clipping, the token form's gradient equals the gradient
    # of GSPO's sequence objective J = agg(-A_i * exp(mean_t(lp - old))) (s_i broadcast to tokens).
    old, lp, adv, mask = random_inputs(seed)
    adv = adv[:, :1].expand_as(adv).contiguous()
    kw = dict(agg_mode=mode, clip_low=1e6, clip_high=1e6)
    _, grad, _ = grad_of("gspo_token", old, lp, adv, mask, **kw)

    def objective(x):
        valid = mask.bool()
        seq = torch.where(valid, x - old, 0.0).sum(-1) / valid.sum(-1).clamp_min(1)
        loss_mat = -adv * torch.exp(seq)[:, None]
        return aggregate_loss(loss_mat, mask, mode)

    h = 1e-6
    fd = torch.zeros_like(lp)
    for idx in torch.nonzero(mask.bool()):
        i, t = idx.tolist()
        up, down = lp.clone(), lp.clone()
        up[i, t] += h
        down[i, t] -= h
        fd[i, t] = (objective(up) - objective(down)) / (2 * h)
    torch.testing.assert_close(grad, fd, atol=1e-7, rtol=1e-6)


@FAST
@given(seed=st.integers(0, 2**31 - 1), mode=st.sampled_from(AGG_MODES))
def test_gspo_token_gradient_matches_literal_formula(seed, mode):
    # d loss / d lp_{i,t} = w_{i,t} * (-A_{i,t} * s_i) where the token is not clipped, 0 where it is;
    # w is the aggregation weight of the token (1/N, 1/B', 1/(B' n_i), 1/(B' L)).
    old, lp, adv, mask = random_inputs(seed)
    _, grad, _ = grad_of("gspo_token", old, lp, adv, mask, agg_mode=mode, clip_low=0.1, clip_high=0.05)
    valid = mask.bool()
    n_i = valid.sum(-1, keepdim=True).double()
    seqs = max(int((n_i > 0).sum()), 1)
    s = torch.exp(torch.where(valid, lp - old, 0.0).sum(-1, keepdim=True) / n_i.clamp_min(1))
    clipped = (-adv * s.clamp(0.9, 1.05)) > (-adv * s)
    weight = {
        "token-mean": torch.full_like(lp, 1.0 / max(int(valid.sum()), 1)),
        "seq-mean-token-sum": torch.full_like(lp, 1.0 / seqs),
        "seq-mean-token-mean": (1.0 / (seqs * n_i.clamp_min(1))).expand_as(lp),
        "seq-mean-token-sum-norm": torch.full_like(lp, 1.0 / (seqs * lp.shape[1])),
    }[mode]
    expected = torch.where(valid & ~clipped, -adv * s * weight, 0.0)
    torch.testing.assert_close(grad, expected, atol=1e-12, rtol=1e-9)


@FAST
@given(seed=st.integers(0, 2**31 - 1), name=st.sampled_from(LOSSES), mode=st.sampled_from(AGG_MODES))
def test_zero_advantage_gives_zero_gradient(seed, name, mode):
    old, lp, adv, mask = random_inputs(seed)
    loss, grad, _ = grad_of(name, old, lp, torch.zeros_like(adv), mask, agg_mode=mode)
    assert loss.item() == 0.0
    assert (grad == 0).all()


@FAST
@given(seed=st.integers(0, 2**31 - 1), name=st.sampled_from(["gspo_token", "ppo"]), mode=st.sampled_from(AGG_MODES))
def test_on_policy_ratio_is_exactly_one(seed, name, mode):
    _, lp, adv, mask = random_inputs(seed, dtype=torch.float32)
    _, _, metrics = grad_of(name, lp, lp, adv, mask, agg_mode=mode)
    if mask.sum() > 0:
        assert metrics["ratio_mean"] == 1.0 and metrics["ratio_max"] == 1.0
    assert metrics["clip_frac"] == 0.0 and metrics["approx_kl"] == 0.0


@FAST
@given(
    seed=st.integers(0, 2**31 - 1),
    name=st.sampled_from(LOSSES),
    mode=st.sampled_from(AGG_MODES),
    extra=st.integers(1, 3),
    junk=st.sampled_from([NAN, INF, -INF, 7.0]),
)
def test_padding_invariance(seed, name, mode, extra, junk):
    old, lp, adv, mask = random_inputs(seed)
    kw = dict(agg_mode=mode, norm_length=9)  # norm_length fixed: the default (L) grows with padding

    def pad(x, value):
        x = torch.where(mask.bool(), x, value)  # junk at existing padding too
        return torch.cat([x, torch.full((x.shape[0], extra), value, dtype=x.dtype)], 1)

    loss, grad, metrics = grad_of(name, old, lp, adv, mask, **kw)
    loss_p, grad_p, metrics_p = grad_of(name, pad(old, junk), pad(lp, junk), pad(adv, junk), pad(mask, 0.0), **kw)
    torch.testing.assert_close(loss_p, loss)
    torch.testing.assert_close(grad_p[:, : lp.shape[1]], torch.where(mask.bool(), grad, 0.0))
    assert (grad_p[:, lp.shape[1]:] == 0).all()
    assert metrics_p == pytest.approx(metrics)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("mode", AGG_MODES)
def test_micro_batches_sum_to_full_batch(name, mode):
    old, lp, adv, mask = random_inputs(7, batch=6, length=5)
    mask[2] = 0  # an empty sequence
    mask[0] = 1
    total_tokens, total_seqs = float(mask.sum()), float((mask.sum(-1) > 0).sum())
    full_loss, full_grad, _ = grad_of(name, old, lp, adv, mask, agg_mode=mode)
    losses, grads = [], []
    for rows in (slice(0, 1), slice(1, 3), slice(3, 6)):
        loss, grad, _ = grad_of(name, old[rows], lp[rows], adv[rows], mask[rows], agg_mode=mode,
                                total_tokens=total_tokens, total_seqs=total_seqs)
        losses.append(loss)
        grads.append(grad)
    torch.testing.assert_close(sum(losses), full_loss, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(torch.cat(grads), full_grad, atol=1e-12, rtol=1e-12)
    # Without the totals the local denominators differ and the sum is not the full loss.
    local = sum(grad_of(name, old[r], lp[r], adv[r], mask[r], agg_mode=mode)[0]
                for r in (slice(0, 1), slice(1, 3), slice(3, 6)))
    assert not torch.allclose(local, full_loss)


def test_empty_sequences_give_finite_loss_and_gradient():
    lp = torch.tensor([[NAN, NAN], [-1.0, -2.0]], requires_grad=True)
    mask = torch.tensor([[0, 0], [1, 1]])
    for name in LOSSES:
        for mode in AGG_MODES:
            loss, _ = compute_policy_loss(name, old_logprobs=lp.detach(), logprobs=lp, advantages=torch.ones(2, 2),
                                          response_mask=mask, agg_mode=mode)
            (grad,) = torch.autograd.grad(loss, lp)
            assert torch.isfinite(loss) and torch.isfinite(grad).all() and (grad[0] == 0).all()
