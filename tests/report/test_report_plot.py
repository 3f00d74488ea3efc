"""Training-dynamics plots: image size, several runs, seed aggregation, missing data, run directories."""
import math

import matplotlib
import pytest
from PIL import Image

from gndpo.errors import GndpoError
from gndpo.report import JsonlLogger, plot_dynamics, plot_run_dirs
from gndpo.report.plot import _aggregate, _smooth


def _records(n=6, scale=1.0, keys=("loss", "grad_norm", "entropy")):
    return [{"step": s, **{k: scale * (i + 1) / s for i, k in enumerate(keys)}} for s in range(1, n + 1)]


def _size(path):
    with Image.open(path) as img:
        assert img.format == "PNG"
        return img.size


def test_one_run_three_panels(tmp_path):
    backend = matplotlib.get_backend()
    out = plot_dynamics([("gndpo", _records())], tmp_path / "figs" / "dyn.png", title="GNDPO")
    assert out == tmp_path / "figs" / "dyn.png"
    assert _size(out) == (3 * 450, 350)
    assert matplotlib.get_backend() == backend  # no global backend switch


def test_three_runs_with_missing_keys_and_smoothing(tmp_path):
    runs = [
        ("gndpo", _records()),
        ("opd", _records(scale=2.0)),
        ("gspo", _records(keys=("loss", "grad_norm"))),  # no entropy: left out of that panel
    ]
    runs[1][1][2]["loss"] = float("nan")  # a gap, not a crash
    out = plot_dynamics(runs, tmp_path / "three.png", smooth=3)
    assert _size(out) == (1350, 350)
    out = plot_dynamics(runs, tmp_path / "two.png", keys=("loss", "entropy"), dpi=50)
    assert _size(out) == (450, 175)


def test_aggregate_seeds(tmp_path):
    runs = [("gndpo", _records(scale=s)) for s in (1.0, 1.1, 0.9)] + [("opd", _records(scale=3.0))]
    out = plot_dynamics(runs, tmp_path / "seeds.png", aggregate_seeds=True)
    assert _size(out) == (1350, 350)
    # The same runs without aggregation: one line per seed, also fine.
    assert _size(plot_dynamics(runs, tmp_path / "lines.png")) == (1350, 350)


def test_smooth_and_aggregate_by_hand():
    nan = math.nan
    # trailing window of 2, NaN ignored: [1, (1+2)/2, (2+3)/2, 3, 5]
    assert _smooth([1.0, 2.0, 3.0, nan, 5.0], 2) == [1.0, 1.5, 2.5, 3.0, 5.0]
    assert _smooth([1.0, 2.0], 1) == [1.0, 2.0]
    steps, mean, lo, hi = _aggregate([([1, 2], [1.0, 4.0]), ([1, 3], [3.0, nan]), ([2], [2.0])])
    assert steps == [1, 2] and mean == [2.0, 3.0] and lo == [1.0, 2.0] and hi == [3.0, 4.0]


def test_plot_errors(tmp_path):
    with pytest.raises(GndpoError, match="none of the runs logged loss, grad_norm, entropy; choose keys among: acc"):
        plot_dynamics([("a", [{"step": 1, "acc": 0.5}])], tmp_path / "x.png")
    with pytest.raises(GndpoError, match="no runs"):
        plot_dynamics([], tmp_path / "x.png")
    with pytest.raises(GndpoError, match="smooth must be >= 1"):
        plot_dynamics([("a", _records())], tmp_path / "x.png", smooth=0)
    assert not (tmp_path / "x.png").exists()


def test_plot_run_dirs(tmp_path):
    for name, scale in (("run-a", 1.0), ("run-b", 2.0)):
        logger = JsonlLogger(tmp_path / name / "metrics.jsonl")
        for record in _records(scale=scale):
            logger.log({k: v for k, v in record.items() if k != "step"}, record["step"])
        logger.close()
    out = plot_run_dirs([tmp_path / "run-a", str(tmp_path / "run-b")], tmp_path / "cmp.png", keys=("loss",))
    assert _size(out) == (450, 350)

    (tmp_path / "empty").mkdir()
    with pytest.raises(GndpoError, match="no metrics file at .*empty"):
        plot_run_dirs([tmp_path / "run-a", tmp_path / "empty"], tmp_path / "cmp.png")
    with pytest.raises(GndpoError, match="does not exist"):
        plot_run_dirs([tmp_path / "nope"], tmp_path / "cmp.png")
    with pytest.raises(GndpoError, match="2 labels for 1 run"):
        plot_run_dirs([tmp_path / "run-a"], tmp_path / "cmp.png", labels=["a", "b"])
