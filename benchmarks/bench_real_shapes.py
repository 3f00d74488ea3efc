"""One GNDPO step at the paper's real shapes, on this CPU, in the presets' precision: the resource plan's estimate
next to the measured peak, and the time of each phase.

Student: InternVL3.5-1B's shapes (config.json from gndpo.lab.shapes: Qwen3-0.6B text model with its 151,936-token
vocabulary and untied head, InternViT-300M vision tower on 448 px tiles, 256 image tokens per tile), random
weights. Teacher: the same family and shapes, other random weights, in bfloat16 (as the presets load the 8B).
Precision as the presets: float32 master weights and AdamW state, bfloat16 compute (autocast in one process),
gradient checkpointing; --compute float32 on CPUs without native bf16 matrix products. Short responses (every one exactly --new-tokens long) keep it minutes on a CPU; the
tokenizer is the lab family's small one (prompts use few ids; the random model samples all 151,936).

Two training steps run under torch's profiler, which records every allocation of the CPU allocator: the peak of
the running sum is the peak tensor memory (what the plan estimates; the process's RSS adds the Python heap and
libraries). The second step is the one with AdamW's state alive. The plan is built for the same config with
``data.max_prompt_length`` set to the real prompt length (the plan's worst case is then the run itself).

    python3 run.py bench bench_real_shapes.py [--layers N] [--new-tokens 16]

Needs ~21 GiB of free memory at the full 28 + 24 layers (1.06B parameters at 16 bytes each for masters,
gradients and AdamW, plus the teacher and bf16 copies); --layers N keeps N text and N vision layers (same
per-layer shapes) on a smaller machine, and says so in the output.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=None, help="text and vision layers (default: the real 28/24)")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--compute", default="bfloat16", choices=("bfloat16", "float32"),
                        help="the student's compute dtype (the presets': bfloat16). On a CPU without native bf16 "
                             "matrix products (AVX2 only) torch runs bf16 matmuls in its reference loop, minutes "
                             "each at these shapes: use float32 there (the plan then counts that)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--plan-only", action="store_true", help="print the resource plan of this run and stop "
                        "(seconds; no training, no measurement)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from PIL import Image
    from torch.profiler import ProfilerActivity, profile

    from gndpo.config import load_config
    from gndpo.data.loaders import load_records
    from gndpo.forward import prompt_lengths
    from gndpo.lab.shapes import save_random_model
    from gndpo.models import load_processor
    from gndpo.plan import GIB, build_plan, format_plan, measured_peak_bytes
    from gndpo.train import train

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        student = save_random_model(root / "student", "1b", seed=0, layers=args.layers)
        teacher = save_random_model(root / "teacher", "1b", seed=1, layers=args.layers)
        build_s = time.perf_counter() - t0
        rng = torch.Generator().manual_seed(0)
        with open(root / "train.jsonl", "w") as f:
            for i in range(2):
                pixels = (torch.rand(448, 448, 3, generator=rng) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(root / f"img{i}.png")
                f.write(json.dumps({"id": f"p{i}", "problem": f"What is the area of the triangle? ({i})",
                                    "answer": "6", "images": [str(root / f"img{i}.png")]}) + "\n")
        records = load_records(str(root / "train.jsonl"))
        P = max(prompt_lengths(load_processor(str(student)), records, suffix=None, system_prompt=None))
        R = args.new_tokens
        cfg = load_config(None, [
            f"model.path={student}", f"teacher.path={teacher}", f"data.train={root / 'train.jsonl'}",
            "data.prompt_suffix=none", f"data.max_prompt_length={P}", "data.max_image_tiles=12",
            "model.dtype=float32", f"model.compute_dtype={args.compute}", "model.gradient_checkpointing=true",
            "teacher.dtype=bfloat16", "teacher.micro_batch_size=4", "algorithm.method=gndpo", "rollout.n=2",
            f"rollout.max_new_tokens={R}", f"rollout.min_new_tokens={R}", "rollout.micro_batch_size=4",
            "trainer.prompts_per_step=2", "trainer.micro_batch_size=4", "trainer.total_steps=2", "trainer.device=cpu",
            f"trainer.output_dir={root / 'run'}", "logging.progress=false", "logging.tensorboard=false",
            "checkpoint.save_final=false", "optim.lr=1e-6"])
        plan = build_plan(cfg)
        if args.plan_only:
            print(format_plan(plan))
            print(f"plan: peak ({plan.peak_phase}) {plan.peak_bytes / GIB:.2f} GiB")
            return
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            train(cfg)
        measured = measured_peak_bytes(prof)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        steps = [json.loads(line) for line in open(root / "run" / "metrics.jsonl")]

    shape = "InternVL3.5-1B shapes" + (f" with {args.layers} text and vision layers" if args.layers else "")
    phases = ("rollout", "old_logprobs", "teacher", "advantages", "update")
    print(f"# {shape}: {plan.student.total / 1e9:.3f}B parameters, vocabulary {plan.student.vocab:,}; float32 "
          f"masters computing in {args.compute}; "
          f"{P}-token prompts (256 image tokens), {R}-token responses, 2 prompts x 2 samples; "
          f"{args.threads} threads; models built in {build_s:.0f} s")
    print(format_plan(plan))
    print()
    print("| | GiB |")
    print("|---|---|")
    print(f"| plan: peak ({plan.peak_phase}) | {plan.peak_bytes / GIB:.2f} |")
    print(f"| measured: peak tensor memory (profiler) | {measured / GIB:.2f} |")
    print(f"| plan / measured | {plan.peak_bytes / measured:.3f} |")
    print(f"| measured: peak RSS of the process | {rss / GIB:.2f} |")
    print()
    print("| phase | step 1 (s) | step 2 (s) |")
    print("|---|---|---|")
    for p in phases:
        print(f"| {p} | {steps[0][f'time/{p}']:.1f} | {steps[1][f'time/{p}']:.1f} |")
    print(f"| whole step | {steps[0]['time/step']:.1f} | {steps[1]['time/step']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"plan_bytes": plan.peak_bytes, "plan_phase": plan.peak_phase,
                                               "measured_bytes": measured, "rss_bytes": rss, "layers": args.layers,
                                               "steps": steps}, indent=1))
    gap = abs(plan.peak_bytes / measured - 1)
    if gap > 0.15:
        print(f"plan and measurement differ by {gap:.0%} (> 15 %): a plan bug to fix or explain", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
