"""``gndpo train | eval | lab | plot | export | serve-teacher``: the command line.

User mistakes (bad config, missing data, incompatible models) print one ``error:`` line and exit 2.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from gndpo.errors import GndpoError

_TRAIN_EPILOG = """\
overrides are dotted key=value pairs applied after CONFIG, e.g.
  gndpo train configs/paper/internvl3_5-1b-gndpo.yaml trainer.total_steps=10 optim.lr=2e-6

config keys (defaults = the paper's Table 2):
"""


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="gndpo: %(message)s", stream=sys.stderr)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()  # weight loading/saving bars would bury ours
    except ImportError:  # pragma: no cover - transformers is a hard dependency
        pass


def _train(args: argparse.Namespace) -> int:
    from gndpo.config import load_config, to_yaml

    # `resume=true` is accepted as shorthand for trainer.resume=true.
    overrides = ["trainer." + o if o.split("=", 1)[0] == "resume" else o for o in args.overrides]
    if args.resume:
        overrides.append("trainer.resume=true")
    cfg = load_config(args.config, overrides)
    if args.dry_run:
        from gndpo.errors import ModelError
        from gndpo.plan import build_plan, default_world_size, format_plan, parse_memory

        gpu_memory = None if args.gpu_memory is None else parse_memory(args.gpu_memory)
        world_size = default_world_size() if args.world_size is None else args.world_size
        print(to_yaml(cfg), end="")
        print("config is valid (dry run: no model loaded)", file=sys.stderr)
        # The plan is printed as YAML comments, so stdout stays the resolved config (`--dry-run > run.yaml`).
        try:
            plan = build_plan(cfg, world_size=world_size, shard=args.shard or "none", shard_teacher=args.shard_teacher,
                              gpu_memory=gpu_memory)
        except ModelError as exc:
            if gpu_memory is not None:  # asked to check the memory, and cannot: an error, not a silent pass
                raise
            print(f"# plan: unavailable ({exc})")
            return 0
        print("\n".join(f"# {line}".rstrip() for line in format_plan(plan).splitlines()))
        for warning in plan.warnings:  # a warning, not an error: the estimate is a worst case
            print(f"warning: {warning}", file=sys.stderr)
        return 0
    if args.gpu_memory is not None or args.world_size is not None or args.shard is not None or args.shard_teacher:
        from gndpo.errors import ConfigError

        raise ConfigError("--gpu-memory, --world-size, --shard and --shard-teacher size the resource plan; "
                          "add --dry-run")
    from gndpo.dist import init_from_env, shutdown
    from gndpo.train import train

    dist = init_from_env(cfg.trainer.dist_timeout)  # torchrun: join the process group; else one process
    try:
        metrics = train(cfg, dist=dist)
    finally:
        shutdown()
    if dist.is_main:
        print(f"done: {cfg.trainer.total_steps} steps, run directory {cfg.trainer.output_dir}; "
              f"final loss {metrics.get('loss', float('nan')):.4g}, accuracy {metrics.get('accuracy', float('nan')):.3f}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from gndpo.report.plot import plot_run_dirs

    out = Path(args.out) if args.out else Path(args.runs[0]) / "dynamics.png"
    path = plot_run_dirs(args.runs, out, labels=args.labels, aggregate_seeds=args.aggregate_seeds)
    print(f"wrote {path}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import json

    from gndpo.data.loaders import load_records
    from gndpo.evaluate import greedy_accuracy
    from gndpo.models import load_model, resolve_device
    from gndpo.train import resolve_suffix

    records = load_records(args.data, split=args.split, format=args.format, prompt_key=args.prompt_key,
                           answer_key=args.answer_key, image_key=None if args.image_key == "null" else args.image_key,
                           limit=args.limit)
    loaded = load_model(args.model, device=resolve_device(args.device))
    result = greedy_accuracy(loaded.model, loaded.processor, records, batch_size=args.batch_size,
                             max_new_tokens=args.max_new_tokens, suffix=resolve_suffix(args.suffix))
    if args.out:
        with open(args.out, "w") as f:
            for rec, text, ok in zip(records, result["responses"], result["correct"]):
                f.write(json.dumps({"id": rec.id, "answer": rec.answer, "response": text, "correct": ok}) + "\n")
    print(f"accuracy {100 * result['accuracy']:.2f}% on {result['n']} items ({args.data}, split {args.split}); "
          f"format {100 * result['format_rate']:.1f}%, mean length {result['mean_response_length']:.1f} tokens, "
          f"truncated {100 * result['truncated_rate']:.1f}%")
    return 0


def _export(args: argparse.Namespace) -> int:
    from gndpo.checkpoint import export_checkpoint

    out, what = export_checkpoint(args.run_dir, step=args.step, out=args.out, merge=args.merge)
    print(f"wrote {out}: {what}")
    return 0


def _serve_teacher(args: argparse.Namespace) -> int:
    from gndpo.serve import API_KEY_ENV, serve_teacher

    if args.api_key:
        print(f"warning: --api-key is visible to other users of this machine (ps, /proc); prefer "
              f"export {API_KEY_ENV}=...", file=sys.stderr)
    serve_teacher(args.model, host=args.host, port=args.port, api_key=args.api_key or os.environ.get(API_KEY_ENV),
                  dtype=args.dtype, max_model_len=args.max_model_len,
                  gpu_memory_utilization=args.gpu_memory_utilization, max_images=args.max_images,
                  announce=lambda line: print(line, flush=True))
    return 0


def _lab(args: argparse.Namespace) -> int:
    from gndpo.lab.run import lab_main

    return lab_main(args)


def build_parser() -> argparse.ArgumentParser:
    from gndpo import __version__

    parser = argparse.ArgumentParser(prog="gndpo", description="On-policy distillation with GNDPO (arXiv 2606.09091).")
    parser.add_argument("--version", action="version", version=f"gndpo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    from gndpo.config import help_text

    p = sub.add_parser("train", help="train a student (gndpo, opd or gspo)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_TRAIN_EPILOG + help_text())
    p.add_argument("config", nargs="?", help="YAML config file (optional: overrides alone are enough)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.add_argument("--dry-run", action="store_true", help="validate and print the resolved config and its resource "
                   "plan (parameter counts, memory per GPU, from config.json alone); load no weights")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in trainer.output_dir")
    p.add_argument("--gpu-memory", metavar="SIZE", help="with --dry-run: warn when the estimated peak per GPU exceeds "
                   "SIZE (80GB, 80GiB, 141GB; a bare number is GiB); an unreadable model config is then an error")
    p.add_argument("--world-size", type=int, metavar="N", help="with --dry-run: GPUs the plan assumes "
                   "(default: $WORLD_SIZE or 1)")
    p.add_argument("--shard", choices=("none", "fsdp"), help="with --dry-run: none (default) = each GPU holds the "
                   "whole student; fsdp = its weights, gradients and optimizer state split across N GPUs (planned)")
    p.add_argument("--shard-teacher", action="store_true", help="with --dry-run --shard fsdp: split the teacher's "
                   "weights too")
    p.set_defaults(func=_train)

    p = sub.add_parser("plot", help="training-dynamics PNG (loss, grad_norm, entropy) of one or more runs")
    p.add_argument("runs", nargs="+", help="run directories (each with metrics.jsonl)")
    p.add_argument("--out", help="output PNG (default: RUN/dynamics.png of the first run)")
    p.add_argument("--labels", nargs="+", help="legend labels, one per run")
    p.add_argument("--aggregate-seeds", action="store_true", help="average runs sharing a label, with a min-max band")
    p.set_defaults(func=_plot)

    p = sub.add_parser("eval", help="greedy accuracy of a model on a dataset")
    p.add_argument("model", help="model directory or Hugging Face id (e.g. a checkpoint of a run)")
    p.add_argument("data", help="dataset file, directory or hub id (same adapters as training)")
    p.add_argument("--split", default="test")
    p.add_argument("--format", default="auto")
    p.add_argument("--prompt-key", default="problem")
    p.add_argument("--answer-key", default="answer")
    p.add_argument("--image-key", default="images")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N records")
    p.add_argument("--suffix", default="paper", help="'paper', 'none' or literal text appended to each problem")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="write per-item results as JSON lines here")
    p.set_defaults(func=_eval)

    p = sub.add_parser("lab", help="the offline lab: GSPO vs OPD vs GNDPO on a synthetic multimodal task")
    p.add_argument("action", nargs="?", default="run", choices=("run", "bootstrap"),
                   help="run (default): the comparison; bootstrap: retrain the shipped teacher/student")
    p.add_argument("--out", default="lab_out", help="output directory")
    p.add_argument("--seeds", type=int, default=None, help="seeds per method")
    p.add_argument("--steps", type=int, default=None, help="training steps per run")
    p.add_argument("--methods", nargs="+", default=None, help="subset of gspo opd gndpo")
    p.add_argument("--quick", action="store_true", help="smoke version (CI): few steps, small eval")
    p.add_argument("--stress", action="store_true", help="also run the stress setting (OPD vs GNDPO at high temperature)")
    p.add_argument("--jobs", type=int, default=None, metavar="N", help="worker processes for the runs and "
                   "evaluations, one torch thread each (default: one per CPU core); 1 = in sequence, in this process")
    p.add_argument("--seed", type=int, default=0, help="bootstrap: task/model seed")
    p.set_defaults(func=_lab)

    p = sub.add_parser("export", help="a run's checkpoint as a standalone Hugging Face model directory",
                       description="Write a checkpoint of a run as a save_pretrained directory with its processor. "
                                   "LoRA runs: the adapters (PEFT layout), or with --merge the base model with the "
                                   "adapters merged in (loads without PEFT). Full fine-tuning runs: the model.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (trainer.output_dir)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest complete one)")
    p.add_argument("--out", default=None, help="output directory, must not exist (default: RUN_DIR/export/step-N, "
                                               "or step-N-merged with --merge)")
    p.add_argument("--merge", action="store_true", help="merge LoRA adapters into the base model (a full "
                                                         "fine-tuning run's export is a full model either way)")
    p.set_defaults(func=_export)

    p = sub.add_parser("serve-teacher", help="serve a teacher's log-probs over HTTP (vLLM engine) for "
                       "teacher.backend=server", description="Score student tokens with MODEL on this machine's "
                       "GPUs for trainers elsewhere (teacher.backend=server teacher.url=http://HOST:PORT). Loopback "
                       "only unless an API key is set; the key comes from $GNDPO_TEACHER_API_KEY (or --api-key).")
    p.add_argument("model", metavar="MODEL", help="teacher: a local save_pretrained directory or a Hugging Face id "
                                                  "(safetensors weights)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; any other needs "
                                                       "an API key)")
    p.add_argument("--port", type=int, default=8100, help="port (default 8100; 0 = any free port, printed)")
    p.add_argument("--api-key", default=None, help="required bearer key; prefer $GNDPO_TEACHER_API_KEY, since "
                                                   "command lines are visible to other users")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="engine dtype (auto: bfloat16 on a GPU, float32 on a CPU)")
    p.add_argument("--max-model-len", type=int, default=None, help="longest prompt + response in tokens, images "
                                                                  "expanded (default: the model's own limit)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="fraction of GPU memory the engine "
                                                                             "may take (default 0.9)")
    p.add_argument("--max-images", type=int, default=None, help="most images in one prompt (default 4 for "
                                                               "vision-language models, 0 for text models)")
    p.set_defaults(func=_serve_teacher)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        # Flags may sit anywhere among the overrides, a flag's value right after it; the config file is optional.
        flags, positional, rest = [], [], iter(argv[1:])
        for a in rest:
            (flags if a.startswith("-") else positional).append(a)
            value = next(rest, None) if a in ("--gpu-memory", "--world-size", "--shard") else None
            if value is not None:
                flags.append(value)
        if positional and "=" in positional[0]:
            positional.insert(0, "")
        argv = ["train", *flags, *positional]
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "config", None) == "":
        args.config = None
    _setup_logging()
    try:
        return int(args.func(args) or 0)
    except GndpoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
