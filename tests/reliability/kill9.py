"""kill -9 at random moments, resume, repeat; then check nothing trained was lost or counted twice.

Used by tests/reliability/test_kill9.py (a few kills, in CI) and benchmarks/soak_kill9.py (many, by hand). The
run is the lab's recipe on the shipped tiny models, one thread, a checkpoint after every step. Kills take turns
aiming at the run's phases: any moment after a step (sampling, scoring, the update, a checkpoint write), the
model load, and the first rollout of a (re)started process. Where each kill landed is read from the phase marks
``phase_marked_train.py`` writes as the run enters each phase (a checkpoint write is also seen afterwards as the
``.tmp-`` directory the kill left behind, which the next start cleans up).
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from importlib.resources import files
from pathlib import Path

ASSETS = files("gndpo") / "lab" / "assets"
MARKED = Path(__file__).with_name("phase_marked_train.py")
# what each aim waits for before its random delay (seconds)
AIMS = (("running", None, 1.2), ("model load", "load", 0.2), ("running", None, 1.2),
        ("first rollout", "rollout 1", 0.5))


def train_args(data: Path, out: Path, steps: int) -> list[str]:
    return [str(Path(str(files("gndpo"))).parents[1] / "configs" / "lab" / "gndpo.yaml")
            if (Path(str(files("gndpo"))).parents[1] / "configs").exists() else "",
            f"model.path={ASSETS / 'student'}", f"teacher.path={ASSETS / 'teacher'}", f"data.train={data}",
            "trainer.prompts_per_step=4", "rollout.n=4", "trainer.micro_batch_size=16", f"trainer.total_steps={steps}",
            "trainer.threads=1", f"trainer.output_dir={out}", "logging.progress=false", "logging.tensorboard=false",
            "checkpoint.every=1", "checkpoint.keep_last=2", "trainer.seed=3"]


def _lines(path: Path) -> int:
    try:
        return sum(1 for _ in open(path))
    except OSError:
        return 0


def _marks(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except OSError:
        return []


def run(args: list[str], env: dict, marks: Path | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "gndpo.cli", "train"] if marks is None else [sys.executable, str(MARKED), str(marks)]
    return subprocess.Popen([*cmd, *[a for a in args if a]], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=env)


def phase(marks: list[str], logged_before: int, logged_now: int, leftovers: list[str]) -> str:
    """Where a kill landed, from the last phase mark of the killed process (``leftovers``: the ``.tmp-``
    checkpoint directories it wrote)."""
    last = marks[-1] if marks else "start"
    if last == "checkpoint":  # without a leftover: renamed into place, the step's metrics line not yet written
        return "checkpoint write" if leftovers else "checkpoint done, metrics line pending"
    if last == "start":
        return "start-up (imports, config, data)"
    if last == "load":
        return "model load"
    if logged_now == logged_before:  # no step of this process finished: its first one
        return "first step (rollout, scoring)" if last.startswith("rollout") else "first step (update)"
    return "a later step (rollout, scoring)" if last.startswith("rollout") else "a later step (update)"


def soak(root: Path, *, kills: int, steps: int, seed: int = 0, log=print) -> dict:
    """Kill a run ``kills`` times at random moments, then let it finish; compare with an uninterrupted run."""
    from gndpo.lab.task import write_task

    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    write_task(root / "task", seed=0, n_train=32, n_test=4)
    data = root / "task" / "train.jsonl"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    ref, out = root / "reference", root / "killed"
    p = run(train_args(data, ref, steps), env)
    assert p.wait() == 0, p.stderr.read().decode()[-2000:]

    phases, seen_steps = Counter(), []
    for k in range(kills):
        args = train_args(data, out, steps) + (["trainer.resume=true"] if (out / "metrics.jsonl").exists() else [])
        before = _lines(out / "metrics.jsonl")
        marks = root / f"marks-{k}.txt"
        started = time.time()
        p = run(args, env, marks)
        aim, wait_for, delay = AIMS[k % len(AIMS)]
        deadline = time.monotonic() + 120
        while p.poll() is None and time.monotonic() < deadline and not (
                wait_for in _marks(marks) if wait_for else _lines(out / "metrics.jsonl") > before):
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, delay))
        if p.poll() is not None:  # finished before the kill: nothing left to interrupt
            log(f"kill {k + 1}: the run had already ended")
            break
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        ckpts = out / "checkpoints"  # the half-written checkpoints of this process (an older one waits for the
        leftovers = [d.name for d in ckpts.iterdir()  # next save's clean-up)
                     if d.name.startswith(".tmp-") and d.stat().st_mtime >= started] if ckpts.exists() else []
        seen_steps.append(_lines(out / "metrics.jsonl"))
        where = phase(_marks(marks), before, seen_steps[-1], leftovers)
        phases[where] += 1
        log(f"kill {k + 1}/{kills} (aimed at {aim}): in {where}, after {seen_steps[-1]} logged steps"
            + (f" ({leftovers[0]} left behind)" if leftovers else ""))
    p = run(train_args(data, out, steps) + ["trainer.resume=true"], env)
    assert p.wait() == 0, p.stderr.read().decode()[-2000:]

    from safetensors.torch import load_file

    a = load_file(str(ref / "checkpoints" / f"step-{steps:06d}" / "model.safetensors"))
    b = load_file(str(out / "checkpoints" / f"step-{steps:06d}" / "model.safetensors"))
    logged = [json.loads(line)["step"] for line in open(out / "metrics.jsonl")]
    return {"kills": len(seen_steps), "phases": dict(phases), "in_checkpoint_write": phases["checkpoint write"],
            "bit_equal": a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a),
            "steps_logged": logged, "expected_steps": list(range(1, steps + 1))}
