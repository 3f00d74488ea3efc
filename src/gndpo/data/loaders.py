"""Dataset adapters: JSON lines / JSON, Parquet, `datasets` folders and hub ids -> ``PromptRecord``s.

Every record is checked and its images decoded while the dataset loads, so a bad record stops the run
before any model is loaded, with a one-line ``DataError`` naming the file, the record and the fix.
"""
from __future__ import annotations

import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from PIL import Image

from gndpo.data.records import PromptRecord
from gndpo.errors import DataError

FORMATS = ("auto", "jsonl", "json", "parquet", "datasets", "geometry3k")

_JSON_SUFFIXES = (".jsonl", ".json")
_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow", ".csv", ".tsv", ".txt")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_IMAGE_FIELDS = ("images", "image", "img", "imgs", "image_path", "image_paths")


@dataclass(frozen=True)
class _Table:
    """Rows read from one source. ``rows`` is a list of dicts or a ``datasets.Dataset`` (decodes on access)."""

    rows: Sequence[Any]
    fields: tuple[str, ...]
    where: str  # how errors name the source
    base_dir: Path | None  # relative image paths resolve against it


def load_records(
    source: str | os.PathLike | None,
    *,
    split: str = "train",
    format: str = "auto",
    prompt_key: str = "problem",
    answer_key: str = "answer",
    image_key: str | None = "images",
    id_key: str | None = None,
    limit: int | None = None,
) -> list[PromptRecord]:
    """Load prompt records from a file, a directory, or a Hugging Face hub dataset id.

    ``format="auto"`` picks the reader from the source: ``*.jsonl``/``*.json`` (JSON lines or a JSON list),
    ``*.parquet``, a ``datasets.save_to_disk`` folder, a folder holding ``{split}.jsonl``/``{split}.parquet``
    or ``data/{split}-*.parquet`` (hub snapshot), else a hub id ``owner/name``. Images (paths, bytes,
    ``{"bytes", "path"}`` dicts or PIL images, one or a list) are opened and converted to RGB here.
    """
    if format not in FORMATS:
        raise DataError(f"unknown data format {format!r}; set data.format to one of: {', '.join(FORMATS)}")
    if limit is not None and limit < 1:
        raise DataError(f"data.limit must be a positive number of records or null, got {limit}")
    if format == "geometry3k":
        from gndpo.data.geometry3k import GEOMETRY3K_KEYS, load_geometry3k

        given = {"prompt_key": prompt_key, "answer_key": answer_key, "image_key": image_key}
        if given != GEOMETRY3K_KEYS:
            raise DataError(f"format geometry3k fixes the fields {GEOMETRY3K_KEYS}, got {given}; "
                            "use data.format=auto to choose the fields yourself")
        return load_geometry3k(source, split=split, id_key=id_key, limit=limit)
    if source is None or not str(source).strip():
        raise DataError("no dataset given; set data.train to a jsonl/json/parquet file, a directory or a hub id")
    table = _read(str(source), split=split, format=format, limit=limit)
    return _to_records(table, split=split, prompt_key=prompt_key, answer_key=answer_key, image_key=image_key,
                       id_key=id_key)


# ---------------------------------------------------------------- readers


def _read(source: str, *, split: str, format: str, limit: int | None) -> _Table:
    path = Path(source).expanduser()
    if format in ("jsonl", "json"):
        return _read_json(_existing_file(path), split=split, limit=limit)
    if format == "parquet":
        return _read_parquet([_existing_file(path)], where=str(path), limit=limit)
    if format == "datasets":
        if path.is_dir():
            return _read_saved(path, split=split, limit=limit)
        if path.exists():
            raise DataError(f"data.format=datasets expects a save_to_disk directory or a hub id, got the file {path}")
        return _read_hub(source, split=split, limit=limit)
    # auto
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in _JSON_SUFFIXES:
            return _read_json(path, split=split, limit=limit)
        if suffix == ".parquet":
            return _read_parquet([path], where=str(path), limit=limit)
        raise DataError(f"cannot tell the format of {path} from its extension; use a .jsonl, .json or .parquet "
                        "file, or set data.format")
    if path.is_dir():
        return _read_directory(path, split=split, limit=limit)
    if _looks_like_hub_id(source):
        return _read_hub(source, split=split, limit=limit)
    raise DataError(f"dataset file not found: {path}")


def _existing_file(path: Path) -> Path:
    if not path.is_file():
        raise DataError(f"dataset file not found: {path}")
    return path


def _looks_like_hub_id(source: str) -> bool:
    return bool(_HUB_ID.fullmatch(source)) and not source.lower().endswith(_FILE_SUFFIXES)


def _read_directory(path: Path, *, split: str, limit: int | None) -> _Table:
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return _read_saved(path, split=split, limit=limit)
    for name in (f"{split}.jsonl", f"{split}.json"):
        if (path / name).is_file():
            return _read_json(path / name, split=split, limit=limit)
    if (path / f"{split}.parquet").is_file():
        return _read_parquet([path / f"{split}.parquet"], where=str(path / f"{split}.parquet"), limit=limit)
    for pattern in (f"data/{split}-*.parquet", f"data/{split}.parquet", f"{split}-*.parquet"):
        shards = sorted(path.glob(pattern))
        if shards:
            return _read_parquet(shards, where=str(path / pattern), limit=limit)
    present = ", ".join(sorted(p.name for p in path.iterdir())[:10]) or "nothing"
    raise DataError(f"no {split!r} split in directory {path}: expected a datasets.save_to_disk folder, "
                    f"{split}.jsonl, {split}.parquet or data/{split}-*.parquet (found: {present}); "
                    "set data.split or data.train")


def _read_json(path: Path, *, split: str, limit: int | None) -> _Table:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        hint = "; save it as UTF-8" if isinstance(e, UnicodeDecodeError) else ""
        raise DataError(f"cannot read dataset file {path}: {e}{hint}") from e
    rows: list = []
    parsed_whole = False
    if path.suffix.lower() == ".json" or text.lstrip().startswith("["):
        try:
            data = json.loads(text)
            parsed_whole = True
        except json.JSONDecodeError:
            pass  # not one JSON document: read it as JSON lines, like `datasets` does
        else:
            if isinstance(data, dict):  # {"train": [...], ...} or a file holding one record
                data = data[split] if isinstance(data.get(split), list) else [data]
            if isinstance(data, list):
                rows = data[:limit] if limit else data
            else:
                parsed_whole = False
    if not parsed_whole:
        for lineno, line in enumerate(text.splitlines(), start=1):
            if limit and len(rows) >= limit:
                break
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {lineno} is not valid JSON ({e.msg} at column {e.colno}); "
                                "write one JSON object per line") from e
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"record {index} of {path} is a {type(row).__name__}, not a JSON object with fields")
    return _Table(rows=rows, fields=_union_keys(rows), where=str(path), base_dir=path.parent)


def _read_parquet(paths: Sequence[Path], *, where: str, limit: int | None) -> _Table:
    pq = _import("pyarrow.parquet", where)
    rows: list[dict] = []
    fields: tuple[str, ...] = ()
    for path in paths:
        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ...
            raise DataError(f"cannot read parquet file {path}: {_one_line(e)}") from e
        fields = fields or tuple(table.column_names)
        if limit:
            table = table.slice(0, limit - len(rows))
        rows.extend(table.to_pylist())
        if limit and len(rows) >= limit:
            break
    return _Table(rows=rows, fields=fields, where=where, base_dir=Path(paths[0]).parent)


def _read_saved(path: Path, *, split: str, limit: int | None) -> _Table:
    datasets = _import("datasets", str(path))
    try:
        data = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DataError(f"cannot load the datasets folder {path}: {_one_line(e)}") from e
    where = str(path)
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise DataError(f"{path} has no split {split!r} (splits: {', '.join(data)}); set data.split")
        data, where = data[split], f"{path} (split {split})"
    return _dataset_table(data, where=where, base_dir=path, limit=limit)


def _read_hub(source: str, *, split: str, limit: int | None) -> _Table:
    datasets = _import("datasets", source)
    try:
        data = datasets.load_dataset(source, split=split)
    except Exception as e:  # offline, unknown repo, unknown split, gated...
        raise DataError(f"dataset {source!r} could not be found locally or on the Hugging Face hub "
                        f"({type(e).__name__}: {_one_line(e)}); check data.train, data.split and the network") from e
    return _dataset_table(data, where=f"{source} (split {split})", base_dir=None, limit=limit)


def _dataset_table(data, *, where: str, base_dir: Path | None, limit: int | None) -> _Table:
    if limit and len(data) > limit:
        data = data.select(range(limit))
    return _Table(rows=data, fields=tuple(data.column_names), where=where, base_dir=base_dir)


def _import(module: str, source: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise DataError(f"reading {source} needs the optional package {module.split('.')[0]!r}: "
                        "pip install gndpo[data]") from e


def _union_keys(rows: Iterable[dict]) -> tuple[str, ...]:
    keys: dict[str, None] = {}
    for row in rows:
        keys.update(dict.fromkeys(row))
    return tuple(keys)


def _one_line(error: BaseException, limit: int = 300) -> str:
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------- records


def _to_records(
    table: _Table, *, split: str, prompt_key: str, answer_key: str, image_key: str | None, id_key: str | None
) -> list[PromptRecord]:
    if len(table.rows) == 0:
        raise DataError(f"dataset {table.where} has no records; check data.train and data.split")
    use_images = image_key is not None and image_key in table.fields
    if image_key is not None and not use_images:
        others = [f for f in table.fields if f.lower() in _IMAGE_FIELDS]
        if others:
            raise DataError(f"records of {table.where} have no {image_key!r} field but have {others[0]!r}; "
                            f"set data.image_key={others[0]} (or data.image_key=null for text only)")
    records: list[PromptRecord] = []
    seen: dict[str, int] = {}
    for index, row in enumerate(table.rows):
        record_id = _text(row, id_key, "id_key", index, table) if id_key else f"{split}-{index}"
        if record_id in seen:
            raise DataError(f"records {seen[record_id]} and {index} of {table.where} share the id {record_id!r}; "
                            "set data.id_key to a unique field (or null for split-index ids)")
        seen[record_id] = index
        label = f"record {index}" + (f" (id {record_id!r})" if id_key else "") + f" of {table.where}"
        prompt = _text(row, prompt_key, "prompt_key", index, table)
        answer = _text(row, answer_key, "answer_key", index, table)
        images: tuple = ()
        if use_images:
            if image_key not in row:
                raise DataError(f"{label} has no {image_key!r} field but other records do; "
                                f'give it "{image_key}": [] if it has no image')
            images = _load_images(row[image_key], label=label, base_dir=table.base_dir)
        records.append(PromptRecord(id=record_id, prompt=prompt, answer=answer, images=images,
                                    fields=_scalar_fields(row, skip=image_key)))
    return records


def _scalar_fields(row: dict, *, skip: str | None) -> dict[str, str]:
    """The record's text and number fields as strings (what a context template or a routing key may name)."""
    return {str(k): v if isinstance(v, str) else str(v) for k, v in row.items()
            if k != skip and isinstance(v, (str, int, float)) and not isinstance(v, bool)}


def _text(row: dict, key: str, option: str, index: int, table: _Table) -> str:
    if key not in row:
        fields = ", ".join(map(str, row)) or "none"
        raise DataError(f"record {index} of {table.where} has no {key!r} field (fields: {fields}); set data.{option}")
    value = row[key]
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    what = "null" if value is None else f"a {type(value).__name__}"
    raise DataError(f"field {key!r} of record {index} of {table.where} is {what}, expected a string; "
                    f"fix the record or set data.{option}")


def _load_images(value: Any, *, label: str, base_dir: Path | None) -> tuple:
    if value is None:
        return ()
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    return tuple(_open_image(item, label=label, base_dir=base_dir) for item in items)


def _open_image(item: Any, *, label: str, base_dir: Path | None) -> Image.Image:
    if isinstance(item, Image.Image):
        return _rgb(item, label=label, what="image")
    if isinstance(item, dict):
        if item.get("bytes") is not None:
            item = item["bytes"]
        elif item.get("path"):
            item = item["path"]
        else:
            raise DataError(f"{label}: image entry has neither 'bytes' nor 'path' (keys: {', '.join(map(str, item))})")
    if isinstance(item, (bytes, bytearray, memoryview)):
        return _rgb(io.BytesIO(bytes(item)), label=label, what="image bytes")
    if isinstance(item, (str, os.PathLike)):
        text = str(item)
        if text.startswith(("http://", "https://")):
            raise DataError(f"{label}: image URLs are not supported ({text}); download the images and use local paths")
        path = Path(text).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if not path.is_file():
            raise DataError(f"{label}: image file not found: {path}")
        return _rgb(path, label=label, what=f"image file {path}")
    raise DataError(f"{label}: unsupported image value of type {type(item).__name__}; "
                    "use a path, bytes, a {'bytes', 'path'} dict or a PIL image")


def _rgb(source: Any, *, label: str, what: str) -> Image.Image:
    try:
        image = source if isinstance(source, Image.Image) else Image.open(source)
        image.load()
        return image.convert("RGB")
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError (truncated), DecompressionBombError...
        raise DataError(f"{label}: cannot read {what}: {_one_line(e)}") from e
