"""`gndpo lab --resume`: finished runs of the same configuration are kept, their evaluations cached; any other run
is trained again."""
import json

import pytest
import yaml

import gndpo.lab.run as lab_run
import gndpo.train
from gndpo.cli import main

pytestmark = pytest.mark.slow

ARGS = ["lab", "--quick", "--steps", "1", "--methods", "gspo", "--jobs", "1"]


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
    run = out / "runs" / "gspo-seed0"
    args = [*ARGS, "--out", str(out)]
    assert main(args) == 0
    first = _results(out)
    assert [r["reused"] for r in first["runs"]] == [False]
    mtime = (run / "metrics.jsonl").stat().st_mtime_ns

    # finished, same configuration: no training, no evaluation (the run's and the shipped checkpoints' are cached)
    trained, evaluated = _spy(monkeypatch)
    caplog.set_level("INFO", logger="gndpo")
    assert main([*args, "--resume"]) == 0
    assert trained == [] and evaluated == [] and "trained again" not in caplog.text
    assert (run / "metrics.jsonl").stat().st_mtime_ns == mtime
    second = _results(out)
    assert second["table"] == first["table"]
    assert (second["base"], second["teacher"]) == (first["base"], first["teacher"])
    (kept,) = second["runs"]
    assert kept["reused"] and kept["accuracy_at"] == {"1": first["runs"][0]["accuracy"]}
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert kept["train_seconds"] == pytest.approx(sum(r["time/step"] for r in rows))  # part of the first lab's time
    assert 0 < kept["train_seconds"] <= first["runs"][0]["train_seconds"]
    assert "1 run reused from an earlier lab (--resume)." in (out / "results.md").read_text()

    # a run of a lab before the cache: evaluated, not trained again
    (run / "lab_eval.json").unlink()
    assert main([*args, "--resume"]) == 0
    assert trained == [] and evaluated == ["step-000001"] and _results(out)["table"] == first["table"]

    # its final checkpoint half-written (no COMPLETE marker): trained again, with one line saying why
    (run / "checkpoints" / "step-000001" / "COMPLETE").unlink()
    caplog.clear()
    assert main([*args, "--resume"]) == 0
    assert trained == ["gspo-seed0"] and evaluated == ["step-000001"] * 2
    assert _trained_again(caplog) == ["gspo-seed0: trained again (the earlier run is not finished: its final "
                                      "checkpoint step-000001 is not intact (no COMPLETE marker))"]
    third = _results(out)
    assert [r["reused"] for r in third["runs"]] == [False] and "reused" not in (out / "results.md").read_text()
    assert third["table"] == first["table"]  # a training is deterministic given its seed

    # a stored configuration that differs from the lab's: trained again, with one line naming the difference
    config = yaml.safe_load((run / "run_config.yaml").read_text())
    config["optim"]["lr"] = 0.125
    (run / "run_config.yaml").write_text(yaml.safe_dump(config))
    caplog.clear()
    assert main([*args, "--resume"]) == 0
    assert trained == ["gspo-seed0"] * 2 and evaluated == ["step-000001"] * 3
    assert _trained_again(caplog) == ["gspo-seed0: trained again (its configuration changed: optim.lr was 0.125, "
                                      "now 0.0003)"]
    assert _results(out)["table"] == first["table"]

    # without --resume: trained and evaluated again, as before the option existed
    assert main(args) == 0
    assert trained == ["gspo-seed0"] * 3 and evaluated == ["step-000001"] * 4 + ["student", "teacher"]
    assert not _results(out)["runs"][0]["reused"]


def _trained_again(caplog):
    return [r.getMessage() for r in caplog.records if "trained again" in r.getMessage()]
