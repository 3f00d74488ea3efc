"""Several teachers and self-distillation, end to end in one process (tiny text models): routing per record,
per-teacher metrics and statistics (teacher_norm), the student as its own teacher on its current or starting
weights, dense (top-k) distillation through both, and the one-line errors of bad input before any model loads."""
import json
import math

import pytest
import torch

from gndpo.config import load_config
from gndpo.errors import ConfigError
from gndpo.train import train

pytestmark = pytest.mark.slow
CONTEXT = '"Reference answer: {answer}"'


@pytest.fixture(scope="module")
def routed(tiny_dir, tmp_path_factory):
    """text.jsonl with a ``teacher`` field: big, small, (none: the default), big, small, ... per record."""
    path = tmp_path_factory.mktemp("routed") / "train.jsonl"
    rows = [json.loads(line) for line in open(tiny_dir / "text.jsonl")]
    names = ("big", "small", None)
    path.write_text("".join(json.dumps({**r, **({"teacher": names[i % 3]} if names[i % 3] else {})}) + "\n"
                            for i, r in enumerate(rows)))
    return path


def make_cfg(tiny_dir, out, data, *, steps=1, extra=(), teachers=True):
    overrides = [f"model.path={tiny_dir / 'text_student'}", f"data.train={data}", "data.image_key=null",
                 "data.prompt_suffix=none", "data.shuffle=false", "rollout.n=4", "rollout.max_new_tokens=6",
                 "trainer.prompts_per_step=3", "trainer.micro_batch_size=4", f"trainer.total_steps={steps}",
                 "trainer.device=cpu", f"trainer.output_dir={out}", "optim.lr=1e-3", "logging.progress=false",
                 "logging.tensorboard=false", "trainer.seed=11", *extra]
    if teachers:  # small is the student's own starting model, served as an ordinary teacher
        overrides += [f"teachers=[{{name: big, path: \"{tiny_dir / 'text_teacher'}\"}}, "
                      f"{{name: small, path: \"{tiny_dir / 'text_student'}\"}}]", "data.teacher_key=teacher"]
    return load_config(None, overrides)


def test_each_response_is_scored_by_its_records_teacher(tiny_dir, routed, tmp_path):
    seen = []
    metrics = train(make_cfg(tiny_dir, tmp_path / "run", routed), callbacks=[seen.append])
    rec = seen[0]
    names = [rec.rollouts.records[int(i)].fields.get("teacher", "big") for i in rec.rollouts.prompt_index]
    assert set(names) == {"big", "small"} and "teacher" not in rec.rollouts.records[2].fields  # default: the first
    mask = rec.rollouts.response_mask
    small = torch.tensor([n == "small" for n in names])
    # small is the student itself before the update: its scores are the student's own, the big teacher's are not
    torch.testing.assert_close(rec.teacher_logprobs[small], rec.old_logprobs[small], rtol=0, atol=1e-5)
    assert (rec.teacher_logprobs[~small] - rec.old_logprobs[~small]).abs()[mask[~small]].min() > 1e-4
    tokens = {n: float(mask[torch.tensor([m == n for m in names])].sum()) for n in ("big", "small")}
    assert metrics["teacher/small/token_share"] == pytest.approx(tokens["small"] / sum(tokens.values()))
    assert metrics["teacher/small/reward_mean"] == pytest.approx(0.0, abs=1e-5)
    r = (rec.teacher_logprobs - rec.old_logprobs).clamp(-5, 5)[~small][mask[~small]]
    assert metrics["teacher/big/reward_mean"] == pytest.approx(float(r.mean()), abs=1e-5)
    assert metrics["teacher/small/clamp_frac"] == 0.0
    assert math.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0


def test_teacher_norm_pools_per_teacher_or_over_the_batch(tiny_dir, routed, tmp_path):
    records = {}
    for norm in ("batch", "per_teacher"):
        seen = []
        cfg = make_cfg(tiny_dir, tmp_path / norm, routed, extra=[f"algorithm.teacher_norm={norm}"])
        cfg.teachers[1].path, cfg.teachers[1].context = "self", "Reference answer: {answer}"  # r != 0 there
        train(cfg, callbacks=[seen.append])
        records[norm] = seen[0]
    batch, per = records["batch"], records["per_teacher"]
    assert torch.equal(batch.rollouts.response_ids, per.rollouts.response_ids)  # same rollouts, other statistics
    mask = batch.rollouts.response_mask
    small = torch.tensor([batch.rollouts.records[int(i)].fields.get("teacher") == "small"
                          for i in batch.rollouts.prompt_index])
    for rows in (small, ~small):  # per teacher: each teacher's tokens z-scored on their own (std 1 up to the
        values = per.advantages[rows][mask[rows]]  # 1e-8 under the rsqrt: the self teacher's r are small here)
        assert abs(float(values.mean())) < 1e-5 and abs(float(values.std()) - 1) < 1e-3
    values = batch.advantages[mask]  # batch: over every token together, and not per teacher
    assert abs(float(values.mean())) < 1e-5 and abs(float(values.std()) - 1) < 1e-4
    assert abs(float(batch.advantages[small][mask[small]].std()) - 1) > 0.1


@pytest.mark.parametrize("weights", ["current", "initial"])
def test_the_student_teaches_itself_with_the_reference_answer(tiny_dir, tmp_path, weights):
    """Step 1: both score with the starting weights, after the privileged prompt. Step 2: current has moved with
    the update, initial has not."""
    from gndpo.models import load_model
    from gndpo.teacher.context import ContextTeacher
    from gndpo.teacher.hf import HFTeacher

    seen = []
    cfg = make_cfg(tiny_dir, tmp_path / weights, tiny_dir / "text.jsonl", steps=2, teachers=False,
                   extra=["teacher.path=self", f"teacher.context={CONTEXT}", f"teacher.self_weights={weights}"])
    train(cfg, callbacks=[seen.append])
    start = load_model(str(tiny_dir / "text_student"))
    reference = ContextTeacher(HFTeacher(start.model, start.processor, suffix=None), "Reference answer: {answer}")
    for step, rec in enumerate(seen, start=1):
        expected = reference.score(rec.rollouts).logprobs
        if step == 1 or weights == "initial":
            torch.testing.assert_close(rec.teacher_logprobs, expected, rtol=0, atol=1e-5)
        else:
            assert (rec.teacher_logprobs - expected).abs().max() > 1e-3
        if step == 1:  # the privileged prompt, not the student's: the scores differ from the old log-probs
            assert (rec.teacher_logprobs - rec.old_logprobs).abs().max() > 1e-3


def test_dense_topk_through_several_teachers_and_the_self_teacher(tiny_dir, routed, tmp_path):
    cfg = make_cfg(tiny_dir, tmp_path / "dense", routed, extra=[
        "algorithm.distill=topk", "algorithm.topk=4", "algorithm.dense_mode=reward"])
    cfg.teachers[1].path, cfg.teachers[1].context = "self", "Reference answer: {answer}"
    seen = []
    metrics = train(cfg, callbacks=[seen.append])
    assert seen[0].divergence is not None and torch.isfinite(seen[0].divergence).all()
    assert math.isfinite(metrics["loss"]) and metrics["distill/divergence"] > 0
    assert {"teacher/big/token_share", "teacher/small/token_share"} <= metrics.keys()


# ---------------------------------------------------------------- bad input, before any model loads


def test_bad_routes_and_contexts_are_one_line_before_any_model_loads(tiny_dir, routed, tmp_path, capsys):
    from test_cli import assert_one_line_error, run_cli, write_jsonl

    rows = [json.loads(line) for line in open(tiny_dir / "text.jsonl")][:4]
    unknown = write_jsonl(tmp_path / "unknown.jsonl", [{**r, "teacher": "big" if i else "huge"}
                                                       for i, r in enumerate(rows)])
    base = ["train", "model.path=/nonexistent/model", "data.image_key=null", "trainer.device=cpu",
            f"trainer.output_dir={tmp_path / 'run'}", "logging.progress=false"]
    teachers = "teachers=[{name: big, path: /x}, {name: small, path: /y}]"
    cases = [
        ([f"data.train={unknown}", teachers, "data.teacher_key=teacher"],
         ["names the teacher 'huge'", "(big, small)", "record 0 of data.train"]),
        ([f"data.train={routed}", "teacher.path=self", "teacher.context='\"{solution}\"'"],
         ["teacher.context reads the field 'solution'", "(its fields: id, problem, answer, teacher)"]),
        ([f"data.train={routed}", "teacher.path=self"], ["teacher.path=self needs teacher.context"]),
        ([f"data.train={routed}", "teachers=[{name: a, path: /x}, {name: b}]", "data.teacher_key=teacher"],
         ["teachers[1] ('b') has neither path nor url"]),
    ]
    for args, needles in cases:
        rc, _, err = run_cli(base + args, capsys)
        assert_one_line_error(rc, err, *needles)  # not "model path not found": no model was looked for
    # every teacher of the list is checked against the student's tokenizer at start
    rc, _, err = run_cli(["train", f"model.path={tiny_dir / 'text_student'}", f"data.train={routed}",
                          "data.image_key=null", "trainer.device=cpu", f"trainer.output_dir={tmp_path / 'tok'}",
                          "logging.progress=false", "data.teacher_key=teacher",
                          f"teachers=[{{name: big, path: \"{tiny_dir / 'text_teacher'}\"}}, "
                          f"{{name: small, path: \"{tiny_dir / 'text_other_tok'}\"}}]"], capsys)
    assert_one_line_error(rc, err, "vocabularies differ")
    with pytest.raises(ConfigError, match="dist.shard_teacher is not supported with a teachers: list"):
        load_config(None, ["model.path=m", "data.train=d", teachers, "data.teacher_key=t", "dist.shard_teacher=true"])
    with pytest.raises(ConfigError, match="algorithm.teacher_norm=per_teacher and algorithm.norm_stats=running both "
                                          "replace the batch statistics"):
        load_config(None, ["model.path=m", "data.train=d", teachers, "data.teacher_key=t",
                           "algorithm.teacher_norm=per_teacher", "algorithm.norm_stats=running"])
