"""What a privileged context does to the lab student as its own teacher (why `gndpo lab --self-distill` turns out
as docs/LAB.md reports).

    python3 run.py bench lab_self_context.py [--items 1000] [--prompts 128]

1. Greedy test accuracy of the shipped student without the context and with `Reference answer: {answer}` in the
   system prompt or before the question (after the image): a self teacher is this model, scoring.
2. gndpo.lab.teachers.context_preference: the token reward clamp(log p(o | x, context) - log p(o | x), -5, 5) the
   self teacher gives the student's own samples (n = 4 per prompt, T = 1), right and wrong ones apart.

Greedy decoding and seeded sampling: the same machine gives the same numbers.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1000, help="test items for the greedy accuracy")
    parser.add_argument("--prompts", type=int, default=128, help="train prompts for the reward (4 samples each)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    from gndpo.data.loaders import load_records
    from gndpo.evaluate import greedy_accuracy
    from gndpo.lab.run import assets_dir
    from gndpo.lab.task import LAB_MAX_NEW_TOKENS, LAB_SUFFIX, write_task
    from gndpo.lab.teachers import SELF_CONTEXT, context_preference
    from gndpo.models import load_model
    from gndpo.teacher.context import privileged

    torch.set_num_threads(args.threads)
    student = load_model(str(assets_dir() / "student"), device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        write_task(data, seed=0, n_train=8000, n_test=1000)  # the lab's own split
        test = load_records(str(data / "test.jsonl"), split="test")[:args.items]
        print(f"greedy test accuracy of the lab student on {len(test)} items, context {SELF_CONTEXT!r}\n")
        print("| context | accuracy | well-formed |\n|---|---|---|")
        for label, at in (("none", None), ("system prompt", "system"), ("before the question", "prompt")):
            records = test if at is None else [privileged(r, SELF_CONTEXT, at) for r in test]
            result = greedy_accuracy(student.model, student.processor, records, suffix=LAB_SUFFIX,
                                     max_new_tokens=LAB_MAX_NEW_TOKENS, progress=False)
            print(f"| {label} | {100 * result['accuracy']:.1f} % | {100 * result['format_rate']:.1f} % |")
        pref = context_preference(assets_dir() / "student", data, prompts=args.prompts)
    print(f"\nreward the self teacher gives the student's own samples ({pref['responses']} responses, "
          f"{pref['right']} right)\n")
    print("| context | mean reward | right responses | wrong responses | clamped |\n|---|---|---|---|---|")
    for label, at in (("system prompt", "system"), ("before the question", "prompt")):
        p = pref[at]
        print(f"| {label} | {p['reward_mean']:.3f} | {p['right']:.3f} | {p['wrong']:.3f} | "
              f"{100 * p['clamp_frac']:.1f} % |")


if __name__ == "__main__":
    main()
