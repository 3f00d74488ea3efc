"""Training-dynamics plots in the style of the paper's Figure 2 (arXiv 2606.09091): one panel per metric
(loss, grad norm, entropy) against step, one line per run, runs overlaid for comparison.

Figures are drawn on a bare ``matplotlib.figure.Figure`` with the Agg canvas, so plotting neither needs a
display nor touches pyplot's global state or the process-wide backend.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

from gndpo.errors import GndpoError
from gndpo.report.loggers import read_metrics

PANEL_SIZE = (4.5, 3.5)  # inches per panel; with dpi=100 a panel is 450 x 350 pixels
TITLES = {"loss": "Loss", "grad_norm": "Grad norm", "entropy": "Entropy"}

Series = tuple[list[int], list[float]]  # (steps, values), sorted by step


def _series(records: Sequence[Mapping], key: str) -> Series | None:
    """(steps, values) of one metric; the last record of a step wins; non-finite values become NaN gaps."""
    by_step: dict[int, float] = {}
    for i, record in enumerate(records):
        value = record.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        step = record.get("step", i)
        by_step[int(step)] = float(value) if math.isfinite(value) else math.nan
    if not by_step:
        return None
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average over ``window`` points, ignoring NaNs (all-NaN windows stay NaN)."""
    if window <= 1:
        return values
    out = []
    for i in range(len(values)):
        finite = [v for v in values[max(0, i - window + 1) : i + 1] if not math.isnan(v)]
        out.append(sum(finite) / len(finite) if finite else math.nan)
    return out


def _aggregate(series: list[Series]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Mean, min and max across seeds at every step any seed logged (NaNs ignored)."""
    per_step: dict[int, list[float]] = {}
    for steps, values in series:
        for s, v in zip(steps, values):
            if not math.isnan(v):
                per_step.setdefault(s, []).append(v)
    steps = sorted(per_step)
    return (
        steps,
        [sum(per_step[s]) / len(per_step[s]) for s in steps],
        [min(per_step[s]) for s in steps],
        [max(per_step[s]) for s in steps],
    )


def plot_dynamics(
    runs: Sequence[tuple[str, Sequence[Mapping]]],
    out_path: str | Path,
    keys: Sequence[str] = ("loss", "grad_norm", "entropy"),
    title: str | None = None,
    smooth: int = 1,
    aggregate_seeds: bool = False,
    dpi: int = 100,
) -> Path:
    """Write a PNG with one panel per metric in ``keys`` and one line per ``(label, records)`` run.

    ``records`` are metric dicts with a ``step`` (as :func:`read_metrics` returns them). A run lacking a
    metric is left out of that panel. ``smooth``: trailing moving-average window in logged points.
    ``aggregate_seeds``: runs sharing a label are drawn as their mean with a min-max band.
    The image is ``len(keys) * 450`` by ``350`` pixels at the default ``dpi=100``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not runs:
        raise GndpoError("plot_dynamics got no runs; pass at least one (label, metrics) pair")
    if not keys:
        raise GndpoError("plot_dynamics got no metric keys; pass keys such as ('loss', 'grad_norm', 'entropy')")
    if smooth < 1:
        raise GndpoError(f"smooth must be >= 1 (a window in logged points), got {smooth}; use 1 for no smoothing")

    groups: dict[str, list[Sequence[Mapping]]] = {}
    for label, records in runs:
        groups.setdefault(label, []).append(records)
    # Without aggregation every run is its own line; repeated labels share a colour but only one legend entry.
    lines = list(groups.items()) if aggregate_seeds else [(label, [records]) for label, records in runs]
    if not any(_series(records, key) for _, records in runs for key in keys):
        found = sorted({k for _, records in runs for r in records for k in r if k != "step"})
        raise GndpoError(f"none of the runs logged {', '.join(keys)}; choose keys among: {', '.join(found) or 'none'}")

    fig = Figure(figsize=(PANEL_SIZE[0] * len(keys), PANEL_SIZE[1]), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    colors = {label: f"C{i % 10}" for i, label in enumerate(groups)}
    for ax, key in zip(axes, keys):
        labelled = set()
        for label, members in lines:
            series = [s for s in (_series(records, key) for records in members) if s is not None]
            if not series:
                continue
            series = [(steps, _smooth(values, smooth)) for steps, values in series]
            legend = None if label in labelled else label
            labelled.add(label)
            if aggregate_seeds and len(series) > 1:
                steps, mean, lo, hi = _aggregate(series)
                ax.plot(steps, mean, color=colors[label], label=f"{label} (n={len(series)})", linewidth=1.5)
                ax.fill_between(steps, lo, hi, color=colors[label], alpha=0.2, linewidth=0)
            else:
                (steps, values), = series
                ax.plot(steps, values, color=colors[label], label=legend, linewidth=1.5)
        ax.set_title(TITLES.get(key, key))
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if labelled:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, f"no {key} logged", ha="center", va="center", transform=ax.transAxes)
    if title:
        fig.suptitle(title)
    fig.tight_layout()

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, format="png", dpi=dpi)
    return out_path


def plot_run_dirs(
    paths: Sequence[str | Path],
    out_path: str | Path,
    labels: Sequence[str] | None = None,
    **kw,
) -> Path:
    """:func:`plot_dynamics` over run directories (each holding ``metrics.jsonl``); labels default to the
    directory names."""
    if labels is not None and len(labels) != len(paths):
        raise GndpoError(f"got {len(labels)} labels for {len(paths)} run directories; pass one label per directory")
    runs = []
    for i, path in enumerate(paths):
        path = Path(path)
        if not path.is_dir():
            raise GndpoError(f"run directory {path} does not exist; pass directories written by gndpo train")
        label = labels[i] if labels is not None else (path.name or path.resolve().name)
        runs.append((label, read_metrics(path)))
    return plot_dynamics(runs, out_path, **kw)
