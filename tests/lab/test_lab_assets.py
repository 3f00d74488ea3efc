"""The shipped lab checkpoints: they load through the Auto classes and the teacher beats the student."""
import json

import pytest
from transformers import AutoModelForImageTextToText, AutoProcessor

from gndpo.data.loaders import load_records
from gndpo.evaluate import greedy_accuracy
from gndpo.lab import task
from gndpo.lab.bootstrap import ASSETS_DIR


@pytest.fixture(scope="module")
def report():
    return json.loads((ASSETS_DIR / "bootstrap.json").read_text())


def test_shipped_files_are_small_and_the_report_meets_the_targets(report):
    size = sum(p.stat().st_size for p in ASSETS_DIR.rglob("*") if p.is_file())
    assert size < 10 * 2**20
    assert (ASSETS_DIR / "teacher" / "model.safetensors").is_file()
    assert report["models"]["teacher"]["test_accuracy"] >= 0.9
    assert 0.2 <= report["models"]["student"]["test_accuracy"] <= 0.5
    assert report["models"]["student"]["format_rate"] >= 0.9
    assert report["task"]["suffix"] == task.LAB_SUFFIX and report["max_new_tokens"] == task.LAB_MAX_NEW_TOKENS


@pytest.mark.slow
def test_teacher_beats_the_student_on_a_test_slice(report, tmp_path):
    # the test split is the head of the seeded permutation, so 64 items are the first 64 of the bootstrap's
    task.write_task(tmp_path, seed=report["task"]["seed"], n_train=1, n_test=64)
    records = load_records(tmp_path, split="test", id_key="id")
    results = {}
    for kind in ("teacher", "student"):
        processor = AutoProcessor.from_pretrained(ASSETS_DIR / kind)
        model = AutoModelForImageTextToText.from_pretrained(ASSETS_DIR / kind)
        assert processor.tokenizer.padding_side == "left"
        results[kind] = greedy_accuracy(model, processor, records, max_new_tokens=task.LAB_MAX_NEW_TOKENS,
                                        suffix=task.LAB_SUFFIX, progress=False)
    teacher, student = results["teacher"], results["student"]
    assert teacher["accuracy"] >= 0.85 and teacher["accuracy"] >= student["accuracy"] + 0.3
    assert student["format_rate"] >= 0.9 and student["truncated_rate"] == 0.0
    assert teacher["mean_response_length"] <= task.LAB_MAX_NEW_TOKENS


def test_trained_student_decodes_the_same_batched_or_alone(tmp_path):
    task.write_task(tmp_path, seed=0, n_train=1, n_test=6)
    records = load_records(tmp_path, split="test", id_key="id")
    assert len({len(r.prompt) for r in records}) > 1  # prompts of different lengths: real left padding
    processor = AutoProcessor.from_pretrained(ASSETS_DIR / "student")
    model = AutoModelForImageTextToText.from_pretrained(ASSETS_DIR / "student")
    kwargs = dict(max_new_tokens=task.LAB_MAX_NEW_TOKENS, suffix=task.LAB_SUFFIX, progress=False)
    batched = greedy_accuracy(model, processor, records, batch_size=6, **kwargs)
    alone = greedy_accuracy(model, processor, records, batch_size=1, **kwargs)
    assert batched["responses"] == alone["responses"]
