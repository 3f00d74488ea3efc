"""The suite's pieces without the harness: think stripping, headline numbers from the harness's score files,
the table (Overall, marks, the comparison row), resume settings, mean@K / pass@K, and one-line refusals."""
import json
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from gndpo.cli import main
from gndpo.errors import ConfigError
from gndpo.eval import report
from gndpo.eval.benchmarks import BY_KEY, SUITES, select
from gndpo.eval.suite import parse_models
from gndpo.eval.vlmeval_driver import read_headline, strip_think
from gndpo.evaluate import mean_at_k, pass_at_k, sampled_accuracy
from gndpo.rollout.base import SamplingParams

BENCHMARKS = [BY_KEY[k] for k in SUITES["paper"]]  # Table 1's seven


@pytest.mark.parametrize("text, answer", [
    ("<think>a</think> \\boxed{3}", "\\boxed{3}"),
    ("<think>a</think>x</think> B", "B"),           # the last close wins
    ("<think>cut off while thinking", ""),          # no answer was given
    ("plain answer B", "plain answer B"),
    ("<THINK>a</THINK>C", "C"),
])
def test_strip_think(text, answer):
    assert strip_think(text) == answer


def test_read_headline_scales(tmp_path):
    f = tmp_path / "s.csv"
    f.write_text("Setting,Overall\nAverage,0.8333\nWorst Case,0.5\n")
    assert read_headline(str(f), ["Setting", "Worst Case"], "Overall", "fraction") == pytest.approx(50.0)
    f.write_text("Score (Strict),Score (Loose)\n99.62%,99.81%\n")
    assert read_headline(str(f), None, "Score (Strict)", "percent-string") == pytest.approx(99.62)
    f.write_text("Task&Skill,tot,acc\nOverall,5,80.0\n")
    assert read_headline(str(f), ["Task&Skill", "Overall"], "acc", "percent") == pytest.approx(80.0)
    with pytest.raises(ValueError, match="no row Task&Skill == 'Total'"):
        read_headline(str(f), ["Task&Skill", "Total"], "acc", "percent")


def test_select_and_labels():
    assert [b.key for b in select("paper", None)] == [b.key for b in BENCHMARKS]
    assert [b.key for b in select(None, "wemath, MathVista")] == ["mathvista", "wemath"]  # Table-1 order
    with pytest.raises(ConfigError, match="unknown benchmark 'mmlu'; known: mathvista"):
        select(None, "mmlu")
    specs = parse_models(["runs/a/checkpoints/step-000065", "base=OpenGVLab/InternVL3_5-1B-HF", "/x/student"])
    assert [s.label for s in specs] == ["a/step-000065", "base", "student"]
    with pytest.raises(ConfigError, match="share the label 'student'"):
        parse_models(["/x/student", "/y/student"])


def cell(score, **kw):
    return {"score": score, "n_items": 10, "data": "official", "rule_only": False, **kw}


def state_with(rows, compare=None):
    keys = [b.key for b in BENCHMARKS]
    s = {"format": 1, "benchmarks": keys, "models": {label: {"path": label, "results": dict(zip(keys, scores))}
                                                     for label, scores in rows.items()},
         "decoding": {"temperature": 0.6, "top_p": 0.95, "max_new_tokens": 32768, "seed": 0}, "judge": None,
         "harness": {"name": "VLMEvalKit", "package": "ms-vlmeval", "version": "0.0.20"}}
    if compare:
        s["compare"] = compare
    return s


def test_table_overall_marks_and_deltas():
    base = [cell(x) for x in (50.0, 40.0, 20.0, 30.0, 10.0, 25.0, 35.0)]          # mean 30.0
    trained = [cell(x) for x in (53.5, 41.0, 21.0, 33.0, 12.0, 26.0, 37.0)]       # mean 31.9286
    md = report.format_markdown(state_with({"base": base, "trained": trained}, compare=["base", "trained"]))
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in md.splitlines()
            if line.startswith("| ") and not line.startswith("| model")}
    assert rows["base"][-1] == "30.0" and rows["trained"][-1] == "31.9"
    assert rows["Δ trained − base"] == ["+3.5", "+1.0", "+1.0", "+3.0", "+2.0", "+1.0", "+2.0", "+1.9"]
    assert md.splitlines()[4].startswith("| model | MathVista | MMMU | MathVision | MathVerse | DynaMath | WeMath | "
                                         "LogicVista | Overall |")
    keys = [b.key for b in BENCHMARKS]
    assert report.overall(dict(zip(keys, base))) == pytest.approx(30.0)
    # rule-only and refused cells are marked; the paper's Overall needs all seven, each scored with a judge
    marked = [cell(50.0, rule_only=True)] + base[1:-1] + [{"refused": True}]
    md = report.format_markdown(state_with({"m": marked}))
    row = [c.strip() for c in next(line for line in md.splitlines() if line.startswith("| m ")).split("|")[2:-1]]
    assert row[0] == "50.0†" and row[6] == "n/a‡"
    assert row[7] == f"{(50 + 40 + 20 + 30 + 10 + 25) / 6:.1f} (mean of 6, 1 rule-only)"  # says what it is
    assert "† scored without a judge" in md and "‡ not scored" in md
    assert report.overall(dict(zip(keys, marked))) is None
    all_judged_but_one_rule_only = [cell(50.0, rule_only=True)] + base[1:]
    assert report.overall(dict(zip(keys, all_judged_but_one_rule_only))) is None
    assert report.overall(dict(zip(keys[:-1], base[:-1]))) is None


def test_overall_of_a_subset_says_what_it_is():
    """--benchmarks picks 3 of the 7, scored without a judge: never an Overall, the mean labelled as what it is."""
    results = {"mmmu": cell(50.0, rule_only=True), "dynamath": cell(40.0, rule_only=True),
               "wemath": cell(60.0, rule_only=True)}
    state = state_with({})
    state["benchmarks"] = ["mmmu", "dynamath", "wemath"]
    state["models"] = {"m": {"path": "m", "results": results}}
    report.save_state(Path(state_dir := tempfile.mkdtemp()), state)
    md = Path(state_dir, "eval.md").read_text()
    assert "| model | MMMU | DynaMath | WeMath | Overall |" in md
    assert "| m | 50.0† | 40.0† | 60.0† | 50.0 (mean of 3, rule-only) |" in md
    assert json.loads(Path(state_dir, "eval.json").read_text())["models"]["m"]["overall"] is None
    # judged, still 3 of 7: a mean of 3, not an Overall; the comparison row compares like with like
    judged = {k: cell(v["score"] + 1.0) for k, v in results.items()}
    state["models"] = {"a": {"path": "a", "results": judged}, "b": {"path": "b", "results": results}}
    state["compare"] = ["b", "a"]
    md = report.format_markdown(state)
    assert "| a | 51.0 | 41.0 | 61.0 | 51.0 (mean of 3) |" in md
    assert "| Δ a − b | +1.0 | +1.0 | +1.0 | — |" in md  # judged vs rule-only means: no delta


def test_a_failed_benchmark_holds_no_score():
    keys = [b.key for b in BENCHMARKS]
    results = dict(zip(keys, [cell(x) for x in (50.0, 40.0, 20.0, 30.0, 10.0, 25.0, 35.0)]))
    results["mmmu"] = {"failed": "the judge failed 3 of 4 calls (...)", "judge_failed": 3, "judge_calls": 4}
    state = state_with({})
    state["models"] = {"m": {"path": "m", "results": results}}
    md = report.format_markdown(state)
    row = [c.strip() for c in next(line for line in md.splitlines() if line.startswith("| m ")).split("|")[2:-1]]
    assert row[1] == "failed§" and row[7] == f"{(50 + 20 + 30 + 10 + 25 + 35) / 6:.1f} (mean of 6)"
    assert "§ not scored: the judge failed" in md and report.overall(results) is None


def test_judge_names_become_safe_file_names_and_secrets_never_reach_the_harness():
    from gndpo.eval.vlmeval_driver import judge_alias, scrubbed

    assert judge_alias("Qwen/Qwen2.5-72B-Instruct") == "Qwen-Qwen2.5-72B-Instruct"
    assert judge_alias("gpt-4o-mini") == "gpt-4o-mini" and judge_alias("exact_matching") != "exact_matching"
    env = {"OPENAI_API_KEY": "k", "OPENAI_API_BASE": "u", "AZURE_OPENAI_ENDPOINT": "u", "LOCAL_LLM": "x",
           "BOYUE": "1", "BOYUE_API_BASE": "u", "STEPAI_API_KEY": "k", "HF_TOKEN": "t", "AWS_SECRET_ACCESS_KEY": "s",
           "MY_JUDGE_BASE_URL": "u", "PATH": "/bin", "HOME": "/root", "TOKENIZERS_PARALLELISM": "false",
           "HTTP_PROXY": "p", "LMUData": "/d", "OMP_NUM_THREADS": "1"}
    assert scrubbed(env) == {"PATH": "/bin", "HOME": "/root", "TOKENIZERS_PARALLELISM": "false", "HTTP_PROXY": "p",
                             "LMUData": "/d", "OMP_NUM_THREADS": "1"}


def test_eval_json_records_the_installed_harness_version(tmp_path, monkeypatch, capsys):
    """The version comes from the harness's own python, and a table made with one version refuses another."""
    import gndpo.eval.harness as harness
    from fake_openai import FakeOpenAI

    def fake_python(version):
        script = tmp_path / f"python-{version}"
        script.write_text(f"#!/bin/sh\ncase \"$2\" in *importlib.metadata*) echo {version};; esac\nexit 0\n")
        script.chmod(0o755)
        return script

    data = tmp_path / "data"
    data.mkdir()
    (data / "MMMU_DEV_VAL.tsv").write_text("index\n")
    out = tmp_path / "eval"
    with FakeOpenAI(models=["served"]) as server:
        args = ["eval", "served", "--base-url", server.url, "--benchmarks", "mmmu", "--judge", "none", "--data-dir",
                str(data), "--out", str(out)]
        monkeypatch.setattr(harness, "ensure_harness", lambda log=print: fake_python("0.0.21"))
        assert main(args) == 0, capsys.readouterr().err  # the fake harness reports nothing: nothing scored
        assert json.loads((out / "eval.json").read_text())["harness"] == {
            "name": "VLMEvalKit", "package": "ms-vlmeval", "version": "0.0.21"}
        monkeypatch.setattr(harness, "ensure_harness", lambda log=print: fake_python("0.0.20"))
        assert main(args) == 2
    assert "was scored with harness" in capsys.readouterr().err


def test_other_settings_are_refused_on_an_existing_table(tmp_path):
    state = state_with({"m": [cell(1.0)] * 7})
    report.save_state(tmp_path, state)
    loaded = report.load_state(tmp_path)
    other = {k: loaded[k] for k in report.SETTINGS}
    report.check_settings(loaded, other, tmp_path)  # the same settings: fine
    other["decoding"] = dict(other["decoding"], temperature=0.0)
    with pytest.raises(ConfigError, match="was scored with decoding .*use another --out or the same settings"):
        report.check_settings(loaded, other, tmp_path)


class CannedSampler:
    """A rollout backend returning fixed texts: prompt i's K samples in order."""

    def __init__(self, texts):
        self.texts = texts

    def generate(self, records, sampling):
        k = sampling.n
        texts = [t for r in records for t in self.texts[r.id][:k]]
        n = len(texts)
        return SimpleNamespace(texts=texts, response_mask=torch.ones(n, 3, dtype=torch.bool),
                               truncated=torch.zeros(n, dtype=torch.bool))


def test_mean_and_pass_at_k_by_hand():
    from gndpo.data.records import PromptRecord

    records = [PromptRecord(id=f"p{i}", prompt="q", answer=str(i)) for i in range(3)]
    texts = {"p0": ["\\boxed{0}", "\\boxed{0}", "\\boxed{0}", "\\boxed{9}"],   # 3 of 4 right
             "p1": ["\\boxed{7}", "\\boxed{1}", "\\boxed{7}", "\\boxed{7}"],   # 1 of 4
             "p2": ["\\boxed{7}"] * 4}                                         # 0 of 4
    result = sampled_accuracy(CannedSampler(texts), records, SamplingParams(n=4, temperature=0.6), progress=False)
    assert result["mean@K"] == pytest.approx(4 / 12) and result["pass@K"] == pytest.approx(2 / 3)
    assert result["correct"] == [True, True, False] and result["k"] == 4
    assert pass_at_k([[False], [True]]) == 0.5 and mean_at_k([[1.0, 0.0], [1.0, 1.0]]) == 0.75


def test_help_lists_the_suite(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = capsys.readouterr().out
    for b in BENCHMARKS:
        assert b.dataset in out and b.column in out


@pytest.mark.parametrize("args, message", [
    (["/nonexistent/model", "--suite", "paper", "--judge", "none"], "is not a model directory"),
    (["{student}", "--suite", "paper"], "choose a judge: --judge-model NAME"),
    (["{student}", "--suite", "paper", "--judge-model", "j"], "needs --judge-base-url"),
    (["{student}", "--benchmarks", "mmmu", "--judge", "none", "--data-dir", "{tmp}", "--max-new-tokens", "64"],
     "MMMU_DEV_VAL.tsv not found"),
    (["{student}", "--benchmarks", "mmmu", "--judge-model", "j", "--judge-base-url", "http://127.0.0.1:9/v1",
      "--data-dir", "{data}", "--max-new-tokens", "64"], "the judge at http://127.0.0.1:9/v1 is unreachable"),
    (["{student}", "--benchmarks", "mmmu", "--judge", "none", "--data-dir", "{data}", "--max-new-tokens", "600"],
     "--max-new-tokens 600 does not fit the model's context of 512 tokens"),
    (["{student}", "--benchmarks", "nope", "--judge", "none"], "unknown benchmark 'nope'"),
    (["{student}", "{data}", "--samples", "4"], "--samples 4 needs --temperature > 0"),
    (["{student}"], "gndpo eval takes MODEL DATA"),
    (["{student}", "--suite", "paper", "--judge", "none", "--compare", "a=x", "b=y"], "is not a model directory"),
])
def test_mistakes_are_one_line(args, message, tmp_path, capsys, monkeypatch):
    from importlib.resources import files

    student = str(files("gndpo") / "lab" / "assets" / "student")
    data = tmp_path / "data"
    data.mkdir()
    (data / "MMMU_DEV_VAL.tsv").write_text("index\timage\tquestion\tanswer\n")
    monkeypatch.setitem(__import__("sys").modules, "vllm", None)  # the suite must fail before it needs vLLM
    args = [a.format(student=student, data=data, tmp=tmp_path) for a in args]
    code = main(["eval", *args, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out" / "eval.json").exists()


def test_without_vllm_the_suite_says_how_to_serve(tmp_path, capsys, monkeypatch):
    from importlib.resources import files

    import gndpo.eval.harness as harness

    monkeypatch.setattr(harness, "ensure_harness", lambda log=print: "/harness/python")
    monkeypatch.setattr(harness, "harness_version", lambda python: "0.0.20")
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "vllm" else object())
    data = tmp_path / "data"
    data.mkdir()
    for name in ("MMMU_DEV_VAL", "DynaMath"):
        (data / f"{name}.tsv").write_text("index\n")
    student = str(files("gndpo") / "lab" / "assets" / "student")
    code = main(["eval", student, "--benchmarks", "mmmu,dynamath", "--judge", "none", "--data-dir", str(data),
                 "--max-new-tokens", "64", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "vLLM is not installed in this environment" in err and "--base-url" in err
    state = json.loads((tmp_path / "out" / "eval.json").read_text())  # the table exists, nothing was scored
    assert state["models"]["student"]["results"] == {}
    assert BY_KEY["mmmu"].judge == "fallback"


def test_eval_dataset_samples_k_with_a_seed(tmp_path, capsys):
    """``gndpo eval MODEL DATA --samples K``: mean@K and pass@K printed, the seed changes the draws, a rerun with
    the same seed repeats them."""
    from importlib.resources import files

    from gndpo.lab.task import write_task

    write_task(tmp_path / "task", n_train=4, n_test=6)
    student = str(files("gndpo") / "lab" / "assets" / "student")
    outputs = []
    for seed in (0, 0, 1):
        out = tmp_path / f"items-{seed}-{len(outputs)}.jsonl"
        code = main(["eval", student, str(tmp_path / "task" / "test.jsonl"), "--temperature", "1.0", "--samples",
                     "3", "--seed", str(seed), "--max-new-tokens", "24", "--out", str(out)])
        stdout = capsys.readouterr().out
        assert code == 0 and "mean@3 " in stdout and "pass@3 " in stdout and "seed" in stdout
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(rows) == 6 and all(len(r["response"]) == 3 for r in rows)
        outputs.append([r["response"] for r in rows])
    assert outputs[0] == outputs[1] and outputs[0] != outputs[2]


def test_geometry3k_extra_column_scored_by_gndpo(tmp_path, capsys):
    """--benchmarks geometry3k: the training prompt (image + problem + the paper's suffix) to the served model,
    graded by the training reward, an extra column after Overall, resumed item by item."""
    from PIL import Image

    from fake_openai import FakeOpenAI

    g3k = tmp_path / "data" / "geometry3k"
    (g3k / "img").mkdir(parents=True)
    rows = []
    for i, answer in enumerate(["3", "2\\sqrt{3}", "60", "7"]):
        Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(g3k / "img" / f"{i}.png")
        rows.append({"id": f"g{i}", "problem": f"<image>Find x in figure G{i}.", "answer": answer,
                     "images": [f"img/{i}.png"]})
    (g3k / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rules = [{"contains": ["figure G0"], "reply": "<think>easy</think> \\boxed{3}"},            # right
             {"contains": ["figure G1"], "reply": "<think>...</think> \\boxed{\\sqrt{12}}"},    # right (math-verify)
             {"contains": ["figure G2"], "reply": "<think>...</think> \\boxed{30}"},            # wrong
             {"contains": ["figure G3"], "reply": "<think>never finished"}]                     # no answer
    out = tmp_path / "eval"
    with FakeOpenAI(rules, models=["served-vlm"]) as server:
        args = ["eval", "served-vlm", "--base-url", server.url, "--benchmarks", "geometry3k", "--judge", "none",
                "--data-dir", str(tmp_path / "data"), "--out", str(out)]
        assert main(args) == 0, capsys.readouterr().err
        first = list(server.requests)
        assert main(args) == 0 and len(server.requests) == len(first)  # resumed: nothing asked again
    assert len(first) == 4 and all(r["images"] == 1 and "\\boxed{}" in r["text"] for r in first)
    assert {(r["params"]["temperature"], r["params"]["top_p"]) for r in first} == {(0.6, 0.95)}
    result = json.loads((out / "eval.json").read_text())["models"]["served-vlm"]["results"]["geometry3k"]
    assert result["score"] == pytest.approx(50.0) and result["n_items"] == 4 and result["data"] == "local"
    md = (out / "eval.md").read_text()
    assert "| model | Overall | Geometry3K |" in md and "| served-vlm | — | 50.0 |" in md
