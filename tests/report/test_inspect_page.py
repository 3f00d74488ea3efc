"""``gndpo inspect`` on two real (tiny) runs, rendered by a real headless Chromium: it loads with no console
errors, shows every saved token of the chosen step as a span, fits 1280 px, and a screenshot is written. The runs
are 3 steps long with the default ``logging.rollouts_every`` (10): the first and last steps' samples are saved.

Chromium comes from ``python3 run.py test``, which installs Debian's ``chromium`` when it runs as root (as CI does)
and it is missing; the rendering test is skipped only where it could not be installed."""
import json
import os
import re
import shutil
import subprocess

import pytest

from gndpo.cli import main
from gndpo.config import load_config
from gndpo.report.outliers import load_rollouts
from gndpo.train import train

pytestmark = pytest.mark.slow
CHROMIUM = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


@pytest.fixture(scope="module")
def two_runs(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    for method in ("opd", "gndpo"):
        train(load_config(None, [
            f"model.path={tiny_dir / 'text_student'}", f"teacher.path={tiny_dir / 'text_teacher'}",
            f"data.train={tiny_dir / 'text.jsonl'}", "data.image_key=null", f"algorithm.method={method}",
            "rollout.n=4", "rollout.max_new_tokens=8", "trainer.prompts_per_step=2", "trainer.micro_batch_size=4",
            "trainer.total_steps=3", "trainer.device=cpu", f"trainer.output_dir={root / method}",
            "logging.progress=false", "logging.tensorboard=false", "logging.rollouts_per_step=3",
            "checkpoint.save_final=false"]))
    return root


def test_the_page_is_self_contained(two_runs, tmp_path, capsys):
    out = tmp_path / "report.html"
    assert main(["inspect", str(two_runs / "opd"), str(two_runs / "gndpo"), "--out", str(out)]) == 0
    html = out.read_text()
    assert "http://" not in html.replace("http://www.w3.org/2000/svg", "") and "https://" not in html
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=", html)  # nothing fetched
    data = json.loads(re.search(r'<script type="application/json" id="data">(.*?)</script>', html, re.S)
                      .group(1).replace("<\\/", "</"))
    assert [r["label"] for r in data["runs"]] == ["opd", "gndpo"]
    assert [[s["step"] for s in r["samples"]] for r in data["runs"]] == [[1, 3], [1, 3]]  # first and last
    assert all(len(s["responses"]) == 3 and all(resp["tokens"] for resp in s["responses"])
               for r in data["runs"] for s in r["samples"])
    assert all("outlier/max_abs_r" in row for row in data["runs"][0]["timeline"])


def test_summary_prints_each_runs_medians(tmp_path, capsys):
    rows = [{"step": 1, "outlier/max_abs_r": 4.0, "clamp_frac": 0.5, "outlier/top1pct_adv_share": 0.02,
             "outlier/kurtosis_r": 1.0, "grad_norm": float("nan")},
            {"step": 2, "outlier/max_abs_r": 9.0, "clamp_frac": 0.1, "outlier/top1pct_adv_share": 0.06,
             "outlier/kurtosis_r": 3.0, "grad_norm": 2.0},
            {"step": 3, "outlier/max_abs_r": 5.0, "clamp_frac": 0.3, "outlier/top1pct_adv_share": 0.04,
             "outlier/kurtosis_r": 2.0, "grad_norm": 4.0}]
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["inspect", str(run), "--summary", "--labels", "OPD"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("| run | steps | median max \\|r_t\\| | median clamp fraction | median share of")
    # medians of (4, 9, 5), (0.5, 0.1, 0.3), (0.02, 0.06, 0.04), (1, 3, 2); grad_norm: NaN skipped, (2, 4) -> 3
    assert out[2] == "| OPD | 3 | 5 | 0.3 | 0.04 | 2 | 3 |"
    assert not (run / "inspect.html").exists()


def test_a_missing_run_is_one_line(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope")]) == 2
    assert "holds no metrics.jsonl" in capsys.readouterr().err


@pytest.mark.skipif(CHROMIUM is None, reason=os.environ.get(
    "GNDPO_NO_CHROMIUM", "no Chromium here (python3 run.py test installs it when root; else apt-get install chromium)"))
def test_rendered_in_headless_chromium(two_runs, tmp_path):
    out = tmp_path / "report.html"
    assert main(["inspect", str(two_runs / "opd"), str(two_runs / "gndpo"), "--out", str(out)]) == 0
    flags = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,1600",
             "--enable-logging=stderr", "--v=0", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*flags, "--dump-dom", out.as_uri()], capture_output=True, text=True, timeout=120)
    body = re.search(r"<body([^>]*)>", dom.stdout).group(1)
    attrs = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', body))
    assert attrs.get("ready") == "1", dom.stderr[-2000:]  # the script ran to its end
    console_errors = [line for line in dom.stderr.splitlines() if "CONSOLE" in line and
                      ("Uncaught" in line or "Error" in line)]
    assert not console_errors, console_errors
    # the last saved step of both runs: every saved token is a span
    expected = sum(len(resp["tokens"]) for run in ("opd", "gndpo")
                   for resp in load_rollouts(two_runs / run)[-1]["responses"])
    assert int(attrs["tokens"]) == expected > 0
    assert len(re.findall(r'class="tok( clamped)?"', dom.stdout)) == expected
    assert int(attrs["scroll-width"]) <= 1280  # usable at 1280 px: no horizontal scrolling
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, f"--screenshot={shot}", out.as_uri()], capture_output=True, timeout=120)
    assert shot.stat().st_size > 10_000
