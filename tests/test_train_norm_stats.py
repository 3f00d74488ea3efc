"""algorithm.norm_stats=running through the loop: the first step is the paper's batch normalization, later steps
are not, the running state is the decayed sum of the batches', and a resumed run ends bit-equal to an
uninterrupted one (the state travels in the checkpoint)."""
import json

import pytest
import torch
from safetensors.torch import load_file

from gndpo.config import load_config
from gndpo.core.advantages import compute_advantages
from gndpo.train import train

pytestmark = pytest.mark.slow
RUNNING = ("algorithm.norm_stats=running", "algorithm.norm_decay=0.5")
NORM_KEYS = ("norm/batch_mean", "norm/batch_std", "norm/running_mean", "norm/running_std", "norm/running_count")


def make_cfg(tiny_dir, out, *, steps, extra=()):
    return load_config(None, [
        f"model.path={tiny_dir / 'text_student'}", f"teacher.path={tiny_dir / 'text_teacher'}",
        f"data.train={tiny_dir / 'text.jsonl'}", "data.image_key=null", "data.prompt_suffix=Answer in \\boxed{}.",
        "rollout.n=4", "rollout.max_new_tokens=8", "trainer.prompts_per_step=2", "trainer.micro_batch_size=4",
        f"trainer.total_steps={steps}", "trainer.device=cpu", f"trainer.output_dir={out}", "optim.lr=1e-3",
        "logging.progress=false", "logging.tensorboard=false", "checkpoint.every=0", "trainer.seed=7", *RUNNING,
        *extra])


def rows(out):
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def weights(out, step):
    return load_file(str(out / "checkpoints" / f"step-{step:06d}" / "model.safetensors"))


def test_running_statistics_in_the_loop_and_a_bit_equal_resume(tiny_dir, tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    seen = []
    train(make_cfg(tiny_dir, full, steps=4), callbacks=[seen.append])
    train(make_cfg(tiny_dir, split, steps=2))  # stops after step 2: its checkpoint holds the running state
    state = torch.load(split / "checkpoints" / "step-000002" / "trainer_state.pt", weights_only=False)["state"]
    train(make_cfg(tiny_dir, split, steps=4, extra=["trainer.resume=true"]))

    a, b = weights(full, 4), weights(split, 4)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    full_rows, split_rows = rows(full), rows(split)
    assert [r["step"] for r in split_rows] == [1, 2, 3, 4]
    keys = (*NORM_KEYS, "loss", "grad_norm")
    for x, y in zip(full_rows, split_rows):
        assert {k: x[k] for k in keys} == {k: y[k] for k in keys}

    # the state: decay * previous + this batch's, the count being the batch's response tokens
    counts = [r["norm/running_count"] for r in full_rows]
    assert counts[0] == full_rows[0]["num_tokens"]
    for t in range(1, 4):
        assert counts[t] == pytest.approx(0.5 * counts[t - 1] + full_rows[t]["num_tokens"], rel=1e-12)
    saved = state["norm_moments"]
    assert isinstance(saved, tuple) and saved[2] == counts[1]

    # step 1 normalizes exactly as the paper does; later steps with the running statistics, so differently
    for rec in seen:
        paper, _ = compute_advantages("gndpo", teacher_logprobs=rec.teacher_logprobs,
                                      student_logprobs=rec.old_logprobs, response_mask=rec.rollouts.response_mask)
        assert torch.equal(rec.advantages, paper) == (rec.step == 1), rec.step
    assert full_rows[0]["norm/running_std"] == full_rows[0]["norm/batch_std"]
    assert full_rows[3]["norm/running_std"] != full_rows[3]["norm/batch_std"]


def test_dense_reward_mode_runs_the_candidate_moments_through_the_running_state(tiny_dir, tmp_path):
    """algorithm.dense_mode=reward: the batch moments are those of every candidate's reward, expectations under the
    old student; the running state joins them as it joins the sampled rewards', so the expected advantage of a
    step is (batch mean - running mean) / running sigma: 0 at step 1, not after."""
    import math

    seen = []
    dense = ["algorithm.distill=topk", "algorithm.topk=4", "algorithm.dense_mode=reward"]
    train(make_cfg(tiny_dir, tmp_path / "dense", steps=2, extra=dense), callbacks=[seen.append])
    got = rows(tmp_path / "dense")
    for row in got:  # the running state's batch statistics are the estimator's own
        assert row["norm/batch_mean"] == pytest.approx(row["reward_mean"], rel=1e-9)
        assert row["norm/batch_std"] == pytest.approx(row["reward_std"], rel=1e-9)
    assert got[1]["norm/running_count"] == pytest.approx(0.5 * got[0]["num_tokens"] + got[1]["num_tokens"])
    for rec, row in zip(seen, got):
        mask = rec.rollouts.response_mask
        q = rec.candidates.old_logprobs.double().exp()[mask]
        expected_adv = float((q * rec.candidates.advantages.double()[mask]).sum()) / int(mask.sum())
        want = (row["norm/batch_mean"] - row["norm/running_mean"]) / math.sqrt(row["norm/running_std"] ** 2 + 1e-8)
        assert expected_adv == pytest.approx(want, rel=1e-4, abs=1e-8)
    assert got[0]["norm/running_mean"] == got[0]["norm/batch_mean"]
    assert abs(want) > 1e-4  # step 2: the running mean is not the batch's, and the check above sees it
