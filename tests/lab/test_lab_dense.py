"""gndpo lab --dense: which runs it plans, and that each is the dense setting it names (no training here)."""
from argparse import Namespace

import pytest

from gndpo.errors import GndpoError
from gndpo.lab.run import DENSE, lab_tasks, normalizes, plan_from_args


def args(**kw):
    return Namespace(**{"quick": True, "methods": None, "seeds": 2, "steps": None, "stress": False, "dense": False,
                        **kw})


def test_dense_runs_beside_opd_and_gndpo_in_both_settings(tmp_path):
    plan = plan_from_args(args(dense=True, stress=True))
    assert plan.methods == ("opd", "gndpo", "fkl-topk-loss", "rkl-topk-loss", "rkl-topk-gndpo")
    tasks = [t for t in lab_tasks(plan, tmp_path / "data", tmp_path / "runs") if t.cfg is not None]
    names = [t.name for t in tasks]
    assert len(names) == 2 * 5 * 2 and "rkl-topk-gndpo-stress-seed1" in names
    by_name = {t.name: t.cfg for t in tasks}
    for method, (recipe, _) in DENSE.items():
        a = by_name[f"{method}-seed0"].algorithm
        assert (a.distill, a.topk, a.advantage, a.scope) == ("topk", 8, "gndpo", "batch")
    assert by_name["fkl-topk-loss-seed0"].algorithm.divergence == "forward_kl"
    assert (by_name["rkl-topk-gndpo-seed0"].algorithm.divergence,
            by_name["rkl-topk-gndpo-seed0"].algorithm.dense_mode) == ("reverse_kl", "reward")
    assert by_name["rkl-topk-loss-stress-seed0"].rollout.temperature == 1.6
    assert by_name["opd-seed0"].algorithm.distill == "sampled"
    # the normalizer's jitter is reported for runs that z-score a reward over the batch only
    assert [normalizes(by_name[f"{m}-seed0"]) for m in plan.methods] == [False, True, False, False, True]


def test_the_default_lab_runs_no_dense_setting_and_unknown_names_are_one_line(tmp_path):
    assert plan_from_args(args()).methods == ("gspo", "opd", "gndpo")
    with pytest.raises(GndpoError, match="unknown lab method 'kl-topk'; choose from: gspo, opd, gndpo, fkl-topk-loss"):
        plan_from_args(args(methods=["kl-topk"]))
