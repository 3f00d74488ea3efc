"""``gndpo lab``: the paper's comparison in miniature, offline, on a CPU.

1. write the synthetic task (train/test jsonl + PNGs) through the same adapters as real datasets;
2. greedy test accuracy of the shipped base student and teacher;
3. train the student with GSPO, OPD and GNDPO (``configs/lab/*.yaml`` through the normal trainer), per seed;
4. greedy test accuracy of every trained student;
5. ``results.md`` (Table-1 style accuracy + stability columns), ``results.json``, ``dynamics.png`` (Figure-2
   panels), with ``--stress`` ``inspect_stress.html`` (``gndpo inspect`` of the seed-0 stress runs), with
   ``--eval-every`` ``accuracy_steps.png`` and a table of accuracy against steps, and each run's metrics and
   checkpoints under ``runs/``.

Settings beyond the default (docs/LAB.md records each): ``--long`` = 240 steps with the students evaluated at
steps 60, 120, 180 and 240 of the same runs (accuracy against the horizon); ``--small-batch`` =
4 prompts x 4 samples per step instead of 32 x 8, same number of steps (60), OPD vs GNDPO with batch statistics
(the paper) vs GNDPO with running statistics (``algorithm.norm_stats=running``), normal and stress.

Steps 2-4 are independent tasks (two evaluations, one task per (method, seed) run: train, then evaluate). With
``jobs`` > 1 they run in that many spawned worker processes on one torch thread each; one thread is as fast as
two for these tiny models, so N workers on N cores is the fastest use of the machine. A training is
deterministic given its seed (the sampler draws from keyed per-sample seeds), so a run gives the same metrics
and weights in a worker as in sequence; results are gathered by task name, never by completion order.

``--resume`` keeps the runs that ``--out`` already holds finished with the same configuration, and every cached
evaluation (``gndpo.lab.resume``), so an interrupted lab goes on where it stopped.

A grad-norm *spike* is a step whose pre-clip gradient norm exceeds 3x the median of its own run.
"""
from __future__ import annotations

import json
import logging
import math
import os
import statistics
import time
import traceback
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Callable

from gndpo.config import RunConfig
from gndpo.errors import GndpoError
from gndpo.lab import resume as lab_resume
from gndpo.lab import teachers as lab_teachers

log = logging.getLogger("gndpo")

METHODS = ("gspo", "opd", "gndpo")  # the default comparison, the paper's three
# Further lab methods, each a recipe of METHODS plus overrides: name -> (recipe, overrides).
# Dense (top-k) distillation settings `gndpo lab --dense` runs beside OPD and GNDPO; K = 8 of the lab's ~100-token
# vocabulary.
DENSE = {
    "fkl-topk-loss": ("gndpo", ("algorithm.distill=topk", "algorithm.topk=8", "algorithm.divergence=forward_kl",
                                "algorithm.dense_mode=loss")),
    "rkl-topk-loss": ("gndpo", ("algorithm.distill=topk", "algorithm.topk=8", "algorithm.divergence=reverse_kl",
                                "algorithm.dense_mode=loss")),
    "rkl-topk-gndpo": ("gndpo", ("algorithm.distill=topk", "algorithm.topk=8", "algorithm.divergence=reverse_kl",
                                 "algorithm.dense_mode=reward")),
}
# GNDPO with running reward statistics (`gndpo lab --small-batch`)
VARIANTS = {**DENSE, "gndpo-running": ("gndpo", ("algorithm.norm_stats=running",))}
SPIKE_FACTOR = 3.0
LONG_STEPS, LONG_EVAL_EVERY = 240, 60
# 4 prompts x 4 samples per step (16 responses, 300-400 response tokens, instead of 32 x 8); micro-batches tile it
SMALL_BATCH = ("trainer.prompts_per_step=4", "rollout.n=4", "trainer.micro_batch_size=16")
SMALL_BATCH_METHODS = ("opd", "gndpo", "gndpo-running")

Report = Callable[..., None]  # report(kind, *payload): "phase" name what | "step" name n | "end" name | "log" level msg


@dataclass(frozen=True)
class LabPlan:
    seeds: int
    steps: int
    n_train: int
    n_test: int
    methods: tuple[str, ...]
    stress: bool
    stress_overrides: tuple[str, ...] = ("rollout.temperature=1.6",)
    eval_every: int = 0  # also evaluate the checkpoints of every N-th step (0: the final one only)
    overrides: tuple[str, ...] = ()  # applied to every run (--small-batch)
    setting: str = "default"  # default, or those of dense, long, small-batch, teachers, self-distill it ran
    teachers: bool = False  # the two-teacher runs (gndpo.lab.teachers)
    self_distill: bool = False  # the self-distillation runs (gndpo.lab.teachers)
    variants: tuple[str, ...] | None = None  # only these runs of --teachers/--self-distill (None: all)


@dataclass(frozen=True)
class LabTask:
    """One unit of lab work: a training run then its greedy evaluation (``cfg`` set), or the evaluation of a
    shipped checkpoint (``cfg`` None, ``name`` = "student" or "teacher")."""

    name: str
    cfg: RunConfig | None = None
    reuse: bool = False  # --resume: its run directory already holds this run, finished; evaluate only


def plan_from_args(args) -> LabPlan:
    quick = bool(getattr(args, "quick", False))
    dense = bool(getattr(args, "dense", False))
    long, small = bool(getattr(args, "long", False)), bool(getattr(args, "small_batch", False))
    methods = tuple(args.methods or (("opd", "gndpo", *DENSE) if dense else SMALL_BATCH_METHODS if small else METHODS))
    bad = [m for m in methods if m not in METHODS and m not in VARIANTS]
    if bad:
        raise GndpoError(f"unknown lab method {bad[0]!r}; choose from: {', '.join((*METHODS, *VARIANTS))}")
    seeds = args.seeds if args.seeds is not None else (1 if quick else 3)
    steps = args.steps if args.steps is not None else (3 if quick else LONG_STEPS if long else None)
    eval_every = getattr(args, "eval_every", None)
    eval_every = eval_every if eval_every is not None else (LONG_EVAL_EVERY if long else 0)
    if seeds < 1 or (steps is not None and steps < 1):
        raise GndpoError("--seeds and --steps must be >= 1")
    if eval_every < 0:
        raise GndpoError(f"--eval-every must be >= 0 (got {eval_every}); 0 evaluates the final checkpoint only")
    teachers, self_distill = bool(getattr(args, "teachers", False)), bool(getattr(args, "self_distill", False))
    variants = tuple(getattr(args, "variants", None) or ()) or None
    why = lab_teachers.check_variants(variants, teachers, self_distill)
    if why:
        raise GndpoError(why)
    setting = ", ".join(name for name, on in (("dense", dense), ("long", long), ("small-batch", small),
                                              ("teachers", teachers), ("self-distill", self_distill)) if on) \
        or "default"
    return LabPlan(seeds=seeds, steps=steps or 0, n_train=2000 if quick else 8000, n_test=64 if quick else 1000,
                   methods=methods, stress=bool(getattr(args, "stress", False)) or small, eval_every=eval_every,
                   overrides=SMALL_BATCH if small else (), setting=setting, teachers=teachers,
                   self_distill=self_distill, variants=variants)


def eval_steps(total_steps: int, every: int) -> list[int]:
    """The steps whose checkpoints a run evaluates: every ``every``-th and the last."""
    return sorted({*(range(every, total_steps + 1, every) if every else ()), total_steps})


def resolve_jobs(jobs: int | None, n_tasks: int) -> int:
    """``jobs`` worker processes, or one per usable core; never more than there are tasks."""
    if jobs is None:  # the cores this process may run on (taskset, cgroup cpusets), not the machine's
        jobs = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(jobs, n_tasks))


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


# ---------------------------------------------------------------- tasks


def run_config(method: str, seed: int, plan: LabPlan, data_dir: Path, runs_dir: Path, extra: tuple[str, ...] = (),
               tag: str = "") -> RunConfig:
    from gndpo.config import load_config

    recipe, variant = VARIANTS.get(method, (method, ()))
    name = f"{method}{tag}-seed{seed}"
    overrides = [f"model.path={assets_dir() / 'student'}", f"teacher.path={assets_dir() / 'teacher'}",
                 f"data.train={data_dir / 'train.jsonl'}", f"trainer.output_dir={runs_dir / name}",
                 f"trainer.seed={seed}", f"logging.run_name={method}{tag}",
                 "logging.progress=false",  # the lab draws one bar for all its runs
                 *variant, *plan.overrides, *extra]
    if plan.steps:
        overrides.append(f"trainer.total_steps={plan.steps}")
    if plan.eval_every:  # the intermediate checkpoints that the evaluation reads, all kept
        overrides += [f"checkpoint.every={plan.eval_every}", "checkpoint.keep_last=null"]
    cfg = load_config(config_path(recipe), overrides)
    cfg.logging.rollouts_every = max(1, cfg.trainer.total_steps // 10)  # ten saved steps for gndpo inspect
    return cfg


def lab_tasks(plan: LabPlan, data_dir: Path, runs_dir: Path) -> list[LabTask]:
    """The runs in table order, then the evaluations of the shipped student and teacher."""
    runs = [(m, s, (), "") for m in plan.methods for s in range(plan.seeds)]
    if plan.stress:  # the plan's distillation methods: sampling hot stresses the teacher-student log-ratio
        runs += [(m, s, plan.stress_overrides, "-stress") for m in plan.methods if m != "gspo"
                 for s in range(plan.seeds)]
    runs += lab_teachers.runs(plan, data_dir, assets_dir())  # --teachers, --self-distill
    tasks = [LabTask(f"{m}{tag}-seed{s}", run_config(m, s, plan, data_dir, runs_dir, extra, tag))
             for m, s, extra, tag in runs]
    return tasks + [LabTask("student"), LabTask("teacher")]


def evaluate(model_dir: Path, data_dir: Path) -> float:
    """Greedy accuracy on the lab's test split."""
    from gndpo.data.loaders import load_records
    from gndpo.evaluate import greedy_accuracy
    from gndpo.lab.task import LAB_MAX_NEW_TOKENS, LAB_SUFFIX
    from gndpo.models import load_model

    loaded = load_model(str(model_dir), what=model_dir.name, device="cpu")
    test = load_records(str(data_dir / "test.jsonl"), split="test")
    return greedy_accuracy(loaded.model, loaded.processor, test, suffix=LAB_SUFFIX, max_new_tokens=LAB_MAX_NEW_TOKENS,
                           progress=False)["accuracy"]


def normalizes(cfg) -> bool:
    """Whether the run z-scores a reward over the batch (gndpo, and the dense reward mode), so that the
    normalizer's jitter means something; a dense loss has no reward to normalize."""
    a = cfg.algorithm
    return a.scope == "batch" and not (a.distill == "topk" and a.dense_mode == "loss")


def norm_jitter(rows: list[dict]) -> float | None:
    """How much the std that normalized the rewards moves from one step to the next: mean |log(s_t / s_t-1)|
    (running statistics' when the run kept them, else the batch's own); None for runs that do not normalize."""
    key = "norm/running_std" if "norm/running_std" in rows[0] else "reward_std"
    stds = [r.get(key, 0.0) for r in rows]
    logs = [math.log(s) for s in stds if s > 0 and math.isfinite(s)]
    if len(logs) < 2:
        return None
    return statistics.fmean(abs(b - a) for a, b in zip(logs, logs[1:]))


def run_one(task: LabTask, data_dir: Path, report: Report, eval_every: int = 0) -> dict:
    """Train ``task.cfg`` from scratch (unless ``task.reuse``), then evaluate its final checkpoint (and every
    ``eval_every``-th), each accuracy cached in the run directory as soon as it is measured."""
    from gndpo.report.loggers import read_metrics
    from gndpo.train import train

    cfg = task.cfg
    out = Path(cfg.trainer.output_dir)
    test, inputs = lab_resume.test_digest(data_dir), lab_resume.inputs_digest(data_dir, assets_dir())
    if not task.reuse:
        if (out / "metrics.jsonl").exists() or (out / lab_resume.EVAL_CACHE).exists():
            import shutil  # a re-run of the lab replaces its own earlier runs

            shutil.rmtree(out)
        report("phase", task.name, "train")
        start = time.perf_counter()
        train(cfg, callbacks=[lambda record: report("step", task.name, record.step)])
        train_s = time.perf_counter() - start
    cache_file = out / lab_resume.EVAL_CACHE
    cached = lab_resume.read_cache(cache_file, test=test, inputs=inputs)
    at = {}
    for step in eval_steps(cfg.trainer.total_steps, eval_every):
        if str(step) not in cached:
            report("phase", task.name, f"eval step {step}")
            cached[str(step)] = evaluate(out / "checkpoints" / f"step-{step:06d}", data_dir)
            lab_resume.write_cache(cache_file, cached, test=test, inputs=inputs)
        at[step] = cached[str(step)]
    rows = read_metrics(out)
    if task.reuse:
        train_s = lab_resume.train_seconds(rows, cfg.trainer.total_steps)
    gn = [r["grad_norm"] for r in rows]
    loss = [r["loss"] for r in rows]
    return {"method": cfg.logging.run_name, "seed": cfg.trainer.seed, "accuracy": at[cfg.trainer.total_steps],
            "accuracy_at": at, "grad_norm_max": max(gn), "spikes": spikes(gn),
            "loss_std": statistics.pstdev(loss) if len(loss) > 1 else 0.0,
            "norm_jitter": norm_jitter(rows) if normalizes(cfg) else None,
            # a reused run's (--resume): the sum of its logged time/step, which leaves out the setup before step 1
            "train_seconds": train_s, "reused": task.reuse, "run_dir": str(out)}


def run_task(task: LabTask, data_dir: Path, report: Report, eval_every: int = 0) -> dict:
    """The task's result, or ``{"error": one line, "traceback": text}``: failures travel back as data, since
    an arbitrary exception may not survive pickling out of a worker."""
    try:
        if task.cfg is None:
            report("phase", task.name, "eval")
            return {"accuracy": evaluate(assets_dir() / task.name, data_dir)}
        return run_one(task, data_dir, report, eval_every)
    except Exception as exc:  # noqa: BLE001 - every failure becomes the lab's one error line
        first = next(iter(str(exc).strip().splitlines()), "")
        if not isinstance(exc, GndpoError):  # a user mistake speaks for itself; anything else names its type
            first = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
        return {"error": first, "traceback": traceback.format_exc()}
    finally:
        report("end", task.name)


# ---------------------------------------------------------------- workers


class _ForwardLogs(logging.Handler):
    def __init__(self, queue):
        super().__init__(logging.INFO)
        self.queue = queue

    def emit(self, record: logging.LogRecord) -> None:
        self.queue.put(("log", record.levelno, record.getMessage()))


_EVENTS = None  # a worker's end of the parent's event queue, set by _init_worker (a pool's only per-process state)


def _init_worker(events) -> None:
    # Before torch loads in this fresh process: OpenMP/MKL pools of one thread, so N workers on N cores do not
    # oversubscribe them (two spinning threads on a core held by another process run 10-30x slower).
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; the parent handles it
    import torch
    import transformers

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    global _EVENTS
    _EVENTS = events
    logging.captureWarnings(True)  # library warnings too: the parent prints them above its bar, not across it
    log.setLevel(logging.INFO)
    for logger in (log, logging.getLogger("py.warnings")):
        logger.propagate = False
        logger.addHandler(_ForwardLogs(events))


def _worker_report(*event) -> None:
    import multiprocessing

    if not multiprocessing.parent_process().is_alive():  # the lab was killed (SIGTERM, SIGKILL): no one to run for
        os._exit(1)
    _EVENTS.put(event)


def _worker_task(task: LabTask, data_dir: Path, eval_every: int) -> dict:
    return run_task(task, data_dir, _worker_report, eval_every)


def _terminate(pool) -> None:
    """Cancel queued tasks and stop running ones now."""
    if hasattr(pool, "terminate_workers"):  # Python >= 3.14
        pool.terminate_workers()
        return
    for process in list((pool._processes or {}).values()):  # no public handle to the workers before 3.14
        process.terminate()
    # The executor's own thread sees its workers die, reaps them and closes its queues (reaping them here as
    # well would race it for each exit status).
    pool.shutdown(wait=True, cancel_futures=True)


def _schedule_rank(task: LabTask) -> int:
    """Lower starts first: longest first, so short tasks fill the tail instead of one long run finishing alone
    (a run scored by a teacher takes about 1.7x a GSPO run here, an evaluation a fraction of either)."""
    if task.cfg is None or task.reuse:
        return 2
    return 1 if task.cfg.algorithm.advantage == "grpo" else 0


def _drain(events, display: "Progress") -> None:
    while not events.empty():
        display(*events.get())


def run_parallel(tasks: list[LabTask], data_dir: Path, out_dir: Path, jobs: int,
                 display: "Progress", eval_every: int = 0) -> dict[str, dict]:
    """Every task's outcome by name, from ``jobs`` worker processes; the first failure stops them all."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    ctx = multiprocessing.get_context("spawn")  # fork would copy this process's torch thread pools and locks
    events = ctx.SimpleQueue()  # no feeder thread: a worker's events are in the pipe when its task returns
    pool = ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker, initargs=(events,))
    outcomes: dict[str, dict] = {}
    try:
        pending = {pool.submit(_worker_task, task, data_dir, eval_every): task
                   for task in sorted(tasks, key=_schedule_rank)}
        while pending:
            done, _ = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
            _drain(events, display)
            for future in done:
                task = pending.pop(future)
                try:
                    outcomes[task.name] = checked(task, future.result(), out_dir)
                except BrokenProcessPool:
                    raise GndpoError(f"a lab worker process died (killed, or out of memory?) while running "
                                     f"{', '.join(display.doing) or task.name}; try fewer --jobs") from None
                display.finished(task, outcomes[task.name])
    except BaseException:  # a failed run, or Ctrl-C: no worker may outlive the lab
        _terminate(pool)
        raise
    pool.shutdown()
    return outcomes


def run_sequential(tasks: list[LabTask], data_dir: Path, out_dir: Path, display: "Progress",
                   eval_every: int = 0) -> dict[str, dict]:
    import torch

    torch.set_num_threads(1)  # as in a worker; the training configs set trainer.threads=1 as well
    outcomes = {}
    for task in tasks:
        outcomes[task.name] = checked(task, run_task(task, data_dir, display, eval_every), out_dir)
        display.finished(task, outcomes[task.name])
    return outcomes


def checked(task: LabTask, outcome: dict, out_dir: Path) -> dict:
    """``outcome``, or the one-line GndpoError naming the task, with the traceback kept in a file (removed when a
    later lab in the same directory runs the task through)."""
    trace = out_dir / f"{task.name}.traceback.txt"
    if "error" not in outcome:
        trace.unlink(missing_ok=True)
        return outcome
    trace.write_text(outcome["traceback"])
    what = f"lab run {task.name}" if task.cfg is not None else f"lab evaluation of the shipped {task.name}"
    raise GndpoError(f"{what} failed: {outcome['error']} (traceback in {trace})")


class Progress:
    """One bar over every run's training steps, fed by all tasks; its postfix says what each is doing."""

    def __init__(self, tasks: list[LabTask]):
        from tqdm.auto import tqdm

        self.totals = {t.name: t.cfg.trainer.total_steps for t in tasks if t.cfg is not None}
        done = sum(self.totals[t.name] for t in tasks if t.reuse)  # kept by --resume: their steps are done
        self.bar = tqdm(total=sum(self.totals.values()), initial=done, desc="lab", unit="step", dynamic_ncols=True)
        self.doing: dict[str, str] = {}

    def __call__(self, kind: str, *payload) -> None:
        if kind == "log":
            log.log(*payload)  # a worker's record, printed above the bar
            return
        name, *rest = payload
        if kind == "end":
            self.doing.pop(name, None)
        elif kind == "phase":
            self.doing[name] = rest[0]
        elif kind == "step":
            self.doing[name] = f"{rest[0]}/{self.totals[name]}"
            self.bar.update(1)
        self.bar.set_postfix_str(", ".join(f"{k} {v}" for k, v in self.doing.items()), refresh=True)

    def finished(self, task: LabTask, outcome: dict) -> None:
        if task.cfg is None:
            log.info("%s greedy accuracy: %.1f%%", task.name, 100 * outcome["accuracy"])
        else:
            log.info("%s: greedy accuracy %.1f%% (%s in %.0f s)", task.name, 100 * outcome["accuracy"],
                     "kept from an earlier lab, trained" if task.reuse else "trained", outcome["train_seconds"])

    def close(self) -> None:
        self.bar.close()


# ---------------------------------------------------------------- report


def summarize(base_acc: float, teacher_acc: float, runs: list[dict]) -> list[dict]:
    table = [{"method": "base student", "acc_mean": base_acc, "acc_std": 0.0, "n": 1},
             {"method": "teacher", "acc_mean": teacher_acc, "acc_std": 0.0, "n": 1}]
    for method in dict.fromkeys(r["method"] for r in runs):
        rs = [r for r in runs if r["method"] == method]
        acc_m, acc_s = _mean_std([r["accuracy"] for r in rs])
        jitter = [r["norm_jitter"] for r in rs if r.get("norm_jitter") is not None]
        steps = sorted({int(step) for r in rs for step in r.get("accuracy_at", {})})
        table.append({"method": method, "acc_mean": acc_m, "acc_std": acc_s, "n": len(rs),
                      "acc_seeds": [r["accuracy"] for r in rs], "delta": acc_m - base_acc,
                      "grad_norm_max": _mean_std([r["grad_norm_max"] for r in rs])[0],
                      "spikes": _mean_std([r["spikes"] for r in rs])[0],
                      "loss_std": _mean_std([r["loss_std"] for r in rs])[0],
                      "norm_jitter": _mean_std(jitter)[0] if jitter else None,
                      "acc_at": {step: _mean_std([_at(r, step) for r in rs if _at(r, step) is not None])
                                 for step in steps}})
    return table


def _at(run: dict, step: int) -> float | None:
    """A run's accuracy at ``step`` (JSON keys are strings once results.json is read back)."""
    at = run.get("accuracy_at", {})
    return at.get(step, at.get(str(step)))


def render_markdown(table: list[dict], plan: LabPlan, wall_s: float, n_test: int, jobs: int = 1,
                    reused: int = 0) -> str:
    runs = [row for row in table if "delta" in row]
    jitter = any(row.get("norm_jitter") is not None for row in runs)
    changed = f"; every run with {' '.join(plan.overrides)}" if plan.overrides else ""
    lines = [
        "# gndpo lab results", "",
        f"Setting: {plan.setting} ({plan.steps} steps{changed}). "
        f"Greedy test accuracy on {n_test} held-out items of the synthetic task (mean ± std over {plan.seeds} "
        f"seed(s)); stability columns averaged over seeds. A grad-norm spike is a step whose pre-clip norm "
        f"exceeds {SPIKE_FACTOR:g}x its run's median. Wall time {wall_s / 60:.1f} min "
        f"({jobs} worker process{'es' if jobs > 1 else ''}).", "",
        "| method | accuracy (%) | Δ vs base | max grad-norm | grad-norm spikes | loss std |"
        + (" normalizer jitter |" if jitter else ""),
        "|---|---|---|---|---|---|" + ("---|" if jitter else ""),
    ]
    for row in table:
        if "delta" not in row:
            lines.append(f"| {row['method']} | {100 * row['acc_mean']:.1f} | | | | |" + (" |" if jitter else ""))
            continue
        line = (f"| {row['method']} | {100 * row['acc_mean']:.1f} ± {100 * row['acc_std']:.1f} | "
                f"{100 * row['delta']:+.1f} | {row['grad_norm_max']:.3f} | {row['spikes']:.1f} | "
                f"{row['loss_std']:.4f} |")
        if jitter:
            line += f" {row['norm_jitter']:.4f} |" if row.get("norm_jitter") is not None else " |"
        lines.append(line)
    if reused:
        lines += ["", f"{reused} run{'s' if reused > 1 else ''} reused from an earlier lab (--resume)."]
    if plan.seeds > 1:
        lines += ["", "Per seed (accuracy %): " + "; ".join(
            f"{row['method']} {' / '.join(f'{100 * a:.1f}' for a in row['acc_seeds'])}" for row in runs) + "."]
    if jitter:
        lines += ["", "Normalizer jitter: the mean |log(s_t / s_t-1)| over steps of the std s_t that z-scored the "
                      "rewards (the batch's own, or the running one with algorithm.norm_stats=running); empty for "
                      "methods that do not normalize."]
    steps = sorted({step for row in runs for step in row.get("acc_at", {})})
    if plan.eval_every and steps:
        base = table[0]["acc_mean"]
        lines += ["", "Greedy test accuracy (%) against training steps, evaluated on the checkpoints of the same "
                      "runs (mean ± std over seeds; step 0 is the base student):", "",
                  "| method | " + " | ".join(f"step {s}" for s in [0, *steps]) + " |",
                  "|---|" + "---|" * (len(steps) + 1)]
        for row in runs:
            cells = [f"{100 * row['acc_at'][s][0]:.1f} ± {100 * row['acc_at'][s][1]:.1f}" if s in row["acc_at"]
                     else "" for s in steps]
            lines.append(f"| {row['method']} | {100 * base:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_accuracy_steps(base_acc: float, runs: list[dict], out_path: Path) -> Path:
    """Greedy test accuracy against steps, one line per method (mean over seeds, min-max band)."""
    from gndpo.report.plot import plot_dynamics

    key = "greedy test accuracy (%)"
    series = [(r["method"], [{"step": 0, key: 100 * base_acc}] +
               [{"step": int(step), key: 100 * acc} for step, acc in sorted(
                   r["accuracy_at"].items(), key=lambda item: int(item[0]))]) for r in runs]
    return plot_dynamics(series, out_path, keys=(key,), aggregate_seeds=True)


def lab_main(args) -> int:
    if args.action == "bootstrap":
        from gndpo.lab.bootstrap import main as bootstrap_main

        argv = ["--seed", str(args.seed)]
        if args.out and args.out != "lab_out":
            argv += ["--out", args.out]
        return int(bootstrap_main(argv) or 0)

    from tqdm.contrib.logging import logging_redirect_tqdm

    from gndpo.lab.task import write_task
    from gndpo.report.plot import plot_run_dirs

    plan = plan_from_args(args)
    jobs = getattr(args, "jobs", None)
    if jobs is not None and jobs < 1:
        raise GndpoError(f"--jobs must be >= 1 (got {jobs}); 1 runs every task in sequence in this process")
    if not (assets_dir() / "student" / "config.json").is_file():
        raise GndpoError(f"lab checkpoints missing in {assets_dir()}; run `gndpo lab bootstrap` to create them")
    out = Path(args.out or ("lab_out" if plan.setting == "default" else f"lab_out/{plan.setting.replace(', ', '-')}"))
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    data_dir, runs_dir = out / "data", out / "runs"
    write_task(data_dir, seed=0, n_train=plan.n_train, n_test=plan.n_test)
    tasks = lab_tasks(plan, data_dir, runs_dir)  # every config is validated before any model loads
    plan = replace(plan, steps=plan.steps or tasks[0].cfg.trainer.total_steps)  # the recipe's, when not given
    # The shipped student's and teacher's accuracies, cached like a run's (their inputs: the shipped checkpoints)
    shipped_cache = out / lab_resume.EVAL_CACHE
    digests = {"test": lab_resume.test_digest(data_dir), "inputs": lab_resume.inputs_digest(data_dir, assets_dir())}
    shipped = {}
    if getattr(args, "resume", False):
        tasks = lab_resume.mark_reusable(tasks, digests["inputs"])
        shipped = lab_resume.read_cache(shipped_cache, **digests)
    todo = [t for t in tasks if t.cfg is not None or t.name not in shipped]
    jobs = resolve_jobs(jobs, len(todo))

    display = Progress(tasks)
    try:
        with logging_redirect_tqdm():
            for name in (t.name for t in tasks if t.cfg is None and t.name in shipped):
                log.info("%s greedy accuracy: %.1f%% (cached)", name, 100 * shipped[name])
            if jobs == 1:
                outcomes = run_sequential(todo, data_dir, out, display, plan.eval_every)
            else:
                outcomes = run_parallel(todo, data_dir, out, jobs, display, plan.eval_every)
    finally:
        display.close()
    outcomes.update({name: {"accuracy": acc} for name, acc in shipped.items()})
    lab_resume.write_cache(shipped_cache, {name: outcomes[name]["accuracy"] for name in ("student", "teacher")},
                           **digests)
    runs = [outcomes[t.name] for t in tasks if t.cfg is not None]  # table order, whatever finished first
    base, teacher = outcomes["student"]["accuracy"], outcomes["teacher"]["accuracy"]
    wall = time.perf_counter() - start
    table = summarize(base, teacher, runs)
    results_md = render_markdown(table, plan, wall, plan.n_test, jobs, reused=sum(r["reused"] for r in runs))
    stress = [r for r in runs if r["method"].endswith("-stress") and r["seed"] == 0]
    if stress:  # the per-token view of OPD and GNDPO at high temperature, side by side
        from gndpo.report.inspect import write_report

        write_report([r["run_dir"] for r in stress], out / "inspect_stress.html",
                     labels=[f"{r['method']} (seed 0)" for r in stress])
        results_md += ("\nPer-token view of the stress runs (which tokens carry extreme log-ratios, and what GNDPO's "
                       "normalization does to them): [inspect_stress.html](inspect_stress.html), written by "
                       "`gndpo inspect`.\n")
    teachers_md, teachers_numbers = lab_teachers.report(plan, runs, data_dir, assets_dir())
    results_md += teachers_md
    (out / "results.md").write_text(results_md)
    (out / "results.json").write_text(json.dumps({"base": base, "teacher": teacher, "runs": runs, "table": table,
                                                  "wall_seconds": wall, "jobs": jobs, "plan": plan.__dict__,
                                                  **teachers_numbers}, indent=2))
    plot_run_dirs([r["run_dir"] for r in runs], out / "dynamics.png", labels=[r["method"] for r in runs],
                  aggregate_seeds=plan.seeds > 1)
    figures = [out / "dynamics.png"]
    if plan.eval_every:
        figures.append(plot_accuracy_steps(base, runs, out / "accuracy_steps.png"))
    print((out / "results.md").read_text())
    print(f"wrote {out / 'results.md'}, {', '.join(map(str, figures))} and runs in {runs_dir} ({wall / 60:.1f} min, "
          f"{jobs} worker process{'es' if jobs > 1 else ''})")
    return 0
