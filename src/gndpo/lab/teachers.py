"""The lab's runs of the two teacher features (``gndpo lab --teachers``, ``gndpo lab --self-distill``), beside the
default GSPO/OPD/GNDPO comparison and through the same trainer.

- ``--teachers``: the task's two halves ("Digit sum times k." and "Digit product plus k.", ``task.SUBTASKS``) each
  get a specialist teacher (``teacher_sum``, ``teacher_prod``: shipped, made by ``gndpo lab bootstrap``; each
  >= 92 % on its half and <= 1.2 % on the other). GNDPO distills the student from both, each item routed to its
  half's specialist by a ``teacher`` field (``data.teacher_key``), with the batch's statistics (the paper's) and
  with per-teacher statistics (``algorithm.teacher_norm=per_teacher``), against GNDPO with one specialist
  (``teacher_sum``) for both halves. Accuracy is reported per half.
- ``--self-distill``: GNDPO with the student as its own teacher (``teacher.path=self``) given the reference answer
  as privileged context (``"Reference answer: {answer}"``): in the system prompt, on the current weights and on
  a frozen copy of the starting ones, and before the question (after the image) on the current weights; next to
  the default table's OPD and GNDPO with the real teacher. The report adds what the privileged teacher says about
  the base student's own samples, right and wrong (:func:`context_preference`).

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


TEACHERS_VARIANTS = ("2teachers", "2teachers-per_teacher", "sum_teacher")  # --teachers
SELF_VARIANTS = ("self", "self-initial", "self-in-prompt")  # --self-distill


def check_variants(variants: tuple[str, ...] | None, teachers: bool, self_distill: bool) -> str | None:
    """Why ``--variants`` does not fit the options (one line), or None."""
    for v in variants or ():
        if v not in TEACHERS_VARIANTS + SELF_VARIANTS:
            return f"unknown lab variant {v!r}; choose from: {', '.join(TEACHERS_VARIANTS + SELF_VARIANTS)}"
        if (v in TEACHERS_VARIANTS and not teachers) or (v in SELF_VARIANTS and not self_distill):
            return f"lab variant {v!r} belongs to {'--teachers' if v in TEACHERS_VARIANTS else '--self-distill'}, " \
                   "which is not given"
    return None


def runs(plan, data_dir: Path, assets: Path) -> list[tuple[str, int, tuple[str, ...], str]]:
    """``(method, seed, overrides, tag)`` of every run the plan's options ask for (``plan.variants``: only those,
    default all of each option), for ``run.run_config``."""
    wanted = set(plan.variants or TEACHERS_VARIANTS + SELF_VARIANTS)
    out = []
    if plan.teachers:
        routed = write_routed(data_dir)
        two = ("teacher.path=null", _teachers_list(assets), "data.teacher_key=teacher", f"data.train={routed}")
        variants = [("-2teachers", two), ("-2teachers-per_teacher", (*two, "algorithm.teacher_norm=per_teacher")),
                    ("-sum_teacher", (f"teacher.path={assets / SPECIALISTS['sum']}",))]
        out += [("gndpo", s, extra, tag) for tag, extra in variants if tag[1:] in wanted for s in range(plan.seeds)]
    if plan.self_distill:
        self_ = ("teacher.path=self", f'teacher.context="{SELF_CONTEXT}"')
        variants = [("-self", (*self_, "teacher.context_at=system")),
                    ("-self-initial", (*self_, "teacher.context_at=system", "teacher.self_weights=initial")),
                    ("-self-in-prompt", (*self_, "teacher.context_at=prompt"))]
        out += [("gndpo", s, extra, tag) for tag, extra in variants if tag[1:] in wanted for s in range(plan.seeds)]
    return out


def context_preference(student_dir: Path, data_dir: Path, *, prompts: int = 128, n: int = 4, seed: int = 0) -> dict:
    """What the student as its own privileged teacher says about the student's own samples: ``n`` samples (T = 1)
    of each of the first ``prompts`` train prompts, scored by the student without and with the context at each
    place; per place the mean token reward ``clamp(r_t, -5, 5)`` over all tokens, its per-response mean over right
    and over wrong responses, and the clamped fraction. A teacher that knows the answer should prefer the right
    responses (a higher mean on them)."""
    import torch

    from gndpo.data.loaders import load_records
    from gndpo.forward import rollout_logprobs
    from gndpo.lab.task import LAB_MAX_NEW_TOKENS, LAB_SUFFIX
    from gndpo.models import load_model
    from gndpo.rewards import get_reward
    from gndpo.rollout.base import SamplingParams
    from gndpo.rollout.hf import HFRollout
    from gndpo.teacher.context import ContextTeacher
    from gndpo.teacher.hf import HFTeacher

    student = load_model(str(student_dir), what="student", device="cpu")
    records = load_records(str(data_dir / "train.jsonl"), id_key="id")[:prompts]
    ro = HFRollout(student.model, student.processor, suffix=LAB_SUFFIX).generate(
        records, SamplingParams(n=n, max_new_tokens=LAB_MAX_NEW_TOKENS, seed=seed))
    right = torch.tensor(get_reward("math")(ro.texts, [ro.records[int(i)].answer for i in ro.prompt_index])) > 0
    mask = ro.response_mask
    with torch.no_grad():
        own = rollout_logprobs(student.model, student.processor, ro, micro_batch_size=64, suffix=LAB_SUFFIX,
                               system_prompt=None)
    out = {"responses": ro.size, "right": int(right.sum())}
    for at in ("system", "prompt"):
        teacher = ContextTeacher(HFTeacher(student.model, student.processor, suffix=LAB_SUFFIX, micro_batch_size=64),
                                 SELF_CONTEXT, at)
        ratio = teacher.score(ro).logprobs - own  # (B, R)
        r = ratio.clamp(-5, 5)
        per_response = (r * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # (B,)
        out[at] = {"reward_mean": float(r[mask].mean()), "right": float(per_response[right].mean()),
                   "wrong": float(per_response[~right].mean()), "clamp_frac": float((ratio.abs()[mask] > 5).float().mean())}
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


def self_section(runs_: list[dict], seeds: int, preference: dict | None = None) -> str:
    lines = ["", "## Self-distillation with the reference answer as privileged context", "",
             f"The student as its own teacher (`teacher.path=self`, context `{SELF_CONTEXT}`): in the system prompt "
             f"on its current weights (gndpo-self) and on a frozen copy of its starting weights (gndpo-self-initial), "
             f"and before the question on its current weights (gndpo-self-in-prompt), next to distillation from the "
             f"real teacher; greedy test accuracy (%), mean ± std over {seeds} seed(s).", "",
             "| run | accuracy | per seed | max grad-norm |", "|---|---|---|---|"]
    for method in ("opd", "gndpo", "gndpo-self", "gndpo-self-initial", "gndpo-self-in-prompt"):
        rs = sorted((r for r in runs_ if r["method"] == method), key=lambda r: r["seed"])
        if rs:
            per_seed = " / ".join(f"{100 * r['accuracy']:.1f}" for r in rs)
            gn = sum(r["grad_norm_max"] for r in rs) / len(rs)
            lines.append(f"| {method} | {_cell([r['accuracy'] for r in rs])} | {per_seed} | {gn:.2f} |")
    if preference:
        lines += ["", f"What the privileged teacher says about the base student's own samples ({preference['responses']} "
                  f"responses at T = 1 to the first train prompts, {preference['right']} of them right): the token "
                  "reward clamp(log p(o | x, context) - log p(o | x), -5, 5), its mean per response over right and "
                  "over wrong responses, and the clamped fraction.", "",
                  "| context | mean reward | right responses | wrong responses | clamped |", "|---|---|---|---|---|"]
        for at, label in (("system", "system prompt"), ("prompt", "before the question")):
            p = preference[at]
            lines.append(f"| {label} | {p['reward_mean']:.3f} | {p['right']:.3f} | {p['wrong']:.3f} | "
                         f"{100 * p['clamp_frac']:.1f} % |")
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
        numbers["self_preference"] = context_preference(assets / "student", data_dir)
        md += self_section(runs_, plan.seeds, numbers["self_preference"])
    return md, numbers
