"""The lab's runs of the two teacher features (``gndpo lab --teachers``, ``gndpo lab --self-distill``), beside the
default GSPO/OPD/GNDPO comparison and through the same trainer.

- ``--teachers``: the task's two halves ("Digit sum times k." and "Digit product plus k.", ``task.SUBTASKS``) each
  get a specialist teacher (``teacher_sum``, ``teacher_prod``: shipped, made by ``gndpo lab bootstrap``; each
  >= 92 % on its half and <= 1.2 % on the other). GNDPO distills the student from both, each item routed to its
  half's specialist by a ``teacher`` field (``data.teacher_key``), with the batch's statistics (the paper's) and
  with per-teacher statistics (``algorithm.teacher_norm=per_teacher``), against GNDPO with one specialist
  (``teacher_sum``) for both halves. Accuracy is reported per half.
- ``--self-distill``: GNDPO with the student as its own teacher (``teacher.path=self``) given the reference answer
  as privileged context (``"Reference answer: {answer}"`` before the question), on the current weights and on a
  frozen copy of the starting ones, next to the default table's OPD and GNDPO with the real teacher.

Every run uses the GNDPO lab recipe (``configs/lab/gndpo.yaml``) unchanged but for the teacher.
"""
from __future__ import annotations

import json
from pathlib import Path

SELF_CONTEXT = "Reference answer: {answer}"
ROUTED_TRAIN = "train_routed.jsonl"
SPECIALISTS = {"sum": "teacher_sum", "prod": "teacher_prod"}


def write_routed(data_dir: Path) -> Path:
    """``train.jsonl`` with each row's ``teacher``: the half of the task it belongs to (``sum`` or ``prod``)."""
    from gndpo.lab.task import subtask

    out = data_dir / ROUTED_TRAIN
    with open(data_dir / "train.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    out.write_text("".join(json.dumps({**row, "teacher": subtask(row["problem"])}, sort_keys=True) + "\n"
                           for row in rows), encoding="utf-8")
    return out


def _teachers_list(assets: Path) -> str:
    entries = ", ".join(f'{{name: {name}, path: "{assets / kind}"}}' for name, kind in SPECIALISTS.items())
    return f"teachers=[{entries}]"


def runs(plan, data_dir: Path, assets: Path) -> list[tuple[str, int, tuple[str, ...], str]]:
    """``(method, seed, overrides, tag)`` of every run the plan's options ask for, for ``run.run_config``."""
    out = []
    if plan.teachers:
        routed = write_routed(data_dir)
        two = ("teacher.path=null", _teachers_list(assets), "data.teacher_key=teacher", f"data.train={routed}")
        variants = [("-2teachers", two), ("-2teachers-per_teacher", (*two, "algorithm.teacher_norm=per_teacher")),
                    ("-sum_teacher", (f"teacher.path={assets / SPECIALISTS['sum']}",))]
        out += [("gndpo", s, extra, tag) for tag, extra in variants for s in range(plan.seeds)]
    if plan.self_distill:
        self_ = ("teacher.path=self", f'teacher.context="{SELF_CONTEXT}"')
        variants = [("-self", self_), ("-self-initial", (*self_, "teacher.self_weights=initial"))]
        out += [("gndpo", s, extra, tag) for tag, extra in variants for s in range(plan.seeds)]
    return out


# ---------------------------------------------------------------- evaluation and report


def half_accuracy(model_dir: Path, data_dir: Path) -> dict[str, float]:
    """Greedy test accuracy overall and on each half of the task."""
    from gndpo.data.loaders import load_records
    from gndpo.evaluate import greedy_accuracy
    from gndpo.lab.task import LAB_MAX_NEW_TOKENS, LAB_SUFFIX, SUBTASKS, subtask
    from gndpo.models import load_model

    loaded = load_model(str(model_dir), what=model_dir.name, device="cpu")
    test = load_records(str(data_dir / "test.jsonl"), split="test")
    result = greedy_accuracy(loaded.model, loaded.processor, test, suffix=LAB_SUFFIX, max_new_tokens=LAB_MAX_NEW_TOKENS,
                             progress=False)
    out = {"all": result["accuracy"]}
    for name in SUBTASKS:
        oks = [ok for ok, r in zip(result["correct"], test) if subtask(r.prompt) == name]
        out[name] = sum(oks) / max(len(oks), 1)
    return out


def final_checkpoint(run_dir: str | Path) -> Path:
    return sorted((Path(run_dir) / "checkpoints").glob("step-*"))[-1]


def _cell(xs: list[float]) -> str:
    import statistics

    if not xs:
        return ""
    mean = statistics.fmean(xs)
    return f"{100 * mean:.1f}" + (f" ± {100 * statistics.stdev(xs):.1f}" if len(xs) > 1 else "")


def teachers_section(runs_: list[dict], halves: dict[str, dict], base: dict[str, dict], seeds: int) -> str:
    """The two-teacher table: accuracy overall and per half, mean ± std over seeds (runs: the lab's results)."""
    lines = ["", "## Two teachers, one per half of the task", "",
             f"GNDPO with each item scored by its half's specialist (`teachers:` + `data.teacher_key`) against one "
             f"specialist for both halves; greedy test accuracy (%), mean ± std over {seeds} seed(s).", "",
             "| run | all | sum half | prod half |", "|---|---|---|---|"]
    for label, row in base.items():
        lines.append(f"| {label} | {100 * row['all']:.1f} | {100 * row['sum']:.1f} | {100 * row['prod']:.1f} |")
    for method in ("gndpo", "gndpo-2teachers", "gndpo-2teachers-per_teacher", "gndpo-sum_teacher"):
        dirs = [r["run_dir"] for r in runs_ if r["method"] == method]
        if dirs and all(d in halves for d in dirs):
            cells = [_cell([halves[d][k] for d in dirs]) for k in ("all", "sum", "prod")]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def self_section(runs_: list[dict], seeds: int) -> str:
    lines = ["", "## Self-distillation with the reference answer as privileged context", "",
             f"The student as its own teacher (`teacher.path=self`, context `{SELF_CONTEXT}` before the question) "
             f"on its current weights and on a frozen copy of its starting weights, next to distillation from the "
             f"real teacher; greedy test accuracy (%), mean ± std over {seeds} seed(s).", "",
             "| run | accuracy | per seed | max grad-norm |", "|---|---|---|---|"]
    for method in ("opd", "gndpo", "gndpo-self", "gndpo-self-initial"):
        rs = sorted((r for r in runs_ if r["method"] == method), key=lambda r: r["seed"])
        if rs:
            per_seed = " / ".join(f"{100 * r['accuracy']:.1f}" for r in rs)
            gn = sum(r["grad_norm_max"] for r in rs) / len(rs)
            lines.append(f"| {method} | {_cell([r['accuracy'] for r in rs])} | {per_seed} | {gn:.2f} |")
    return "\n".join(lines) + "\n"


def report(plan, runs_: list[dict], data_dir: Path, assets: Path) -> tuple[str, dict]:
    """The markdown sections of the options the plan ran, and their numbers (for results.json). The two-teacher
    section evaluates each run's final checkpoint (and the shipped models) per half, in this process."""
    import time

    md, numbers = "", {}
    if plan.teachers:
        start = time.perf_counter()
        base = {label: half_accuracy(assets / kind, data_dir) for label, kind in (
            ("base student", "student"), ("teacher", "teacher"), ("teacher_sum (shipped)", "teacher_sum"),
            ("teacher_prod (shipped)", "teacher_prod"))}
        wanted = ("gndpo", "gndpo-2teachers", "gndpo-2teachers-per_teacher", "gndpo-sum_teacher")
        halves = {r["run_dir"]: half_accuracy(final_checkpoint(r["run_dir"]), data_dir) for r in runs_
                  if r["method"] in wanted}
        md += teachers_section(runs_, halves, base, plan.seeds)
        seconds = time.perf_counter() - start
        md += f"\n(Per-half evaluations of {len(base) + len(halves)} models after the runs: {seconds:.0f} s.)\n"
        numbers["halves"] = {"base": base, "runs": halves, "seconds": seconds}
    if plan.self_distill:
        md += self_section(runs_, plan.seeds)
    return md, numbers
