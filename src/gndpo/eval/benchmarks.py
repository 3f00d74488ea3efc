"""The paper's Table-1 benchmarks (arXiv 2606.09091) and how VLMEvalKit names and scores them.

Each entry says where VLMEvalKit (``ms-vlmeval`` 0.0.20) writes the headline number: a glob for the score file in
the harness's output directory, the row that holds it (``column == value``, or the first row) and the column, and
the scale the harness uses (a fraction, a percentage, or a ``"61.20%"`` string). ``judge`` is what the official
scoring needs: ``"required"`` (the harness refuses to score without an LLM judge), ``"fallback"`` (rules first, the
judge only for answers the rules cannot parse; without one those count wrong, so the score is "rule-only") or
``"none"``.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Benchmark:
    key: str          # gndpo's name (--benchmarks)
    column: str       # the Table-1 column header
    dataset: str      # VLMEvalKit's dataset name (its TSV is $LMUData/<dataset>.tsv)
    metric: str       # what the number is
    judge: str        # "required" | "fallback"
    score_glob: str   # the score file, relative to the harness output dir; {m} = model name, {d} = dataset
    row: tuple[str, str] | None  # (column, value) selecting the row; None = the first row
    value_column: str
    scale: str        # "fraction" (0-1), "percent" (0-100) or "percent-string" ("61.20%")
    runner: str = "vlmeval"  # "vlmeval": VLMEvalKit scores it; "gndpo": gndpo.eval.native does


BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark("mathvista", "MathVista", "MathVista_MINI", "testmini accuracy", "required",
              "{m}_{d}_*_score.csv", ("Task&Skill", "Overall"), "acc", "percent"),
    Benchmark("mmmu", "MMMU", "MMMU_DEV_VAL", "val accuracy", "fallback",
              "{m}_{d}_acc.csv", ("split", "validation"), "Overall", "fraction"),
    Benchmark("mathvision", "MathVision", "MathVision", "accuracy", "required",
              "{m}_{d}_*_score.csv", ("Subject", "Overall"), "acc", "percent"),
    Benchmark("mathverse", "MathVerse", "MathVerse_MINI_Vision_Only", "vision-only accuracy", "required",
              "{m}_{d}_*_score.csv", ("split", "Vision Only"), "Overall", "percent"),
    Benchmark("dynamath", "DynaMath", "DynaMath",
              "worst-case accuracy (a question counts when all its variants are right)", "fallback",
              "{m}_{d}_*_score.csv", ("Setting", "Worst Case"), "Overall", "fraction"),
    Benchmark("wemath", "WeMath", "WeMath", "strict score", "fallback",
              "{m}_{d}_*_score.csv", None, "Score (Strict)", "percent-string"),
    Benchmark("logicvista", "LogicVista", "LogicVista", "accuracy", "required",
              "{m}_{d}_*_score.csv", ("Task&Skill", "Overall"), "acc", "percent"),
    # an extra, not in Table 1: the paper's training set's test split, with the training prompt and reward
    Benchmark("geometry3k", "Geometry3K", "geometry3k", "test accuracy (training prompt, \\boxed{} + math-verify)",
              "none", "", None, "", "percent", runner="gndpo"),
)
BY_KEY = {b.key: b for b in BENCHMARKS}
SUITES = {"paper": tuple(b.key for b in BENCHMARKS if b.runner == "vlmeval")}
TABLE1 = frozenset(SUITES["paper"])

# Table 3 of the paper: the decoding of every evaluation.
PAPER_DECODING = {"temperature": 0.6, "top_p": 0.95, "max_new_tokens": 32768}

HARNESS = {"name": "VLMEvalKit", "package": "ms-vlmeval", "version": "0.0.20"}


def select(suite: str | None, benchmarks: str | None) -> list[Benchmark]:
    """The benchmarks of ``--suite`` and/or ``--benchmarks a,b`` in Table-1 order, or a one-line error."""
    from gndpo.errors import ConfigError

    keys: list[str] = []
    if suite is not None:
        if suite not in SUITES:
            raise ConfigError(f"unknown suite {suite!r}; known: {', '.join(SUITES)}")
        keys += SUITES[suite]
    if benchmarks:
        for key in (k.strip().lower() for k in benchmarks.split(",") if k.strip()):
            if key not in BY_KEY:
                raise ConfigError(f"unknown benchmark {key!r}; known: {', '.join(BY_KEY)}")
            keys.append(key)
    if not keys:
        raise ConfigError("no benchmark chosen; pass --suite paper or --benchmarks a,b")
    return [b for b in BENCHMARKS if b.key in keys]
