"""Running reward statistics (algorithm.norm_stats=running): hand-computed values and the limits they must meet."""
import math

import pytest
import torch

from gndpo.core.advantages import compute_advantages
from gndpo.core.normstats import Moments, accumulate_moments, reward_moments, running_step

MASK = torch.tensor([[1, 1, 0], [1, 1, 1]])


def rewards(*rows):
    """Teacher log-probs equal to ``rows`` against a student at 0: the rewards are ``rows`` (|r| <= 5)."""
    width = max(len(r) for r in rows)
    teacher = torch.tensor([list(r) + [float("nan")] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return dict(teacher_logprobs=teacher, student_logprobs=torch.zeros_like(teacher), response_mask=mask)


def gndpo(batch, moments=None):
    return compute_advantages("gndpo", **batch, moments=moments)[0]


def test_two_steps_hand_computed():
    # step 1: r = [1, 3]: (sum, sum sq, count) = (4, 10, 2); step 2: r = [2, 4]: (6, 20, 2). Decay 0.5:
    # S = 0.5*4 + 6 = 8, Q = 0.5*10 + 20 = 25, N = 0.5*2 + 2 = 3; mean = 8/3;
    # sum (r - mean)^2 = Q - S^2/N = 25 - 64/3 = 11/3; var = 11/3 / 3 * 3/2 = 11/6 (std 1.354006);
    # advantages (2 - 8/3) / sqrt(11/6) = -0.492366 and (4 - 8/3) / sqrt(11/6) = 0.984732.
    first, second = rewards([1.0, 3.0]), rewards([2.0, 4.0])
    m1, _ = running_step(None, 0.5, **first)
    assert m1 == Moments(4.0, 10.0, 2.0)
    m2, metrics = running_step(m1, 0.5, **second)
    assert m2 == Moments(8.0, 25.0, 3.0)
    torch.testing.assert_close(gndpo(second, m2), torch.tensor([[-0.492366, 0.984732]]), atol=1e-6, rtol=0)
    # the batch alone: mean 3, unbiased var 2 -> -+1/sqrt(2)
    torch.testing.assert_close(gndpo(second), torch.tensor([[-0.707107, 0.707107]]), atol=1e-6, rtol=0)
    assert metrics == pytest.approx({"norm/batch_mean": 3.0, "norm/batch_std": math.sqrt(2.0),
                                     "norm/running_mean": 8 / 3, "norm/running_std": math.sqrt(11 / 6),
                                     "norm/running_count": 3.0})


def test_first_step_is_batch_normalization_exactly():
    batch = rewards([0.5, -2.0, 4.0], [1.0, 7.0])  # 7 is clamped to 5
    running, _ = running_step(None, 0.9, **batch)
    assert running == reward_moments(**batch)
    assert torch.equal(gndpo(batch, running), gndpo(batch))


def test_decay_zero_is_batch_normalization_at_every_step():
    previous = Moments(100.0, 5000.0, 50.0)  # any history: a decay of 0 forgets it
    for batch in (rewards([1.0, 2.0, -3.0]), rewards([0.25, 0.5], [4.0])):
        running, metrics = running_step(previous, 0.0, **batch)
        assert running == reward_moments(**batch)
        assert torch.equal(gndpo(batch, running), gndpo(batch))
        assert metrics["norm/running_std"] == metrics["norm/batch_std"]
        previous = running


def test_a_repeated_batch_keeps_the_batch_statistics():
    # The decayed sums are their own bias correction: identical batches give the batch's mean and its variance
    # at every step (an EMA started at 0 without Adam's 1 / (1 - d^t) would be pulled to 0 early on). Only the
    # Bessel factor differs: N/(N-1) of the effective count N instead of the batch's n/(n-1) (5/4 here).
    batch = rewards([0.5, -1.5, 2.0], [3.0, -0.25])
    running = None
    for step in range(1, 21):
        running, metrics = running_step(running, 0.9, **batch)
        n = 5 * (1 - 0.9 ** step) / (1 - 0.9)
        assert running.count == pytest.approx(n)
        # equal up to verl's 1e-8 in s / (n + 1e-8)
        assert metrics["norm/running_mean"] == pytest.approx(metrics["norm/batch_mean"], rel=1e-8)
        bessel = (n / (n - 1)) / (5 / 4)
        assert metrics["norm/running_std"] == pytest.approx(metrics["norm/batch_std"] * math.sqrt(bessel), rel=1e-8)
        torch.testing.assert_close(gndpo(batch, running) * math.sqrt(bessel), gndpo(batch), atol=1e-6, rtol=0)


def test_a_constant_reward_stream():
    # every token's reward is 2, step after step: mean 2, variance 0, advantages 0 (finite): what is left is
    # verl's 1e-8 in the mean's denominator, (2 - 2N / (N + 1e-8)) * rsqrt(0 + 1e-8) = 2e-4 / N, as in a batch
    running = None
    for rows, count in ((([2.0, 2.0],), 2.0), (([2.0], [2.0, 2.0, 2.0]), 0.9 * 2 + 4)):
        running, metrics = running_step(running, 0.9, **rewards(*rows))
        assert running.count == pytest.approx(count)
        assert metrics["norm/running_mean"] == pytest.approx(2.0) and metrics["norm/running_std"] == 0.0
        adv = gndpo(rewards(*rows), running)
        torch.testing.assert_close(adv[rewards(*rows)["response_mask"].bool()],
                                   torch.full((sum(map(len, rows)),), 2e-4 / count), atol=1e-9, rtol=0)


def test_running_statistics_damp_a_batch_that_strays():
    # After steady batches of mean 0, one batch shifted to mean 3: the batch z-score erases the shift (mean-zero
    # advantages), the running statistics keep most of it as a positive advantage.
    steady, shifted = rewards([1.0, -1.0, 0.5, -0.5]), rewards([4.0, 2.0, 3.5, 2.5])
    running = None
    for _ in range(10):
        running, _ = running_step(running, 0.9, **steady)
    running, _ = running_step(running, 0.9, **shifted)
    assert abs(float(gndpo(shifted).sum())) < 1e-5
    assert float(gndpo(shifted, running).min()) > 0


def test_split_and_reduce_equals_whole_batch():
    # two ranks, each with half of the responses: the all-reduced moments are the whole batch's, so are the
    # running statistics built from them (2 ranks = 1 process)
    whole = rewards([1.0, -2.0, 3.0], [0.5, 0.25, -4.0])
    rank0, rank1 = rewards([1.0, -2.0, 3.0]), rewards([0.5, 0.25, -4.0])
    other = torch.tensor(reward_moments(**rank1), dtype=torch.float64)

    def all_reduce(t, op):  # what dist.all_reduce returns on rank 0
        assert op == "sum" and t.dtype == torch.float64
        return t + other

    previous = Moments(2.0, 9.0, 4.0)
    split, _ = running_step(previous, 0.9, **rank0, reduce=all_reduce)
    single, _ = running_step(previous, 0.9, **whole)
    assert split == pytest.approx(single, rel=1e-15)


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\]"):
        accumulate_moments(None, Moments(1.0, 1.0, 2.0), 1.5)
    batch = rewards([1.0, 2.0])
    with pytest.raises(ValueError, match="scope='batch' only"):
        compute_advantages("gndpo", **batch, scope="group", group_ids=torch.tensor([0]), moments=(3.0, 5.0, 2.0))
    with pytest.raises(ValueError, match="at least 2 valid response tokens"):
        gndpo(batch, Moments(1.0, 1.0, 1.5))
    assert Moments(1.0, 1.0, 1.0).mean_std() == (0.0, 0.0)
