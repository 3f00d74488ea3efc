"""Atomic, resumable checkpoints and the run directory that holds them.

Layout::

    RUN_DIR/
      run_config.yaml                 the resolved config of the run (checked on resume; the base config of
                                      gndpo train --resume RUN_DIR)
      metrics.jsonl                   written by gndpo.report.loggers
      checkpoints/
        step-000012/
          config.json, model.safetensors, generation_config.json   student, HF save_pretrained layout
            (LoRA runs: adapter_config.json, adapter_model.safetensors instead, PEFT's layout; no base weights)
          tokenizer / processor files                             when a processor is given
          trainer_state.pt            optimizer, scheduler, RNG states, user state (step, data position)
          config.yaml                 the run config at save time
          sharded/                    the trainer's checkpoints (format 2): model + optimizer as a Distributed
                                      Checkpoint, every rank writing its shards; any number of ranks resumes
                                      from it (DCP reshards), and trainer_state.pt then holds no optimizer
          MANIFEST.json               every other file's size and SHA-256, written before the marker
          COMPLETE                    written last: a directory without it is not a checkpoint

A directory becomes a run when its first step is logged or checkpointed (:func:`run_started`); until then a
mistake (a wrong path, a missing field, an engine that cannot start) leaves it reusable by the corrected command.

A checkpoint is written into ``checkpoints/.tmp-step-000012-<pid>``, every file is fsynced, the
``COMPLETE`` marker is written, and only then is the directory renamed to its final name, so a crash
never leaves a partial checkpoint where :func:`latest_checkpoint` would find it. Re-saving an existing
step renames the old one to ``.old-…`` first; deleting (``keep_last``) renames to ``.del-…`` first.
Leftovers of interrupted saves are cleaned (or, for ``.old-…``, put back) on the next save or resume.

A complete checkpoint can still be damaged later (a truncated copy, a bad disk). Resume checks the newest one
against its manifest and, if a file is missing, has another size or another hash, sets it aside as
``.broken-step-…`` (kept for inspection, never read again) with a warning naming the file, and falls back to the
next newest intact checkpoint; with none intact it stops with one line. Checkpoints written before manifests
existed are trusted as before.

With ``dist`` (the trainer), every rank calls :func:`save_checkpoint` and :func:`load_checkpoint`: they write
and read the sharded state together, and rank 0 alone writes the Hugging Face files (gathered from the shards),
the trainer state and the marker, then renames. Without it (and for LoRA runs, whose adapters are small), one
process saves the unwrapped model (or its PEFT wrapper from :func:`gndpo.lora.apply_lora`) and the optimizer's
own state dict (format 1, which the loader still reads).

:func:`export_checkpoint` turns a checkpoint into a standalone Hugging Face directory (``gndpo export``).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import yaml

from gndpo.atomic import atomic_write_text as _atomic_write_text
from gndpo.atomic import fsync_dir as _fsync_dir
from gndpo.errors import GndpoError
from gndpo.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, is_adapter_checkpoint, load_adapter_state, merge_adapters

CHECKPOINTS_DIR = "checkpoints"
COMPLETE_MARKER = "COMPLETE"
MANIFEST = "MANIFEST.json"
TRAINER_STATE = "trainer_state.pt"
CHECKPOINT_CONFIG = "config.yaml"
RUN_CONFIG = "run_config.yaml"
METRICS_FILE = "metrics.jsonl"
FORMAT_VERSION = 2
SHARDED_DIR = "sharded"

# Config keys that may change between a run and its resumption; everything else must match.
RESUME_MUTABLE_KEYS = ("trainer.total_steps", "trainer.resume", "trainer.output_dir", "trainer.dist_timeout",
                       "trainer.max_bad_steps",
                       "logging.*", "checkpoint.*", "dist.*")

_STEP_RE = re.compile(r"^step-(\d+)$")
_OLD_RE = re.compile(r"^\.old-(step-\d+)-\d+$")


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR / f"step-{step:06d}"


# ---------------------------------------------------------------------------------------------- file safety
def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def _dump_yaml(config: Mapping) -> str:
    return yaml.safe_dump(_plain(config), sort_keys=False, allow_unicode=True)


def _plain(value: Any) -> Any:
    """Nested dicts/lists of YAML-safe scalars (tuples become lists, Paths strings)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _tidy(ckpt_root: Path) -> None:
    """Remove leftovers of interrupted saves and deletions; put back a checkpoint whose replacement was
    interrupted between its two renames."""
    if not ckpt_root.is_dir():
        return
    for entry in sorted(ckpt_root.iterdir()):
        if entry.name.startswith((".tmp-", ".del-")):
            shutil.rmtree(entry, ignore_errors=True)
        elif (m := _OLD_RE.match(entry.name)) is not None:
            final = ckpt_root / m.group(1)
            if not (final / COMPLETE_MARKER).exists() and (entry / COMPLETE_MARKER).exists():
                if final.exists():
                    shutil.rmtree(final, ignore_errors=True)
                os.rename(entry, final)
            else:
                shutil.rmtree(entry, ignore_errors=True)


def _remove(path: Path) -> None:
    """Delete a checkpoint so that no half-deleted directory can look complete: rename, then delete."""
    trash = path.with_name(f".del-{path.name}-{os.getpid()}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- RNG
def _rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(rng: dict) -> None:
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    cuda = rng.get("cuda")
    if cuda is not None:
        if torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
            torch.cuda.set_rng_state_all(cuda)
        else:
            warnings.warn(
                f"checkpoint holds CUDA RNG states for {len(cuda)} devices but this process sees "
                f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}; CUDA RNG not restored",
                stacklevel=3,
            )


# ---------------------------------------------------------------------------------------------- save
def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    model,
    optimizer,
    scheduler=None,
    processor=None,
    state: dict,
    config: Mapping | None,
    keep_last: int | None = None,
    dist=None,
) -> Path:
    """Save the student (HF ``save_pretrained`` layout), its processor, the optimizer, scheduler, RNG
    states, ``state`` and ``config`` as ``run_dir/checkpoints/step-{step:06d}``, atomically.

    ``dist`` (a :class:`gndpo.dist.DistContext`; every rank calls): model and optimizer also go to a sharded
    Distributed Checkpoint that any world size resumes from. An existing checkpoint of the same step is replaced.
    ``keep_last``: then delete all but that many newest complete checkpoints. Returns the checkpoint directory.
    """
    if keep_last is not None and keep_last < 1:
        raise GndpoError(f"checkpoint.keep_last must be >= 1 or null, got {keep_last}; set 1 or more")
    sharded = dist is not None and not _is_peft(model)
    main = dist is None or dist.is_main
    root = Path(run_dir) / CHECKPOINTS_DIR
    final = checkpoint_path(run_dir, step)
    # every rank must agree on the temporary directory: no pid in its name when the ranks write together
    tmp = root / (f".tmp-{final.name}" if sharded else f".tmp-{final.name}-{os.getpid()}")
    if main:
        root.mkdir(parents=True, exist_ok=True)
        _tidy(root)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    if sharded:
        from gndpo import dist as distributed

        dist.barrier()
        try:
            with _single_process_dcp(dist):
                distributed.save_sharded(str(tmp / SHARDED_DIR), model, optimizer)
            full = distributed.full_state_dict(model) if dist.distributed else None
        except BaseException as exc:
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            os_error = _os_error(exc)  # DCP wraps a rank's failed write in its own exception
            if os_error is not None:
                raise _write_error(run_dir, final, os_error) from None
            raise
    if not main:
        dist.barrier()  # rank 0 finishes and renames
        return final
    try:
        if sharded and full is not None:
            model.save_pretrained(tmp, state_dict=full)
        else:
            model.save_pretrained(tmp)
        if processor is not None:
            processor.save_pretrained(tmp)
        torch.save(
            {
                "format": FORMAT_VERSION if sharded else 1,
                "step": step,
                "optimizer": optimizer.state_dict() if optimizer is not None and not sharded else None,
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "rng": _rng_state(),
                "state": state,
            },
            tmp / TRAINER_STATE,
        )
        if config is not None:
            (tmp / CHECKPOINT_CONFIG).write_text(_dump_yaml(config), encoding="utf-8")
        _fsync_tree(tmp)
        _atomic_write_text(tmp / MANIFEST, json.dumps(_manifest(tmp), indent=1))
        _atomic_write_text(tmp / COMPLETE_MARKER, f"step {step}\nsaved {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        os_error = _os_error(exc)
        if os_error is not None:
            raise _write_error(run_dir, final, os_error) from None
        raise

    if final.exists():
        old = root / f".old-{final.name}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(root)

    if keep_last is not None:
        for ckpt in list_checkpoints(run_dir)[:-keep_last]:
            if ckpt != final:
                _remove(ckpt)
    if dist is not None and sharded:
        dist.barrier()
    return final


@contextlib.contextmanager
def _single_process_dcp(dist):
    """Distributed Checkpoint in one process (no process group) warns at every save and load that it assumes one
    process: which is the intent here, so that warning is silenced; under torchrun there is none to silence."""
    with warnings.catch_warnings():
        if dist is None or not dist.distributed:
            warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled, unavailable or uninitialized",
                                    category=UserWarning)
        yield


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc``: itself, a cause, or one of a DCP ``CheckpointException``'s rank failures."""
    seen = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError):
            return e
        todo += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            todo += [f for f in failures.values() if isinstance(f, BaseException)]
    return None


def _write_error(run_dir, final: Path, exc: OSError) -> GndpoError:
    previous = latest_checkpoint(run_dir)
    kept = (f"{previous.name} is intact and is the one --resume uses" if previous is not None
            else "no earlier checkpoint exists")
    return GndpoError(f"cannot write checkpoint {final.name} in {final.parent}: {exc.strerror or exc} "
                      f"({type(exc).__name__}); {kept}; free space or fix permissions, then resume")


# ---------------------------------------------------------------------------------------------- integrity
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def _manifest(root: Path) -> dict:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name not in (MANIFEST, COMPLETE_MARKER))
    return {"format": 1, "files": {p.relative_to(root).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
                                   for p in files}}


def verify_checkpoint(path: str | Path) -> str | None:
    """None when the checkpoint is complete and every file matches its manifest; else what is wrong, briefly."""
    path = Path(path)
    if not _is_complete(path):
        return f"no {COMPLETE_MARKER} marker"
    if not (path / MANIFEST).is_file():
        return None  # written before manifests existed
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError) as exc:
        return f"{MANIFEST} unreadable ({exc})"
    for name, want in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        size = f.stat().st_size
        if size != want["size"]:
            return f"{name} has {size:,} bytes, {want['size']:,} expected"
        if _sha256(f) != want["sha256"]:
            return f"{name} does not match its checksum"
    return None


def newest_intact_checkpoint(run_dir: str | Path, warn=None) -> Path | None:
    """The newest checkpoint that passes :func:`verify_checkpoint`; damaged newer ones are set aside with a
    warning. None when the run has no checkpoint; a one-line error when it has some but none is intact."""
    warn = warn or logging.getLogger("gndpo").warning
    found = list_checkpoints(run_dir)
    damaged = []
    for ckpt in reversed(found):
        problem = verify_checkpoint(ckpt)
        if problem is None:
            if damaged:
                warn(f"checkpoint {damaged[-1][0]} is damaged ({damaged[-1][1]}); resuming from {ckpt.name}"
                     if len(damaged) == 1 else f"{len(damaged)} checkpoints are damaged (" +
                     "; ".join(f"{n}: {w}" for n, w in damaged) + f"); resuming from {ckpt.name}")
            return ckpt
        damaged.append((ckpt.name, problem))
        aside = ckpt.with_name(f".broken-{ckpt.name}-{int(time.time())}")
        os.rename(ckpt, aside)
    if damaged:
        raise GndpoError(f"no intact checkpoint in {Path(run_dir) / CHECKPOINTS_DIR} (" +
                         "; ".join(f"{n}: {w}" for n, w in damaged) + "; set aside as .broken-*); restore one "
                         "or start over in another trainer.output_dir")
    return None


# ---------------------------------------------------------------------------------------------- find
def _is_complete(path: Path) -> bool:
    return (path / COMPLETE_MARKER).is_file()


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest step first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        m = _STEP_RE.match(entry.name)
        if m is not None and entry.is_dir() and _is_complete(entry):
            found.append((int(m.group(1)), entry))
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


# ---------------------------------------------------------------------------------------------- load
def _read_weights(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """Tensors of a save_pretrained directory, single-file or sharded."""
    from safetensors.torch import load_file

    single = ckpt_dir / "model.safetensors"
    if single.is_file():
        return load_file(single)
    index = ckpt_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        weights: dict[str, torch.Tensor] = {}
        for shard in shards:
            weights.update(load_file(ckpt_dir / shard))
        return weights
    raise GndpoError(f"{ckpt_dir} holds no model.safetensors; pass a checkpoint directory written by gndpo")


def _load_into(model, weights: Mapping[str, torch.Tensor], ckpt_dir: Path) -> None:
    """``load_state_dict`` that accepts missing keys only when they are tied to (share storage with) a
    loaded tensor, as save_pretrained leaves out a tied lm_head."""
    own = model.state_dict()
    unexpected = sorted(set(weights) - set(own))
    if unexpected:
        raise GndpoError(
            f"checkpoint {ckpt_dir} does not fit the model: unexpected weights such as {unexpected[0]}; "
            "load it into the same architecture it was saved from"
        )
    loaded_ptrs = {own[k].data_ptr() for k in weights}
    untied = sorted(k for k in set(own) - set(weights) if own[k].data_ptr() not in loaded_ptrs)
    if untied:
        raise GndpoError(
            f"checkpoint {ckpt_dir} lacks weight {untied[0]} (and {len(untied) - 1} more) that is not tied to a "
            "saved one; load it into the same architecture it was saved from"
        )
    reshaped = sorted(k for k in weights if weights[k].shape != own[k].shape)
    if reshaped:
        k = reshaped[0]
        raise GndpoError(
            f"checkpoint {ckpt_dir} does not fit the model: {k} has shape {tuple(weights[k].shape)}, the model "
            f"{tuple(own[k].shape)}; load it into the same architecture it was saved from"
        )
    model.load_state_dict(weights, strict=False)


def _saved_weights(model, ckpt_dir: Path) -> Mapping[str, torch.Tensor]:
    weights = _read_weights(ckpt_dir)
    if set(weights) <= set(model.state_dict()):
        return weights
    # save_pretrained writes some architectures (e.g. VLMs whose modules were reorganised in transformers)
    # under their original checkpoint names; transformers' own loader knows the mapping back.
    del weights
    fits = "load it into the same architecture it was saved from"
    try:
        fresh, info = type(model).from_pretrained(
            ckpt_dir, config=model.config, dtype=next(model.parameters()).dtype, output_loading_info=True
        )
    except Exception as e:
        raise GndpoError(f"cannot read the weights of {ckpt_dir} into {type(model).__name__} ({e}); {fits}") from e
    kinds = {"unexpected_keys": "unexpected weights", "missing_keys": "missing weights", "mismatched_keys": "weights of another shape"}
    for kind, words in kinds.items():
        if info.get(kind):
            first = sorted(map(str, info[kind]))[0]
            raise GndpoError(f"checkpoint {ckpt_dir} does not fit the model: {words} such as {first}; {fits}")
    return fresh.state_dict()


def _is_peft(model) -> bool:
    # PEFT is optional: its wrapper is recognized by what it carries, without importing it
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def load_checkpoint(ckpt_dir: str | Path, *, model, optimizer=None, scheduler=None, restore_rng: bool = True) -> dict:
    """Load a checkpoint into ``model`` (in place) and, when given, ``optimizer`` and ``scheduler``; restore
    the RNG states unless ``restore_rng`` is False. Returns the ``state`` dict saved with it."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise GndpoError(f"checkpoint {ckpt_dir} does not exist; pass a directory under RUN_DIR/checkpoints")
    if not _is_complete(ckpt_dir):
        raise GndpoError(f"checkpoint {ckpt_dir} is incomplete (no {COMPLETE_MARKER} marker: its save was interrupted); use an earlier one")
    # Only our own file, written by save_checkpoint, is unpickled in full (it holds RNG tuples and numpy state).
    trainer_state = torch.load(ckpt_dir / TRAINER_STATE, map_location="cpu", weights_only=False)

    if (ckpt_dir / SHARDED_DIR).is_dir():  # format 2: model and optimizer from the shards, any world size
        if optimizer is None:
            raise GndpoError(f"checkpoint {ckpt_dir} keeps its optimizer in shards; load it with an optimizer, or "
                             "read its Hugging Face files (from_pretrained) for the weights alone")
        from gndpo import dist as distributed

        with _single_process_dcp(None):
            distributed.load_sharded(str(ckpt_dir / SHARDED_DIR), model, optimizer)
        optimizer = None  # loaded
    else:
        with torch.no_grad():
            if _is_peft(model) or is_adapter_checkpoint(ckpt_dir):
                load_adapter_state(model, ckpt_dir)
            else:
                _load_into(model, _saved_weights(model, ckpt_dir), ckpt_dir)
    if optimizer is not None:
        if trainer_state.get("optimizer") is None:
            raise GndpoError(f"checkpoint {ckpt_dir} holds no optimizer state; load it without an optimizer")
        optimizer.load_state_dict(trainer_state["optimizer"])
    if scheduler is not None:
        if trainer_state.get("scheduler") is None:
            raise GndpoError(f"checkpoint {ckpt_dir} holds no lr scheduler state; load it without a scheduler")
        scheduler.load_state_dict(trainer_state["scheduler"])
    if restore_rng:
        _set_rng_state(trainer_state["rng"])
    return trainer_state["state"]


# ---------------------------------------------------------------------------------------------- run dir
def _flatten(config: Mapping, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _mutable(key: str) -> bool:
    return any(key == p or (p.endswith(".*") and key.startswith(p[:-1])) for p in RESUME_MUTABLE_KEYS)


def config_difference(old: Mapping, new: Mapping) -> tuple[str, Any, Any] | None:
    """The first key (dotted) whose value differs between two configs, outside RESUME_MUTABLE_KEYS."""
    missing = object()
    a, b = _flatten(yaml.safe_load(_dump_yaml(old)) or {}), _flatten(yaml.safe_load(_dump_yaml(new)) or {})
    for key in list(b) + [k for k in a if k not in b]:
        if not _mutable(key) and a.get(key, missing) != b.get(key, missing):
            show = lambda v: "<absent>" if v is missing else v  # noqa: E731
            return key, show(a.get(key, missing)), show(b.get(key, missing))
    return None


def run_started(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a run that trained: a step logged in ``metrics.jsonl`` or a checkpoint (complete,
    set aside as damaged, or an interrupted replacement). A run that failed before its first step ended leaves
    neither, only files of its setup (``run_config.yaml``, an empty ``metrics.jsonl``), and its directory is
    reused as if it were empty."""
    run_dir = Path(run_dir)
    root = run_dir / CHECKPOINTS_DIR
    if root.is_dir() and any(not e.name.startswith((".tmp-", ".del-")) for e in root.iterdir()):
        return True
    metrics = run_dir / METRICS_FILE
    if metrics.is_file():
        with open(metrics, "rb") as f:
            return bool(f.read(4096).strip())
    return False


def stored_run_config(run_dir: str | Path) -> dict | None:
    """The config a run stored in ``run_config.yaml`` (None when there is none)."""
    stored = Path(run_dir) / RUN_CONFIG
    if not stored.is_file():
        return None
    try:
        config = yaml.safe_load(stored.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise GndpoError(f"cannot read {stored}: {str(exc).splitlines()[0]}; restore it from the newest "
                         f"checkpoint's {CHECKPOINT_CONFIG}") from None
    if not isinstance(config, dict):
        raise GndpoError(f"{stored} holds no config mapping; restore it from the newest checkpoint's "
                         f"{CHECKPOINT_CONFIG}")
    return config


def resume_difference_message(run_dir: str | Path, diff: tuple[str, Any, Any]) -> str:
    key, old, new = diff
    return (f"cannot resume {run_dir}: {key} changed from {old!r} to {new!r}, and a resumed run stays exact only "
            f"with the settings it trained with; set it back to {old!r}, or start a new run in another "
            f"trainer.output_dir (changeable on resume: {', '.join(RESUME_MUTABLE_KEYS)})")


def prepare_run_dir(run_dir: str | Path, *, config: Mapping, resume: bool) -> Path | None:
    """Create or reopen a run directory; returns the checkpoint to resume from (None: start fresh).

    A directory that holds a run (:func:`run_started`: it logged a step or saved a checkpoint) is only reused
    with ``resume=True``, and only if its stored config equals ``config`` outside RESUME_MUTABLE_KEYS. Any other
    directory, including one whose run failed before its first step ended, is (re)used for a fresh start,
    whatever ``resume`` says and whatever config it stored. ``run_config.yaml`` is (re)written with ``config``.
    """
    run_dir = Path(run_dir)
    holds_run = run_dir.is_dir() and run_started(run_dir)
    if holds_run and not resume:
        raise GndpoError(
            f"output directory {run_dir} already holds a run; continue it with gndpo train --resume {run_dir} "
            "(or trainer.resume=true), or choose another trainer.output_dir"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    stored = stored_run_config(run_dir) if holds_run else None
    if stored is not None:
        diff = config_difference(stored, config)
        if diff is not None:
            raise GndpoError(resume_difference_message(run_dir, diff))
    _atomic_write_text(run_dir / RUN_CONFIG, _dump_yaml(config))
    if not holds_run:
        return None
    _tidy(run_dir / CHECKPOINTS_DIR)
    return newest_intact_checkpoint(run_dir)


# ---------------------------------------------------------------------------------------------- export
# Files of a checkpoint that belong to the trainer, not to the model: never exported.
_TRAINER_FILES = (TRAINER_STATE, CHECKPOINT_CONFIG, COMPLETE_MARKER, MANIFEST, SHARDED_DIR)


def _find_checkpoint(run_dir: Path, step: int | None) -> Path:
    if not run_dir.is_dir():
        raise GndpoError(f"run directory {run_dir} does not exist; pass the trainer.output_dir of a run")
    found = list_checkpoints(run_dir)
    if not found:
        raise GndpoError(f"{run_dir} holds no complete checkpoint; train with checkpoint.save_final=true or "
                         "checkpoint.every=N first")
    path = found[-1] if step is None else checkpoint_path(run_dir, step)
    if path not in found:
        steps = ", ".join(str(int(_STEP_RE.match(p.name).group(1))) for p in found)
        raise GndpoError(f"{run_dir} has no complete checkpoint of step {step}; available steps: {steps}")
    problem = verify_checkpoint(path)
    if problem is not None:
        raise GndpoError(f"checkpoint {path} is damaged ({problem}); export another step (--step N)")
    return path


EXPORT_DTYPES = ("auto", "float32", "bfloat16", "float16")


def _source_dtype(ckpt: Path) -> str | None:
    """The dtype the student's own config.json named when the run started (recorded in the trainer state)."""
    try:
        state = torch.load(ckpt / TRAINER_STATE, map_location="cpu", weights_only=False).get("state") or {}
    except Exception:
        return None
    return state.get("source_dtype")


def _cast_weights(model_dir: Path, dtype: str) -> None:
    """Rewrite every safetensors file of ``model_dir`` with its floating-point tensors in ``dtype``, and the
    config's ``dtype`` with it (one file in memory at a time)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    target = getattr(torch, dtype)
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        tensors = {k: v.to(target) if v.is_floating_point() else v for k, v in tensors.items()}
        file.unlink()  # a copy, not the checkpoint's file: replace it
        save_file(tensors, str(file), metadata=metadata)
    config_file = model_dir / "config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        for section in (config, *(v for v in config.values() if isinstance(v, dict) and "dtype" in v)):
            section["dtype"] = dtype
        config.pop("torch_dtype", None)
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def export_checkpoint(run_dir: str | Path, *, step: int | None = None, out: str | Path | None = None,
                      merge: bool = False, dtype: str = "auto") -> tuple[Path, str]:
    """Write a checkpoint of a run (default: the newest complete one) as a standalone Hugging Face directory
    with its processor, atomically; returns the directory and what it holds.

    A full fine-tuning checkpoint is copied without the trainer's files. A LoRA checkpoint gives the adapter
    directory (PEFT's layout, loadable with ``PeftModel.from_pretrained`` on the run's base model) or, with
    ``merge``, the base model (``model.path`` in ``run_config.yaml``) with the adapters merged in, which loads
    with plain transformers. ``out`` defaults to ``RUN_DIR/export/step-N`` (``step-N-merged`` with ``merge``)
    and must not exist.

    ``dtype``: the weights' dtype in the export. Checkpoints hold the trainer's float32 masters; ``auto`` writes
    the dtype the model's own config.json named when the run started (InternVL3.5: bfloat16), rounding each
    weight once. LoRA adapters (without ``merge``) stay as PEFT saved them.
    """
    if dtype not in EXPORT_DTYPES:
        raise GndpoError(f"--dtype {dtype!r} is not one of: {', '.join(EXPORT_DTYPES)}")
    run_dir = Path(run_dir)
    ckpt = _find_checkpoint(run_dir, step)
    out = Path(out) if out is not None else run_dir / "export" / f"{ckpt.name}{'-merged' if merge else ''}"
    if out.exists():
        raise GndpoError(f"export directory {out} already exists; pass another --out or remove it")
    adapters = is_adapter_checkpoint(ckpt)
    if adapters and not merge and dtype != "auto":
        raise GndpoError("--dtype applies to full models: LoRA adapters export as PEFT saved them (float32); add "
                         "--merge for a full model in that dtype")
    base = None
    if adapters and merge:
        config_file = run_dir / RUN_CONFIG
        if not config_file.is_file():
            raise GndpoError(f"{run_dir} has no {RUN_CONFIG} naming the base model; cannot merge the adapters")
        model_cfg = (yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}).get("model") or {}
        base = model_cfg.get("path")
        if not base:
            raise GndpoError(f"{config_file} names no model.path (the base model); cannot merge the adapters")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        skip = set(_TRAINER_FILES)
        if base is not None:  # the processor files only; the merged model replaces the adapter files
            skip |= {ADAPTER_CONFIG, ADAPTER_WEIGHTS, "README.md"}  # README.md: PEFT's adapter card
        for entry in ckpt.iterdir():
            if entry.name not in skip:
                (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, tmp / entry.name)
        if base is not None:
            merge_adapters(ckpt, tmp, base_path=base, trust_remote_code=bool(model_cfg.get("trust_remote_code")),
                           dtype=None if dtype == "auto" else dtype)
        elif not adapters:
            written = (dtype if dtype != "auto" else _source_dtype(ckpt)) or None
            if written is not None and written != _saved_dtype(tmp):
                _cast_weights(tmp, written)
        _fsync_tree(tmp)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(out.parent)
    step_n = int(_STEP_RE.match(ckpt.name).group(1))
    if base is not None:
        what = f"the LoRA adapters of step {step_n} merged into {base}"
    elif adapters:
        what = f"the LoRA adapters of step {step_n} (PEFT layout; --merge writes a full model)"
    else:
        what = f"the full model of step {step_n}"
    if not adapters or base is not None:
        what += f" in {_saved_dtype(out)}"
    return out, what


def _saved_dtype(model_dir: Path) -> str:
    try:
        return str(json.loads((model_dir / "config.json").read_text()).get("dtype") or "its saved dtype")
    except (OSError, ValueError):
        return "its saved dtype"
