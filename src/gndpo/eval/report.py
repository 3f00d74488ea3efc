"""``eval.json`` (every score with what produced it) and ``eval.md`` (the paper's Table-1 layout).

One table per output directory: each ``gndpo eval`` run adds rows (models) or cells (benchmarks) to it, and a
cell once scored is not recomputed. Decoding, judge and harness are recorded once per table; a run with other
settings is refused rather than mixed into it. Scores are percentages; Overall is the unweighted mean of the
columns, given only when every column of the row has a score.
"""
from __future__ import annotations

import json
from pathlib import Path

from gndpo.atomic import atomic_write_text
from gndpo.errors import ConfigError
from gndpo.eval.benchmarks import BENCHMARKS, BY_KEY, TABLE1

FORMAT = 1
SETTINGS = ("harness", "decoding", "judge")


def load_state(out: Path) -> dict:
    path = Path(out) / "eval.json"
    if not path.exists():
        return {"format": FORMAT, "models": {}, "benchmarks": []}
    try:
        state = json.loads(path.read_text())
    except ValueError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}); move it away to start a new table") from None
    if state.get("format") != FORMAT:
        raise ConfigError(f"{path} was written by another gndpo version (format {state.get('format')}); use a new "
                          f"--out")
    return state


def check_settings(state: dict, settings: dict, out: Path) -> None:
    """Adopt ``settings`` for a new table; refuse different ones for an existing table."""
    for key in SETTINGS:
        if key in state and state[key] != settings[key]:
            raise ConfigError(f"{Path(out) / 'eval.json'} was scored with {key} {json.dumps(state[key])}, this run "
                              f"asks for {json.dumps(settings[key])}; use another --out or the same settings")
    state.update({k: settings[k] for k in SETTINGS})


def save_state(out: Path, state: dict) -> None:
    Path(out).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(out) / "eval.json", json.dumps(state, indent=1, sort_keys=False) + "\n")
    atomic_write_text(Path(out) / "eval.md", format_markdown(state))


def overall(cells: list[dict | None]) -> float | None:
    """The unweighted mean of the row's scores, or None when a column has none."""
    if not cells or any(c is None or c.get("score") is None for c in cells):
        return None
    return sum(c["score"] for c in cells) / len(cells)


def _cell(c: dict | None) -> str:
    if c is None:
        return "—"
    if c.get("refused"):
        return "n/a‡"
    return f"{c['score']:.1f}" + ("†" if c.get("rule_only") else "") + ("*" if c.get("data") == "unofficial" else "")


def _row_marks(cells: list[dict | None]) -> str:
    return ("†" if any(c and c.get("rule_only") for c in cells) else "") + \
        ("*" if any(c and c.get("data") == "unofficial" for c in cells) else "")


def format_markdown(state: dict) -> str:
    compare = state.get("compare")
    chosen = state.get("benchmarks", [])
    # Table 1's columns, Overall (their mean), then extras such as Geometry3K
    keys = [b.key for b in BENCHMARKS if b.key in chosen and b.key in TABLE1]
    extras = [b.key for b in BENCHMARKS if b.key in chosen and b.key not in TABLE1]
    cols = [BY_KEY[k] for k in keys + extras]
    lines = ["# Evaluation", ""]
    d, j, h = state.get("decoding", {}), state.get("judge"), state.get("harness", {})
    if d:
        lines.append(f"{h.get('name', '?')} {h.get('version', '?')} (`{h.get('package', '?')}`); decoding: "
                     f"temperature {d.get('temperature')}, top-p {d.get('top_p')}, up to {d.get('max_new_tokens')} "
                     f"new tokens, seed {d.get('seed')}; judge: "
                     + (f"`{j['model']}` at {j['base_url']}" if j else "none (rule-only scoring)") + ".")
        lines.append("")
    header = ["model", *(BY_KEY[k].column for k in keys), "Overall", *(BY_KEY[k].column for k in extras)]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows = {}
    for label, entry in state.get("models", {}).items():
        cells = [entry.get("results", {}).get(k) for k in keys]
        more = [entry.get("results", {}).get(k) for k in extras]
        rows[label] = cells + more
        mean = overall(cells)
        lines.append("| " + " | ".join([label, *map(_cell, cells), "—" if mean is None else
                                        f"{mean:.1f}{_row_marks(cells)}", *map(_cell, more)]) + " |")
    if compare and all(name in rows for name in compare):
        base, trained = (rows[name] for name in compare)

        def delta(b, t):
            ok = b and t and b.get("score") is not None and t.get("score") is not None
            return f"{t['score'] - b['score']:+.1f}" if ok else "—"

        n = len(keys)
        mb, mt = overall(base[:n]), overall(trained[:n])
        deltas = [delta(b, t) for b, t in zip(base[:n], trained[:n])]
        deltas.append("—" if mb is None or mt is None else f"{mt - mb:+.1f}")
        deltas += [delta(b, t) for b, t in zip(base[n:], trained[n:])]
        lines.append("| " + " | ".join([f"Δ {compare[1]} − {compare[0]}", *deltas]) + " |")
    lines += ["", "Columns: " + "; ".join(f"{b.column}: {b.metric} (`{b.dataset}`)"
                                         for b in cols) + ". Overall: unweighted mean of the Table-1 columns."]
    notes = []
    cells_all = [c for cells in rows.values() for c in cells if c]
    if any(c.get("rule_only") for c in cells_all):
        notes.append("† scored without a judge (rule-only): answers the rules cannot parse count as wrong, so the "
                     "number can be lower than the official score.")
    if any(c.get("refused") for c in cells_all):
        notes.append("‡ not scored: the official scoring of this benchmark needs an LLM judge (--judge-model).")
    if any(c.get("data") == "unofficial" for c in cells_all):
        notes.append("\\* the data file differs from VLMEvalKit's official one (MD5): a subset or a fixture, not "
                     "comparable with published numbers.")
    if notes:
        lines += [""] + notes
    lines += ["", "Items per cell:", ""]
    for label, cells in rows.items():
        counts = ", ".join(f"{b.column} {c['n_items']}" for b, c in zip(cols, cells) if c and c.get("n_items"))
        lines.append(f"- {label}: {counts or 'none scored yet'}")
    return "\n".join(lines) + "\n"

