"""``gndpo eval --suite paper`` through the real VLMEvalKit against fake model/judge servers: the numbers worked out
by hand in evalkit_fixtures.py, resume, rule-only scoring, and failures as one line with finished results kept."""
import csv
import json
from pathlib import Path

import pytest
from evalkit_fixtures import EXPECTED
from fake_openai import FakeOpenAI

from gndpo.cli import main
from gndpo.eval.benchmarks import BY_KEY, SUITES

BENCHMARKS = [BY_KEY[k] for k in SUITES["paper"]]  # Table 1's seven

ORDER = [b.key for b in BENCHMARKS]


def run_cli(capsys, *args):
    code = main(["eval", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def suite_args(server, data, out, *extra, model="fixture-vlm"):
    return [model, "--base-url", server.url, "--judge-model", "fixture-judge", "--judge-base-url", server.url,
            "--data-dir", data, "--out", out, *extra]


def score_row(path: Path, column: str, value: str) -> dict:
    rows = list(csv.DictReader(open(path)))
    return next(r for r in rows if r[column] == value)


def test_table_by_hand_resume_and_a_second_row(fixture_data, tmp_path, capsys, monkeypatch):
    data, rules = fixture_data
    monkeypatch.setenv("GNDPO_JUDGE_API_KEY", "judge-secret-4711")
    out = tmp_path / "eval"
    with FakeOpenAI(rules) as server:
        code, stdout, err = run_cli(capsys, "--suite", "paper", *suite_args(server, data, out))
        assert code == 0, err
        state = json.loads((out / "eval.json").read_text())
        results = state["models"]["fixture-vlm"]["results"]
        for key in ORDER:
            assert results[key]["score"] == pytest.approx(EXPECTED[key], abs=0.01), key
            assert results[key]["data"] == "unofficial" and not results[key]["rule_only"]
        assert [results[k]["n_items"] for k in ORDER] == [5, 5, 4, 4, 6, 10, 5]
        mean = sum(EXPECTED.values()) / 7
        row = next(line for line in (out / "eval.md").read_text().splitlines() if line.startswith("| fixture-vlm"))
        assert row.split("|")[-2].strip() == f"{mean:.1f}*"  # 73.5, marked: fixture data, not the official files
        assert state["decoding"] == {"temperature": 0.6, "top_p": 0.95, "max_new_tokens": 32768, "seed": 0}
        assert state["harness"]["version"] == "0.0.20"

        # the harness's own tables behind the headline numbers, by hand
        items = out / "items" / "fixture-vlm"
        dyn = score_row(next(items.glob("fixture-vlm_DynaMath_*_score.csv")), "Setting", "Average")
        assert float(dyn["Overall"]) == pytest.approx(5 / 6, abs=1e-3)  # 5 of 6 variants right, 1 of 2 seeds
        wemath = list(csv.DictReader(open(next(items.glob("fixture-vlm_WeMath_*_score.csv")))))[0]
        assert float(wemath["Score (Strict)"].rstrip("%")) == pytest.approx(523 / 525 * 100, abs=0.01)
        assert float(wemath["Score (Loose)"].rstrip("%")) == pytest.approx(524 / 525 * 100, abs=0.01)
        # <think> blocks are stripped before scoring; the raw response is kept beside it
        preds = list(csv.DictReader(open(items / "fixture-vlm_MathVista_MINI.tsv"), delimiter="\t"))
        mv4 = next(p for p in preds if "[Q:MV4]" in p["question"])
        assert mv4["prediction"] == "I count eight squares. [P:MV4]" and "<think>" in mv4["raw_prediction"]
        # Table 3's decoding reached the model; the judge got its key, which no file in the output holds
        sent = [r for r in server.requests if r["model"] == "fixture-vlm"]
        assert {(r["params"]["temperature"], r["params"]["top_p"], r["params"]["max_tokens"]) for r in sent} == \
            {(0.6, 0.95, 32768)}
        assert {r["auth"] for r in server.requests if r["model"] == "fixture-judge"} == {"Bearer judge-secret-4711"}
        assert not any("judge-secret-4711" in p.read_text(errors="ignore") for p in out.rglob("*") if p.is_file())

        # resume: nothing is asked again; a second row extends the same table
        before = len(server.requests)
        code, stdout, _ = run_cli(capsys, "--suite", "paper", *suite_args(server, data, out))
        assert code == 0 and "already scored" in stdout and len(server.requests) == before
        code, stdout, _ = run_cli(capsys, "--benchmarks", "mmmu,dynamath",
                                  *suite_args(server, data, out, model="again=fixture-vlm"))
        assert code == 0
    md = (out / "eval.md").read_text()
    again = next(line for line in md.splitlines() if line.startswith("| again"))
    cells = [c.strip() for c in again.split("|")[2:-1]]
    assert cells == ["—", "75.0*", "—", "—", "50.0*", "—", "—", "—"]  # Overall needs every column


def test_judge_none_is_rule_only_and_marked(fixture_data, tmp_path, capsys):
    data, rules = fixture_data
    out = tmp_path / "eval"
    with FakeOpenAI(rules) as server:
        code, _, err = run_cli(capsys, "fixture-vlm", "--base-url", server.url, "--judge", "none", "--benchmarks",
                               "mathvista,mmmu,wemath", "--data-dir", data, "--out", out)
        assert code == 0, err
        assert server.count("fixture-judge") == 0
    results = json.loads((out / "eval.json").read_text())["models"]["fixture-vlm"]["results"]
    assert results["mathvista"] == {"refused": True, "reason": "needs an LLM judge"}
    assert results["mmmu"]["score"] == pytest.approx(50.0) and results["mmmu"]["rule_only"]  # the judge's MM3 is lost
    assert results["wemath"]["rule_only"]
    row = next(line for line in (out / "eval.md").read_text().splitlines() if line.startswith("| fixture-vlm"))
    assert [c.strip() for c in row.split("|")[2:-1]] == ["n/a‡", "50.0†*", f"{99.52:.1f}†*", "—"]


def test_failures_are_one_line_and_keep_finished_benchmarks(fixture_data, tmp_path, capsys):
    data, rules = fixture_data
    out = tmp_path / "eval"
    # a judge that lists its models but fails every chat request: MMMU falls back to its rules and finishes,
    # LogicVista's scorer gives up and writes no score file
    with FakeOpenAI(rules) as model, FakeOpenAI(broken_chat=True) as judge:
        code, _, err = run_cli(capsys, "fixture-vlm", "--base-url", model.url, "--judge-model", "fixture-judge",
                               "--judge-base-url", judge.url, "--benchmarks", "mmmu,logicvista", "--data-dir", data,
                               "--out", out)
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: fixture-vlm: LogicVista:") and "no score file" in line and len(err.splitlines()) == 1
    results = json.loads((out / "eval.json").read_text())["models"]["fixture-vlm"]["results"]
    assert results["mmmu"]["score"] == pytest.approx(50.0) and "logicvista" not in results

    # a model server that fails requests: not counted as wrong answers, one line
    with FakeOpenAI(rules, broken_chat=True) as model, FakeOpenAI(rules) as judge:
        code, _, err = run_cli(capsys, "fixture-vlm", "--base-url", model.url, "--judge-model", "fixture-judge",
                               "--judge-base-url", judge.url, "--benchmarks", "dynamath", "--data-dir", data,
                               "--out", tmp_path / "eval2", "--request-timeout", "5")
    assert code == 2 and "6 of 6 requests to the model server failed" in err and len(err.splitlines()) == 1
