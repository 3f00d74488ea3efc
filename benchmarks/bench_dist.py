"""1 process vs 2 ranks (torchrun, gloo, FSDP2) on this CPU: the same training, tokens/s and the ratio.

    python3 run.py bench bench_dist.py [--steps 6] [--recipe lab|text] [--repeats 2]

Both runs train the same global batch from the same seed (so they also end with the same weights, which the
script checks); the 2-rank run gives each process half the prompts, one torch thread each. On a 2-core machine
the best case is 2x; gloo collectives, the FSDP2 gathers and the duplicated teacher pay for the rest. Interleaved
repeats (1, 2, 1, 2, ...) so background load hits both alike; medians of the steady steps (step 1 excluded).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def recipe(name: str, root: Path, steps: int, out: Path) -> list[str]:
    from gndpo.lab.task import write_task

    if name == "lab":  # the lab's LLaVA pair and task: what `gndpo lab` trains
        data = root / "task"
        if not data.exists():
            write_task(data, seed=0, n_train=64, n_test=4)
        assets = ROOT / "src" / "gndpo" / "lab" / "assets"
        return [str(ROOT / "configs" / "lab" / "gndpo.yaml"), f"model.path={assets / 'student'}",
                f"teacher.path={assets / 'teacher'}", f"data.train={data / 'train.jsonl'}",
                "trainer.prompts_per_step=16", "trainer.micro_batch_size=32", f"trainer.total_steps={steps}",
                f"trainer.output_dir={out}", "logging.progress=false"]
    from gndpo.lab.tiny import build_tiny_causal_lm

    for kind, hidden, seed in (("student", 256, 0), ("teacher", 384, 1)):
        path = root / f"text_{kind}"
        if not path.exists():
            model, tok = build_tiny_causal_lm(seed=seed, hidden=hidden, layers=4)
            model.save_pretrained(path)
            tok.save_pretrained(path)
    data = root / "text.jsonl"
    data.write_text("".join(json.dumps({"id": f"t{i}", "problem": f"What is {i % 9} plus {i % 7}?",
                                        "answer": str(i % 9 + i % 7)}) + "\n" for i in range(64)))
    return [f"model.path={root / 'text_student'}", f"teacher.path={root / 'text_teacher'}", f"data.train={data}",
            "data.image_key=null", "data.prompt_suffix=none", "rollout.n=8", "rollout.max_new_tokens=48",
            "rollout.min_new_tokens=48", "trainer.prompts_per_step=8", "trainer.micro_batch_size=16",
            f"trainer.total_steps={steps}", "trainer.device=cpu", "trainer.threads=1", "optim.lr=1e-4",
            f"trainer.output_dir={out}", "logging.progress=false", "logging.tensorboard=false"]


def run(ranks: int, args: list[str]) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if ranks == 1:
        cmd = [sys.executable, "-m", "gndpo.cli", "train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-addr",
               "127.0.0.1", "--master-port", str(free_port()), "-m", "gndpo.cli", "train", *args]
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode:
        sys.exit(f"{ranks}-rank run failed:\n{result.stderr[-2000:]}")
    return time.perf_counter() - start


def steady(out: Path) -> tuple[float, float]:
    """(median tokens/s, median step seconds) over steps 2.. of a run."""
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")][1:]
    return statistics.median(r["tokens_per_sec"] for r in rows), statistics.median(r["time/step"] for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", choices=("lab", "text"), default="lab")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    opts = parser.parse_args()
    from safetensors.torch import load_file

    root = Path(tempfile.mkdtemp(prefix="bench_dist-"))
    results: dict[int, list[tuple[float, float, float]]] = {1: [], 2: []}
    finals = {}
    for rep in range(opts.repeats):
        for ranks in (1, 2):
            out = root / f"r{ranks}-{rep}"
            wall = run(ranks, recipe(opts.recipe, root, opts.steps, out))
            tps, step = steady(out)
            results[ranks].append((tps, step, wall))
            finals[ranks] = out / "checkpoints" / f"step-{opts.steps:06d}" / "model.safetensors"
            print(f"repeat {rep}, {ranks} rank(s): {tps:.0f} tokens/s, {step:.2f} s/step, {wall:.1f} s wall",
                  flush=True)
    a, b = load_file(str(finals[1])), load_file(str(finals[2]))
    gap = max(float((a[k] - b[k]).abs().max()) for k in a)
    med = {r: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v)) for r, v in results.items()}
    print("\n| recipe | ranks | tokens/s | s/step | speed-up |\n|---|---|---|---|---|")
    for r in (1, 2):
        print(f"| {opts.recipe} | {r} | {med[r][0]:.0f} | {med[r][1]:.2f} | {med[r][0] / med[1][0]:.2f}x |")
    print(f"\nfinal weights, 1 vs 2 ranks: max |difference| {gap:.2e}")


if __name__ == "__main__":
    main()
