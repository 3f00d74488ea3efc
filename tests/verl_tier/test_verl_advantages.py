"""The gndpo / gndpo_opd estimators through verl's own driver-side advantage step, against gndpo.core.

verl's ``compute_advantage`` (``verl.trainer.ppo.ray_trainer``, which the V1 trainer calls through
``compute_advantage_for_multi_trajectories``) looks the estimator up in its registry and runs it on a DataProto
holding the whole batch; ``token_level_rewards`` carries teacher - student per response token.
"""
import numpy as np
import pytest
import torch
from verl_batches import PATTERNS, random_batch, run_ranks

from gndpo.core import compute_advantages

SHAPES = [(2, 3), (7, 16), (32, 64), (64, 9)]


def verl_advantages(estimator, teacher, student, mask, algorithm=None, uids=None):
    from omegaconf import OmegaConf
    from verl import DataProto
    from verl.trainer.ppo.v1.utils import compute_advantage_for_multi_trajectories

    uids = uids if uids is not None else np.array([f"p{i // 4}" for i in range(len(mask))], dtype=object)
    data = DataProto.from_dict(
        tensors={"token_level_rewards": (teacher - student).float(), "response_mask": mask},
        non_tensors={"uid": uids},
    )
    config = OmegaConf.create({"adv_estimator": estimator, **(algorithm or {})})
    keys = [f"{u}_{i}_0" for i, u in enumerate(uids)]
    out = compute_advantage_for_multi_trajectories(data, batch_keys=keys, adv_estimator=estimator, config=config)
    assert out.batch["returns"] is out.batch["advantages"] or torch.equal(out.batch["returns"], out.batch["advantages"])
    return out.batch["advantages"]


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("batch,length", SHAPES)
@pytest.mark.parametrize("estimator,core_name", [("gndpo", "gndpo"), ("gndpo_opd", "opd")])
def test_verl_advantages_equal_gndpo_core(estimator, core_name, batch, length, pattern):
    teacher, student, mask = random_batch(batch * 1000 + length, batch, length, pattern)
    got = verl_advantages(estimator, teacher, student, mask)
    want, _ = compute_advantages(core_name, teacher_logprobs=teacher, student_logprobs=student, response_mask=mask)
    assert got.shape == (batch, length) and got.dtype == torch.float32
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert (got[mask == 0] == 0).all()
    if estimator == "gndpo":  # z-scored over every valid token of the whole batch
        valid = got[mask.bool()].double()
        assert abs(valid.mean().item()) < 1e-6 and abs(valid.std().item() - 1.0) < 1e-5
    else:  # OPD: the clamped log-ratio itself
        ratio = (teacher - student).clamp(-5, 5)
        torch.testing.assert_close(got[mask.bool()], ratio[mask.bool()], atol=1e-6, rtol=0)


def test_hand_computed_batch():
    # log-ratios 1, 3 | 8 (clamped to 5), pad: r = [1, 3, 5], mean 3, unbiased var (4 + 0 + 4) / 2 = 4, std 2
    teacher = torch.tensor([[1.0, 3.0], [8.0, 99.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    got = verl_advantages("gndpo", teacher, torch.zeros(2, 2), mask)
    torch.testing.assert_close(got, torch.tensor([[-1.0, 0.0], [1.0, 0.0]]), atol=1e-6, rtol=0)
    opd = verl_advantages("gndpo_opd", teacher, torch.zeros(2, 2), mask)
    torch.testing.assert_close(opd, torch.tensor([[1.0, 3.0], [5.0, 0.0]]))


@pytest.mark.parametrize("world", [2, 3, 8])
@pytest.mark.parametrize("pattern", ["right", "holes"])
def test_driver_statistics_equal_any_data_parallel_split(world, pattern):
    """verl computes advantages once on the driver; gndpo's own trainer all-reduces per-rank moments. For any
    split of the batch over ``world`` ranks, both give the same advantages; so does any reordering of the batch
    (verl's batch balancing reorders responses before the advantage step)."""
    teacher, student, mask = random_batch(world, 48, 20, pattern)
    driver = verl_advantages("gndpo", teacher, student, mask)
    cuts = sorted(torch.randperm(47, generator=torch.Generator().manual_seed(world))[: world - 1].add(1).tolist())
    bounds = list(zip([0, *cuts], [*cuts, 48]))

    def rank(r, reduce):
        lo, hi = bounds[r]
        adv, _ = compute_advantages("gndpo", teacher_logprobs=teacher[lo:hi], student_logprobs=student[lo:hi],
                                    response_mask=mask[lo:hi], reduce=reduce)
        return adv

    sharded = torch.cat(run_ranks(world, rank))
    torch.testing.assert_close(driver, sharded, atol=1e-6, rtol=0)
    perm = torch.randperm(48, generator=torch.Generator().manual_seed(7))
    shuffled = verl_advantages("gndpo", teacher[perm], student[perm], mask[perm])
    torch.testing.assert_close(shuffled, driver[perm], atol=1e-6, rtol=0)


def test_options_reach_gndpo_core():
    teacher, student, mask = random_batch(3, 16, 12, "right")
    uids = np.array([f"p{i // 4}" for i in range(16)], dtype=object)
    cases = [({"clamp": None}, dict(clamp=None)), ({"clamp": 2.0}, dict(clamp=2.0)), ({"eps": 1.0}, dict(eps=1.0)),
             ({"scope": "sequence"}, dict(scope="sequence")),
             ({"scope": "group"}, dict(scope="group", group_ids=torch.arange(16) // 4))]
    default = verl_advantages("gndpo", teacher, student, mask)
    for options, core_options in cases:
        got = verl_advantages("gndpo", teacher, student, mask, {"gndpo": options}, uids)
        want, _ = compute_advantages("gndpo", teacher_logprobs=teacher, student_logprobs=student, response_mask=mask,
                                     **core_options)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        assert not torch.allclose(got, default), options  # every option changes the result


def test_bad_options_and_batches_fail_with_the_cause():
    teacher, student, mask = random_batch(4, 4, 5, "full")
    with pytest.raises(ValueError, match=r"algorithm.gndpo has unknown key\(s\) \['clip'\]; valid keys: clamp, eps"):
        verl_advantages("gndpo", teacher, student, mask, {"gndpo": {"clip": 3}})
    with pytest.raises(ValueError, match="unknown normalization scope 'prompt'"):
        verl_advantages("gndpo", teacher, student, mask, {"gndpo": {"scope": "prompt"}})
    with pytest.raises(ValueError, match="at least 2 valid response tokens"):
        verl_advantages("gndpo", teacher, student, torch.zeros_like(mask))


def test_registry_lookup_names_gndpo():
    from verl.trainer.ppo import core_algos

    from gndpo.integrations import verl as plugin

    assert core_algos.get_adv_estimator_fn("gndpo") is plugin.compute_gndpo_advantage
    assert core_algos.get_adv_estimator_fn("gndpo_opd") is plugin.compute_opd_advantage
    with pytest.raises(ValueError, match="Unknown advantage estimator"):
        core_algos.get_adv_estimator_fn("gndpo_typo")
