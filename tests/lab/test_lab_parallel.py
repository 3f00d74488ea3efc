"""`gndpo lab --jobs N`: worker processes reproduce the sequential lab exactly, and a failing run is one line."""
import json
import multiprocessing
import re

import pytest
import torch
from safetensors.torch import load_file

from gndpo.cli import main
from gndpo.lab.run import assets_dir, resolve_jobs

pytestmark = pytest.mark.slow

TIMING = ("time/", "tokens_per_sec")  # wall-clock measurements, the only metrics allowed to differ


def _lab(out, jobs):
    return main(["lab", "--quick", "--methods", "gspo", "opd", "--out", str(out), "--jobs", str(jobs)])


def _rows(run_dir):
    rows = [json.loads(line) for line in open(f"{run_dir}/metrics.jsonl")]
    return [{k: v for k, v in row.items() if not k.startswith(TIMING)} for row in rows]


def _weights(run_dir):
    (final,) = sorted((run_dir / "checkpoints").glob("step-*"))[-1:]
    return load_file(final / "model.safetensors")


def test_jobs_default_to_the_cores_and_never_exceed_the_tasks():
    assert resolve_jobs(8, 3) == 3 and resolve_jobs(2, 11) == 2 and resolve_jobs(1, 11) == 1
    assert 1 <= resolve_jobs(None, 11) <= 11
    assert main(["lab", "--jobs", "0"]) == 2


def test_workers_give_the_sequential_runs_bit_for_bit(tmp_path, quick_lab):
    """The shared quick lab ran in 2 worker processes; the same runs in sequence, in this process, are equal."""
    par_dir, err = quick_lab
    assert _lab(tmp_path / "seq", 1) == 0
    # one combined bar: no per-run training bars ("gspo: 33%|") nor per-evaluation bars ("eval: ")
    assert not re.search(r"(^|[\r\n])\s*(gspo|opd|gndpo|eval): ", err)
    seq, par = json.loads((tmp_path / "seq" / "results.json").read_text()), \
        json.loads((par_dir / "results.json").read_text())
    assert (seq["jobs"], par["jobs"]) == (1, 2)
    assert (seq["base"], seq["teacher"]) == (par["base"], par["teacher"])
    assert [r["method"] for r in par["runs"]] == ["gspo", "opd", "gndpo"]  # table order, not completion order
    for a, b in zip(seq["runs"], par["runs"]):
        assert a["method"] == b["method"]
        assert {k: v for k, v in a.items() if k not in ("train_seconds", "run_dir")} == \
               {k: v for k, v in b.items() if k not in ("train_seconds", "run_dir")}
        assert _rows(a["run_dir"]) == _rows(b["run_dir"]) and len(_rows(a["run_dir"])) == 3
        wa, wb = (_weights(d / "runs" / f"{a['method']}-seed0") for d in (tmp_path / "seq", par_dir))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # training moved the weights, so their equality is not that of two untouched copies of the student
    shipped = load_file(assets_dir() / "student" / "model.safetensors")
    trained = _weights(par_dir / "runs" / "opd-seed0")
    assert any(not torch.equal(shipped[k], trained[k]) for k in shipped)


def test_a_failing_run_stops_the_workers_with_one_error_line(tmp_path, capfd):
    out = tmp_path / "lab"
    (out / "runs").mkdir(parents=True)
    (out / "runs" / "opd-seed0").write_text("not a directory")  # that worker cannot create its run directory
    assert _lab(out, 2) == 2
    err = capfd.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: lab run opd-seed0 failed: FileExistsError: ")
    assert "Traceback" not in err
    assert "FileExistsError" in (out / "opd-seed0.traceback.txt").read_text()
    assert not (out / "results.md").exists()
    assert multiprocessing.active_children() == []  # the other worker was stopped, not left running


def test_a_run_that_succeeds_on_a_later_lab_removes_its_old_traceback(tmp_path):
    from gndpo.errors import GndpoError
    from gndpo.lab.run import LabTask, checked

    task = LabTask("student")  # an evaluation task: no config needed
    with pytest.raises(GndpoError, match=r"lab evaluation of the shipped student failed: boom \(traceback in "):
        checked(task, {"error": "boom", "traceback": "Traceback: boom"}, tmp_path)
    assert (tmp_path / "student.traceback.txt").read_text() == "Traceback: boom"
    assert checked(task, {"accuracy": 0.5}, tmp_path) == {"accuracy": 0.5}
    assert not (tmp_path / "student.traceback.txt").exists()
