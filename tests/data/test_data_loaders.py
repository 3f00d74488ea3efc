"""Dataset adapters: every source layout, image form and user mistake, on fixtures built here."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from gndpo.data import FORMATS, PromptRecord, load_records
from gndpo.errors import DataError


def png_bytes(color=(255, 0, 0), size=(4, 3), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def write_png(path: Path, color=(255, 0, 0), size=(4, 3), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(color, size, mode))
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def red_green_rows(tmp_path: Path) -> list[dict]:
    write_png(tmp_path / "img" / "red.png", (255, 0, 0))
    write_png(tmp_path / "img" / "green.png", (0, 255, 0), mode="RGBA")
    return [
        {"problem": "<image>What colour?", "answer": "red", "images": ["img/red.png"]},
        {"problem": "Two: <image><image>", "answer": 2, "images": ["img/red.png", "img/green.png"]},
        {"problem": "Single image, not a list", "answer": 0.5, "images": "img/green.png"},
    ]


# ---------------------------------------------------------------- adapters


def test_jsonl_relative_image_paths_single_and_list(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", red_green_rows(tmp_path))
    records = load_records(str(path))
    assert [r.id for r in records] == ["train-0", "train-1", "train-2"]
    assert [r.answer for r in records] == ["red", "2", "0.5"]  # numbers become reference strings
    assert [len(r.images) for r in records] == [1, 2, 1]
    assert all(isinstance(r, PromptRecord) for r in records)
    image = records[1].images[1]
    assert image.mode == "RGB" and image.size == (4, 3) and image.getpixel((0, 0)) == (0, 255, 0)
    assert records[2].images[0].getpixel((1, 1)) == (0, 255, 0)


def test_relative_paths_resolve_against_the_file_not_the_cwd(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "ds" / "train.jsonl", [{"problem": "p", "answer": "a", "images": ["x.png"]}])
    write_png(tmp_path / "ds" / "x.png")
    monkeypatch.chdir(tmp_path)
    assert len(load_records(path)[0].images) == 1  # a Path works as well as a str


def test_json_list_file_and_split_dict(tmp_path):
    rows = [{"question": "1+1?", "solution": "2", "uid": "a"}, {"question": "2+2?", "solution": "4", "uid": "b"}]
    (tmp_path / "list.json").write_text(json.dumps(rows))
    records = load_records(str(tmp_path / "list.json"), prompt_key="question", answer_key="solution",
                           id_key="uid")
    assert [(r.id, r.prompt, r.answer, r.images) for r in records] == [("a", "1+1?", "2", ()), ("b", "2+2?", "4", ())]
    (tmp_path / "splits.json").write_text(json.dumps({"train": rows[:1], "test": rows[1:]}))
    test = load_records(str(tmp_path / "splits.json"), split="test", prompt_key="question", answer_key="solution")
    assert [(r.id, r.prompt) for r in test] == [("test-0", "2+2?")]


def test_parquet_with_image_bytes_dicts(tmp_path):
    rows = [
        {"problem": "p0", "answer": "1", "images": [{"bytes": png_bytes((0, 0, 255)), "path": "blue.png"}]},
        {"problem": "p1", "answer": "2", "images": [{"bytes": None, "path": "rel.png"}]},
    ]
    write_png(tmp_path / "rel.png", (9, 9, 9))
    path = write_parquet(tmp_path / "train.parquet", rows)
    records = load_records(str(path))
    assert records[0].images[0].getpixel((0, 0)) == (0, 0, 255)
    assert records[1].images[0].getpixel((0, 0)) == (9, 9, 9)  # path fallback when bytes are null


def test_raw_bytes_single_image(tmp_path):
    path = write_parquet(tmp_path / "raw.parquet", [{"problem": "p", "answer": "a", "images": png_bytes((1, 2, 3))}])
    assert load_records(str(path))[0].images[0].getpixel((0, 0)) == (1, 2, 3)


def test_save_to_disk_dataset_dict_picks_the_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"problem": datasets.Value("string"), "answer": datasets.Value("string"),
                                  "images": datasets.Sequence(datasets.Image())})
    red, blue = Image.new("RGB", (5, 5), (255, 0, 0)), Image.new("L", (5, 5), 200)
    train = datasets.Dataset.from_dict({"problem": ["<image>a", "<image>b"], "answer": ["1", "2"],
                                        "images": [[red], [blue]]}, features=features)
    test = datasets.Dataset.from_dict({"problem": ["<image>c"], "answer": ["3"], "images": [[red]]},
                                      features=features)
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "dd"))
    records = load_records(str(tmp_path / "dd"))
    assert [r.answer for r in records] == ["1", "2"]
    assert records[1].images[0].mode == "RGB" and records[1].images[0].getpixel((0, 0)) == (200, 200, 200)
    assert [r.id for r in load_records(str(tmp_path / "dd"), split="test")] == ["test-0"]
    assert [r.answer for r in load_records(str(tmp_path / "dd"), format="datasets", limit=1)] == ["1"]
    with pytest.raises(DataError, match=r"has no split 'validation' \(splits: train, test\); set data.split"):
        load_records(str(tmp_path / "dd"), split="validation")
    train.save_to_disk(str(tmp_path / "single"))  # a plain Dataset: no split to choose
    assert len(load_records(str(tmp_path / "single"), split="anything")) == 2


def test_directory_with_split_files(tmp_path):
    write_jsonl(tmp_path / "ds" / "train.jsonl", [{"problem": "p", "answer": "a"}])
    write_jsonl(tmp_path / "ds" / "test.jsonl", [{"problem": "q", "answer": "b"}])
    assert load_records(str(tmp_path / "ds"))[0].prompt == "p"
    assert load_records(str(tmp_path / "ds"), split="test")[0].prompt == "q"
    write_parquet(tmp_path / "pq" / "train.parquet", [{"problem": "pp", "answer": "a"}])
    assert load_records(str(tmp_path / "pq"))[0].prompt == "pp"


def test_hub_snapshot_layout_reads_all_shards_in_order(tmp_path):
    write_parquet(tmp_path / "snap" / "data" / "train-00000-of-00002.parquet", [{"problem": "s0", "answer": "0"}])
    write_parquet(tmp_path / "snap" / "data" / "train-00001-of-00002.parquet",
                  [{"problem": "s1", "answer": "1"}, {"problem": "s2", "answer": "2"}])
    write_parquet(tmp_path / "snap" / "data" / "test-00000-of-00001.parquet", [{"problem": "t", "answer": "0"}])
    assert [r.prompt for r in load_records(str(tmp_path / "snap"))] == ["s0", "s1", "s2"]
    assert [r.prompt for r in load_records(str(tmp_path / "snap"), limit=2)] == ["s0", "s1"]
    assert [r.prompt for r in load_records(str(tmp_path / "snap"), split="test")] == ["t"]


def test_text_only_when_no_record_has_the_image_key(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"problem": "p", "answer": "a"}, {"problem": "q", "answer": "b"}])
    assert [r.images for r in load_records(str(path))] == [(), ()]


def test_image_key_none_ignores_images(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"problem": "p", "answer": "a", "images": ["missing.png"]}])
    assert load_records(str(path), image_key=None)[0].images == ()


def test_null_or_empty_images_in_an_image_column(tmp_path):
    path = write_parquet(tmp_path / "t.parquet", [{"problem": "p", "answer": "a", "images": None},
                                                  {"problem": "q", "answer": "b", "images": [png_bytes()]}])
    assert [len(r.images) for r in load_records(str(path))] == [0, 1]
    path = write_jsonl(tmp_path / "e.jsonl", [{"problem": "p", "answer": "a", "images": []},
                                             {"problem": "q", "answer": "b", "images": ["x.png"]}])
    write_png(tmp_path / "x.png")
    assert [len(r.images) for r in load_records(str(path))] == [0, 1]


def test_limit_keeps_the_first_records_and_ids_follow_the_split(tmp_path):
    rows = [{"problem": f"p{i}", "answer": str(i), "images": []} for i in range(5)]
    path = write_jsonl(tmp_path / "val.jsonl", rows)
    records = load_records(str(path), split="val", limit=2)
    assert [(r.id, r.prompt) for r in records] == [("val-0", "p0"), ("val-1", "p1")]
    assert len(load_records(str(path), limit=99)) == 5


def test_id_key_numbers_become_strings(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"problem": "p", "answer": "a", "n": 7}])
    assert load_records(str(path), id_key="n")[0].id == "7"


def test_explicit_format_reads_a_file_with_another_extension(tmp_path):
    path = tmp_path / "rows.txt"
    write_jsonl(path, [{"problem": "p", "answer": "a"}])
    assert load_records(str(path), format="jsonl")[0].prompt == "p"
    with pytest.raises(DataError, match=r"cannot tell the format of .*rows.txt.*set data.format"):
        load_records(str(path))


def test_formats_listed():
    assert set(FORMATS) >= {"auto", "jsonl", "parquet", "datasets", "geometry3k"}


# ---------------------------------------------------------------- mistakes


def test_missing_file(tmp_path):
    missing = tmp_path / "data" / "train.jsonl"
    with pytest.raises(DataError, match=r"^dataset file not found: .*data/train.jsonl$"):
        load_records(str(missing))
    with pytest.raises(DataError, match="dataset file not found"):
        load_records("data/nope.parquet")  # looks like owner/name, but it is a file name
    with pytest.raises(DataError, match="dataset file not found"):
        load_records(str(missing), format="parquet")


def test_missing_prompt_key_names_record_fields_and_fix(tmp_path):
    rows = [{"problem": "p", "answer": "a"}] * 3 + [{"question": "q", "answer": "a"}]
    path = write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    with pytest.raises(DataError) as info:
        load_records(str(path))
    assert str(info.value) == (f"record 3 of {path} has no 'problem' field (fields: question, answer); "
                               "set data.prompt_key")


def test_missing_answer_and_id_keys(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"problem": "p", "label": "a"}])
    with pytest.raises(DataError, match=r"record 0 of .* has no 'answer' field \(fields: problem, label\); "
                                        r"set data.answer_key"):
        load_records(str(path))
    with pytest.raises(DataError, match=r"has no 'uid' field .*set data.id_key"):
        load_records(str(path), answer_key="label", id_key="uid")


def test_null_or_non_string_fields(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"problem": ["chat"], "answer": "a"}])
    with pytest.raises(DataError, match=r"field 'problem' of record 0 of .* is a list, expected a string"):
        load_records(str(path))
    path = write_parquet(tmp_path / "t.parquet", [{"problem": "p", "answer": "a"}, {"problem": "q", "answer": None}])
    with pytest.raises(DataError, match=r"field 'answer' of record 1 of .* is null"):
        load_records(str(path))


def test_duplicate_ids(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"problem": "p", "answer": "a", "k": 1}] * 2)
    with pytest.raises(DataError, match=r"records 0 and 1 of .* share the id '1'"):
        load_records(str(path), id_key="k")


def test_missing_image_file_names_record_id_and_path(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"problem": "p", "answer": "a", "id": "q7", "images": ["gone.png"]}])
    with pytest.raises(DataError) as info:
        load_records(str(path), id_key="id")
    message = str(info.value)
    assert message.startswith("record 0 (id 'q7') of ")
    assert message.endswith(f"image file not found: {tmp_path}/gone.png")
    assert "\n" not in message


def test_unreadable_image(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"this is not a png at all")
    path = write_jsonl(tmp_path / "t.jsonl", [{"problem": "p", "answer": "a", "images": ["bad.png"]}])
    with pytest.raises(DataError, match=r"^record 0 of .*: cannot read image file .*bad.png: "):
        load_records(str(path))
    pq_path = write_parquet(tmp_path / "b.parquet", [{"problem": "p", "answer": "a", "images": [{"bytes": b"junk"}]}])
    with pytest.raises(DataError, match="cannot read image bytes"):
        load_records(str(pq_path))


def test_image_key_present_in_some_records_only(tmp_path):
    write_png(tmp_path / "x.png")
    path = write_jsonl(tmp_path / "t.jsonl", [{"problem": "p", "answer": "a", "images": ["x.png"]},
                                             {"problem": "q", "answer": "b"}])
    with pytest.raises(DataError, match=r"record 1 of .* has no 'images' field but other records do"):
        load_records(str(path))


def test_image_column_under_another_name_is_not_silently_dropped(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"problem": "p", "answer": "a", "image": "x.png"}])
    with pytest.raises(DataError, match=r"no 'images' field but have 'image'; set data.image_key=image"):
        load_records(str(path))


def test_unsupported_image_values(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"problem": "p", "answer": "a", "images": [3]}])
    with pytest.raises(DataError, match="unsupported image value of type int"):
        load_records(str(path))
    path = write_jsonl(tmp_path / "u.jsonl", [{"problem": "p", "answer": "a", "images": ["https://x/y.png"]}])
    with pytest.raises(DataError, match="image URLs are not supported"):
        load_records(str(path))


def test_empty_dataset(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match=r"dataset .*empty.jsonl has no records"):
        load_records(str(tmp_path / "empty.jsonl"))
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(DataError, match="has no records"):
        load_records(str(tmp_path / "empty.json"))


def test_invalid_json_line(tmp_path):
    (tmp_path / "t.jsonl").write_text('{"problem": "p", "answer": "a"}\n{"problem": oops}\n')
    with pytest.raises(DataError, match=r"t.jsonl line 2 is not valid JSON"):
        load_records(str(tmp_path / "t.jsonl"))
    (tmp_path / "s.jsonl").write_text('"just a string"\n')
    with pytest.raises(DataError, match="record 0 of .* is a str, not a JSON object"):
        load_records(str(tmp_path / "s.jsonl"))


def test_unknown_format_and_bad_limit(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"problem": "p", "answer": "a"}])
    with pytest.raises(DataError, match=r"unknown data format 'csv'; set data.format to one of: auto, jsonl"):
        load_records(str(path), format="csv")
    with pytest.raises(DataError, match="data.limit must be a positive"):
        load_records(str(path), limit=0)


def test_directory_without_the_split(tmp_path):
    write_jsonl(tmp_path / "ds" / "train.jsonl", [{"problem": "p", "answer": "a"}])
    with pytest.raises(DataError, match=r"no 'dev' split in directory .*ds.*\(found: train.jsonl\)"):
        load_records(str(tmp_path / "ds"), split="dev")


def test_corrupt_parquet(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"cannot read parquet file .*bad.parquet"):
        load_records(str(tmp_path / "bad.parquet"))


def test_unknown_hub_id_offline_is_one_line(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.chdir(tmp_path)  # the id must not exist as a local path
    with pytest.raises(DataError) as info:
        load_records("nobody-gndpo-test/no-such-dataset")
    message = str(info.value)
    assert message.startswith("dataset 'nobody-gndpo-test/no-such-dataset' could not be found locally or on the "
                              "Hugging Face hub (")
    assert "\n" not in message


def test_no_source():
    with pytest.raises(DataError, match="no dataset given; set data.train"):
        load_records("")
