"""Advantage estimators: hand-computed values, the verl formula, invariants, sharded statistics."""

import math
import threading

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gndpo.core.advantages import compute_advantages, distillation_reward, masked_moments

FAST = settings(max_examples=50, deadline=None)
NAN, INF = float("nan"), float("inf")

# Scenario A: valid rewards r = [1, -1, 2 | 0]; padding holds NaN / inf that must not leak.
TEACHER_A = torch.tensor([[-1.0, -3.0, 0.0], [-2.0, NAN, -INF]])
STUDENT_A = torch.tensor([[-2.0, -2.0, -2.0], [-2.0, INF, 0.0]])
MASK_A = torch.tensor([[1, 1, 1], [1, 0, 0]])


def gndpo(**kw):
    return compute_advantages("gndpo", **kw)


def test_gndpo_hand_computed():
    # r = [1, -1, 2, 0]: mean = 0.5; centered [0.5, -1.5, 1.5, -0.5]; sum sq = 5;
    # biased var = 5/4, unbiased = 5/3; adv = centered * sqrt(3/5) = centered * 0.774597.
    adv, metrics = gndpo(teacher_logprobs=TEACHER_A, student_logprobs=STUDENT_A, response_mask=MASK_A)
    expected = torch.tensor([[0.387298, -1.161895, 1.161895], [-0.387298, 0.0, 0.0]])
    torch.testing.assert_close(adv, expected, atol=1e-6, rtol=0)
    assert metrics["reward_mean"] == pytest.approx(0.5)
    assert metrics["reward_std"] == pytest.approx(math.sqrt(5 / 3))
    assert (metrics["reward_min"], metrics["reward_max"]) == (-1.0, 2.0)
    assert metrics["log_ratio_mean"] == pytest.approx(0.5)
    assert metrics["clamp_frac"] == 0.0
    assert metrics["num_tokens"] == 4.0
    assert metrics["adv_mean"] == pytest.approx(0.0, abs=1e-7)
    assert metrics["adv_std"] == pytest.approx(1.0, abs=1e-7)
    assert metrics["adv_max_abs"] == pytest.approx(1.161895, abs=1e-6)
    assert all(isinstance(v, float) for v in metrics.values())


def test_opd_hand_computed():
    # OPD: the clamped reward itself, 0 at padding.
    adv, metrics = compute_advantages(
        "opd", teacher_logprobs=TEACHER_A, student_logprobs=STUDENT_A, response_mask=MASK_A
    )
    torch.testing.assert_close(adv, torch.tensor([[1.0, -1.0, 2.0], [0.0, 0.0, 0.0]]))
    assert metrics["adv_mean"] == pytest.approx(0.5)


# Scenario B: raw log-ratios [1, -inf, 7 | 0] (the teacher gives token 2 zero probability).
TEACHER_B = torch.tensor([[-1.0, -INF, 0.0], [-2.0, NAN, NAN]])
STUDENT_B = torch.tensor([[-2.0, -1.0, -7.0], [-2.0, 0.0, 0.0]])


def test_clamp_makes_minus_inf_finite_hand_computed():
    # clamp 3: r = [1, -3, 3, 0]; mean 0.25; centered [0.75, -3.25, 2.75, -0.25];
    # sum sq = 0.5625 + 10.5625 + 7.5625 + 0.0625 = 18.75; unbiased var 6.25, std 2.5;
    # adv = centered / 2.5 = [0.3, -1.3, 1.1, -0.1]. Two of four tokens clamped.
    adv, metrics = gndpo(teacher_logprobs=TEACHER_B, student_logprobs=STUDENT_B, response_mask=MASK_A, clamp=3.0)
    torch.testing.assert_close(adv, torch.tensor([[0.3, -1.3, 1.1], [-0.1, 0.0, 0.0]]), atol=1e-6, rtol=0)
    assert metrics["clamp_frac"] == 0.5
    assert (metrics["reward_min"], metrics["reward_max"]) == (-3.0, 3.0)
    # log-ratio statistics skip the -inf: finite values 1, 7, 0.
    assert metrics["log_ratio_mean"] == pytest.approx(8 / 3)
    assert (metrics["log_ratio_min"], metrics["log_ratio_max"]) == (0.0, 7.0)
    # The clamp bound changes the result: with 5, r = [1, -5, 5, 0].
    adv5, _ = gndpo(teacher_logprobs=TEACHER_B, student_logprobs=STUDENT_B, response_mask=MASK_A, clamp=5.0)
    assert torch.isfinite(adv5).all() and not torch.allclose(adv5, adv)
    opd, _ = compute_advantages("opd", teacher_logprobs=TEACHER_B, student_logprobs=STUDENT_B, response_mask=MASK_A)
    torch.testing.assert_close(opd, torch.tensor([[1.0, -5.0, 5.0], [0.0, 0.0, 0.0]]))


def test_clamp_none_changes_result_and_rejects_infinite():
    # Scenario A's r = [1, -1, 2, 0] under clamp 1 is [1, -1, 1, 0]; clamp None keeps 2.
    with_clamp, _ = compute_advantages(
        "opd", teacher_logprobs=TEACHER_A, student_logprobs=STUDENT_A, response_mask=MASK_A, clamp=1.0
    )
    without, _ = compute_advantages(
        "opd", teacher_logprobs=TEACHER_A, student_logprobs=STUDENT_A, response_mask=MASK_A, clamp=None
    )
    assert with_clamp[0, 2] == 1.0 and without[0, 2] == 2.0
    with pytest.raises(ValueError, match="infinite values at response positions and clamp is None"):
        gndpo(teacher_logprobs=TEACHER_B, student_logprobs=STUDENT_B, response_mask=MASK_A, clamp=None)


def test_nan_at_response_positions_is_named_error():
    teacher = TEACHER_A.clone()
    teacher[0, :2] = NAN
    with pytest.raises(ValueError, match="teacher_logprobs has 2 NaN values at response positions"):
        gndpo(teacher_logprobs=teacher, student_logprobs=STUDENT_A, response_mask=MASK_A)
    student = STUDENT_A.clone()
    student[1, 0] = NAN
    with pytest.raises(ValueError, match="student_logprobs has 1 NaN values"):
        compute_advantages("opd", teacher_logprobs=TEACHER_A, student_logprobs=student, response_mask=MASK_A)
    with pytest.raises(ValueError, match="rewards has 1 NaN"):
        compute_advantages("grpo", rewards=torch.tensor([1.0, NAN]), group_ids=torch.tensor([0, 0]),
                           response_mask=torch.ones(2, 2))


def test_fewer_than_two_tokens_is_error():
    mask = torch.tensor([[1, 0, 0], [0, 0, 0]])
    with pytest.raises(ValueError, match="at least 2 valid response tokens"):
        gndpo(teacher_logprobs=TEACHER_A, student_logprobs=STUDENT_A, response_mask=mask)


def test_unknown_names_list_valid_ones():
    with pytest.raises(ValueError, match="valid names: gndpo, grpo, opd"):
        compute_advantages("gae")
    with pytest.raises(ValueError, match="valid scopes: batch, group, sequence, none"):
        gndpo(teacher_logprobs=TEACHER_A, student_logprobs=STUDENT_A, response_mask=MASK_A, scope="prompt")
    with pytest.raises(ValueError, match="needs group_ids"):
        gndpo(teacher_logprobs=TEACHER_A, student_logprobs=STUDENT_A, response_mask=MASK_A, scope="group")


def test_scopes_hand_computed():
    # Rows (r per token, P = padding): [1, -1] [2, 0] in group 7; [3, 1] [1, P] in group 2.
    r = torch.tensor([[1.0, -1.0], [2.0, 0.0], [3.0, 1.0], [1.0, NAN]])
    mask = torch.tensor([[1, 1], [1, 1], [1, 1], [1, 0]])
    student = torch.zeros(4, 2)
    groups = torch.tensor([7, 7, 2, 2])
    kw = dict(teacher_logprobs=r, student_logprobs=student, response_mask=mask)
    # group 7 = {1, -1, 2, 0}: as scenario A. group 2 = {3, 1, 1}: mean 5/3, centered [4/3, -2/3, -2/3],
    # sum sq 24/9, unbiased var 4/3, std 1.154701 -> [1.154701, -0.577350, -0.577350].
    adv, _ = gndpo(scope="group", group_ids=groups, **kw)
    expected = torch.tensor([[0.387298, -1.161895], [1.161895, -0.387298], [1.154701, -0.577350], [-0.577350, 0.0]])
    torch.testing.assert_close(adv, expected, atol=1e-6, rtol=0)
    # sequence: [1, -1] -> mean 0, var 2 -> +-0.707107; [2, 0] -> +-0.707107; [3, 1] -> +-0.707107;
    # [1] alone has no variance -> 0.
    adv, _ = gndpo(scope="sequence", **kw)
    s = 0.707107
    torch.testing.assert_close(adv, torch.tensor([[s, -s], [s, -s], [s, -s], [0.0, 0.0]]), atol=1e-6, rtol=0)
    # batch: all 7 tokens {1,-1,2,0,3,1,1}: mean 1, centered [0,-2,1,-1,2,0,0], sum sq 10, var 10/6.
    adv, _ = gndpo(scope="batch", **kw)
    expected = torch.tensor([[0.0, -2.0], [1.0, -1.0], [2.0, 0.0], [0.0, 0.0]]) / math.sqrt(10 / 6)
    torch.testing.assert_close(adv, expected, atol=1e-6, rtol=0)
    # none = OPD.
    adv, _ = gndpo(scope="none", **kw)
    torch.testing.assert_close(adv, torch.where(mask.bool(), r, 0.0))


def test_eps_option_changes_result():
    # r = [0, 1e-5]: var = 5e-11, far below eps=1e-8: adv ~ centered / 1e-4 (eps dominates).
    t = torch.tensor([[0.0, 1e-5]], dtype=torch.float64)
    kw = dict(teacher_logprobs=t, student_logprobs=torch.zeros_like(t), response_mask=torch.ones(1, 2))
    small, _ = gndpo(eps=1e-18, **kw)
    default, _ = gndpo(**kw)
    torch.testing.assert_close(small, torch.tensor([[-0.707107, 0.707107]], dtype=torch.float64), atol=1e-5, rtol=0)
    assert default.abs().max() < 0.1


# --- The official formula, written out literally (verl masked_mean / masked_var(unbiased=True)) ---


def verl_masked_mean(values, mask):
    return (values * mask).sum() / (mask.sum() + 1e-8)


def verl_masked_var(values, mask):
    mean = verl_masked_mean(values, mask)
    centered = values - mean
    variance = verl_masked_mean(centered**2, mask)
    mask_sum = mask.sum()
    return variance * (mask_sum / (mask_sum - 1))


def official_gndpo(teacher, student, mask):
    r = torch.clamp(teacher - student, -5, 5)
    mean, var = verl_masked_mean(r, mask), verl_masked_var(r, mask)
    return (r - mean) * torch.rsqrt(var + 1e-8) * mask


def random_batch(seed, batch, length, scale=3.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    teacher = -scale * torch.rand(batch, length, generator=g, dtype=dtype) * 3
    student = -scale * torch.rand(batch, length, generator=g, dtype=dtype) * 3
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).float()
    mask[0, :2] = 1  # at least two valid tokens, as the batch scope requires
    return teacher, student, mask, g


@FAST
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 6), length=st.integers(2, 9))
def test_matches_literal_verl_formula(seed, batch, length):
    teacher, student, mask, _ = random_batch(seed, batch, length)
    adv, _ = gndpo(teacher_logprobs=teacher, student_logprobs=student, response_mask=mask)
    # When every valid reward clamps to the same bound the variance is 0 and the 1e-8 in the mean's
    # denominator, times rsqrt(1e-8) = 1e4, leaves ~1e-4 that the float32 reference rounds away; gndpo's
    # float64 statistics keep it. More generally the float32 reference's rounding of r (~3e-7 at |r| = 5) is
    # divided by the rewards' spread: below a spread of ~0.1 it exceeds the tolerance (seed 8444, one response of
    # two tokens, failed so). The float64 comparison below covers every case exactly.
    r = torch.clamp(teacher - student, -5, 5)[mask.bool()]
    if float(r.max() - r.min()) > 0.1:
        torch.testing.assert_close(adv, official_gndpo(teacher, student, mask), atol=1e-6, rtol=1e-5)
    t64, s64, m64 = teacher.double(), student.double(), mask.double()
    adv64, _ = gndpo(teacher_logprobs=t64, student_logprobs=s64, response_mask=m64)
    torch.testing.assert_close(adv64, official_gndpo(t64, s64, m64), atol=1e-10, rtol=1e-10)


@FAST
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 6), length=st.integers(2, 9))
def test_gndpo_zero_mean_unit_std(seed, batch, length):
    teacher, student, mask, _ = random_batch(seed, batch, length, dtype=torch.float64)
    adv, _ = gndpo(teacher_logprobs=teacher, student_logprobs=student, response_mask=mask)
    valid = mask.bool()
    r = distillation_reward(teacher, student, mask)[valid]
    if r.var() < 1e-4:  # all rewards (nearly) equal: eps dominates, nothing to normalize
        return
    a = adv[valid]
    assert a.mean().abs() < 1e-6
    assert a.std(unbiased=True).item() == pytest.approx(1.0, abs=1e-5)


@FAST
@given(
    seed=st.integers(0, 2**31 - 1),
    scale=st.floats(0.1, 10.0),
    shift=st.floats(-20.0, 20.0),
    scope=st.sampled_from(["batch", "group", "sequence"]),
)
def test_gndpo_affine_invariance_without_clamp(seed, scale, shift, scope):
    teacher, student, mask, g = random_batch(seed, 6, 5, dtype=torch.float64)
    groups = torch.randint(0, 3, (6,), generator=g)
    kw = dict(student_logprobs=student, response_mask=mask, clamp=None, scope=scope, group_ids=groups, eps=0.0)
    adv, _ = gndpo(teacher_logprobs=teacher, **kw)
    # teacher' - student = scale * (teacher - student) + shift
    adv2, _ = gndpo(teacher_logprobs=scale * (teacher - student) + shift + student, **kw)
    # verl's mean divides by (n + 1e-8), which moves the mean by |mean| * 1e-8 / n: invariance holds
    # to ~1e-7 / std, so segments of nearly equal rewards are skipped.
    r = teacher - student
    segments = {"batch": [0] * 6, "group": groups.tolist(), "sequence": list(range(6))}[scope]
    for seg in set(segments):
        rows = [i for i, s in enumerate(segments) if s == seg]
        values = r[rows][mask[rows].bool()]
        assume(values.numel() < 2 or values.std() > 0.05)
    torch.testing.assert_close(adv2, adv, atol=1e-5, rtol=1e-5)


def loop_gndpo(teacher, student, mask, segment_of_row, eps=1e-8):
    """Plain-python reference: z-score each segment's tokens one by one (verl formula per segment)."""
    adv = torch.zeros_like(teacher)
    for seg in set(segment_of_row):
        rows = [i for i, s in enumerate(segment_of_row) if s == seg]
        values = [
            max(-5.0, min(5.0, float(teacher[i, t] - student[i, t])))
            for i in rows for t in range(teacher.shape[1]) if mask[i, t]
        ]
        n = len(values)
        if n < 2:
            continue
        mean = sum(values) / (n + 1e-8)
        var = sum((v - mean) ** 2 for v in values) / (n + 1e-8) * n / (n - 1)
        for i in rows:
            for t in range(teacher.shape[1]):
                if mask[i, t]:
                    r = max(-5.0, min(5.0, float(teacher[i, t] - student[i, t])))
                    adv[i, t] = (r - mean) / math.sqrt(var + eps)
    return adv


@FAST
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 6), length=st.integers(1, 6))
def test_loop_equals_vectorized_for_every_scope(seed, batch, length):
    teacher, student, mask, g = random_batch(seed, batch, length, dtype=torch.float64)
    groups = torch.randint(0, 3, (batch,), generator=g)
    kw = dict(teacher_logprobs=teacher, student_logprobs=student, response_mask=mask)
    if mask.sum() >= 2:
        adv, _ = gndpo(**kw)
        torch.testing.assert_close(adv, loop_gndpo(teacher, student, mask, [0] * batch), atol=1e-9, rtol=1e-9)
    adv, _ = gndpo(scope="group", group_ids=groups, **kw)
    torch.testing.assert_close(adv, loop_gndpo(teacher, student, mask, groups.tolist()), atol=1e-9, rtol=1e-9)
    adv, _ = gndpo(scope="sequence", **kw)
    torch.testing.assert_close(adv, loop_gndpo(teacher, student, mask, list(range(batch))), atol=1e-9, rtol=1e-9)


@FAST
@given(seed=st.integers(0, 2**31 - 1), extra=st.integers(1, 4), junk=st.sampled_from([NAN, INF, -INF, 123.0]))
def test_padding_invariance(seed, extra, junk):
    teacher, student, mask, g = random_batch(seed, 4, 5)
    groups = torch.tensor([0, 0, 1, 1])
    pad = torch.full((4, extra), junk)
    teacher_p, student_p = torch.cat([teacher, pad], 1), torch.cat([student, -pad], 1)
    mask_p = torch.cat([mask, torch.zeros(4, extra)], 1)
    # Junk also at existing padding positions.
    teacher_p[:, :5] = torch.where(mask.bool(), teacher, junk)
    for name, kw in [("gndpo", {}), ("opd", {}), ("gndpo", {"scope": "group", "group_ids": groups})]:
        adv, metrics = compute_advantages(
            name, teacher_logprobs=teacher, student_logprobs=student, response_mask=mask, **kw
        )
        adv_p, metrics_p = compute_advantages(
            name, teacher_logprobs=teacher_p, student_logprobs=student_p, response_mask=mask_p, **kw
        )
        torch.testing.assert_close(adv_p[:, :5], adv)
        assert (adv_p[:, 5:] == 0).all()
        assert metrics_p == pytest.approx(metrics)


def test_distillation_reward_gradients_do_not_see_padding():
    teacher = TEACHER_B.clone().requires_grad_()
    student = STUDENT_B.clone().requires_grad_()
    r = distillation_reward(teacher, student, MASK_A, clamp=5.0)
    r.sum().backward()
    # d r / d teacher = 1 inside the clamp, 0 where clamped (-inf -> -5, 7 -> 5) and at padding.
    torch.testing.assert_close(teacher.grad, torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))
    torch.testing.assert_close(student.grad, -teacher.grad)


# --- Data-parallel statistics: shards + all-reduce == whole batch ---


class FakeAllReduce:
    """Threads stand in for ranks; each call blocks until every rank has contributed."""

    def __init__(self, world):
        self.world, self.slots = world, [None] * world
        self.barrier = threading.Barrier(world)

    def for_rank(self, rank):
        def reduce(tensor, op):
            assert tensor.dtype == torch.float64 and op in ("sum", "min", "max")
            self.slots[rank] = tensor.clone()
            self.barrier.wait()
            stacked = torch.stack(self.slots)
            out = {"sum": stacked.sum(0), "min": stacked.min(0).values, "max": stacked.max(0).values}[op]
            self.barrier.wait()
            return out

        return reduce


def run_sharded(name, shards, **common):
    fake = FakeAllReduce(len(shards))
    results, errors = [None] * len(shards), []

    def work(rank):
        try:
            results[rank] = compute_advantages(name, reduce=fake.for_rank(rank), **shards[rank], **common)
        except Exception as exc:  # surfaced below
            errors.append(exc)
            fake.barrier.abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in range(len(shards))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), cuts=st.lists(st.integers(0, 8), min_size=1, max_size=3))
def test_sharded_statistics_equal_whole_batch(seed, cuts):
    teacher, student, mask, _ = random_batch(seed, 8, 6)
    mask[0, :2] = 1  # at least two valid tokens overall
    bounds = [0, *sorted(cuts), 8]  # shards may be empty or hold only padding
    shards = [
        dict(teacher_logprobs=teacher[a:b], student_logprobs=student[a:b], response_mask=mask[a:b])
        for a, b in zip(bounds, bounds[1:])
    ]
    whole, whole_metrics = gndpo(teacher_logprobs=teacher, student_logprobs=student, response_mask=mask)
    results = run_sharded("gndpo", shards)
    torch.testing.assert_close(torch.cat([adv for adv, _ in results]), whole, atol=1e-6, rtol=1e-6)
    for _, metrics in results:
        assert metrics == pytest.approx(whole_metrics, rel=1e-9, abs=1e-9)

    s, ss, n = masked_moments(teacher - student, mask)
    assert n == mask.sum()
    valid = mask.bool()
    assert s.item() == pytest.approx((teacher - student)[valid].double().sum().item())
    assert ss.item() == pytest.approx(((teacher - student)[valid].double() ** 2).sum().item())


# --- GRPO ---


def test_grpo_hand_computed():
    # group 0: R = [1, 0, 1, 1]: mean 0.75, centered [.25, -.75, .25, .25], sum sq .75,
    # unbiased var .25, std .5 -> adv = centered / (.5 + 1e-6) ~ [.5, -1.5, .5, .5].
    # group 1: R = [0, 0, 0, 0]: zero variance -> 0.
    rewards = torch.tensor([1.0, 0, 0, 1, 0, 1, 0, 0])
    group_ids = torch.tensor([0, 0, 1, 0, 1, 0, 1, 1])
    mask = torch.tensor([[1, 1, 0]] * 8)
    adv, metrics = compute_advantages("grpo", rewards=rewards, group_ids=group_ids, response_mask=mask)
    per_response = torch.tensor([0.5, -1.5, 0, 0.5, 0, 0.5, 0, 0]) * (0.5 / (0.5 + 1e-6))
    torch.testing.assert_close(adv, per_response[:, None] * mask, atol=1e-6, rtol=0)
    assert metrics["outcome_reward_mean"] == pytest.approx(3 / 8)
    assert metrics["outcome_reward_std"] == pytest.approx(torch.tensor([1.0, 0, 0, 1, 0, 1, 0, 0]).std().item())
    assert metrics["zero_std_group_frac"] == 0.5
    assert metrics["num_tokens"] == 16.0
    # norm_by_std=False: R - mean only.
    adv, _ = compute_advantages("grpo", rewards=rewards, group_ids=group_ids, response_mask=mask, norm_by_std=False)
    torch.testing.assert_close(adv[:, 0], torch.tensor([0.25, -0.75, 0, 0.25, 0, 0.25, 0, 0]))
    # eps changes the result: std .5 + eps 0.5 = 1.
    adv, _ = compute_advantages("grpo", rewards=rewards, group_ids=group_ids, response_mask=mask, eps=0.5)
    torch.testing.assert_close(adv[:, 0], torch.tensor([0.25, -0.75, 0, 0.25, 0, 0.25, 0, 0]))


def test_grpo_singleton_group_keeps_raw_reward():
    adv, _ = compute_advantages("grpo", rewards=torch.tensor([0.7]), group_ids=torch.tensor([3]),
                                response_mask=torch.ones(1, 2))
    torch.testing.assert_close(adv, torch.full((1, 2), 0.7 / (1 + 1e-6)))


@FAST
@given(seed=st.integers(0, 2**31 - 1), groups=st.integers(1, 4), size=st.integers(2, 5), binary=st.booleans())
def test_grpo_loop_equals_vectorized(seed, groups, size, binary):
    g = torch.Generator().manual_seed(seed)
    n = groups * size
    rewards = torch.randn(n, generator=g, dtype=torch.float64)
    if binary:
        rewards = (rewards > 0).double()
    group_ids = torch.randperm(n, generator=g) % groups * 10  # shuffled, non-contiguous ids
    mask = torch.randint(0, 2, (n, 4), generator=g)
    adv, _ = compute_advantages("grpo", rewards=rewards, group_ids=group_ids, response_mask=mask)
    expected = torch.zeros(n, 4, dtype=torch.float64)
    for gid in group_ids.unique():
        members = (group_ids == gid).nonzero().flatten()
        r = rewards[members]
        for i in members:
            expected[i] = (rewards[i] - r.mean()) / (r.std() + 1e-6) * mask[i]
    torch.testing.assert_close(adv, expected, atol=1e-9, rtol=1e-9)
