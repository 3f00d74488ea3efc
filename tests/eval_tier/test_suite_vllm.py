"""The whole ``gndpo eval --suite paper`` path as a user runs it: gndpo serves each checkpoint with vLLM's
OpenAI-compatible server on loopback, VLMEvalKit sends it the seven benchmarks' fixture rows (with images), a
stub judge scores them, and the table comes out complete. Needs vLLM (the vLLM virtualenv) and the harness."""
import importlib.util
import json
import shutil
from importlib.resources import files

import pytest
from evalkit_fixtures import JUDGE
from fake_openai import FakeOpenAI

from gndpo.cli import main
from gndpo.eval.benchmarks import BY_KEY, SUITES

BENCHMARKS = [BY_KEY[k] for k in SUITES["paper"]]  # Table 1's seven

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vLLM is not installed here (python3 run.py test runs this in .venv-vllm)")
ASSETS = files("gndpo") / "lab" / "assets"


def long_context_copy(src, dst):
    """The lab model with a 4,096-token context (its positions are rotary: no weight changes), since the
    benchmarks' prompts (DynaMath's answer guide, in a character-level tokenizer) exceed its 512."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = 4096
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_paper_suite_end_to_end_on_vllm(fixture_data, tmp_path, capsys, monkeypatch):
    data, rules = fixture_data
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "eval"
    base = long_context_copy(ASSETS / "student", tmp_path / "student")
    trained = long_context_copy(ASSETS / "teacher", tmp_path / "teacher")
    # the stub judge also maps the answers to WeMath's multi-step questions to the right letter: VLMEvalKit's
    # WeMath scorer divides by the problems whose multi-step question is right (none, from the tiny model)
    wemath = [{"model": JUDGE, "contains": [f"[Q:WM{i}]"], "reply": a} for i, a in ((3, "C"), (7, "D"))]
    with FakeOpenAI(wemath + rules) as judge:
        code = main(["eval", "--suite", "paper", "--compare", f"base={base}", f"trained={trained}", "--judge-model",
                     JUDGE, "--judge-base-url", judge.url, "--data-dir", str(data), "--max-new-tokens", "48",
                     "--dtype", "float32", "--out", str(out)])
        stdout, err = capsys.readouterr()
        assert code == 0, err
        assert judge.count(JUDGE) > 0
    state = json.loads((out / "eval.json").read_text())
    assert list(state["models"]) == ["base", "trained"]
    for label in ("base", "trained"):
        results = state["models"][label]["results"]
        assert [results[b.key]["n_items"] for b in BENCHMARKS] == [5, 5, 4, 4, 6, 10, 5]
        assert all(0.0 <= results[b.key]["score"] <= 100.0 for b in BENCHMARKS)
    md = (out / "eval.md").read_text()
    rows = {line.split("|")[1].strip(): [c.strip().rstrip("*†") for c in line.split("|")[2:-1]]
            for line in md.splitlines() if line.startswith("| ") and not line.startswith("| model")}
    for label in ("base", "trained"):
        scores = [state["models"][label]["results"][b.key]["score"] for b in BENCHMARKS]
        assert rows[label] == [f"{s:.1f}" for s in scores] + [f"{sum(scores) / 7:.1f}"]  # Overall = the mean
    assert "Δ trained − base" in rows
    # the prompts vLLM ran carried the images: every MMMU item of the fixture has 1 or 2
    preds = (out / "items" / "base" / "base_MMMU_DEV_VAL.tsv").read_text()
    assert "[Q:MM4]" in preds
    assert "serving" in stdout and "wrote" in stdout


def test_a_server_that_cannot_start_is_one_line(fixture_data, tmp_path, capsys):
    data, _ = fixture_data
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "no-such-arch", "architectures": ["NoSuchModel"],
                                                    "max_position_embeddings": 512}))
    code = main(["eval", str(broken), "--benchmarks", "mmmu", "--judge", "none", "--data-dir", str(data),
                 "--max-new-tokens", "48", "--out", str(tmp_path / "eval")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "the vLLM server for" in err and "exited with code" in err
