"""``gndpo train`` with phase markers, for the kill -9 soak: ``python phase_marked_train.py MARKS ARGS...``.

The same training run as ``gndpo train ARGS`` in the same process, which also appends a line to the file MARKS as
it enters each phase: ``start`` (imports and config), ``load`` (the student model), ``rollout N`` (the N-th
rollout of this process), ``update``, ``checkpoint``. The soak reads the last line after a kill to say where the
kill landed. Lines go out with unbuffered ``os.write`` calls, so a kill -9 loses none that was written.
"""
from __future__ import annotations

import os
import sys


def main(marks: str, args: list[str]) -> int:
    fd = os.open(marks, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def mark(text: str) -> None:
        os.write(fd, (text + "\n").encode())

    mark("start")
    import gndpo.checkpoint as ckpt
    import gndpo.train as tr
    from gndpo.cli import main as gndpo_main

    def entering(name: str, fn):
        def wrapped(*a, **k):
            mark(name)
            return fn(*a, **k)
        return wrapped

    rollouts = {"n": 0}
    real_build = tr.build_rollout

    def build_rollout(*a, **k):
        backend = real_build(*a, **k)
        real_generate = backend.generate

        def generate(*ga, **gk):
            rollouts["n"] += 1
            mark(f"rollout {rollouts['n']}")
            return real_generate(*ga, **gk)

        backend.generate = generate
        return backend

    tr.load_model = entering("load", tr.load_model)
    tr.build_rollout = build_rollout
    tr.update_policy = entering("update", tr.update_policy)
    ckpt.save_checkpoint = entering("checkpoint", ckpt.save_checkpoint)
    return gndpo_main(["train", *args])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
