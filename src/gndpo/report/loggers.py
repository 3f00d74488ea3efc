"""Metric loggers: ``metrics.jsonl`` always, TensorBoard and Weights & Biases when asked.

``metrics.jsonl`` holds one JSON object per training step, ``{"step": N, "loss": ..., ...}``, flushed as
soon as it is written, so a crash loses at most the line being written. Non-finite floats are written with
Python's ``NaN`` / ``Infinity`` tokens (not strict JSON, but ``json.loads`` and :func:`read_metrics` read
them back exactly). A resumed run first drops the lines past the checkpoint it resumes from, so the file
never holds a step twice.

TensorBoard and W&B are imported only when a logger of that kind is built.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

from gndpo.atomic import atomic_write_text as _atomic_write_text
from gndpo.errors import GndpoError

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_run_id"


@runtime_checkable
class MetricsLogger(Protocol):
    def log(self, metrics: Mapping[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def _scalar(value: Any) -> Any:
    """A plain Python number (or string/bool/None) for a metric value; tensors and numpy scalars unwrap."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if hasattr(value, "item"):  # torch / numpy scalars
        return value.item()
    return float(value)


def _parse_lines(path: Path) -> list[dict]:
    """Records of a metrics file; a malformed *last* line (a write cut off by a crash) is dropped."""
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise GndpoError(f"{path} line {i + 1} is not valid JSON; fix or delete that line") from None
        if not isinstance(record, dict):
            raise GndpoError(f"{path} line {i + 1} is not a JSON object; fix or delete that line")
        records.append(record)
    return records


class JsonlLogger:
    """Appends ``{"step": N, **metrics}`` lines to ``path``.

    ``resume_step``: drop existing lines with ``step > resume_step`` first (atomically), so a run resumed
    from the checkpoint of that step does not log those steps twice. Use 0 for a resume with no checkpoint.
    ``resume_record``: that checkpoint's own line (checkpoints carry it): written back when the file lacks it, as
    after a kill between the checkpoint and its line (``recovered`` then holds it).
    """

    def __init__(self, path: str | Path, resume_step: int | None = None, resume_record: Mapping | None = None):
        self.path = Path(path)
        self._failed = False
        self.recovered: dict | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step is not None and (self.path.exists() or resume_record):
                kept = [r for r in (_parse_lines(self.path) if self.path.exists() else [])
                        if not (isinstance(r.get("step"), int) and r["step"] > resume_step)]
                if resume_step > 0 and resume_record and not any(r.get("step") == resume_step for r in kept):
                    self.recovered = {"step": int(resume_step), **{k: _scalar(v) for k, v in resume_record.items()
                                                                   if k != "step"}}
                    kept.append(self.recovered)
                _atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
            self._file = open(self.path, "a", encoding="utf-8")
        except OSError as exc:
            raise self._error(exc) from None

    def _error(self, exc: OSError) -> GndpoError:
        return GndpoError(f"cannot write the metrics file {self.path}: {exc.strerror or exc}; free space or fix "
                          f"permissions, then resume (checkpoints already written are intact)")

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        record: dict[str, Any] = {"step": int(step)}
        record.update((k, _scalar(v)) for k, v in metrics.items() if k != "step")
        line = json.dumps(record, allow_nan=True) + "\n"
        try:
            self._file.write(line)
            self._file.flush()
        except OSError as exc:
            self._failed = True
            raise self._error(exc) from None

    def close(self) -> None:
        """Close the file; after a failed write its unwritten line fails again here, which is not a second error
        (the run is already stopping with the first)."""
        if self._file.closed:
            return
        try:
            self._file.close()  # the file is closed even when its last flush fails
        except OSError as exc:
            if not self._failed:
                raise self._error(exc) from None


class TensorBoardLogger:
    """Scalars to a TensorBoard event directory. ``purge_step`` hides events at or after that step that an
    interrupted earlier run wrote (TensorBoard's own resume mechanism)."""

    def __init__(self, log_dir: str | Path, purge_step: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise GndpoError(
                "tensorboard is not installed; pip install gndpo[tensorboard] or set logging.tensorboard=false"
            ) from None
        self._writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step, flush_secs=30)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for key, value in metrics.items():
            value = _scalar(value)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(key, value, global_step=int(step))

    def close(self) -> None:
        self._writer.flush()
        self._writer.close()


class WandbLogger:
    """Weights & Biases run. The run id is kept in ``dir/wandb_run_id`` so that a resumed training run
    continues the same W&B run instead of starting a new one."""

    def __init__(self, project: str, name: str | None, config: Mapping | None, dir: str | Path, resume: bool = False):
        try:
            wandb = importlib.import_module("wandb")
        except ImportError:
            raise GndpoError("wandb is not installed; pip install gndpo[wandb] or set logging.wandb=false") from None
        dir = Path(dir)
        dir.mkdir(parents=True, exist_ok=True)
        id_file = dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if resume and id_file.exists() else None
        self._run = wandb.init(
            project=project, name=name, config=dict(config or {}), dir=str(dir),
            id=run_id, resume="allow" if run_id else None,
        )
        if getattr(self._run, "id", None):
            _atomic_write_text(id_file, str(self._run.id) + "\n")

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self._run.log({k: _scalar(v) for k, v in metrics.items()}, step=int(step))

    def close(self) -> None:
        self._run.finish()


class MultiLogger:
    """Fans every call out to several loggers; ``close`` closes all of them even if one fails."""

    def __init__(self, loggers: Sequence[MetricsLogger]):
        self.loggers = list(loggers)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for logger in self.loggers:
            logger.log(metrics, step)

    def close(self) -> None:
        errors = []
        for logger in self.loggers:
            try:
                logger.close()
            except Exception as e:  # close the others before reporting
                errors.append(e)
        if errors:
            raise errors[0]

    def __enter__(self) -> "MultiLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _tensorboard_importable() -> bool:
    try:
        importlib.import_module("torch.utils.tensorboard")
    except ImportError:
        return False
    return True


def build_loggers(
    run_dir: str | Path,
    *,
    tensorboard: str | bool = "auto",
    wandb: bool = False,
    wandb_project: str = "gndpo",
    run_name: str | None = None,
    config: Mapping | None = None,
    resume_step: int | None = None,
    resume_record: Mapping | None = None,
) -> MultiLogger:
    """The loggers of one run: jsonl at ``run_dir/metrics.jsonl`` always; TensorBoard at
    ``run_dir/tensorboard`` (``"auto"``: when importable, ``"true"``: required, ``"false"``: off); W&B when
    ``wandb``. ``resume_step`` is the step of the checkpoint a resumed run starts from (0 = none);
    ``resume_record`` that checkpoint's metrics, logged again where the jsonl file lacks them."""
    run_dir = Path(run_dir)
    mode = str(tensorboard).lower()  # bools are accepted too: True -> "true"
    if mode not in ("auto", "true", "false"):
        raise GndpoError(f"logging.tensorboard must be auto, true or false, got {tensorboard!r}; set one of those")
    jsonl = JsonlLogger(run_dir / METRICS_FILE, resume_step=resume_step, resume_record=resume_record)
    loggers: list[MetricsLogger] = [jsonl]
    if mode == "true" or (mode == "auto" and _tensorboard_importable()):
        purge = resume_step + 1 if resume_step is not None else None
        loggers.append(TensorBoardLogger(run_dir / TENSORBOARD_DIR, purge_step=purge))
    if wandb:
        loggers.append(WandbLogger(wandb_project, run_name or run_dir.resolve().name, config, run_dir, resume=resume_step is not None))
    if jsonl.recovered is not None:  # the step the other loggers missed too
        for other in loggers[1:]:
            other.log({k: v for k, v in jsonl.recovered.items() if k != "step"}, jsonl.recovered["step"])
    return MultiLogger(loggers)


def read_metrics(path_or_run_dir: str | Path) -> list[dict]:
    """Records of a ``metrics.jsonl`` (give the file or its run directory), in file order."""
    path = Path(path_or_run_dir)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise GndpoError(f"no metrics file at {path}; pass a run directory written by gndpo train (it holds {METRICS_FILE})")
    return _parse_lines(path)
