"""``gndpo lab --resume``: which runs of an earlier lab in the same ``--out`` a lab keeps, and its evaluation cache.

A run is kept (not trained again) when its directory holds a *finished* run of the *same configuration*:

- finished: ``metrics.jsonl`` has a row for every step 1..total_steps, and the final checkpoint is complete and
  intact (:func:`gndpo.checkpoint.verify_checkpoint`: its ``COMPLETE`` marker, and every file against its
  manifest), so a run killed mid-save is never taken for done;
- same configuration: its ``run_config.yaml``, loaded through :func:`gndpo.config.load_config` (keys added to the
  config since then take their defaults), equals the lab's config for it field by field, and the lab's inputs
  that the config names only by path (``train.jsonl``, the shipped checkpoints) have the digest the run recorded
  when it was evaluated (runs of labs before this cache recorded none and are trusted on their config).

Every evaluated accuracy is cached in the run's ``lab_eval.json`` (the shipped student's and teacher's in
``<out>/lab_eval.json``), keyed by step (by name), together with the digests of the test split and of the inputs;
an entry whose digests differ from the current ones is ignored. Without ``--resume`` runs are replaced as before.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import replace
from pathlib import Path

from gndpo.atomic import atomic_write_text

log = logging.getLogger("gndpo")

EVAL_CACHE = "lab_eval.json"


def _digest(files: list[Path], root: Path) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(root).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def inputs_digest(data_dir: Path, assets: Path) -> str:
    """What a run trains on beyond its config: the train split and every shipped checkpoint (``gndpo lab
    bootstrap`` rewrites them under the same paths). ``train_routed.jsonl`` (``--teachers``) derives from
    ``train.jsonl`` and is left out, so that turning ``--teachers`` on does not invalidate the other runs."""
    both = _digest([data_dir / "train.jsonl"], data_dir) + _digest(
        sorted(p for p in assets.rglob("*") if p.is_file()), assets)
    return hashlib.sha256(both.encode()).hexdigest()


def test_digest(data_dir: Path) -> str:
    return _digest([data_dir / "test.jsonl"], data_dir)


# ---------------------------------------------------------------- the evaluation cache


def read_cache(path: Path, *, test: str, inputs: str) -> dict[str, float]:
    """The cached accuracies in ``path`` (a ``lab_eval.json``), or none when they were measured on other data."""
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(cache, dict) or cache.get("test") != test or cache.get("inputs") != inputs:
        return {}
    return {str(k): float(v) for k, v in cache.get("accuracy", {}).items()}


def write_cache(path: Path, accuracy: dict, *, test: str, inputs: str) -> None:
    """Replace ``path`` atomically: a lab killed while writing leaves the old cache or the new one."""
    atomic_write_text(path, json.dumps({"test": test, "inputs": inputs,
                                        "accuracy": {str(k): v for k, v in accuracy.items()}}, indent=1) + "\n")


def recorded_inputs(run_dir: Path) -> str | None:
    """The inputs digest an earlier lab recorded for a run (None: it recorded none)."""
    try:
        return json.loads((run_dir / EVAL_CACHE).read_text()).get("inputs")
    except (OSError, ValueError, AttributeError):
        return None


# ---------------------------------------------------------------- which runs to keep


def unfinished(run_dir: Path, total_steps: int) -> str | None:
    """None when ``run_dir`` holds a finished run of ``total_steps`` steps; else why not, briefly."""
    from gndpo import checkpoint as ckpt
    from gndpo.report.loggers import read_metrics

    try:
        steps = {r.get("step") for r in read_metrics(run_dir)}
    except Exception as exc:  # noqa: BLE001 - an unreadable metrics file is just not a finished run
        return f"metrics.jsonl unreadable ({type(exc).__name__})"
    missing = [s for s in range(1, total_steps + 1) if s not in steps]
    if missing:
        return f"metrics.jsonl lacks step {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
    final = ckpt.checkpoint_path(run_dir, total_steps)
    if not final.is_dir():
        return f"its final checkpoint {final.name} is missing"
    problem = ckpt.verify_checkpoint(final)
    return None if problem is None else f"its final checkpoint {final.name} is not intact ({problem})"


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_change(run_dir: Path, cfg) -> str | None:
    """None when the run's stored config equals ``cfg``; else the first difference, briefly."""
    from gndpo.checkpoint import RUN_CONFIG
    from gndpo.config import load_config, to_dict
    from gndpo.errors import GndpoError

    try:
        stored = to_dict(load_config(run_dir / RUN_CONFIG))
    except GndpoError as exc:
        return f"its {RUN_CONFIG} does not load ({exc})"
    old, new = _flat(stored), _flat(to_dict(cfg))
    for key in [*new, *(k for k in old if k not in new)]:
        if old.get(key, "<absent>") != new.get(key, "<absent>"):
            return f"{key} was {old.get(key, '<absent>')!r}, now {new.get(key, '<absent>')!r}"
    return None


def mark_reusable(tasks: list, inputs: str) -> list:
    """``tasks`` with ``reuse`` set on each run that a finished run of the same configuration already holds; one
    log line for every other run an earlier lab left there (it is trained again, replacing that one)."""
    marked = []
    for task in tasks:
        run_dir = Path(task.cfg.trainer.output_dir) if task.cfg is not None else None
        if run_dir is None or not (run_dir / "metrics.jsonl").is_file():
            marked.append(task)  # a shipped checkpoint's evaluation, or nothing there yet
            continue
        why = unfinished(run_dir, task.cfg.trainer.total_steps)
        why = why and f"the earlier run is not finished: {why}"
        why = why or (f"its configuration changed: {change}" if (change := config_change(run_dir, task.cfg)) else None)
        recorded = recorded_inputs(run_dir)
        if why is None and recorded is not None and recorded != inputs:
            why = "the lab's train split or shipped checkpoints changed since it trained"
        if why:
            log.info("%s: trained again (%s)", task.name, why)
            marked.append(task)
        else:
            marked.append(replace(task, reuse=True))
    return marked


def train_seconds(rows: list[dict], total_steps: int) -> float:
    """A kept run's training time: the sum of its steps' ``time/step`` (the step's rollout, scoring, update and
    checkpoint; the setup before the first step, counted in a fresh run's time, is not logged)."""
    by_step = {r["step"]: r.get("time/step", 0.0) for r in rows if isinstance(r.get("step"), int)}
    return float(sum(by_step.get(s, 0.0) for s in range(1, total_steps + 1)))
