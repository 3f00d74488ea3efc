"""The lab task: deterministic files, disjoint splits, records through the real data adapter."""
import json

import pytest

from gndpo.data.loaders import load_records
from gndpo.data.templates import build_messages
from gndpo.lab import task
from gndpo.rewards.math import format_reward, math_reward


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    task.write_task(a, seed=3, n_train=60, n_test=40)
    task.write_task(b, seed=3, n_train=60, n_test=40)
    task.write_task(c, seed=4, n_train=60, n_test=40)
    files_a = _files(a)
    assert {"train.jsonl", "test.jsonl"} <= set(files_a)
    assert any(name.startswith("images/") and name.endswith(".png") for name in files_a)
    assert files_a == _files(b)
    assert files_a["test.jsonl"] != _files(c)["test.jsonl"]


def test_default_splits_are_disjoint_and_test_is_large():
    train, test = task.split_items(seed=0, n_train=8000, n_test=1000)
    assert len(test) == 1000 and len(train) == 8000
    assert not set(train) & set(test)
    # the test split is the head of the permutation: it does not move when the train split grows or shrinks
    assert task.split_items(seed=0, n_train=100, n_test=1000)[1] == test
    with pytest.raises(ValueError, match="distinct items"):
        task.split_items(seed=0, n_train=9000, n_test=1000)


def test_records_load_through_the_data_adapter_with_their_images(tmp_path):
    task.write_task(tmp_path, seed=0, n_train=30, n_test=20)
    rows = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert set(rows[0]) == {"id", "problem", "answer", "images", "solution"}
    records = load_records(tmp_path, split="train", id_key="id")
    assert [r.id for r in records] == [row["id"] for row in rows]
    assert len(load_records(tmp_path / "test.jsonl", split="test")) == 20
    for record, row in zip(records, rows):
        assert record.prompt == row["problem"] and record.answer == row["answer"]
        assert len(record.images) == 1 and record.images[0].size == (32, 32) and record.images[0].mode == "RGB"
        # the SFT target is in the paper's format and its boxed answer verifies
        assert math_reward(row["solution"], record.answer) == 1.0
        assert format_reward(row["solution"]) == 1.0
        messages = build_messages(record, suffix=task.LAB_SUFFIX)
        assert messages[0]["content"][0] == {"type": "image"}
        assert messages[0]["content"][1] == {"type": "text", "text": row["problem"]}


def test_answer_needs_the_image_and_two_steps():
    item = task.Item(a=4, b=7, cells=(1, 2), operation="sum_times", k=3)
    assert item.solution() == "<think>4+7=11,11*3=33</think> \\boxed{33}"
    assert task.Item(4, 7, (0, 3), "prod_plus", 5).solution() == "<think>4*7=28,28+5=33</think> \\boxed{33}"
    # the question text does not name the digits: two items that differ only in the image share it
    other = task.Item(a=2, b=8, cells=(1, 2), operation="sum_times", k=3)
    assert item.problem() == other.problem() and item.answer() != other.answer()
    assert task.draw_image(item).tobytes() != task.draw_image(other).tobytes()
    # every digit draws differently, in the cell it was given
    glyphs = {task.draw_image(task.Item(d, d, (0, 3), "sum_times", 2)).tobytes() for d in range(10)}
    assert len(glyphs) == 10
    assert task.draw_image(task.Item(1, 8, (0, 1), "sum_times", 2)).getpixel((20, 20)) == (255, 255, 255)
    assert max(len(i.solution()) for i in task.all_items()) <= 42
