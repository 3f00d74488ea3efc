"""``eval.json`` (every score with what produced it) and ``eval.md`` (the paper's Table-1 layout).

One table per output directory: each ``gndpo eval`` run adds rows (models) or cells (benchmarks) to it, and a
cell once scored is not recomputed. Decoding, judge and harness (with the version read from the installed package)
are recorded once per table; a run with other settings is refused rather than mixed into it. Scores are
percentages. A cell scored without a judge (none configured, or a scorer that never asked for one) is marked †; a
benchmark whose judge failed on some calls holds no score, only why ("failed"). Overall is the unweighted mean of
the seven Table-1 columns and is given only when all seven are scored with a judge; otherwise the cell says what
its mean covers ("48.3 (mean of 3, rule-only)"), so a partial or rule-only mean never passes for the paper's.
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
    """Adopt ``settings`` for a new table; refuse different ones for an existing table. A harness of None (a run
    that needs none) keeps the table's."""
    if settings.get("harness") is None:
        settings = dict(settings, harness=state.get("harness"))
    for key in SETTINGS:
        if state.get(key) is not None and state[key] != settings[key]:
            raise ConfigError(f"{Path(out) / 'eval.json'} was scored with {key} {json.dumps(state[key])}, this run "
                              f"asks for {json.dumps(settings[key])}; use another --out or the same settings")
    state.update({k: settings[k] for k in SETTINGS})


def save_state(out: Path, state: dict) -> None:
    for entry in state.get("models", {}).values():
        entry["overall"] = overall(entry.get("results", {}))  # None unless all seven are scored with a judge
    Path(out).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(out) / "eval.json", json.dumps(state, indent=1, sort_keys=False) + "\n")
    atomic_write_text(Path(out) / "eval.md", format_markdown(state))


def overall(results: dict) -> float | None:
    """The paper's Overall: the unweighted mean of the seven Table-1 columns, or None unless every one of them is
    scored with a judge."""
    cells = [results.get(k) for k in TABLE1]
    if any(c is None or c.get("score") is None or c.get("rule_only") for c in cells):
        return None
    return sum(c["score"] for c in cells) / len(cells)


def row_mean(results: dict) -> tuple[float, list[str], list[str]] | None:
    """(mean, keys scored, keys of those scored rule-only) over the row's scored Table-1 cells; None if none is."""
    keys = [b.key for b in BENCHMARKS if b.key in TABLE1 and (results.get(b.key) or {}).get("score") is not None]
    if not keys:
        return None
    return (sum(results[k]["score"] for k in keys) / len(keys), keys,
            [k for k in keys if results[k].get("rule_only")])


def _covers(mean: tuple[float, list[str], list[str]]) -> str:
    """What a mean that is not the paper's Overall covers, e.g. " (mean of 3, rule-only)"."""
    _, keys, rule_only = mean
    if len(keys) == len(TABLE1) and not rule_only:
        return ""
    rules = "" if not rule_only else ", rule-only" if len(rule_only) == len(keys) else f", {len(rule_only)} rule-only"
    return f" (mean of {len(keys)}{rules})"


def _overall_cell(results: dict) -> str:
    mean = row_mean(results)
    if mean is None:
        return "—"
    unofficial = any((results.get(k) or {}).get("data") == "unofficial" for k in mean[1])
    return f"{mean[0]:.1f}" + ("*" if unofficial else "") + _covers(mean)


def _cell(c: dict | None) -> str:
    if c is None:
        return "—"
    if c.get("refused"):
        return "n/a‡"
    if c.get("score") is None:
        return "failed§" if c.get("failed") else "—"
    return f"{c['score']:.1f}" + ("†" if c.get("rule_only") else "") + ("*" if c.get("data") == "unofficial" else "")


def format_markdown(state: dict) -> str:
    compare = state.get("compare")
    chosen = state.get("benchmarks", [])
    # Table 1's columns, Overall (their mean), then extras such as Geometry3K
    keys = [b.key for b in BENCHMARKS if b.key in chosen and b.key in TABLE1]
    extras = [b.key for b in BENCHMARKS if b.key in chosen and b.key not in TABLE1]
    cols = [BY_KEY[k] for k in keys + extras]
    lines = ["# Evaluation", ""]
    d, j, h = state.get("decoding", {}), state.get("judge"), state.get("harness")
    if d:
        lines.append((f"{h['name']} {h['version']} (`{h['package']}`)" if h else "scored by gndpo (no harness)")
                     + "; decoding: "
                     f"temperature {d.get('temperature')}, top-p {d.get('top_p')}, up to {d.get('max_new_tokens')} "
                     f"new tokens, seed {d.get('seed')}; judge: "
                     + (f"`{j['model']}` at {j['base_url']}" if j else "none (rule-only scoring)") + ".")
        lines.append("")
    header = ["model", *(BY_KEY[k].column for k in keys), "Overall", *(BY_KEY[k].column for k in extras)]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows = {}
    means = {}
    for label, entry in state.get("models", {}).items():
        results = entry.get("results", {})
        cells = [results.get(k) for k in keys]
        more = [results.get(k) for k in extras]
        rows[label], means[label] = cells + more, row_mean(results)
        lines.append("| " + " | ".join([label, *map(_cell, cells), _overall_cell(results), *map(_cell, more)])
                     + " |")
    if compare and all(name in rows for name in compare):
        base, trained = (rows[name] for name in compare)

        def delta(b, t):
            ok = b and t and b.get("score") is not None and t.get("score") is not None
            return f"{t['score'] - b['score']:+.1f}" if ok else "—"

        n = len(keys)
        mb, mt = (means[name] for name in compare)
        deltas = [delta(b, t) for b, t in zip(base[:n], trained[:n])]
        same = mb is not None and mt is not None and mb[1:] == mt[1:]  # means over the same cells, alike scored
        deltas.append(f"{mt[0] - mb[0]:+.1f}{_covers(mt)}" if same else "—")
        deltas += [delta(b, t) for b, t in zip(base[n:], trained[n:])]
        lines.append("| " + " | ".join([f"Δ {compare[1]} − {compare[0]}", *deltas]) + " |")
    lines += ["", "Columns: " + "; ".join(f"{b.column}: {b.metric} (`{b.dataset}`)" for b in cols)
              + ". Overall: the unweighted mean of the seven Table-1 columns, given only when all seven are scored "
                "with a judge; otherwise the cell says which mean it is."]
    notes = []
    cells_all = [c for cells in rows.values() for c in cells if c]
    if any(c.get("rule_only") for c in cells_all):
        notes.append("† scored without a judge (rule-only): answers the rules cannot parse count as wrong, so the "
                     "number can be lower than the official score.")
    if any(c.get("failed") for c in cells_all):
        notes.append("§ not scored: the judge failed on some of this benchmark's calls (eval.json says how many); "
                     "run the same command again to retry it.")
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

