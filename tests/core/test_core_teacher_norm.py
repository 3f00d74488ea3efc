"""Several teachers in the distillation estimators: per-teacher statistics (scope "teacher") and per-teacher
metrics, worked out by hand; split across ranks they equal the whole batch's."""
import math

import pytest
import torch

from gndpo.core.advantages import compute_advantages

NAMES = ("a", "b")
# r per token (P = padding). Rows 0, 2 scored by teacher a, rows 1, 3 by teacher b.
#   a: [1, -1], [3, 1]    -> {1, -1, 3, 1}: mean 1, centered [0, -2, 2, 0], sum sq 8, unbiased var 8/3
#   b: [2, P], [0, 7]     -> {2, 0, 7} (7 clamps to 5 with clamp 5): {2, 0, 5}: mean 7/3,
#                            centered [-1/3, -7/3, 8/3], sum sq 114/9, unbiased var 19/3
R = torch.tensor([[1.0, -1.0], [2.0, float("nan")], [3.0, 1.0], [0.0, 7.0]])
MASK = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1]])
IDS = torch.tensor([0, 1, 0, 1])


def run(scope, r=R, mask=MASK, ids=IDS, reduce=None, names=NAMES, **kw):
    return compute_advantages("gndpo", teacher_logprobs=r, student_logprobs=torch.zeros_like(r), response_mask=mask,
                              clamp=5.0, scope=scope, teacher_ids=ids, teacher_names=names, reduce=reduce, **kw)


def test_per_teacher_statistics_hand_computed():
    adv, metrics = run("teacher")
    sa, sb = math.sqrt(8 / 3), math.sqrt(19 / 3)
    expected = torch.tensor([[0.0, -2 / sa], [-1 / 3 / sb, 0.0], [2 / sa, 0.0], [-7 / 3 / sb, 8 / 3 / sb]])
    torch.testing.assert_close(adv, expected, atol=1e-6, rtol=0)
    # the batch scope pools all 7 tokens {1,-1,2,3,1,0,5}: mean 11/7 -> another answer
    batch, _ = run("batch")
    r = torch.tensor([1.0, -1.0, 2.0, 3.0, 1.0, 0.0, 5.0])
    z = (r - r.mean()) / r.std()
    torch.testing.assert_close(batch[MASK.bool()], z, atol=1e-6, rtol=0)
    assert (adv - batch).abs().max() > 0.1
    # each teacher's tokens have mean 0 and unit (unbiased) std under scope "teacher"
    for k in (0, 1):
        rows = adv[IDS == k][MASK[IDS == k].bool()]
        assert abs(float(rows.mean())) < 1e-6 and abs(float(rows.std()) - 1) < 1e-6


def test_per_teacher_metrics_hand_computed():
    _, metrics = run("batch")
    # a: rewards {1,-1,3,1} mean 1, nothing clamped, 4 of 7 tokens; b: {2,0,5} mean 7/3, one of 3 clamped
    assert metrics["teacher/a/reward_mean"] == pytest.approx(1.0)
    assert metrics["teacher/b/reward_mean"] == pytest.approx(7 / 3)
    assert metrics["teacher/a/clamp_frac"] == 0.0 and metrics["teacher/b/clamp_frac"] == pytest.approx(1 / 3)
    assert metrics["teacher/a/token_share"] == pytest.approx(4 / 7)
    assert metrics["teacher/b/token_share"] == pytest.approx(3 / 7)
    assert metrics["reward_mean"] == pytest.approx(11 / 7)  # the batch's own metrics are unchanged


def test_a_teacher_with_no_tokens_or_one_token():
    # teacher c scored nothing: NaN means, share 0; teacher b's single token has no variance: advantage 0
    r, mask = torch.tensor([[1.0, 2.0], [4.0, 0.0]]), torch.tensor([[1, 1], [1, 0]])
    adv, metrics = run("teacher", r=r, mask=mask, ids=torch.tensor([0, 1]), names=("a", "b", "c"))
    torch.testing.assert_close(adv, torch.tensor([[-0.707107, 0.707107], [0.0, 0.0]]), atol=1e-6, rtol=0)
    assert math.isnan(metrics["teacher/c/reward_mean"]) and metrics["teacher/c/token_share"] == 0.0
    assert metrics["teacher/b/token_share"] == pytest.approx(1 / 3)


def test_split_over_ranks_equals_the_whole_batch():
    """Two 'ranks' (threads) holding rows {0, 1} and {2, 3}, reducing through a barrier as torch.distributed
    would: each gets exactly its rows of the whole batch's advantages and the whole batch's metrics."""
    import threading

    halves = [slice(0, 2), slice(2, 4)]
    whole, whole_metrics = run("teacher")
    barrier, slots, results = threading.Barrier(2), [None, None], [None, None]

    def reduce_for(rank):
        def reduce(t, op):
            slots[rank] = t.clone()
            barrier.wait()
            both = torch.stack(slots)
            out = {"sum": both.sum(0), "min": both.min(0).values, "max": both.max(0).values}[op]
            barrier.wait()
            return out
        return reduce

    def rank_main(rank):
        part = halves[rank]
        results[rank] = run("teacher", r=R[part], mask=MASK[part], ids=IDS[part], reduce=reduce_for(rank))

    threads = [threading.Thread(target=rank_main, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for rank, part in enumerate(halves):
        adv, metrics = results[rank]
        torch.testing.assert_close(adv, whole[part], atol=1e-6, rtol=0)
        for key in ("teacher/a/reward_mean", "teacher/b/clamp_frac", "teacher/b/token_share", "adv_std",
                    "reward_mean"):
            assert metrics[key] == pytest.approx(whole_metrics[key])


def test_bad_teacher_ids_are_refused():
    with pytest.raises(ValueError, match="scope='teacher' needs teacher_ids"):
        compute_advantages("gndpo", teacher_logprobs=R, student_logprobs=torch.zeros_like(R), response_mask=MASK,
                           scope="teacher")
    with pytest.raises(ValueError, match=r"one id in \[0, 2\) per response"):
        run("batch", ids=torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match=r"one id in \[0, 2\) per response"):
        run("batch", ids=torch.tensor([0, 1]))
