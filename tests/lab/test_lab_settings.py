"""`gndpo lab --long` / `--small-batch` / `--eval-every`: what each plans, the tables it writes, and one tiny run
through every new piece (small batch, gndpo-running, the stress runs, intermediate evaluations, the figure)."""
import json
from argparse import Namespace

import pytest
from PIL import Image

from gndpo.cli import main
from gndpo.errors import GndpoError
from gndpo.lab.run import (SMALL_BATCH, LabPlan, eval_steps, lab_tasks, norm_jitter, plan_from_args,
                           render_markdown, summarize)


def args(**kw):
    base = dict(methods=None, seeds=None, steps=None, quick=False, stress=False, dense=False, long=False,
                small_batch=False, eval_every=None)
    return Namespace(**{**base, **kw})


def test_settings_plan_what_docs_lab_records():
    default = plan_from_args(args())
    assert (default.steps, default.eval_every, default.methods, default.stress, default.overrides) == \
        (0, 0, ("gspo", "opd", "gndpo"), False, ())
    long = plan_from_args(args(long=True))
    assert (long.steps, long.eval_every, long.seeds, long.methods, long.setting) == \
        (240, 60, 3, ("gspo", "opd", "gndpo"), "long")
    small = plan_from_args(args(small_batch=True))
    assert (small.steps, small.methods, small.stress, small.overrides, small.setting) == \
        (0, ("opd", "gndpo", "gndpo-running"), True, SMALL_BATCH, "small-batch")
    assert plan_from_args(args(long=True, steps=100, eval_every=25)).eval_every == 25
    with pytest.raises(GndpoError, match="unknown lab method 'gndpo-ema'; choose from: gspo, opd, gndpo, .*, "
                                         "gndpo-running"):
        plan_from_args(args(methods=["gndpo-ema"]))
    with pytest.raises(GndpoError, match="--eval-every must be >= 0"):
        plan_from_args(args(eval_every=-1))


def test_eval_steps_are_every_nth_and_the_last():
    assert eval_steps(240, 60) == [60, 120, 180, 240]
    assert eval_steps(10, 4) == [4, 8, 10]
    assert eval_steps(60, 0) == [60]


def test_small_batch_tasks_carry_the_batch_the_variant_and_the_checkpoints(tmp_path):
    plan = LabPlan(seeds=1, steps=5, n_train=8, n_test=4, methods=("opd", "gndpo-running"), stress=True,
                   eval_every=2, overrides=SMALL_BATCH)
    tasks = {t.name: t.cfg for t in lab_tasks(plan, tmp_path, tmp_path / "runs")}
    assert set(tasks) == {"opd-seed0", "gndpo-running-seed0", "opd-stress-seed0", "gndpo-running-stress-seed0",
                          "student", "teacher"}
    running = tasks["gndpo-running-stress-seed0"]
    assert (running.algorithm.advantage, running.algorithm.norm_stats, running.rollout.temperature) == \
        ("gndpo", "running", 1.6)
    assert tasks["opd-seed0"].algorithm.norm_stats == "batch"
    for cfg in (tasks["opd-seed0"], running):
        assert (cfg.trainer.prompts_per_step, cfg.rollout.n, cfg.trainer.total_steps) == (4, 4, 5)
        assert (cfg.checkpoint.every, cfg.checkpoint.keep_last) == (2, None)


def test_norm_jitter_hand_computed():
    # stds 1, 2, 1: |log 2| twice -> mean log 2; the running std wins over the batch's when logged
    assert norm_jitter([{"reward_std": s} for s in (1.0, 2.0, 1.0)]) == pytest.approx(0.693147, abs=1e-6)
    rows = [{"reward_std": s, "norm/running_std": r} for s, r in ((1.0, 4.0), (2.0, 4.0), (1.0, 4.0))]
    assert norm_jitter(rows) == 0.0
    assert norm_jitter([{"reward_std": 1.0}]) is None


def test_tables_of_accuracy_against_steps_and_normalizer_jitter():
    run = dict(grad_norm_max=2.0, spikes=0, loss_std=0.1, train_seconds=1.0, run_dir="x")
    runs = [dict(run, method="opd", seed=s, accuracy=acc, accuracy_at={"2": a2, "4": acc}, norm_jitter=None)
            for s, (a2, acc) in enumerate(((0.40, 0.50), (0.42, 0.54)))]
    runs += [dict(run, method="gndpo", seed=0, accuracy=0.5, accuracy_at={2: 0.45, 4: 0.5}, norm_jitter=0.25)]
    table = summarize(0.3, 0.9, runs)
    plan = LabPlan(seeds=2, steps=4, n_train=8, n_test=4, methods=("opd", "gndpo"), stress=False, eval_every=2)
    text = render_markdown(table, plan, 60.0, 4)
    assert "| opd | 52.0 ± 2.8 | +22.0 | 2.000 | 0.0 | 0.1000 | |" in text
    assert "| gndpo | 50.0 ± 0.0 | +20.0 | 2.000 | 0.0 | 0.1000 | 0.2500 |" in text
    assert "| method | step 0 | step 2 | step 4 |" in text
    assert "| opd | 30.0 | 41.0 ± 1.4 | 52.0 ± 2.8 |" in text
    assert "| gndpo | 30.0 | 45.0 ± 0.0 | 50.0 ± 0.0 |" in text


@pytest.mark.slow
def test_a_tiny_small_batch_lab_with_intermediate_evaluations(tmp_path):
    out = tmp_path / "lab"
    assert main(["lab", "--quick", "--small-batch", "--methods", "gndpo-running", "--steps", "2", "--eval-every",
                 "1", "--jobs", "1", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in results["runs"]] == ["gndpo-running", "gndpo-running-stress"]
    for run in results["runs"]:
        assert set(run["accuracy_at"]) == {"1", "2"} and run["accuracy"] == run["accuracy_at"]["2"]
        assert run["norm_jitter"] is not None
        rows = [json.loads(line) for line in open(f"{run['run_dir']}/metrics.jsonl")]
        assert rows[0]["norm/running_count"] == rows[0]["num_tokens"]  # first step: the batch's own statistics
    text = (out / "results.md").read_text()
    assert "Setting: small-batch (2 steps; every run with trainer.prompts_per_step=4 rollout.n=4" in text
    assert "| gndpo-running-stress | " in text and "| method | step 0 | step 1 | step 2 |" in text
    width, height = Image.open(out / "accuracy_steps.png").size
    assert width >= 400 and height >= 300


@pytest.mark.slow
def test_the_first_steps_of_a_longer_run_are_a_shorter_run(tiny_dir, tmp_path):
    """--long evaluates step 60 of 240-step runs: those weights are what a 60-step run ends with, since nothing
    before a step depends on trainer.total_steps (here 2 of 4 vs 2 of 2)."""
    import torch
    from safetensors.torch import load_file

    from gndpo.config import load_config
    from gndpo.train import train

    weights = []
    for steps in (2, 4):
        out = tmp_path / f"s{steps}"
        train(load_config(None, [
            f"model.path={tiny_dir / 'text_student'}", f"teacher.path={tiny_dir / 'text_teacher'}",
            f"data.train={tiny_dir / 'text.jsonl'}", "data.image_key=null", "rollout.n=4", "rollout.max_new_tokens=8",
            "trainer.prompts_per_step=2", "trainer.micro_batch_size=4", f"trainer.total_steps={steps}",
            "trainer.device=cpu", f"trainer.output_dir={out}", "optim.lr=1e-3", "logging.progress=false",
            "logging.tensorboard=false", "checkpoint.every=2", "checkpoint.keep_last=null",
            f"logging.rollouts_every={steps // 2}"]))
        weights.append(load_file(str(out / "checkpoints" / "step-000002" / "model.safetensors")))
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
