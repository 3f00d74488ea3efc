"""What some pages take as given, made in the current directory for the docs tier (markers' ``setup=``).

    python $DOCS_TIER/setup_demo.py pair               models/qwen3_{student,teacher} and prompts.jsonl, as on
                                                       the first-run page
    python $DOCS_TIER/setup_demo.py runs DIR:METHOD... tiny 2-step runs (rollouts saved) of that pair, e.g.
                                                       runs/opd:opd runs/gndpo:gndpo
    python $DOCS_TIER/setup_demo.py shapes             config-only InternVL3.5 directories (resource plan)
    python $DOCS_TIER/setup_demo.py task DIR           the lab task, 64 train and 16 test items
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def pair() -> None:
    from gndpo.lab.families import save_pair

    if not Path("models/qwen3_student").exists():
        save_pair("qwen3", "models")
    Path("prompts.jsonl").write_text("".join(
        json.dumps({"problem": f"What is {a} plus {b}?", "answer": str(a + b)}) + "\n"
        for a in range(8) for b in range(4)))


def runs(specs: list[str]) -> None:
    pair()
    for spec in specs:
        out, _, method = spec.partition(":")
        subprocess.run([sys.executable, "-m", "gndpo.cli", "train", "model.path=models/qwen3_student",
                        "teacher.path=models/qwen3_teacher", "data.train=prompts.jsonl", "data.image_key=null",
                        f"algorithm.method={method or 'gndpo'}", "rollout.n=4", "rollout.max_new_tokens=16",
                        "trainer.prompts_per_step=4", "trainer.total_steps=2", f"trainer.output_dir={out}"],
                       check=True)


def main(argv: list[str]) -> None:
    what, rest = argv[0], argv[1:]
    if what == "pair":
        pair()
    elif what == "runs":
        runs(rest)
    elif what == "shapes":
        from gndpo.lab.shapes import write_config_dirs

        write_config_dirs(".")
    elif what == "task":
        from gndpo.lab.task import write_task

        write_task(rest[0], n_train=64, n_test=16)
    else:
        raise SystemExit(f"unknown setup {what!r}; see {__file__}")


if __name__ == "__main__":
    main(sys.argv[1:])
