"""`gndpo lab --quick` end to end: the README's main command, in its CI-sized form."""
import json

import pytest
from PIL import Image

from gndpo.lab.run import METHODS, spikes

pytestmark = pytest.mark.slow


def test_spike_count_definition():
    # median 1.0 -> threshold 3.0: 3.5 and inf are spikes, 3.0 is not
    assert spikes([1.0, 1.0, 3.0, 3.5, 0.5, float("inf"), 1.0]) == 2
    assert spikes([]) == 0


def test_lab_quick_end_to_end(quick_lab):
    out, _ = quick_lab
    table = (out / "results.md").read_text()
    for row in ("base student", "teacher", *METHODS):
        assert f"| {row} |" in table
    results = json.loads((out / "results.json").read_text())
    assert {r["method"] for r in results["runs"]} == set(METHODS)
    for run in results["runs"]:
        rows = [json.loads(line) for line in open(f"{run['run_dir']}/metrics.jsonl")]
        assert len(rows) == results["plan"]["steps"]
        assert all(k in rows[0] for k in ("loss", "grad_norm", "entropy"))
        assert list((out / "runs" / f"{run['method']}-seed0").glob("checkpoints/step-*/model.safetensors"))
        assert 0.0 <= run["accuracy"] <= 1.0
    width, height = Image.open(out / "dynamics.png").size
    assert width >= 900 and height >= 300
