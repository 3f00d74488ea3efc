"""What would ``torch.compile`` buy the teacher pass on this CPU? (issue 5). Not a test.

    python3 run.py bench whatif_compile.py        # ~1 minute

Same models and work as ``race_trl.py --full`` (8 prompts x 4 samples x 64 tokens, teacher micro-batch 8,
2 threads): one rollout batch from the student, then the teacher's log-probs of it through
``gndpo.forward.rollout_logprobs`` (packed shared prefixes), eager against the teacher's base model wrapped
in ``torch.compile`` (inductor, static shapes: this work has the same shapes every step). Prints the
compilation time, median seconds per pass and the largest log-prob difference.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import race_trl  # noqa: E402  (shared assets)


def main() -> None:
    import torch

    from gndpo.data.loaders import load_records
    from gndpo.data.templates import PAPER_SUFFIX
    from gndpo.forward import encode_each, rollout_logprobs
    from gndpo.models import load_model
    from gndpo.rollout.base import SamplingParams
    from gndpo.rollout.hf import HFRollout

    torch.set_num_threads(2)
    meta = race_trl.build_assets(race_trl.ROOT / "runs" / "race_trl")
    student, teacher = load_model(meta["student"]), load_model(meta["teacher"])
    records = load_records(meta["prompts"], image_key=None)[:8]
    torch.manual_seed(0)
    rollouts = HFRollout(student.model, student.processor, suffix=PAPER_SUFFIX, micro_batch_size=32).generate(
        records, SamplingParams(n=4, max_new_tokens=64, min_new_tokens=64))
    encoded = encode_each(teacher.processor, records, suffix=PAPER_SUFFIX, system_prompt=None)
    model = teacher.model.eval()

    def score():
        with torch.no_grad():
            return rollout_logprobs(model, teacher.processor, rollouts, micro_batch_size=8, suffix=PAPER_SUFFIX,
                                    system_prompt=None, encoded=encoded)

    def timed(reps=5):
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            score()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    reference = score()
    eager = timed()
    model.model.forward = torch.compile(model.model.forward, dynamic=False)
    t0 = time.perf_counter()
    compiled_out = score()
    compile_s = time.perf_counter() - t0
    compiled = timed()
    print(f"teacher pass, eager: {eager:.3f} s; torch.compile: {compiled:.3f} s ({eager / compiled:.2f}x) after "
          f"{compile_s:.1f} s of compilation; max |log-prob diff| {float((compiled_out - reference).abs().max()):.1e}")


if __name__ == "__main__":
    main()
