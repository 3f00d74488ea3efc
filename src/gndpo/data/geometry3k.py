"""Geometry3K as published in ``hiyouga/geometry3k``: the paper's multimodal reasoning set (arXiv 2606.09091).

Each row has ``images`` (a list holding the diagram), ``problem`` (text with an ``<image>`` tag where the
diagram goes) and ``answer`` (a short LaTeX string such as ``2\\sqrt{3}``). The answer is kept verbatim as
the reference for the math reward; ``build_messages`` drops the ``<image>`` tags and puts one image item per
image first in the user turn.
"""
from __future__ import annotations

import os

from gndpo.data.loaders import load_records
from gndpo.data.records import PromptRecord
from gndpo.errors import DataError

GEOMETRY3K_ID = "hiyouga/geometry3k"
GEOMETRY3K_KEYS = {"prompt_key": "problem", "answer_key": "answer", "image_key": "images"}


def load_geometry3k(
    source: str | os.PathLike | None = None,
    *,
    split: str = "train",
    id_key: str | None = None,
    limit: int | None = None,
) -> list[PromptRecord]:
    """Geometry3K records from the hub (default ``hiyouga/geometry3k``) or a local copy in any supported layout."""
    source = source if source is not None and str(source).strip() else GEOMETRY3K_ID
    records = load_records(source, split=split, format="auto", id_key=id_key, limit=limit, **GEOMETRY3K_KEYS)
    for index, record in enumerate(records):
        tags = record.prompt.count("<image>")
        if not record.images:
            raise DataError(f"record {index} (id {record.id!r}) of {source} has no image; Geometry3K rows need "
                            "an 'images' list: is this a Geometry3K copy? (else use data.format=auto)")
        if tags and tags != len(record.images):
            raise DataError(f"record {index} (id {record.id!r}) of {source} has {tags} <image> tags but "
                            f"{len(record.images)} images; fix the row so they match")
    return records
