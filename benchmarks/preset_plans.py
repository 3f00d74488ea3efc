"""The resource plan of each paper preset (configs/paper/*.yaml) on one node of 8 x 80 GB GPUs, as shipped: the peak
memory per GPU of every phase, from `gndpo train PRESET --dry-run --world-size 8 --shard fsdp --gpu-memory 80GB`.

The models are config-only directories of InternVL3.5 1B/2B/4B and the 8B teacher written from their published
model cards (gndpo.lab.shapes): no download, no weights. Prints a markdown table (GiB per GPU) for docs/SCALING.md.

    python3 run.py bench preset_plans.py [--gpu-memory 80GB] [--world-size 8]
"""
import argparse
import tempfile
from pathlib import Path

from gndpo.config import load_config
from gndpo.lab.shapes import write_config_dirs
from gndpo.plan import GIB, PHASES, build_plan, parse_memory

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu-memory", default="80GB")
    parser.add_argument("--world-size", type=int, default=8)
    args = parser.parse_args()
    gpu = parse_memory(args.gpu_memory)
    with tempfile.TemporaryDirectory() as tmp:
        dirs = write_config_dirs(tmp)
        print(f"| preset | {' | '.join(PHASES)} | peak (phase) | fits {args.gpu_memory} |")
        print("|---" * (len(PHASES) + 3) + "|")
        for size in ("1b", "2b", "4b"):
            for method in ("gspo", "opd", "gndpo"):
                name = f"internvl3_5-{size}-{method}"
                cfg = load_config(ROOT / "configs" / "paper" / f"{name}.yaml",
                                  [f"model.path={dirs[size]}", f"teacher.path={dirs['8b']}"])
                plan = build_plan(cfg, world_size=args.world_size, shard="fsdp", shard_teacher=cfg.dist.shard_teacher,
                                  gpu_memory=gpu)
                cells = [f"{plan.phase_bytes[p] / GIB:.2f}" if p in plan.phase_bytes else "-" for p in PHASES]
                fits = "yes" if plan.peak_bytes <= gpu else "**no**"
                print(f"| {name} | {' | '.join(cells)} | {plan.peak_bytes / GIB:.2f} ({plan.peak_phase}) | {fits} |")


if __name__ == "__main__":
    main()
