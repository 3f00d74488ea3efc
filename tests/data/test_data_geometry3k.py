"""Geometry3K adapter on fixture rows with the real ``hiyouga/geometry3k`` schema."""
from __future__ import annotations

import io

import pytest
from PIL import Image

from gndpo.data import GEOMETRY3K_ID, PAPER_SUFFIX, build_messages, load_geometry3k, load_records
from gndpo.errors import DataError

ROWS = {
    "problem": ["<image>Find x.", "<image>Find the area of the figure. Round to the nearest tenth if necessary."],
    "answer": ["2\\sqrt{3}", "\\frac{40}{3}"],
}


def diagram(shade: int) -> Image.Image:
    return Image.new("RGB", (8, 6), (shade, shade, shade))


def save_geometry3k(path, datasets) -> None:
    features = datasets.Features({"images": datasets.Sequence(datasets.Image()),
                                  "problem": datasets.Value("string"), "answer": datasets.Value("string")})
    split = datasets.Dataset.from_dict({**ROWS, "images": [[diagram(10)], [diagram(20)]]}, features=features)
    datasets.DatasetDict({"train": split, "validation": split.select([1]), "test": split.select([0])}).save_to_disk(
        str(path))


def test_geometry3k_save_to_disk_copy(tmp_path):
    datasets = pytest.importorskip("datasets")
    save_geometry3k(tmp_path / "g3k", datasets)
    records = load_geometry3k(tmp_path / "g3k", split="train")
    assert [r.answer for r in records] == ["2\\sqrt{3}", "\\frac{40}{3}"]  # reference kept verbatim
    assert [r.id for r in records] == ["train-0", "train-1"]
    assert records[1].images[0].getpixel((0, 0)) == (20, 20, 20)
    assert [r.id for r in load_records(str(tmp_path / "g3k"), format="geometry3k", split="test")] == ["test-0"]

    messages = build_messages(records[0])
    (user,) = messages
    images = [item for item in user["content"] if item["type"] == "image"]
    texts = [item["text"] for item in user["content"] if item["type"] == "text"]
    assert len(images) == len(records[0].images) == 1
    assert user["content"][0] == {"type": "image"}  # images come first
    assert texts == [f"Find x. {PAPER_SUFFIX}"] and "<image>" not in texts[0]


def test_geometry3k_hub_snapshot_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    def png(shade):
        buf = io.BytesIO()
        diagram(shade).save(buf, format="PNG")
        return {"bytes": buf.getvalue(), "path": None}

    table = pa.Table.from_pylist([{"images": [png(30)], "problem": ROWS["problem"][0], "answer": ROWS["answer"][0]}])
    (tmp_path / "snap" / "data").mkdir(parents=True)
    pq.write_table(table, tmp_path / "snap" / "data" / "validation-00000-of-00001.parquet")
    (record,) = load_geometry3k(str(tmp_path / "snap"), split="validation")
    assert record.images[0].getpixel((0, 0)) == (30, 30, 30) and record.id == "validation-0"


def test_geometry3k_rejects_rows_without_images_or_with_tag_mismatch(tmp_path):
    (tmp_path / "text.jsonl").write_text('{"problem": "Find x.", "answer": "3"}\n')
    with pytest.raises(DataError, match=r"record 0 \(id 'train-0'\) of .*text.jsonl has no image"):
        load_geometry3k(str(tmp_path / "text.jsonl"))
    diagram(1).save(tmp_path / "d.png")
    (tmp_path / "two.jsonl").write_text('{"problem": "<image><image>Find x.", "answer": "3", "images": ["d.png"]}\n')
    with pytest.raises(DataError, match="has 2 <image> tags but 1 images"):
        load_geometry3k(str(tmp_path / "two.jsonl"))


def test_geometry3k_defaults_to_the_hub_id_and_fixes_its_fields(monkeypatch):
    calls = []
    import gndpo.data.geometry3k as g3k

    monkeypatch.setattr(g3k, "load_records", lambda source, **kw: calls.append((source, kw)) or [])
    assert load_geometry3k() == [] and calls[0][0] == GEOMETRY3K_ID == "hiyouga/geometry3k"
    assert calls[0][1]["prompt_key"] == "problem" and calls[0][1]["image_key"] == "images"
    with pytest.raises(DataError, match="format geometry3k fixes the fields"):
        load_records(None, format="geometry3k", prompt_key="question")
