"""The long fault-injection soak, run by hand: kill -9 a training run at many random moments (taking turns at any
moment after a step, the model load and the first rollout of a restarted process), resume each time, then check
that its final weights are bit-equal to an uninterrupted run's and that metrics.jsonl holds every step exactly
once. Prints each kill and where it landed, then one summary line (the figures in docs/RELIABILITY.md). CI runs
the same procedure with a few kills (tests/reliability/test_kill9.py).

    python3 run.py bench soak_kill9.py [--kills 25] [--steps 120] [--seed 0]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "reliability"))

from kill9 import soak  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=25)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    opts = parser.parse_args()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="soak-kill9-") as root:
        result = soak(Path(root), kills=opts.kills, steps=opts.steps, seed=opts.seed,
                      log=lambda line: print(line, flush=True))
    ok = result["bit_equal"] and result["steps_logged"] == result["expected_steps"]
    where = ", ".join(f"{n} in {phase}" for phase, n in sorted(result["phases"].items(), key=lambda x: -x[1]))
    print(f"\n{result['kills']} kills ({where}), {opts.steps} steps, {time.perf_counter() - start:.0f} s: final "
          f"weights {'bit-equal' if result['bit_equal'] else 'DIFFERENT'} to the uninterrupted run; metrics.jsonl "
          f"{'holds every step once' if result['steps_logged'] == result['expected_steps'] else 'is WRONG'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
