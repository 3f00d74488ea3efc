"""core/candidates.py: the per-candidate rewards of dense_mode=reward, their expectation-weighted normalization
and the clipped surrogate over candidates, against numbers worked out by hand and against autograd."""
import math

import pytest
import torch

from gndpo.core.candidates import (
    candidate_advantages, candidate_moments, candidate_policy_loss, candidate_rewards, sampled_candidate,
)
from gndpo.core.divergences import _DIVERGENCES, buckets, topk_divergence
from gndpo.core.normstats import Moments, join_step

L = math.log


def one_position(t_top, s_top, s_rest):
    return dict(teacher_topk_logprobs=torch.tensor([L(t_top)]), student_topk_logprobs=torch.tensor([L(s_top)]),
                student_rest=torch.tensor(L(s_rest)))


@pytest.mark.parametrize("name, expected", [
    # teacher (0.5 | tail 0.5), student (0.25 | tail 0.75)
    ("reverse_kl", [L(0.5 / 0.25), L(0.5 / 0.75)]),                      # log p - log q
    ("forward_kl", [2.0, 2.0 / 3.0]),                                    # p / q
    ("jsd", [0.5 * L(0.375 / 0.25), 0.5 * L(0.625 / 0.75)]),             # (1 - b) log(m / q), m = (0.375, 0.625)
])
def test_candidate_rewards_by_hand(name, expected):
    r, student = candidate_rewards(name, **one_position(0.5, 0.25, 0.75), beta=0.5)
    assert r.tolist() == pytest.approx(expected, abs=1e-7)
    assert student.exp().tolist() == pytest.approx([0.25, 0.75], abs=1e-7)


@pytest.mark.parametrize("name, shift", [("reverse_kl", 1.0), ("forward_kl", 0.0), ("jsd", 0.0)])
def test_the_rewards_are_the_negative_derivative_of_the_divergence(name, shift):
    """autograd of the registered divergence w.r.t. the student's bucket probabilities (free variables): the reward
    is -dD/dq, up to the stated constant (reverse_kl drops its +1)."""
    g = torch.Generator().manual_seed(0)
    teacher = torch.log_softmax(torch.randn(3, 5, generator=g, dtype=torch.float64), -1)
    student = torch.log_softmax(torch.randn(3, 5, generator=g, dtype=torch.float64), -1)
    for beta in (0.5, 0.2):
        q = student.exp().requires_grad_(True)
        d = _DIVERGENCES[name](buckets(teacher[:, :4], torch.log(teacher[:, 4:].exp().sum(-1))), torch.log(q), beta)
        (grad,) = torch.autograd.grad(d.sum(), q)
        r, _ = candidate_rewards(name, teacher_topk_logprobs=teacher[:, :4], student_topk_logprobs=student[:, :4],
                                 student_rest=student[:, 4], beta=beta)
        torch.testing.assert_close(r, -grad + shift, rtol=1e-6, atol=1e-6)


def test_the_sampled_tokens_candidate_is_its_place_in_the_topk_or_the_tail():
    ids = torch.tensor([[[5, 3], [7, 1]]])  # (1, 2, 2)
    assert sampled_candidate(torch.tensor([[3, 9]]), ids).tolist() == [[1, 2]]


# one response, 2 positions, 2 candidates; old q = (0.5, 0.5) and (0.25, 0.75), rewards (1, 3) and (2, -2):
# E_q r = 2 and -1 -> mean 0.5; E_q r^2 = 5 and 4 -> var = (4.5 - 0.25) * 2 / 1 = 8.5
OLD = torch.log(torch.tensor([[[0.5, 0.5], [0.25, 0.75]]]))
REWARD = torch.tensor([[[1.0, 3.0], [2.0, -2.0]]])
MASK = torch.tensor([[True, True]])
SAMPLED = torch.tensor([[1, 0]])


def test_gndpo_normalization_with_expectations_under_the_old_student_by_hand():
    adv, m = candidate_advantages(REWARD, OLD, MASK, SAMPLED, clamp=5.0)
    s = math.sqrt(8.5)
    torch.testing.assert_close(adv, torch.tensor([[[0.5 / s, 2.5 / s], [1.5 / s, -2.5 / s]]]), rtol=1e-6, atol=1e-7)
    # the expected advantage under the old student is 0 over the batch: the mean cancels
    assert float((OLD.exp() * adv).sum()) == pytest.approx(0.0, abs=1e-6)
    assert m["reward_mean"] == pytest.approx(0.5) and m["reward_std"] == pytest.approx(s)
    assert (m["reward_min"], m["reward_max"], m["clamp_frac"]) == (-2.0, 3.0, 0.0)
    assert m["adv_mean"] == pytest.approx((2.5 / s + 1.5 / s) / 2, rel=1e-6)  # the sampled candidates' advantages
    assert m["adv_max_abs"] == pytest.approx(2.5 / s, rel=1e-6) and m["num_tokens"] == 2
    assert candidate_moments(REWARD, OLD, MASK) == (pytest.approx(1.0), pytest.approx(9.0), 2.0)


def test_the_clamp_bounds_each_candidate_and_padding_is_never_read():
    reward = torch.tensor([[[1.0, 3.0], [2.0, -2.0], [float("nan"), float("inf")]]])
    old = torch.cat([OLD, torch.full((1, 1, 2), float("nan"))], 1)
    mask = torch.tensor([[True, True, False]])
    adv, m = candidate_advantages(reward, old, mask, torch.tensor([[1, 0, 0]]), clamp=2.5)
    # pos 1's 3 -> 2.5: E = 1.75 and -1, mean 0.375; E2 = 3.625 and 4, var = (3.8125 - 0.140625) * 2
    mean, std = 0.375, math.sqrt((3.8125 - 0.140625) * 2)
    torch.testing.assert_close(adv[0, 0], torch.tensor([(1 - mean) / std, (2.5 - mean) / std]), rtol=1e-6, atol=1e-7)
    assert adv[0, 2].tolist() == [0.0, 0.0]
    assert m["clamp_frac"] == pytest.approx(0.25)  # half the mass of one of two positions
    none, _ = candidate_advantages(reward, old, mask, torch.tensor([[1, 0, 0]]), clamp=2.5, scope="none")
    assert none.tolist() == [[[1.0, 2.5], [2.0, -2.0], [0.0, 0.0]]]  # opd: the clamped rewards


def test_infinite_rewards_need_the_clamp():
    with pytest.raises(ValueError, match="set a clamp bound"):
        candidate_advantages(torch.tensor([[[1.0, float("inf")], [0.0, 1.0]]]), OLD, MASK, SAMPLED, clamp=None)


def test_split_batches_with_pooled_moments_equal_the_whole_batch():
    g = torch.Generator().manual_seed(1)
    reward = torch.randn(4, 3, 5, generator=g)
    old = torch.log_softmax(torch.randn(4, 3, 5, generator=g), -1)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    sampled = torch.randint(0, 5, (4, 3), generator=g)
    whole, _ = candidate_advantages(reward, old, mask, sampled, clamp=1.5)
    halves = [candidate_moments(reward[i:i + 2], old[i:i + 2], mask[i:i + 2], 1.5) for i in (0, 2)]
    pooled = [float(a + b) for a, b in zip(*halves)]
    assert pooled == pytest.approx([float(v) for v in candidate_moments(reward, old, mask, 1.5)])
    for i in (0, 2):  # what a rank computes with the pooled moments (reduce) equals its rows of the whole
        part, _ = candidate_advantages(reward[i:i + 2], old[i:i + 2], mask[i:i + 2], sampled[i:i + 2], clamp=1.5,
                                       moments=pooled)
        torch.testing.assert_close(part, whole[i:i + 2])
    # running statistics: the first step is the batch's own
    running, _ = join_step(None, 0.9, Moments(*pooled))
    assert torch.equal(candidate_advantages(reward, old, mask, sampled, clamp=1.5, moments=running)[0], whole)


def test_sequence_scope_normalizes_each_response_alone():
    reward = torch.cat([REWARD, 10 * REWARD + 7])
    old, mask, sampled = OLD.repeat(2, 1, 1), MASK.repeat(2, 1), SAMPLED.repeat(2, 1)
    adv, _ = candidate_advantages(reward, old, mask, sampled, clamp=None, scope="sequence")
    torch.testing.assert_close(adv[0], adv[1], rtol=1e-5, atol=1e-6)  # affine invariance, each row its own stats
    whole, _ = candidate_advantages(REWARD, OLD, MASK, SAMPLED, clamp=None)
    torch.testing.assert_close(adv[:1], whole)


def test_the_clipped_surrogate_over_candidates_by_hand():
    old = torch.log(torch.tensor([[[0.5, 0.5]]]))
    adv = torch.tensor([[[1.0, -1.0]]])
    mask = torch.tensor([[True]])
    # rho = (1.5, 0.5): both clipped, min(1.5, 1.2) = 1.2 and min(-0.5, -0.8) = -0.8 -> L = -(0.6 - 0.4)
    lp = torch.log(torch.tensor([[[0.75, 0.25]]])).requires_grad_(True)
    loss, m = candidate_policy_loss(old_logprobs=old, logprobs=lp, advantages=adv, response_mask=mask)
    assert float(loss.detach()) == pytest.approx(-0.2) and m["clip_frac"] == pytest.approx(1.0)
    assert m["approx_kl"] == pytest.approx(0.5 * (L(0.5 / 0.75) + L(0.5 / 0.25)))
    assert m["ratio_mean"] == pytest.approx(1.0) and m["ratio_max"] == pytest.approx(1.5)
    loss.backward()
    assert lp.grad.abs().max() == 0  # clipped on both sides: no gradient
    # rho = (1.1, 0.9): inside the clip, L = -(0.55 - 0.45)
    lp = torch.log(torch.tensor([[[0.55, 0.45]]]))
    loss, m = candidate_policy_loss(old_logprobs=old, logprobs=lp, advantages=adv, response_mask=mask)
    assert float(loss) == pytest.approx(-0.1) and m["clip_frac"] == 0.0


@pytest.mark.parametrize("name", ["reverse_kl", "forward_kl", "jsd"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_at_the_old_weights_the_gradient_is_the_divergences_over_sigma(name, agg):
    """The policy loss's gradient w.r.t. the student's logits at theta = theta_old equals (1 / sigma) times the
    gradient of the divergence aggregated the same way (no clamp reached): the mean cancels over all K + 1
    candidates."""
    from gndpo.core.losses import aggregate_loss

    g = torch.Generator().manual_seed(2)
    B, T, V, K = 2, 4, 7, 3
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    teacher_full = torch.log_softmax(torch.randn(B, T, V, generator=g, dtype=torch.float64), -1)
    t_top, ids = teacher_full.topk(K, -1)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)

    def student_buckets():
        logp = torch.log_softmax(logits, -1)
        return logp.gather(-1, ids), torch.logsumexp(logp.scatter(-1, ids, float("-inf")), -1)

    gathered, rest = student_buckets()
    rewards, old = candidate_rewards(name, teacher_topk_logprobs=t_top, student_topk_logprobs=gathered,
                                     student_rest=rest, beta=0.3)
    adv, m = candidate_advantages(rewards, old, mask, torch.zeros(B, T, dtype=torch.long), clamp=None)
    loss, _ = candidate_policy_loss(old_logprobs=old, logprobs=buckets(gathered, rest), advantages=adv.double(),
                                    response_mask=mask, agg_mode=agg)
    (ours,) = torch.autograd.grad(loss, logits, retain_graph=True)
    d, _, _ = topk_divergence(name, teacher_topk_logprobs=t_top, student_topk_logprobs=gathered,
                              student_rest=rest, beta=0.3)
    (ref,) = torch.autograd.grad(aggregate_loss(d, mask, agg), logits)
    sigma = math.sqrt(m["reward_std"] ** 2 + 1e-8)
    # advantages travel in float32, so the match is at float32's precision
    torch.testing.assert_close(ours, ref / sigma, rtol=1e-5, atol=1e-6)
    assert ours.abs().max() > 1e-3
