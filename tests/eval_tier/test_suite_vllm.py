"""The whole ``gndpo eval --suite paper`` path as a user runs it: gndpo serves each checkpoint with vLLM's
OpenAI-compatible server on loopback, VLMEvalKit sends it the seven benchmarks' fixture rows (with images), a
stub judge scores them, and the table comes out complete. Needs vLLM (the vLLM virtualenv) and the harness."""
import csv
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


def scripted_copy(src, dst, letter):
    """The lab model made to answer ``letter`` to any prompt, so that every score is known in advance.

    Both transformer layers write nothing into the residual stream (zero attention output and MLP down
    projections), so each next token depends on the last token only, through the tied embeddings: the chat
    template's last token "\n" points at ``letter``, which points at <|im_end|> (EOS). With embeddings
    E["\n"] = 10 e0, E[letter] = 20 e0 + 20 e1, E[EOS] = 100 e1 and every other row 0, after the RMS norm (weight 1)
    the logits are 160 for ``letter`` vs 80 for "\n" after "\n", and 566 for EOS vs 226 for ``letter`` after the
    letter: at temperature 0.6 the answer is ``letter`` with probability 1 - 1e-58. The context grows to 4,096
    tokens (rotary positions: no weights change), since the benchmarks' prompts exceed the lab model's 512."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = 4096
    (dst / "config.json").write_text(json.dumps(config))
    tok = AutoTokenizer.from_pretrained(dst)
    newline, answer, eos = tok.convert_tokens_to_ids(["\n", letter]) + [tok.eos_token_id]
    assert tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"][-1] == newline
    weights = load_file(str(dst / "model.safetensors"))
    for name, w in weights.items():
        if name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
            weights[name] = torch.zeros_like(w)
        elif name.endswith("model.norm.weight"):
            weights[name] = torch.ones_like(w)
    embed = torch.zeros_like(weights["language_model.model.embed_tokens.weight"])  # (V, 64)
    embed[newline, 0] = 10.0
    embed[answer, 0], embed[answer, 1] = 20.0, 20.0
    embed[eos, 1] = 100.0
    weights["language_model.model.embed_tokens.weight"] = embed
    save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


# Every prediction is "D" (base) or "C" (trained); the stub judge extracts those letters from MathVerse's and
# LogicVista's prompts and answers "Z" (nothing) to everything else. By hand, from the fixture rows
# (evalkit_fixtures.py) and each scorer's rules:
EXPECTED = {
    # MathVista: MV1 (B) and MV5 (C) are multiple choice, the letter is read by rule; MV2-MV4 want numbers, the
    # judge finds none. base: 0 of 5; trained: MV5 -> 1 of 5
    "mathvista": (0.0, 20.0),
    # MMMU, validation rows MM2 (B), MM3 (C), MM4 (D), MM5 (open, "42"; the judge finds no option): base MM4,
    # trained MM3 -> 1 of 4 each
    "mmmu": (25.0, 25.0),
    # MathVision: MX1 (B), MX4 (D) multiple choice, MX2/MX3 numbers: base MX4 -> 1 of 4; trained 0 of 4
    "mathvision": (25.0, 0.0),
    # MathVerse: the judge extracts the letter, VS4's answer is C: base 0 of 4; trained 1 of 4
    "mathverse": (0.0, 25.0),
    # DynaMath worst case: seed 1's variants are all B, seed 2's floats (the judge finds none): 0 of 2 for both
    "dynamath": (0.0, 0.0),
    # WeMath strict, (525 - 0.5 IG - RM - IK) / 525 per problem: base "D" gets only P2's multi-step question
    # (steps wrong: rote memorization), P1 and P3 nothing (insufficient knowledge): RM 1 + IK 2; trained "C" gets
    # P1's and P3's multi-step questions (steps wrong: RM) and P2's third step only (IK): RM 2 + IK 1 -> 522/525
    "wemath": (522 / 525 * 100, 522 / 525 * 100),
    # LogicVista: LV4 is D, LV5 is C -> 1 of 5 each
    "logicvista": (20.0, 20.0),
}


def test_paper_suite_end_to_end_on_vllm(fixture_data, tmp_path, capsys, monkeypatch):
    data, rules = fixture_data
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "eval"
    base = scripted_copy(ASSETS / "student", tmp_path / "base", "D")
    trained = scripted_copy(ASSETS / "student", tmp_path / "trained", "C")
    extract = [{"model": JUDGE, "contains": [pattern.format(x)], "reply": x} for x in "CD"
               for pattern in ("Model response: '{}'\n", "Answer: <start>\n{}\n<end>")]  # MathVerse, LogicVista
    with FakeOpenAI(extract + rules) as judge:
        code = main(["eval", "--suite", "paper", "--compare", f"base={base}", f"trained={trained}", "--judge-model",
                     JUDGE, "--judge-base-url", judge.url, "--data-dir", str(data), "--max-new-tokens", "48",
                     "--dtype", "float32", "--out", str(out)])
        stdout, err = capsys.readouterr()
        assert code == 0, err
        assert judge.count(JUDGE) > 0
    state = json.loads((out / "eval.json").read_text())
    assert list(state["models"]) == ["base", "trained"]
    for i, label in enumerate(("base", "trained")):
        results = state["models"][label]["results"]
        preds = list(csv.DictReader(open(out / "items" / label / f"{label}_MMMU_DEV_VAL.tsv"), delimiter="\t"))
        assert {p["prediction"] for p in preds} == {"DC"[i]}  # the scripted answer, served by vLLM
        assert [results[b.key]["n_items"] for b in BENCHMARKS] == [5, 5, 4, 4, 6, 10, 5]
        for b in BENCHMARKS:
            assert results[b.key]["score"] == pytest.approx(EXPECTED[b.key][i], abs=0.01), (label, b.key)
            assert not results[b.key]["rule_only"]
    md = (out / "eval.md").read_text()
    rows = {line.split("|")[1].strip(): [c.strip().rstrip("*") for c in line.split("|")[2:-1]]
            for line in md.splitlines() if line.startswith("| ") and not line.startswith("| model")}
    for i, label in enumerate(("base", "trained")):
        scores = [EXPECTED[b.key][i] for b in BENCHMARKS]
        assert rows[label] == [f"{s:.1f}" for s in scores] + [f"{sum(scores) / 7:.1f}"]  # 24.2 and 27.1
    assert rows["Δ trained − base"] == ["+20.0", "+0.0", "-25.0", "+25.0", "+0.0", "+0.0", "+0.0", "+2.9"]
    # the prompts vLLM ran carried the images: MM4 has two
    assert "[Q:MM4]" in (out / "items" / "base" / "base_MMMU_DEV_VAL.tsv").read_text()
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
