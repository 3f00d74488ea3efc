"""``gndpo lab``: the paper's comparison in miniature, offline, on a CPU.

1. write the synthetic task (train/test jsonl + PNGs) through the same adapters as real datasets;
2. greedy test accuracy of the shipped base student and teacher;
3. train the student with GSPO, OPD and GNDPO (``configs/lab/*.yaml`` through the normal trainer), per seed;
4. greedy test accuracy of every trained student;
5. ``results.md`` (Table-1 style accuracy + stability columns), ``results.json``, ``dynamics.png``
   (Figure-2 panels), and each run's metrics and final checkpoint under ``runs/``.

A grad-norm *spike* is a step whose pre-clip gradient norm exceeds 3x the median of its own run.
"""
from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from gndpo.errors import GndpoError

log = logging.getLogger("gndpo")

METHODS = ("gspo", "opd", "gndpo")
SPIKE_FACTOR = 3.0


@dataclass(frozen=True)
class LabPlan:
    seeds: int
    steps: int
    n_train: int
    n_test: int
    methods: tuple[str, ...]
    stress: bool
    stress_overrides: tuple[str, ...] = ("rollout.temperature=1.6",)


def plan_from_args(args) -> LabPlan:
    quick = bool(getattr(args, "quick", False))
    methods = tuple(args.methods or METHODS)
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise GndpoError(f"unknown lab method {bad[0]!r}; choose from: {', '.join(METHODS)}")
    seeds = args.seeds if args.seeds is not None else (1 if quick else 3)
    steps = args.steps if args.steps is not None else (3 if quick else None)
    if seeds < 1 or (steps is not None and steps < 1):
        raise GndpoError("--seeds and --steps must be >= 1")
    return LabPlan(seeds=seeds, steps=steps or 0, n_train=2000 if quick else 8000, n_test=64 if quick else 1000,
                   methods=methods, stress=bool(getattr(args, "stress", False)))


def assets_dir() -> Path:
    return Path(str(resources.files("gndpo.lab") / "assets"))


def config_path(method: str) -> Path:
    return Path(str(resources.files("gndpo") / "configs" / "lab" / f"{method}.yaml"))


def spikes(values: list[float], factor: float = SPIKE_FACTOR) -> int:
    """Steps whose grad norm exceeds ``factor`` x the run's median grad norm."""
    finite = [v for v in values if v == v and v != float("inf")]
    if not finite:
        return 0
    med = statistics.median(finite)
    return sum(1 for v in values if not (v <= factor * med))


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return (statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0) if xs else (float("nan"), 0.0)


def run_one(method: str, seed: int, plan: LabPlan, data_dir: Path, runs_dir: Path, extra: tuple[str, ...] = (),
            tag: str = "") -> dict:
    from gndpo.config import load_config
    from gndpo.evaluate import greedy_accuracy
    from gndpo.lab.task import LAB_MAX_NEW_TOKENS, LAB_SUFFIX
    from gndpo.models import load_model
    from gndpo.data.loaders import load_records
    from gndpo.report.loggers import read_metrics
    from gndpo.train import train

    out = runs_dir / f"{method}{tag}-seed{seed}"
    overrides = [f"model.path={assets_dir() / 'student'}", f"teacher.path={assets_dir() / 'teacher'}",
                 f"data.train={data_dir / 'train.jsonl'}", f"trainer.output_dir={out}", f"trainer.seed={seed}",
                 f"logging.run_name={method}{tag}", *extra]
    if plan.steps:
        overrides.append(f"trainer.total_steps={plan.steps}")
    cfg = load_config(config_path(method), overrides)
    if (out / "metrics.jsonl").exists():  # a re-run of the lab replaces its own earlier runs
        import shutil

        shutil.rmtree(out)
    start = time.perf_counter()
    train(cfg)
    train_s = time.perf_counter() - start
    final = sorted((out / "checkpoints").glob("step-*"))[-1]
    loaded = load_model(str(final), what="trained student", device="cpu")
    test = load_records(str(data_dir / "test.jsonl"), split="test")
    acc = greedy_accuracy(loaded.model, loaded.processor, test, suffix=LAB_SUFFIX, max_new_tokens=LAB_MAX_NEW_TOKENS,
                          progress=True)["accuracy"]
    rows = read_metrics(out)
    gn = [r["grad_norm"] for r in rows]
    loss = [r["loss"] for r in rows]
    return {"method": method + tag, "seed": seed, "accuracy": acc, "grad_norm_max": max(gn), "spikes": spikes(gn),
            "loss_std": statistics.pstdev(loss) if len(loss) > 1 else 0.0, "train_seconds": train_s, "run_dir": str(out)}


def summarize(base_acc: float, teacher_acc: float, runs: list[dict]) -> list[dict]:
    table = [{"method": "base student", "acc_mean": base_acc, "acc_std": 0.0, "n": 1},
             {"method": "teacher", "acc_mean": teacher_acc, "acc_std": 0.0, "n": 1}]
    for method in dict.fromkeys(r["method"] for r in runs):
        rs = [r for r in runs if r["method"] == method]
        acc_m, acc_s = _mean_std([r["accuracy"] for r in rs])
        table.append({"method": method, "acc_mean": acc_m, "acc_std": acc_s, "n": len(rs),
                      "delta": acc_m - base_acc,
                      "grad_norm_max": _mean_std([r["grad_norm_max"] for r in rs])[0],
                      "spikes": _mean_std([r["spikes"] for r in rs])[0],
                      "loss_std": _mean_std([r["loss_std"] for r in rs])[0]})
    return table


def render_markdown(table: list[dict], plan: LabPlan, wall_s: float, n_test: int) -> str:
    lines = [
        "# gndpo lab results", "",
        f"Greedy test accuracy on {n_test} held-out items of the synthetic task (mean ± std over {plan.seeds} "
        f"seed(s)); stability columns averaged over seeds. A grad-norm spike is a step whose pre-clip norm "
        f"exceeds {SPIKE_FACTOR:g}x its run's median. Wall time {wall_s / 60:.1f} min.", "",
        "| method | accuracy (%) | Δ vs base | max grad-norm | grad-norm spikes | loss std |",
        "|---|---|---|---|---|---|",
    ]
    for row in table:
        if "delta" not in row:
            lines.append(f"| {row['method']} | {100 * row['acc_mean']:.1f} | | | | |")
            continue
        lines.append(f"| {row['method']} | {100 * row['acc_mean']:.1f} ± {100 * row['acc_std']:.1f} | "
                     f"{100 * row['delta']:+.1f} | {row['grad_norm_max']:.3f} | {row['spikes']:.1f} | "
                     f"{row['loss_std']:.4f} |")
    return "\n".join(lines) + "\n"


def lab_main(args) -> int:
    if args.action == "bootstrap":
        from gndpo.lab.bootstrap import main as bootstrap_main

        argv = ["--seed", str(args.seed)]
        if args.out and args.out != "lab_out":
            argv += ["--out", args.out]
        return int(bootstrap_main(argv) or 0)

    import torch

    from gndpo.data.loaders import load_records
    from gndpo.evaluate import greedy_accuracy
    from gndpo.lab.task import LAB_MAX_NEW_TOKENS, LAB_SUFFIX, write_task
    from gndpo.models import load_model
    from gndpo.report.plot import plot_run_dirs

    plan = plan_from_args(args)
    if not (assets_dir() / "student" / "config.json").is_file():
        raise GndpoError(f"lab checkpoints missing in {assets_dir()}; run `gndpo lab bootstrap` to create them")
    # Tiny models: one thread is as fast as two, and immune to OpenMP oversubscription on busy cores
    # (two spinning threads on a core another process holds run 10-30x slower).
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    data_dir = out / "data"
    write_task(data_dir, seed=0, n_train=plan.n_train, n_test=plan.n_test)
    test = load_records(str(data_dir / "test.jsonl"), split="test")

    accs = {}
    for who in ("student", "teacher"):
        loaded = load_model(str(assets_dir() / who), what=who, device="cpu")
        accs[who] = greedy_accuracy(loaded.model, loaded.processor, test, suffix=LAB_SUFFIX,
                                    max_new_tokens=LAB_MAX_NEW_TOKENS, progress=True)["accuracy"]
        log.info("%s greedy accuracy: %.1f%%", who, 100 * accs[who])

    runs_dir = out / "runs"
    runs = [run_one(m, s, plan, data_dir, runs_dir) for m in plan.methods for s in range(plan.seeds)]
    stress_runs = []
    if plan.stress:
        stress_runs = [run_one(m, s, plan, data_dir, runs_dir, extra=plan.stress_overrides, tag="-stress")
                       for m in ("opd", "gndpo") for s in range(plan.seeds)]
    wall = time.perf_counter() - start
    table = summarize(accs["student"], accs["teacher"], runs + stress_runs)
    (out / "results.md").write_text(render_markdown(table, plan, wall, len(test)))
    (out / "results.json").write_text(json.dumps({"base": accs["student"], "teacher": accs["teacher"],
                                                  "runs": runs + stress_runs, "table": table,
                                                  "wall_seconds": wall, "plan": plan.__dict__}, indent=2))
    all_runs = runs + stress_runs
    plot_run_dirs([r["run_dir"] for r in all_runs], out / "dynamics.png", labels=[r["method"] for r in all_runs],
                  aggregate_seeds=plan.seeds > 1)
    print((out / "results.md").read_text())
    print(f"wrote {out / 'results.md'}, {out / 'dynamics.png'} and runs in {runs_dir} ({wall / 60:.1f} min)")
    return 0
