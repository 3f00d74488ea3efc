"""Benchmarks gndpo scores itself against the served model: Geometry3K's test split, the paper's training set.

The prompt is the training prompt (``gndpo.data.templates.build_messages``: the diagram first, the problem, the
paper's ``<think>``/``\\boxed{}`` suffix), sent to the OpenAI-compatible server with the suite's decoding; the
answer is graded by the training reward (last ``\\boxed{}`` + math-verify). Items are written to a JSON-lines
file as they finish, so an interrupted run asks only for the rest.
"""
from __future__ import annotations

import base64
import io
import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from gndpo.data.records import PromptRecord
from gndpo.data.templates import PAPER_SUFFIX, build_messages
from gndpo.errors import GndpoError
from gndpo.rewards.math import math_reward


def openai_messages(record: PromptRecord, suffix: str | None = PAPER_SUFFIX) -> list[dict]:
    """The training prompt as OpenAI chat messages, each image a base64 PNG ``image_url`` part."""
    images = iter(record.images)
    messages = build_messages(record, suffix=suffix)
    for message in messages:
        if isinstance(message["content"], list):
            message["content"] = [_image_part(next(images)) if part["type"] == "image" else part
                                  for part in message["content"]]
    return messages


def _image_part(image) -> dict:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(buf.getvalue())
                                               .decode()}}


def chat(api_base: str, key: str | None, body: dict, *, timeout: float, retries: int = 3) -> str:
    """One chat completion; connection errors and 5xx are retried with backoff, a 4xx is a one-line error."""
    data = json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    for attempt in range(retries + 1):
        try:
            with urllib.request.urlopen(urllib.request.Request(api_base, data=data, headers=headers),
                                        timeout=timeout) as r:
                return json.load(r)["choices"][0]["message"]["content"] or ""
        except urllib.error.HTTPError as exc:
            if exc.code < 500 or attempt == retries:
                detail = exc.read().decode(errors="replace")[:200].replace("\n", " ")
                raise GndpoError(f"the model server answered HTTP {exc.code}: {detail}") from None
        except (OSError, ValueError, KeyError) as exc:
            if attempt == retries:
                raise GndpoError(f"the model server failed {retries + 1} times: {exc}") from None
        time.sleep(min(2 ** attempt, 10))
    raise AssertionError("unreachable")


def evaluate_records(records: list[PromptRecord], *, api_base: str, key: str | None, model: str, decoding: dict,
                     items_file: Path, nproc: int = 8, timeout: float = 3600,
                     log: Callable[[str], None] = print) -> dict:
    """Accuracy of the served model on ``records`` (percent), resuming from ``items_file``."""
    done = {}
    if items_file.exists():
        for line in items_file.read_text().splitlines():
            if line.endswith("}"):
                row = json.loads(line)
                done[row["id"]] = row
    todo = [r for r in records if r.id not in done]

    def one(record: PromptRecord) -> dict:
        body = {"model": model, "messages": openai_messages(record), "temperature": decoding["temperature"],
                "top_p": decoding["top_p"], "max_tokens": decoding["max_new_tokens"], "seed": decoding["seed"]}
        response = chat(api_base, key, body, timeout=timeout)
        return {"id": record.id, "answer": record.answer, "response": response,
                "correct": math_reward(response, record.answer) >= 1.0}

    items_file.parent.mkdir(parents=True, exist_ok=True)
    with open(items_file, "a", encoding="utf-8") as f, ThreadPoolExecutor(max(nproc, 1)) as pool:
        for i, row in enumerate(pool.map(one, todo), 1):
            f.write(json.dumps(row) + "\n")
            f.flush()
            done[row["id"]] = row
            if i % 100 == 0:
                log(f"  {i}/{len(todo)} items")
    rows = [done[r.id] for r in records]
    return {"score": 100.0 * sum(r["correct"] for r in rows) / max(len(rows), 1), "n_items": len(rows),
            "rule_only": False, "predictions": items_file.name}
