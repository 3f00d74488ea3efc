"""``gndpo eval --suite paper`` through the real VLMEvalKit against fake model/judge servers: the numbers worked out
by hand in evalkit_fixtures.py, resume, rule-only scoring that calls nobody, judge failures that never become a
judged number, and failures as one line with finished results kept."""
import csv
import json
from pathlib import Path

import pytest
from evalkit_fixtures import EXPECTED, JUDGE
from fake_openai import FakeOpenAI

from gndpo.cli import main
from gndpo.eval.benchmarks import BY_KEY, SUITES
from gndpo.eval.harness import harness_dir

BENCHMARKS = [BY_KEY[k] for k in SUITES["paper"]]  # Table 1's seven

ORDER = [b.key for b in BENCHMARKS]
ALIAS = "fixture-org-judge-1"  # the judge's name in the harness's file names


def run_cli(capsys, *args):
    code = main(["eval", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def suite_args(server, data, out, *extra, model="fixture-vlm", judge=None):
    return [model, "--base-url", server.url, "--judge-model", JUDGE, "--judge-base-url", (judge or server).url,
            "--data-dir", data, "--out", out, *extra]


def score_row(path: Path, column: str, value: str) -> dict:
    rows = list(csv.DictReader(open(path)))
    return next(r for r in rows if r[column] == value)


def installed_version() -> str:
    """ms-vlmeval's version from the harness virtualenv's metadata directory (not through gndpo's code)."""
    [info] = harness_dir().glob("lib/python*/site-packages/ms_vlmeval-*.dist-info")
    return info.name[len("ms_vlmeval-"):-len(".dist-info")]


def cells(out: Path, label: str) -> list[str]:
    row = next(line for line in (out / "eval.md").read_text().splitlines() if line.startswith(f"| {label} "))
    return [c.strip() for c in row.split("|")[2:-1]]


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
        assert cells(out, "fixture-vlm")[7] == f"{mean:.1f}*"  # 73.5, marked: fixture data, not the official files
        assert state["models"]["fixture-vlm"]["overall"] == pytest.approx(mean, abs=0.01)  # WeMath: "99.62%"
        assert state["decoding"] == {"temperature": 0.6, "top_p": 0.95, "max_new_tokens": 32768, "seed": 0}
        assert state["harness"]["version"] == installed_version() == "0.0.20"
        assert state["judge"]["model"] == JUDGE

        # the harness's own tables behind the headline numbers, by hand; the judge's "/" is not a directory
        items = out / "items" / "fixture-vlm"
        dyn = score_row(next(items.glob(f"fixture-vlm_DynaMath_{ALIAS}_score.csv")), "Setting", "Average")
        assert float(dyn["Overall"]) == pytest.approx(5 / 6, abs=1e-3)  # 5 of 6 variants right, 1 of 2 seeds
        wemath = list(csv.DictReader(open(next(items.glob(f"fixture-vlm_WeMath_{ALIAS}_score.csv")))))[0]
        assert float(wemath["Score (Strict)"].rstrip("%")) == pytest.approx(523 / 525 * 100, abs=0.01)
        assert float(wemath["Score (Loose)"].rstrip("%")) == pytest.approx(524 / 525 * 100, abs=0.01)
        assert not [p for p in items.rglob("*") if p.is_dir()]
        # <think> blocks are stripped before scoring; the raw response is kept beside it
        preds = list(csv.DictReader(open(items / "fixture-vlm_MathVista_MINI.tsv"), delimiter="\t"))
        mv4 = next(p for p in preds if "[Q:MV4]" in p["question"])
        assert mv4["prediction"] == "I count eight squares. [P:MV4]" and "<think>" in mv4["raw_prediction"]
        # Table 3's decoding reached the model; the judge got its key, which no file in the output holds
        sent = [r for r in server.requests if r["model"] == "fixture-vlm"]
        assert {(r["params"]["temperature"], r["params"]["top_p"], r["params"]["max_tokens"]) for r in sent} == \
            {(0.6, 0.95, 32768)}
        assert {r["auth"] for r in server.requests if r["model"] == JUDGE} == {"Bearer judge-secret-4711"}
        assert {r["model"] for r in server.requests} == {"fixture-vlm", JUDGE}  # the judge's name as given
        assert not any("judge-secret-4711" in p.read_text(errors="ignore") for p in out.rglob("*") if p.is_file())

        # resume: nothing is asked again; a second row extends the same table
        before = len(server.requests)
        code, stdout, _ = run_cli(capsys, "--suite", "paper", *suite_args(server, data, out))
        assert code == 0 and "already scored" in stdout and len(server.requests) == before
        code, stdout, _ = run_cli(capsys, "--benchmarks", "mmmu,dynamath",
                                  *suite_args(server, data, out, model="again=fixture-vlm"))
        assert code == 0
    # the paper's Overall needs all seven: two columns give a mean that says what it is
    assert cells(out, "again") == ["—", "75.0*", "—", "—", "50.0*", "—", "—", "62.5* (mean of 2)"]


def test_judge_none_calls_nobody_but_the_model(fixture_data, tmp_path, capsys, monkeypatch):
    """A canary set as the default OpenAI endpoint, with a key, as a user's environment may hold them: a
    ``--judge none`` run of all seven sends it nothing (DynaMath's scorer would send it the answers its rules cannot
    parse), and every request the model server gets is the model's."""
    data, rules = fixture_data
    out = tmp_path / "eval"
    with FakeOpenAI(rules) as server, FakeOpenAI(models=["gpt-4o-mini"]) as canary:
        monkeypatch.setenv("OPENAI_API_BASE", canary.url + "/chat/completions")
        monkeypatch.setenv("OPENAI_API_KEY", "sk-canary-0451")
        code, _, err = run_cli(capsys, "fixture-vlm", "--base-url", server.url, "--judge", "none", "--suite",
                               "paper", "--data-dir", data, "--out", out)
        assert code == 0, err
        assert canary.hits == []
        assert {r["model"] for r in server.requests} == {"fixture-vlm"}
        assert all(h["auth"] != "Bearer sk-canary-0451" for h in server.hits)
    results = json.loads((out / "eval.json").read_text())["models"]["fixture-vlm"]["results"]
    for key in ("mathvista", "mathvision", "mathverse", "logicvista"):
        assert results[key] == {"refused": True, "reason": "needs an LLM judge"}
    assert results["mmmu"]["score"] == pytest.approx(50.0) and results["mmmu"]["rule_only"]  # the judge's MM3 lost
    # DY4 ("Approximately two.") is the one answer DynaMath's rules cannot parse: refused, counted, wrong
    assert results["dynamath"]["rule_only"] and results["dynamath"]["unparsed_without_judge"] == 1
    assert results["dynamath"]["score"] == pytest.approx(50.0)
    assert results["wemath"]["rule_only"]
    assert cells(out, "fixture-vlm") == ["n/a‡", "50.0†*", "n/a‡", "n/a‡", "50.0†*", "99.5†*", "n/a‡",
                                         f"{(50 + 50 + 99.52) / 3:.1f}* (mean of 3, rule-only)"]
    dyn = score_row(next((out / "items" / "fixture-vlm").glob("fixture-vlm_DynaMath_exact_matching_score.csv")),
                    "Setting", "Average")
    assert float(dyn["Overall"]) == pytest.approx(4 / 6, abs=1e-3)  # DY4 counted wrong


def test_a_failing_judge_never_gives_a_judged_number(fixture_data, tmp_path, capsys):
    """Three judges that fail: on every chat request while listing their model on /models (VLMEvalKit's MCQ
    scorer then falls back to exact matching: MMMU 50.0, stored as judged before), on some calls (DynaMath counts
    them wrong), and one that goes away after gndpo's check (LogicVista's scorer asserts it works). Each benchmark
    is stored as failed with the count, never with a score; a rerun with a working judge retries it."""
    data, rules = fixture_data
    out = tmp_path / "eval"
    with FakeOpenAI(rules) as model:
        with FakeOpenAI(rules, broken_chat=True) as judge:
            code, _, err = run_cli(capsys, "--benchmarks", "mmmu", *suite_args(model, data, out, judge=judge))
            assert code == 2 and len(err.strip().splitlines()) == 1
            assert "error: fixture-vlm: MMMU_DEV_VAL: the judge failed 5 of 5 calls" in err and "run the same" in err
            results = json.loads((out / "eval.json").read_text())["models"]["fixture-vlm"]["results"]
            assert "score" not in results["mmmu"] and \
                (results["mmmu"]["judge_failed"], results["mmmu"]["judge_calls"]) == (5, 5)
            assert cells(out, "fixture-vlm") == ["failed§", "—"]

            judge.broken_chat = False  # the judge is back: the same command retries and scores it
            code, _, err = run_cli(capsys, "--benchmarks", "mmmu", *suite_args(model, data, out, judge=judge))
        assert code == 0, err
        results = json.loads((out / "eval.json").read_text())["models"]["fixture-vlm"]["results"]
        assert results["mmmu"]["score"] == pytest.approx(75.0) and not results["mmmu"]["rule_only"]
        assert results["mmmu"]["judge_calls"] == 2  # VLMEvalKit's "hello" probe, then MM3

        flaky = [{"model": JUDGE, "contains": ["[P:DY4]"], "status": 500}] + rules
        with FakeOpenAI(flaky) as judge:
            code, _, err = run_cli(capsys, "--benchmarks", "dynamath", *suite_args(model, data, tmp_path / "e2",
                                                                                 judge=judge))
        assert code == 2 and "DynaMath: the judge failed 1 of 1 calls" in err and len(err.strip().splitlines()) == 1
        assert "score" not in json.loads((tmp_path / "e2" / "eval.json").read_text())["models"]["fixture-vlm"][
            "results"]["dynamath"]

        with FakeOpenAI(rules, down_after_models=True) as judge:
            code, _, err = run_cli(capsys, "--benchmarks", "logicvista", *suite_args(model, data, tmp_path / "e3",
                                                                                   judge=judge))
        assert code == 2 and "LogicVista: the judge failed 5 of 5 calls" in err and len(err.strip().splitlines()) == 1


def test_a_failing_model_server_is_one_line(fixture_data, tmp_path, capsys):
    data, rules = fixture_data
    # a model server that fails requests: not counted as wrong answers, one line
    with FakeOpenAI(rules, broken_chat=True) as model, FakeOpenAI(rules) as judge:
        code, _, err = run_cli(capsys, "fixture-vlm", "--base-url", model.url, "--judge-model", JUDGE,
                               "--judge-base-url", judge.url, "--benchmarks", "dynamath", "--data-dir", data,
                               "--out", tmp_path / "eval2", "--request-timeout", "5")
    assert code == 2 and "6 of 6 requests to the model server failed" in err and len(err.splitlines()) == 1
