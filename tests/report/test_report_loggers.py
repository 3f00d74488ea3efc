"""Metric loggers: jsonl append/resume/NaN, TensorBoard selection, W&B (faked, and missing)."""
import json
import math
import sys
import types

import pytest
import torch

from gndpo.errors import GndpoError
from gndpo.report import JsonlLogger, MetricsLogger, TensorBoardLogger, WandbLogger, build_loggers, read_metrics


def _steps(records):
    return [r["step"] for r in records]


def test_jsonl_appends_one_flushed_line_per_step(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    logger = JsonlLogger(path)
    logger.log({"loss": 0.5, "grad_norm": torch.tensor(2.0)}, step=1)
    # Flushed per line: readable before close.
    assert read_metrics(path) == [{"step": 1, "loss": 0.5, "grad_norm": 2.0}]
    logger.log({"loss": 0.25, "step": 99}, step=2)  # a "step" metric cannot override the step
    logger.close()
    again = JsonlLogger(path)  # no resume_step: plain append
    again.log({"loss": 0.125}, step=3)
    again.close()
    assert _steps(read_metrics(tmp_path / "run")) == [1, 2, 3]
    assert isinstance(logger, MetricsLogger)


def test_jsonl_resume_drops_steps_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    logger = JsonlLogger(path)
    for step in range(1, 6):
        logger.log({"loss": float(step)}, step)
    logger.close()
    with open(path, "a") as f:
        f.write('{"step": 6, "lo')  # a line cut off by a crash

    resumed = JsonlLogger(path, resume_step=3)
    assert _steps(read_metrics(path)) == [1, 2, 3]
    resumed.log({"loss": 4.5}, step=4)
    resumed.close()
    records = read_metrics(path)
    assert _steps(records) == [1, 2, 3, 4] and records[-1]["loss"] == 4.5
    assert not [p for p in tmp_path.iterdir() if p.name != "metrics.jsonl"]  # no temp file left

    JsonlLogger(path, resume_step=0).close()  # resume without a checkpoint: start the file over
    assert read_metrics(path) == []


def test_jsonl_non_finite_values_round_trip(tmp_path):
    logger = JsonlLogger(tmp_path / "metrics.jsonl")
    logger.log({"a": float("nan"), "b": float("inf"), "c": -math.inf, "d": 1.0}, step=1)
    logger.close()
    (record,) = read_metrics(tmp_path)
    assert math.isnan(record["a"]) and record["b"] == math.inf and record["c"] == -math.inf and record["d"] == 1.0
    assert "NaN" in (tmp_path / "metrics.jsonl").read_text()


def test_read_metrics_errors(tmp_path):
    with pytest.raises(GndpoError, match="no metrics file"):
        read_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(GndpoError, match="line 2 is not valid JSON"):
        read_metrics(tmp_path)


def test_build_loggers_tensorboard_auto_and_false(tmp_path):
    loggers = build_loggers(tmp_path / "auto", tensorboard="auto")
    assert [type(x) for x in loggers.loggers] == [JsonlLogger, TensorBoardLogger]
    loggers.log({"loss": 1.0, "note": "text is skipped by tensorboard"}, step=1)
    loggers.close()
    assert list((tmp_path / "auto" / "tensorboard").glob("events.out.tfevents.*"))
    assert _steps(read_metrics(tmp_path / "auto")) == [1]

    with build_loggers(tmp_path / "off", tensorboard="false") as loggers:
        assert [type(x) for x in loggers.loggers] == [JsonlLogger]
    assert not (tmp_path / "off" / "tensorboard").exists()

    with pytest.raises(GndpoError, match="auto, true or false"):
        build_loggers(tmp_path / "bad", tensorboard="yes")


def test_build_loggers_without_tensorboard_installed(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    with build_loggers(tmp_path / "a", tensorboard="auto") as loggers:
        assert [type(x) for x in loggers.loggers] == [JsonlLogger]
    with pytest.raises(GndpoError, match=r"tensorboard is not installed; pip install gndpo\[tensorboard\]"):
        build_loggers(tmp_path / "b", tensorboard="true")


def test_wandb_missing_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(GndpoError) as info:
        build_loggers(tmp_path, tensorboard="false", wandb=True)
    assert str(info.value) == "wandb is not installed; pip install gndpo[wandb] or set logging.wandb=false"


def test_wandb_logger_with_a_fake_module_keeps_its_run_id_on_resume(tmp_path, monkeypatch):
    calls = []

    class Run:
        def __init__(self, **kw):
            self.kw, self.id, self.logged, self.finished = kw, kw["id"] or "run123", [], False

        def log(self, data, step):
            self.logged.append((step, data))

        def finish(self):
            self.finished = True

    def init(**kw):
        calls.append(Run(**kw))
        return calls[-1]

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    run_dir = tmp_path / "my-run"
    loggers = build_loggers(run_dir, tensorboard="false", wandb=True, wandb_project="proj", config={"a": {"b": 1}})
    loggers.log({"loss": torch.tensor(0.5)}, step=1)
    loggers.close()
    first = calls[0]
    assert first.kw["project"] == "proj" and first.kw["name"] == "my-run" and first.kw["config"] == {"a": {"b": 1}}
    assert first.kw["id"] is None and first.logged == [(1, {"loss": 0.5})] and first.finished

    build_loggers(run_dir, tensorboard="false", wandb=True, run_name="named", resume_step=1).close()
    assert calls[1].kw["id"] == "run123" and calls[1].kw["resume"] == "allow" and calls[1].kw["name"] == "named"
    assert isinstance(WandbLogger, type)
    assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1


def test_a_resume_writes_back_the_checkpoints_own_line_when_a_kill_cut_it(tmp_path):
    """A kill after checkpoint step-3 was complete but before its metrics line: the resumed run's log gets the
    line back from the checkpoint (which carries it), so the file holds every step exactly once."""
    from gndpo.report.loggers import JsonlLogger, read_metrics

    path = tmp_path / "metrics.jsonl"
    first = JsonlLogger(path)
    for step in (1, 2):
        first.log({"loss": float(step)}, step)
    first.close()
    again = JsonlLogger(path, resume_step=3, resume_record={"loss": 3.0, "step": 99})
    again.log({"loss": 4.0}, 4)
    again.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(path)] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]
    assert again.recovered == {"step": 3, "loss": 3.0}
    # a line already there is kept, never doubled; lines past the checkpoint are dropped as before
    third = JsonlLogger(path, resume_step=3, resume_record={"loss": -1.0})
    third.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(path)] == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert third.recovered is None
