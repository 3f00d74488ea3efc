"""Every case of the bad-input catalogue (bad_inputs.py, docs/RELIABILITY.md): one line, the cause named, exit 2,
nothing written that a later run would mistake for results."""
import json
import os
import re
from pathlib import Path

import pytest
from bad_inputs import CASES

from gndpo.cli import main

DOC = Path(__file__).resolve().parents[2] / "docs" / "RELIABILITY.md"


def documented_messages() -> dict[str, str]:
    """The catalogue table of docs/RELIABILITY.md: case id -> the message it shows."""
    rows = re.findall(r"^\| \d+ \| \w+ \| `([\w-]+)` \| (.*) \|$", DOC.read_text(encoding="utf-8"), re.M)
    return dict(rows)


DOCUMENTED = documented_messages()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line(case, tiny_dir, tmp_path, capsys):
    argv = case.build(tiny_dir, tmp_path)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == case.code, err
    assert len(err) == 1, err
    assert case.expect in err[0], err[0]
    assert not list(tmp_path.glob("run/checkpoints/step-*"))
    message = err[0].replace(str(tmp_path), "DIR").replace(str(tiny_dir), "TINY")
    if os.environ.get("GNDPO_CATALOGUE"):  # the messages for docs/RELIABILITY.md
        with open(os.environ["GNDPO_CATALOGUE"], "a") as f:
            f.write(json.dumps({"id": case.id, "area": case.area, "message": message}) + "\n")
    # the documented message is the one a user sees (regenerate the table with GNDPO_CATALOGUE=FILE)
    assert DOCUMENTED.get(case.id) == message.replace("|", "\\|"), f"docs/RELIABILITY.md is stale for {case.id}"


def test_the_catalogue_is_large_and_documented():
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)
    assert list(DOCUMENTED) == [c.id for c in CASES]  # every case in the docs' table, in order


@pytest.mark.parametrize("mode", ["P", "LA", "RGBA", "CMYK", "I;16", "1", "L", "F"])
def test_unusual_image_modes_and_unicode_paths_are_accepted(mode, tiny_dir, tmp_path):
    """Not errors: every PIL mode a PNG/TIFF can hold, and a unicode directory name, load and encode."""
    from PIL import Image

    from gndpo.data.loaders import load_records
    from gndpo.forward import encode_each
    from gndpo.models import load_processor

    root = tmp_path / "données ✓ 数据"
    root.mkdir()
    suffix = ".tiff" if mode in ("CMYK", "F", "I;16") else ".png"
    Image.new(mode, (40, 24)).save(root / f"im{suffix}")
    (root / "train.jsonl").write_text(json.dumps({"id": "a", "problem": "Wie viele? ✓", "answer": "1",
                                                  "images": [f"im{suffix}"]}, ensure_ascii=False) + "\n",
                                      encoding="utf-8")
    records = load_records(str(root / "train.jsonl"))
    processor = load_processor(str(tiny_dir / "vlm_student"))
    encoded = encode_each(processor, records, suffix=None, system_prompt=None)
    assert len(encoded) == 1 and "pixel_values" in encoded[0]
