"""Faults survived: damaged checkpoints, pre-emption signals, non-finite values, write failures. Each ends with
nothing trained lost (final weights bit-equal to an uninterrupted run) or one line and the last checkpoint intact."""
import errno
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from gndpo import checkpoint as ckpt
from gndpo.cli import main
from gndpo.config import load_config
from gndpo.errors import GndpoError, TrainingError
from gndpo.train import train

pytestmark = pytest.mark.slow


def overrides(tiny_dir, out, steps, *extra):
    return [f"model.path={tiny_dir / 'text_student'}", f"teacher.path={tiny_dir / 'text_teacher'}",
            f"data.train={tiny_dir / 'text.jsonl'}", "data.image_key=null", "data.prompt_suffix=Answer in \\boxed{}.",
            "rollout.n=4", "rollout.max_new_tokens=8", "trainer.prompts_per_step=2", "trainer.micro_batch_size=4",
            f"trainer.total_steps={steps}", "trainer.device=cpu", "trainer.threads=1", f"trainer.output_dir={out}",
            "optim.lr=1e-3", "logging.progress=false", "logging.tensorboard=false", "checkpoint.every=1",
            "checkpoint.keep_last=null", "trainer.seed=7", *extra]


def cfg(tiny_dir, out, steps, *extra):
    return load_config(None, overrides(tiny_dir, out, steps, *extra))


def weights(out, step):
    return load_file(str(out / "checkpoints" / f"step-{step:06d}" / "model.safetensors"))


def assert_bit_equal(a, b):
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def steps_logged(out):
    return [json.loads(line)["step"] for line in open(out / "metrics.jsonl")]


@pytest.fixture(scope="module")
def reference(tiny_dir, tmp_path_factory):
    """An uninterrupted 4-step run."""
    out = tmp_path_factory.mktemp("reference") / "run"
    train(cfg(tiny_dir, out, 4))
    return out


def test_a_damaged_checkpoint_is_set_aside_and_an_earlier_one_resumes(tiny_dir, tmp_path, reference, caplog):
    out = tmp_path / "run"
    train(cfg(tiny_dir, out, 3))
    manifest = json.loads((out / "checkpoints" / "step-000003" / ckpt.MANIFEST).read_text())
    assert "model.safetensors" in manifest["files"] and "trainer_state.pt" in manifest["files"]
    weights_file = out / "checkpoints" / "step-000003" / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:100])  # truncated, as by a failed copy
    assert "model.safetensors has 100 bytes" in ckpt.verify_checkpoint(weights_file.parent)
    with caplog.at_level("WARNING", logger="gndpo"):
        train(cfg(tiny_dir, out, 4, "trainer.resume=true"))
    assert "checkpoint step-000003 is damaged (model.safetensors has 100 bytes" in caplog.text
    assert "resuming from step-000002" in caplog.text
    assert any(p.name.startswith(".broken-step-000003") for p in (out / "checkpoints").iterdir())
    assert_bit_equal(weights(out, 4), weights(reference, 4))
    assert steps_logged(out) == [1, 2, 3, 4]


def test_no_intact_checkpoint_is_one_line(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    train(cfg(tiny_dir, out, 2))
    for step in (1, 2):  # a flipped byte: same size, other checksum
        f = out / "checkpoints" / f"step-{step:06d}" / "trainer_state.pt"
        data = bytearray(f.read_bytes())
        data[-1] ^= 0xFF
        f.write_bytes(bytes(data))
    code = main(["train", *overrides(tiny_dir, out, 3, "trainer.resume=true")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: no intact checkpoint in")
    assert "step-000002: trainer_state.pt does not match its checksum" in err[-1]


def test_export_refuses_a_damaged_checkpoint(tiny_dir, tmp_path):
    out = tmp_path / "run"
    train(cfg(tiny_dir, out, 1))
    (out / "checkpoints" / "step-000001" / "config.json").unlink()
    with pytest.raises(GndpoError, match="is damaged \\(config.json is missing\\); export another step"):
        ckpt.export_checkpoint(out)


def test_sigterm_saves_at_the_step_boundary_and_resume_is_exact(tiny_dir, tmp_path, reference):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    # no periodic checkpoints: the one after the signal is the only way the trained steps survive
    proc = subprocess.Popen([sys.executable, "-m", "gndpo.cli", "train",
                             *overrides(tiny_dir, out, 400, "checkpoint.every=0")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not ((out / "metrics.jsonl").exists()
                                               and len(steps_logged(out)) >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("stopped by SIGTERM after step ") and "written; resume with --resume" in last
    stopped = int(last.split("after step ")[1].split(":")[0])
    assert ckpt.latest_checkpoint(out).name == f"step-{stopped:06d}" and steps_logged(out) == list(range(1, stopped + 1))
    # wherever the signal landed, the resumed run trains on and ends bit-equal to an uninterrupted run of as many
    # steps (the 4-step reference, or a longer one when the signal came later)
    final = max(4, stopped + 1)
    if final > 4:
        reference = tmp_path / "reference"
        train(cfg(tiny_dir, reference, final, "checkpoint.every=0"))
    train(cfg(tiny_dir, out, final, "trainer.resume=true", "checkpoint.every=0"))
    assert_bit_equal(weights(out, final), weights(reference, final))
    assert steps_logged(out) == list(range(1, final + 1))


def test_a_kill_between_a_checkpoint_and_its_metrics_line_loses_no_line(tiny_dir, tmp_path, reference):
    """The window the kill -9 soak found: step 2's checkpoint complete, its metrics line not yet written. The
    checkpoint carries the line; the resumed run writes it back, so every step is logged exactly once."""
    out = tmp_path / "run"
    train(cfg(tiny_dir, out, 2))
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text(lines[0] + "\n")  # as the kill left it
    train(cfg(tiny_dir, out, 4, "trainer.resume=true"))
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[1]["loss"] == json.loads(lines[1])["loss"]  # the same line, less the checkpoint's own timing
    assert_bit_equal(weights(out, 4), weights(reference, 4))


def test_nan_teacher_log_probs_never_reach_the_weights(tiny_dir, tmp_path, monkeypatch, capsys):
    import gndpo.teacher.hf

    real = gndpo.teacher.hf.HFTeacher.score

    def poisoned(self, rollouts):
        import dataclasses

        scores = real(self, rollouts)
        lp = scores.logprobs.clone()
        lp[0, 0] = float("nan")
        return dataclasses.replace(scores, logprobs=lp)

    monkeypatch.setattr(gndpo.teacher.hf.HFTeacher, "score", poisoned)
    out = tmp_path / "run"
    before = load_file(str(tiny_dir / "text_student" / "model.safetensors"))
    code = main(["train", *overrides(tiny_dir, out, 10, "trainer.max_bad_steps=3")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: 3 consecutive steps (up to step 3) had non-finite values "
                                            "(bad/teacher_logprobs); none updated the weights")
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["bad_step"] for r in rows] == [1.0, 1.0, 1.0] and all(r["bad/teacher_logprobs"] == 1.0 for r in rows)
    assert all(math.isnan(r["loss"]) and r["update_skipped"] == 1.0 for r in rows)
    assert_bit_equal({k: v for k, v in weights(out, 3).items()}, {k: before[k] for k in weights(out, 3)})


def test_nonfinite_student_log_probs_advantages_loss_and_gradients_never_reach_the_weights(tiny_dir, tmp_path,
                                                                                            monkeypatch, capsys):
    """One run, one poisoned place per step: the student's log-probs (+inf), the advantages (NaN), the loss (NaN,
    hence every gradient) and one gradient (+inf, after a clean backward). Each step is skipped and says why;
    after max_bad_steps=4 of them the run stops with one line; weights and optimizer state are untouched."""
    import dataclasses

    import gndpo.objective as objective
    import gndpo.train as tr

    step = {"n": 0}
    real_stats, real_adv, real_loss, real_norm = (tr.rollout_stats, tr.compute_step_advantages,
                                                  objective.compute_policy_loss, tr.clip_grad_norm)

    def student_lp(*args, **kwargs):  # the student's pre-update pass, once per step: it also counts the steps
        step["n"] += 1
        stats = real_stats(*args, **kwargs)
        if step["n"] == 1:
            lp = stats.logprobs.clone()
            lp[0, 0] = float("inf")
            stats = dataclasses.replace(stats, logprobs=lp)
        return stats

    def advantages(*args, **kwargs):
        adv, *rest = real_adv(*args, **kwargs)
        if step["n"] == 2:
            adv = adv.clone()
            adv[1, 0] = float("nan")
        return adv, *rest

    def loss(*args, **kwargs):
        value, metrics = real_loss(*args, **kwargs)
        return (value * float("nan"), metrics) if step["n"] == 3 else (value, metrics)

    def grad_norm(params, *args, **kwargs):
        if step["n"] == 4:
            assert all(torch.isfinite(p.grad).all() for p in params if p.grad is not None)  # a clean backward
            next(p for p in params if p.grad is not None).grad.view(-1)[0] = float("inf")
        return real_norm(params, *args, **kwargs)

    for name, fn in (("rollout_stats", student_lp), ("compute_step_advantages", advantages),
                     ("clip_grad_norm", grad_norm)):
        monkeypatch.setattr(tr, name, fn)
    monkeypatch.setattr(objective, "compute_policy_loss", loss)
    optimizer_steps, real_step = [], torch.optim.AdamW.step

    def counted_step(self, *args, **kwargs):
        # Distributed Checkpoint's save calls step() once with lr 0 and zero gradients to create the state it
        # saves (torch.distributed.checkpoint.state_dict._init_optim_state): not an update
        if any(float(g["lr"]) != 0.0 for g in self.param_groups):
            optimizer_steps.append(step["n"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", counted_step)
    out = tmp_path / "run"
    before = load_file(str(tiny_dir / "text_student" / "model.safetensors"))
    code = main(["train", *overrides(tiny_dir, out, 10, "trainer.max_bad_steps=4")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(
        "error: 4 consecutive steps (up to step 4) had non-finite values (bad/gradients); none updated the weights")
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["bad_step"] for r in rows] == [1.0] * 4 and all(r["update_skipped"] == 1.0 for r in rows)
    assert rows[0]["bad/student_logprobs"] == 1.0 and rows[1]["bad/advantages"] == 1.0
    assert rows[2]["bad/gradients"] == 1.0 and math.isnan(rows[2]["loss"]) and math.isnan(rows[2]["grad_norm"])
    assert rows[3]["bad/gradients"] == 1.0 and math.isfinite(rows[3]["loss"]) and rows[3]["grad_norm"] == math.inf
    assert [sum(r[k] > 0 for k in ("bad/teacher_logprobs", "bad/student_logprobs", "bad/advantages",
                                   "bad/gradients")) for r in rows] == [1, 1, 1, 1]  # each step names its cause
    assert_bit_equal(weights(out, 4), {k: before[k] for k in weights(out, 4)})
    assert optimizer_steps == []  # AdamW never stepped: its moments hold nothing of these steps


@pytest.mark.parametrize("where", ["manifest", "shards"])
def test_disk_full_while_saving_keeps_the_previous_checkpoint(tiny_dir, tmp_path, monkeypatch, capsys, reference,
                                                              where):
    """The disk fills while step 3 is saved: in gndpo's own files, or inside a Distributed Checkpoint write
    (which reports a rank's OSError wrapped in its CheckpointException)."""
    from torch.distributed.checkpoint.api import CheckpointException

    import gndpo.dist

    out = tmp_path / "run"
    full = OSError(errno.ENOSPC, "No space left on device")
    real_write, real_shards = ckpt._atomic_write_text, gndpo.dist.save_sharded

    def write(path, text):
        if where == "manifest" and path.name == ckpt.MANIFEST and ".tmp-step-000003" in str(path.parent):
            raise full
        return real_write(path, text)

    def shards(path, model, optimizer):
        if where == "shards" and ".tmp-step-000003" in path:
            raise CheckpointException("write_data", {0: full})
        return real_shards(path, model, optimizer)

    monkeypatch.setattr(ckpt, "_atomic_write_text", write)
    monkeypatch.setattr(gndpo.dist, "save_sharded", shards)
    code = main(["train", *overrides(tiny_dir, out, 4)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: cannot write checkpoint step-000003 in") and "No space left on device" in err[0]
    assert "step-000002 is intact and is the one --resume uses" in err[0]
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-000001", "step-000002"]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    monkeypatch.undo()
    train(cfg(tiny_dir, out, 4, "trainer.resume=true"))
    assert_bit_equal(weights(out, 4), weights(reference, 4))


@pytest.mark.skipif(not os.path.exists("/dev/full") or not os.path.isdir("/proc/self/fd"),
                    reason="needs Linux's /dev/full and /proc/self/fd to fill the disk under the metrics file")
def test_an_unwritable_metrics_file_is_one_line(tiny_dir, tmp_path, monkeypatch, capsys):
    """The disk fills under metrics.jsonl during step 2: its open descriptor is pointed at /dev/full, so the real
    JsonlLogger.log gets the operating system's ENOSPC from its write, and so does the close that follows."""
    import gndpo.train as tr

    out = tmp_path / "run"
    metrics = os.path.realpath(out / "metrics.jsonl")
    real_stats, step = tr.rollout_stats, {"n": 0}

    def fill_the_disk(*args, **kwargs):  # once per step
        step["n"] += 1
        if step["n"] == 2:
            [fd] = [int(fd) for fd in os.listdir("/proc/self/fd")
                    if os.path.realpath(f"/proc/self/fd/{fd}") == metrics]
            full = os.open("/dev/full", os.O_WRONLY)
            os.dup2(full, fd)
            os.close(full)
        return real_stats(*args, **kwargs)

    monkeypatch.setattr(tr, "rollout_stats", fill_the_disk)
    code = main(["train", *overrides(tiny_dir, out, 3)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0] == (f"error: cannot write the metrics file {out / 'metrics.jsonl'}: No space left on device; free "
                      f"space or fix permissions, then resume (checkpoints already written are intact)")
    assert ckpt.latest_checkpoint(out).name == "step-000002"  # saved before the log line failed
    assert steps_logged(out) == [1]


def test_training_error_is_a_user_facing_error():
    assert issubclass(TrainingError, GndpoError)
