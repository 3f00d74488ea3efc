"""The lab's synthetic multimodal reasoning task: read two digits from an image, then do two arithmetic steps.

Each item is a 32x32 image split into a 2x2 grid; two of the four cells hold a seven-segment digit, drawn
at a fixed place: the top-left 8x8 vision patch of its cell (position or colour jitter, or digits that
straddle patches, make a tiny vision tower learn far slower). The question names an operation chain,
"Digit sum times k." or "Digit product plus k." (short: every character is a token of the tiny models).
The digits are only in the image and the operation only in the text, so the answer needs both, plus two
steps of arithmetic. Targets follow the paper's format (arXiv 2606.09091, App. A.2),
``<think>4+7=11,11*3=33</think> \\boxed{33}``, with the digits taken in reading order.

The item space is finite (100 digit pairs x 6 cell pairs x 2 operations x 8 multipliers = 9,600), so the
splits come from one seeded permutation of it: the test set is its head, the train set what follows. They
are disjoint by construction and the test set does not depend on ``n_train``.
"""
from __future__ import annotations

import argparse
import io
import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

# The lab's prompt suffix: none. The paper's A.2 suffix (~230 characters) would triple the prompt of a
# char-level tiny model; the question alone says what to compute, and the SFT targets teach the format.
LAB_SUFFIX = ""
# The longest target is 24 tokens with EOS (`<think>`, `</think>` and `\boxed{` are single tokens).
LAB_MAX_NEW_TOKENS = 32

IMAGE_SIZE = 32
CELL = IMAGE_SIZE // 2
MULTIPLIERS = tuple(range(2, 10))
OPERATIONS = ("sum_times", "prod_plus")
CELL_PAIRS = tuple(itertools.combinations(range(4), 2))  # cells in reading order: 0 1 / 2 3
# The task's two halves, one per operation: the two-teacher lab run (``gndpo lab --teachers``) routes each item to
# the specialist of its half.
SUBTASKS = {"sum": "sum_times", "prod": "prod_plus"}

# Bold seven-segment digits filling one 8x8 vision patch: segment -> (x0, y0, x1, y1), inclusive pixel box.
# A digit inside a single patch is linearly readable from the patch embedding, so even a vision tower that
# barely trains passes it on; digits straddling patches made tiny models read far more slowly.
_SEGMENTS = {
    "a": (1, 0, 6, 1), "b": (5, 0, 6, 4), "c": (5, 3, 6, 7), "d": (1, 6, 6, 7),
    "e": (1, 3, 2, 7), "f": (1, 0, 2, 4), "g": (1, 3, 6, 4),
}
_DIGIT_SEGMENTS = (
    "abcdef", "bc", "abdeg", "abcdg", "bcfg", "acdfg", "acdefg", "abc", "abcdefg", "abcdfg",
)


@dataclass(frozen=True)
class Item:
    """One task instance: digits ``a`` and ``b`` (reading order) in ``cells``, then ``operation`` with ``k``."""

    a: int
    b: int
    cells: tuple[int, int]
    operation: str
    k: int

    @property
    def image_name(self) -> str:
        return f"d{self.a}{self.b}_c{self.cells[0]}{self.cells[1]}.png"

    def problem(self) -> str:
        if self.operation == "sum_times":
            return f"Digit sum times {self.k}."
        return f"Digit product plus {self.k}."

    def answer(self) -> int:
        if self.operation == "sum_times":
            return (self.a + self.b) * self.k
        return self.a * self.b + self.k

    def solution(self) -> str:
        if self.operation == "sum_times":
            s = self.a + self.b
            steps = f"{self.a}+{self.b}={s},{s}*{self.k}={s * self.k}"
        else:
            p = self.a * self.b
            steps = f"{self.a}*{self.b}={p},{p}+{self.k}={p + self.k}"
        return f"<think>{steps}</think> \\boxed{{{self.answer()}}}"


def subtask(problem: str) -> str:
    """The half of the task (a key of SUBTASKS) a question belongs to, read from its text."""
    for name, prefix in (("sum", "Digit sum times"), ("prod", "Digit product plus")):
        if problem.startswith(prefix):
            return name
    raise ValueError(f"not a lab question: {problem!r}")


def all_items() -> list[Item]:
    """Every item of the task, in a fixed canonical order."""
    return [
        Item(a, b, cells, op, k)
        for a in range(10) for b in range(10) for cells in CELL_PAIRS for op in OPERATIONS for k in MULTIPLIERS
    ]


def draw_image(item: Item) -> Image.Image:
    """Black seven-segment digits on white, one per chosen cell, in the cell's top-left vision patch."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for digit, cell in zip((item.a, item.b), item.cells):
        ox, oy = (cell % 2) * CELL, (cell // 2) * CELL
        for segment in _DIGIT_SEGMENTS[digit]:
            x0, y0, x1, y1 = _SEGMENTS[segment]
            draw.rectangle((ox + x0, oy + y0, ox + x1, oy + y1), fill=(0, 0, 0))
    return image


def split_items(*, seed: int, n_train: int, n_test: int) -> tuple[list[Item], list[Item]]:
    """Disjoint (train, test) lists from one seeded permutation of the item space."""
    items = all_items()
    if n_train + n_test > len(items):
        raise ValueError(f"n_train + n_test = {n_train + n_test} exceeds the {len(items)} distinct items")
    random.Random(seed).shuffle(items)
    return items[n_test:n_test + n_train], items[:n_test]


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=9)
    return buffer.getvalue()


def write_task(out_dir: str | Path, *, seed: int = 0, n_train: int = 8000, n_test: int = 1000) -> dict:
    """Write ``train.jsonl``, ``test.jsonl`` and ``images/*.png`` under ``out_dir``; same seed, same bytes.

    Rows: ``id``, ``problem`` (question text), ``answer`` (string), ``images`` (paths relative to the
    jsonl file), ``solution`` (the full SFT target). Items that show the same picture share one PNG.
    Returns the task parameters, for provenance records.
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    train, test = split_items(seed=seed, n_train=n_train, n_test=n_test)
    written: set[str] = set()
    for split, items in (("train", train), ("test", test)):
        lines = []
        for i, item in enumerate(items):
            if item.image_name not in written:
                (out / "images" / item.image_name).write_bytes(_png_bytes(draw_image(item)))
                written.add(item.image_name)
            row = {
                "id": f"lab-{split}-{i:05d}",
                "problem": item.problem(),
                "answer": str(item.answer()),
                "images": [f"images/{item.image_name}"],
                "solution": item.solution(),
            }
            lines.append(json.dumps(row, sort_keys=True))
        (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return task_params(seed=seed, n_train=n_train, n_test=n_test)


def task_params(*, seed: int, n_train: int, n_test: int) -> dict:
    return {
        "name": "grid-digits-arith", "seed": seed, "n_train": n_train, "n_test": n_test,
        "image_size": IMAGE_SIZE, "operations": list(OPERATIONS), "multipliers": list(MULTIPLIERS),
        "suffix": LAB_SUFFIX,
    }


def read_solutions(jsonl_path: str | Path) -> dict[str, str]:
    """``id -> solution`` of a task file: the SFT targets, which prompt records do not carry."""
    with open(jsonl_path, encoding="utf-8") as f:
        return {row["id"]: row["solution"] for row in map(json.loads, filter(str.strip, f))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the gndpo lab task (jsonl + PNG images).")
    parser.add_argument("out", help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=8000)
    parser.add_argument("--n-test", type=int, default=1000)
    args = parser.parse_args(argv)
    write_task(args.out, seed=args.seed, n_train=args.n_train, n_test=args.n_test)


if __name__ == "__main__":
    main()
