"""kill -9 at random moments, resume, repeat; then check nothing trained was lost or counted twice.

Used by tests/reliability/test_kill9.py (a few kills, in CI) and benchmarks/soak_kill9.py (many, by hand). The
run is the lab's recipe on the shipped tiny models, one thread, a checkpoint after every step, so kills land in
every phase: start-up, sampling, scoring, the update, and the checkpoint write (seen afterwards as a ``.tmp-``
directory the kill left behind, which the next start cleans up).
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from importlib.resources import files
from pathlib import Path

ASSETS = files("gndpo") / "lab" / "assets"


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


def run(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gndpo.cli", "train", *[a for a in args if a]],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)


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

    in_checkpoint_write, seen_steps = 0, []
    for k in range(kills):
        args = train_args(data, out, steps) + (["trainer.resume=true"] if (out / "metrics.jsonl").exists() else [])
        before = _lines(out / "metrics.jsonl")
        p = run(args, env)
        deadline = time.monotonic() + 120
        while p.poll() is None and _lines(out / "metrics.jsonl") <= before and time.monotonic() < deadline:
            time.sleep(0.05)  # start-up done once this incarnation logs a step
        time.sleep(rng.uniform(0.0, 1.2))
        if p.poll() is not None:  # finished before the kill: nothing left to interrupt
            log(f"kill {k + 1}: the run had already ended")
            break
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        leftovers = [d.name for d in (out / "checkpoints").iterdir() if d.name.startswith(".tmp-")] \
            if (out / "checkpoints").exists() else []
        in_checkpoint_write += bool(leftovers)
        seen_steps.append(_lines(out / "metrics.jsonl"))
        log(f"kill {k + 1}/{kills}: after {seen_steps[-1]} logged steps"
            + (f", inside a checkpoint write ({leftovers[0]})" if leftovers else ""))
    p = run(train_args(data, out, steps) + ["trainer.resume=true"], env)
    assert p.wait() == 0, p.stderr.read().decode()[-2000:]

    from safetensors.torch import load_file

    a = load_file(str(ref / "checkpoints" / f"step-{steps:06d}" / "model.safetensors"))
    b = load_file(str(out / "checkpoints" / f"step-{steps:06d}" / "model.safetensors"))
    logged = [json.loads(line)["step"] for line in open(out / "metrics.jsonl")]
    return {"kills": len(seen_steps), "in_checkpoint_write": in_checkpoint_write,
            "bit_equal": a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a),
            "steps_logged": logged, "expected_steps": list(range(1, steps + 1))}
