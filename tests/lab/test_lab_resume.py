"""`gndpo lab --resume`: finished runs of the same configuration are kept, their evaluations cached; any other run
is trained again."""
import json

import pytest
import yaml

import gndpo.lab.run as lab_run
import gndpo.train
from gndpo.cli import main

pytestmark = pytest.mark.slow

ARGS = ["lab", "--quick", "--steps", "2", "--methods", "gspo", "opd", "--jobs", "1"]


def _results(out):
    return json.loads((out / "results.json").read_text())


def _spy(monkeypatch):
    """Count the trainings (by output directory name) and evaluations (by checkpoint) a lab does."""
    trained, evaluated = [], []
    train, evaluate = gndpo.train.train, lab_run.evaluate

    def counting_train(cfg, **kw):
        trained.append(cfg.trainer.output_dir.rsplit("/", 1)[-1])
        return train(cfg, **kw)

    def counting_evaluate(model_dir, data_dir):
        evaluated.append(model_dir.name)
        return evaluate(model_dir, data_dir)

    monkeypatch.setattr(gndpo.train, "train", counting_train)
    monkeypatch.setattr(lab_run, "evaluate", counting_evaluate)
    return trained, evaluated


def test_resume_keeps_finished_runs_and_retrains_the_others(tmp_path, monkeypatch, caplog):
    out = tmp_path / "lab"
    runs = out / "runs"
    assert main([*ARGS, "--out", str(out)]) == 0
    first = _results(out)
    assert [r["reused"] for r in first["runs"]] == [False, False]
    mtimes = {p: p.stat().st_mtime_ns for p in runs.glob("*/metrics.jsonl")}
    assert len(mtimes) == 2

    # everything finished: no training, no evaluation (the runs' and the shipped checkpoints' are cached)
    trained, evaluated = _spy(monkeypatch)
    assert main([*ARGS, "--out", str(out), "--resume"]) == 0
    assert trained == [] and evaluated == []
    assert {p: p.stat().st_mtime_ns for p in runs.glob("*/metrics.jsonl")} == mtimes
    second = _results(out)
    assert second["table"] == first["table"] and (second["base"], second["teacher"]) == (first["base"], first["teacher"])
    assert [r["reused"] for r in second["runs"]] == [True, True]
    for run in second["runs"]:  # the sum of the logged step times, a part of the first lab's time for that run
        rows = [json.loads(line) for line in open(f"{run['run_dir']}/metrics.jsonl")]
        assert run["train_seconds"] == pytest.approx(sum(r["time/step"] for r in rows))
        assert 0 < run["train_seconds"] <= next(r for r in first["runs"] if r["method"] == run["method"])["train_seconds"]
    assert "2 runs reused from an earlier lab (--resume)." in (out / "results.md").read_text()

    # gspo: an earlier lab without the cache (evaluated, not retrained); opd: its final checkpoint is gone
    (runs / "gspo-seed0" / "lab_eval.json").unlink()
    final = runs / "opd-seed0" / "checkpoints" / "step-000002"
    (final / "COMPLETE").unlink()  # a half-written checkpoint is not one
    caplog.set_level("INFO", logger="gndpo")
    trained.clear()
    assert main([*ARGS, "--out", str(out), "--resume"]) == 0
    assert trained == ["opd-seed0"] and sorted(evaluated) == ["step-000002", "step-000002"]
    assert "opd-seed0: trained again (the earlier run is not finished: its final checkpoint step-000002 is not " \
           "intact (no COMPLETE marker))" in caplog.text
    third = _results(out)
    assert [r["reused"] for r in third["runs"]] == [True, False]
    assert third["table"] == first["table"]  # a training is deterministic given its seed
    assert "1 run reused from an earlier lab (--resume)." in (out / "results.md").read_text()

    # a run whose stored configuration differs from the lab's is trained again, with one line saying why
    stored = runs / "gspo-seed0" / "run_config.yaml"
    config = yaml.safe_load(stored.read_text())
    config["optim"]["lr"] = 0.125
    stored.write_text(yaml.safe_dump(config))
    trained.clear()
    evaluated.clear()
    caplog.clear()
    assert main([*ARGS, "--out", str(out), "--resume"]) == 0
    assert trained == ["gspo-seed0"] and evaluated == ["step-000002"]
    lines = [line for line in caplog.text.splitlines() if "trained again" in line]
    assert len(lines) == 1 and "gspo-seed0: trained again (its configuration changed: optim.lr was 0.125, now " in lines[0]
    assert _results(out)["table"] == first["table"]


def test_without_resume_every_run_is_trained_again(tmp_path, monkeypatch):
    out = tmp_path / "lab"
    args = ["lab", "--quick", "--steps", "1", "--methods", "opd", "--jobs", "1", "--out", str(out)]
    assert main(args) == 0
    trained, evaluated = _spy(monkeypatch)
    assert main(args) == 0
    assert trained == ["opd-seed0"] and evaluated == ["step-000001", "student", "teacher"]
    assert "reused" not in (out / "results.md").read_text()
