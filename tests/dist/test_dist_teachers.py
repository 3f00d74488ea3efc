"""Several teachers and self-distillation under torchrun (gloo, 2 ranks, FSDP2): the same global batch trains as
in one process. Each rank scores its own share of each teacher; the self teacher scores with the sharded student
gathered once per call, on every rank even when a rank has no response for it; per-teacher statistics and
metrics pool over the ranks."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from test_dist import overrides, torchrun

from gndpo.config import load_config
from gndpo.train import train

pytestmark = pytest.mark.slow
CONTEXT = '"Reference answer: {answer}"'
KEYS = ("loss", "grad_norm", "entropy", "reward_mean", "reward_std", "clamp_frac")


def variants(family_dir, routed):
    teachers = (f"teachers=[{{name: big, path: \"{family_dir / 'qwen2_teacher'}\"}}, "
                f"{{name: self, path: self, context: {CONTEXT}}}]")
    return {
        # records 0-7 route big, self, big, big, self, big, ...: the two ranks' shares differ per teacher
        "routed": ["teacher.path=null", teachers, "data.teacher_key=teacher", f"data.train={routed}",
                   "algorithm.teacher_norm=per_teacher", "data.shuffle=false"],
        "self": ["teacher.path=self", f"teacher.context={CONTEXT}"],
    }


@pytest.fixture(scope="module")
def runs(family_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("dist-teachers")
    rows = [json.loads(line) for line in open(family_dir / "text.jsonl")]
    routed = root / "routed.jsonl"
    routed.write_text("".join(json.dumps({**r, "teacher": "self" if i % 3 == 1 else "big"}) + "\n"
                              for i, r in enumerate(rows)))
    spec, refs = [], {}
    for name, extra in variants(family_dir, routed).items():
        adv = root / f"adv-{name}"
        adv.mkdir()
        spec.append({"overrides": overrides("text", family_dir, None, root / f"2-{name}", method="gndpo",
                                            extra=extra), "advantages": str(adv)})
    result = torchrun({"runs": spec}, root)
    assert result.returncode == 0, result.stderr[-3000:]
    for name, extra in variants(family_dir, routed).items():
        seen = []
        train(load_config(None, overrides("text", family_dir, None, root / f"1-{name}", method="gndpo", extra=extra)),
              callbacks=[seen.append])
        refs[name] = seen
    return root, refs


@pytest.mark.parametrize("name", ["routed", "self"])
def test_two_ranks_train_as_one_process(runs, family_dir, name):
    root, refs = runs
    one = [json.loads(line) for line in open(root / f"1-{name}" / "metrics.jsonl")]
    two = [json.loads(line) for line in open(root / f"2-{name}" / "metrics.jsonl")]
    assert [r["step"] for r in two] == [1, 2, 3]
    keys = KEYS + (("teacher/big/reward_mean", "teacher/self/reward_mean", "teacher/self/token_share")
                   if name == "routed" else ())
    for a, b in zip(one, two):
        for key in keys:
            assert math.isclose(a[key], b[key], rel_tol=1e-4, abs_tol=1e-6), (key, a[key], b[key])
    if name == "routed":  # both teachers scored at every step, and the ranks' shares of them differed
        assert all(0 < r["teacher/self/token_share"] < 1 for r in two)
    for step, rec in enumerate(refs[name], start=1):
        ids = [rec.rollouts.records[int(i)].id for i in rec.rollouts.prompt_index]
        for rank in (0, 1):
            part = torch.load(root / f"adv-{name}" / f"rank{rank}-step{step}.pt")
            rows = [ids.index(pid) + (k % 4) for k, pid in enumerate(part["ids"])]
            R = part["advantages"].shape[1]
            torch.testing.assert_close(part["advantages"], rec.advantages[rows][:, :R], rtol=0, atol=1e-5)
    a = load_file(str(root / f"1-{name}" / "checkpoints" / "step-000003" / "model.safetensors"))
    b = load_file(str(root / f"2-{name}" / "checkpoints" / "step-000003" / "model.safetensors"))
    initial = load_file(str(family_dir / "qwen2_student" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)
    assert any(not torch.equal(initial[k], b[k]) for k in initial if k in b)
