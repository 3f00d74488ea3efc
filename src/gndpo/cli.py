"""``gndpo train | eval | lab | plot | inspect | export | serve-teacher``: the command line.

User mistakes (bad config, missing data, incompatible models) print one ``error:`` line and exit 2.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from gndpo.errors import GndpoError, Interrupted

_TRAIN_EPILOG = """\
overrides are dotted key=value pairs applied after CONFIG, e.g.
  gndpo train configs/paper/internvl3_5-1b-gndpo.yaml trainer.total_steps=10 optim.lr=2e-6
continue a run from its own stored config (RUN_DIR/run_config.yaml), with more steps:
  gndpo train --resume runs/gndpo trainer.total_steps=100

config keys (defaults = the paper's Table 2):
"""


class _Parser(argparse.ArgumentParser):
    """argparse with its misuse errors on one line (the usage block is one --help away)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


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
    config_file, overrides, resumed = _resume_source(args.config, overrides, resume=args.resume)
    cfg = load_config(config_file, overrides)
    if resumed is not None:
        _check_resume_overrides(resumed, cfg)
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


def _resume_source(config: str | None, overrides: list[str], *, resume: bool):
    """The config file and overrides a ``gndpo train`` command means, and the run directory it resumes from its own
    stored config (None: a config file or overrides alone, as given).

    ``--resume RUN_DIR [key=value ...]``, ``RUN_DIR/run_config.yaml --resume`` and ``--resume
    trainer.output_dir=RUN_DIR`` (no config file) continue a run from the ``run_config.yaml`` it stored, in that
    directory wherever it was started from; the overrides change only what a resume may change."""
    from gndpo.checkpoint import RUN_CONFIG
    from gndpo.errors import ConfigError

    given = {o.split("=", 1)[0]: o.split("=", 1)[1] for o in overrides if "=" in o}
    resume = resume or given.get("trainer.resume", "").lower() == "true"
    if config is not None and resume and not Path(config).exists() and \
            Path(config).suffix.lower() not in (".yaml", ".yml", ".json"):
        raise ConfigError(f"run directory {config} does not exist; give the trainer.output_dir of a run")
    if config is not None and Path(config).is_dir():
        if not resume:
            raise ConfigError(f"{config} is a directory; to continue the run in it: gndpo train --resume {config}; "
                              f"to start one, give a YAML config file and/or key=value overrides")
        run_dir = Path(config)
    elif config is not None and resume and Path(config).name == RUN_CONFIG:
        run_dir = Path(config).parent
    elif config is None and resume:
        run_dir = Path(given.get("trainer.output_dir", "runs/gndpo"))
        if not (run_dir / RUN_CONFIG).is_file():
            if "model.path" in given:  # the whole command again: resume (or start) as it says
                return None, overrides, None
            raise ConfigError(f"nothing to resume in {run_dir}: it holds no {RUN_CONFIG}; give the run directory "
                              f"(gndpo train --resume RUN_DIR) or the run's whole command")
    else:
        return config, overrides, None
    if not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} does not exist; give the trainer.output_dir of a run")
    if not (run_dir / RUN_CONFIG).is_file():
        raise ConfigError(f"{run_dir} holds no {RUN_CONFIG}, so it is not a gndpo run directory; give the "
                          f"trainer.output_dir of a run, or the run's whole command with --resume")
    if "trainer.output_dir" in given and Path(given["trainer.output_dir"]).resolve() != run_dir.resolve():
        raise ConfigError(f"trainer.output_dir={given['trainer.output_dir']} is not the run directory {run_dir} "
                          f"being resumed; drop that override (a run continues where it is)")
    return str(run_dir / RUN_CONFIG), [*overrides, f"trainer.output_dir={run_dir}"], run_dir


def _check_resume_overrides(run_dir: Path, cfg) -> None:
    """Refuse, before anything loads, an override that would make a resumed run inexact (a run whose first step
    never ended resumes as a fresh start: any override goes)."""
    from gndpo.checkpoint import RESUME_MUTABLE_KEYS, config_difference, run_started, stored_run_config
    from gndpo.config import to_dict
    from gndpo.errors import ConfigError

    if not run_started(run_dir):
        return
    diff = config_difference(stored_run_config(run_dir), to_dict(cfg))
    if diff is not None:
        key, old, new = diff
        raise ConfigError(f"cannot resume {run_dir} with {key}={new}: a resumed run stays exact only with the "
                          f"settings it trained with ({key} was {old!r}); drop that override, or start a new run in "
                          f"another trainer.output_dir (changeable on resume: {', '.join(RESUME_MUTABLE_KEYS)})")


def _plot(args: argparse.Namespace) -> int:
    from gndpo.report.plot import plot_run_dirs

    out = Path(args.out) if args.out else Path(args.runs[0]) / "dynamics.png"
    path = plot_run_dirs(args.runs, out, labels=args.labels, aggregate_seeds=args.aggregate_seeds)
    print(f"wrote {path}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    if args.suite or args.benchmarks or args.compare:
        return _eval_suite(args)
    if len(args.models) != 2:
        from gndpo.errors import ConfigError

        raise ConfigError("gndpo eval takes MODEL DATA (accuracy on a dataset), or MODEL [MODEL ...] with --suite "
                          "paper / --benchmarks a,b (the paper's Table 1)")
    return _eval_dataset(args, *args.models)


def _eval_dataset(args: argparse.Namespace, model_path: str, data: str) -> int:
    import json

    from gndpo.data.loaders import load_records
    from gndpo.errors import ConfigError
    from gndpo.evaluate import sampled_accuracy
    from gndpo.models import load_model, resolve_device
    from gndpo.rollout.base import SamplingParams
    from gndpo.train import resolve_suffix

    temperature = 0.0 if args.temperature is None else args.temperature
    if args.samples < 1 or temperature < 0 or not 0 < (args.top_p or 1.0) <= 1:
        raise ConfigError("--samples must be >= 1, --temperature >= 0 and --top-p in (0, 1]")
    if args.samples > 1 and temperature == 0:
        raise ConfigError(f"--samples {args.samples} needs --temperature > 0 (greedy decoding gives one answer); "
                          f"e.g. the paper's --temperature 0.6 --top-p 0.95")
    records = load_records(data, split=args.split, format=args.format, prompt_key=args.prompt_key,
                           answer_key=args.answer_key, image_key=None if args.image_key == "null" else args.image_key,
                           limit=args.limit)
    loaded = load_model(model_path, device=resolve_device(args.device))
    suffix = resolve_suffix(args.suffix)
    max_new = args.max_new_tokens or 1024
    sampling = SamplingParams(n=args.samples, temperature=temperature or 1.0, top_p=args.top_p or 1.0,
                              max_new_tokens=max_new, greedy=temperature == 0, seed=args.seed)
    sampler = _eval_sampler(args, loaded, model_path, records, suffix, max_new)
    try:
        result = sampled_accuracy(sampler, records, sampling, batch_size=args.batch_size)
    finally:
        getattr(sampler, "close", lambda: None)()
    if args.out:
        with open(args.out, "w") as f:
            for rec, text, ok, r in zip(records, result["responses"], result["correct"], result["rewards"]):
                f.write(json.dumps({"id": rec.id, "answer": rec.answer, "response": text, "correct": ok,
                                    "reward": r}) + "\n")
    # a split names one part of a dataset directory or hub dataset; a single file has none
    where = f"on {result['n']} items ({data}{'' if Path(data).is_file() else f', split {args.split}'})"
    if temperature == 0:
        head = f"accuracy {100 * result['accuracy']:.2f}% {where}, greedy"
    else:
        k = result["k"]
        head = (f"mean@{k} {100 * result['mean@K']:.2f}%, pass@{k} {100 * result['pass@K']:.2f}% {where}, "
                f"temperature {temperature:g}, top-p {args.top_p or 1.0:g}, seed {args.seed}")
    print(f"{head}; engine {args.engine}; format {100 * result['format_rate']:.1f}%, mean length "
          f"{result['mean_response_length']:.1f} tokens, truncated {100 * result['truncated_rate']:.1f}%")
    return 0


def _eval_sampler(args, loaded, model_path: str, records, suffix, max_new: int):
    """gndpo's HF decode loop, or a vLLM engine (``--engine vllm``; ``auto``: vLLM where it is installed) checked
    against the HF model's log-probs on its first batch."""
    import importlib.util

    if args.engine == "auto":
        args.engine = "vllm" if importlib.util.find_spec("vllm") is not None else "hf"
    if args.engine == "hf":
        from gndpo.rollout.hf import HFRollout

        return HFRollout(loaded.model, loaded.processor, suffix=suffix, micro_batch_size=args.batch_size)
    import torch

    from gndpo.forward import rollout_logprobs
    from gndpo.rollout.vllm import VLLMRollout
    from gndpo.vllm_engine import EngineOptions

    model = loaded.model.eval()
    dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[model.dtype]
    from gndpo.models import context_limit

    limit = context_limit(model.config)  # prompt budget + new tokens, within the model's context
    length = args.max_model_len or min(4096 + max_new, limit or 4096 + max_new)
    options = EngineOptions(dtype=dtype, max_model_len=length, seed=args.seed,
                            max_images=max((len(r.images) for r in records), default=0))

    def reference(rollouts):
        with torch.no_grad():
            return rollout_logprobs(model, loaded.processor, rollouts, micro_batch_size=args.batch_size,
                                    suffix=suffix, system_prompt=None, temperature=1.0)

    return VLLMRollout(model, loaded.processor, path=model_path, options=options, suffix=suffix, system_prompt=None,
                       score_fn=reference, check_every=1_000_000_000)


def _eval_suite(args: argparse.Namespace) -> int:
    import shlex

    from gndpo.errors import ConfigError
    from gndpo.eval.benchmarks import PAPER_DECODING, select
    from gndpo.eval.suite import Judge, default_data_dir, parse_models, run_suite

    benchmarks = select(args.suite, args.benchmarks)
    models = parse_models(args.models + (args.compare or []))
    compare = tuple(m.label for m in parse_models(args.compare)) if args.compare else None
    if args.samples != 1:
        raise ConfigError("--samples applies to MODEL DATA; the suite samples once per item, as the paper does")
    judge = None
    if args.judge_model is None:
        raise ConfigError("choose a judge: --judge-model NAME --judge-base-url http://HOST:PORT/v1 (any "
                          "OpenAI-compatible server; key in $GNDPO_JUDGE_API_KEY), or --judge none (rule-only)")
    if args.judge_model.lower() != "none":
        if not args.judge_base_url:
            raise ConfigError(f"--judge-model {args.judge_model} needs --judge-base-url http://HOST:PORT/v1")
        judge = Judge(args.judge_model, args.judge_base_url, args.judge_key_env)
    decoding = {"temperature": PAPER_DECODING["temperature"] if args.temperature is None else args.temperature,
                "top_p": PAPER_DECODING["top_p"] if args.top_p is None else args.top_p,
                "max_new_tokens": args.max_new_tokens or PAPER_DECODING["max_new_tokens"], "seed": args.seed}
    out = Path(args.out or "eval_out")
    run_suite(models, benchmarks, out=out, data_dir=Path(args.data_dir) if args.data_dir else default_data_dir(),
              decoding=decoding, judge=judge, base_url=args.base_url, max_model_len=args.max_model_len,
              dtype=args.dtype, vllm_args=tuple(shlex.split(args.vllm_args)), timeout=args.request_timeout,
              api_nproc=args.api_nproc, compare=compare,
              log=lambda line: print(line, flush=True))
    print((out / "eval.md").read_text(), end="")
    print(f"wrote {out / 'eval.md'} and {out / 'eval.json'}; per-item outputs in {out / 'items'}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from gndpo.report.inspect import summary, write_report

    if args.summary:
        print(summary(args.runs, labels=args.labels), end="")
        return 0
    out = Path(args.out) if args.out else Path(args.runs[0]) / "inspect.html"
    path = write_report(args.runs, out, labels=args.labels)
    print(f"wrote {path} (open it in a browser; it needs no network)")
    return 0


def _export(args: argparse.Namespace) -> int:
    from gndpo.checkpoint import export_checkpoint

    out, what = export_checkpoint(args.run_dir, step=args.step, out=args.out, merge=args.merge, dtype=args.dtype)
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
                  max_topk=args.max_topk, announce=lambda line: print(line, flush=True))
    return 0


def _lab(args: argparse.Namespace) -> int:
    from gndpo.lab.run import lab_main

    return lab_main(args)


def build_parser() -> argparse.ArgumentParser:
    from gndpo import __version__

    parser = _Parser(prog="gndpo", description="On-policy distillation with GNDPO (arXiv 2606.09091).")
    parser.add_argument("--version", action="version", version=f"gndpo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    from gndpo.config import help_text

    p = sub.add_parser("train", help="train a student (gndpo, opd or gspo)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_TRAIN_EPILOG + help_text())
    p.add_argument("config", nargs="?", help="YAML config file (optional: overrides alone are enough); with --resume "
                   "also a run directory")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.add_argument("--dry-run", action="store_true", help="validate and print the resolved config and its resource "
                   "plan (parameter counts, memory per GPU, from config.json alone); load no weights")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in trainer.output_dir; "
                   "gndpo train --resume RUN_DIR [key=value ...] continues a run from its own run_config.yaml "
                   "(overrides: trainer.total_steps, logging.*, checkpoint.*, ...)")
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

    from gndpo.eval.benchmarks import BENCHMARKS

    p = sub.add_parser(
        "eval", help="accuracy on a dataset, or the paper's Table 1 (--suite paper) on VLMEvalKit",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="gndpo eval MODEL DATA [options]\n       gndpo eval MODEL [MODEL ...] --suite paper [options]",
        epilog="suite 'paper' (Table 1 of arXiv 2606.09091, on VLMEvalKit " "ms-vlmeval 0.0.20):\n" + "".join(
            f"  {b.key:<11} {b.column}: {b.metric} ({b.dataset}; judge {b.judge})\n" for b in BENCHMARKS
            if b.runner == "vlmeval") + "extra (--benchmarks geometry3k; scored by gndpo, after Overall):\n" + "".join(
            f"  {b.key:<11} {b.column}: {b.metric} (DATA_DIR/{b.dataset} or hiyouga/geometry3k)\n" for b in BENCHMARKS
            if b.runner == "gndpo") +
        "\nexamples:\n  gndpo eval runs/x/checkpoints/step-000065 data/geometry3k --temperature 0.6 --top-p 0.95 "
        "--samples 8\n  gndpo eval --suite paper --compare base=OpenGVLab/InternVL3_5-1B-HF "
        "trained=runs/x/checkpoints/step-000065 \\\n      --judge-model qwen3-32b --judge-base-url "
        "http://127.0.0.1:8001/v1\n(docs/EVAL.md)")
    p.add_argument("models", nargs="*", metavar="MODEL",
                   help="model directory or LABEL=DIR; with --suite several (one table row each); else MODEL DATA")
    p.add_argument("--suite", choices=("paper",), help="the paper's seven benchmarks (listed below)")
    p.add_argument("--benchmarks", metavar="A,B", help="a subset of the suite's benchmarks, e.g. mathvista,wemath")
    p.add_argument("--compare", nargs=2, metavar=("BASE", "TRAINED"),
                   help="two more models as LABEL=DIR, put side by side with a delta row (e.g. base=... trained=...)")
    p.add_argument("--temperature", type=float, default=None, help="default: 0.6 (suite), greedy (MODEL DATA)")
    p.add_argument("--top-p", type=float, default=None, help="default: 0.95 (suite), 1.0 (MODEL DATA)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: 32768 (suite), 1024 (MODEL DATA)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--samples", type=int, default=1, metavar="K",
                   help="MODEL DATA: K samples per item (needs --temperature > 0); prints mean@K and pass@K")
    p.add_argument("--out", help="suite: output directory (default eval_out), extended by later runs; "
                   "MODEL DATA: write per-item results as JSON lines here")
    g = p.add_argument_group("suite")
    g.add_argument("--data-dir", help="where VLMEvalKit's <NAME>.tsv files are (default $LMUData, else ~/LMUData)")
    g.add_argument("--judge-model", "--judge", dest="judge_model", metavar="NAME",
                   help="the judge model served at --judge-base-url, or 'none' (rule-only; judge-only benchmarks "
                   "are then left out, marked)")
    g.add_argument("--judge-base-url", metavar="URL", help="OpenAI-compatible judge endpoint, e.g. http://HOST:8001/v1")
    g.add_argument("--judge-key-env", default="GNDPO_JUDGE_API_KEY", metavar="VAR",
                   help="environment variable holding the judge's API key (never written to disk)")
    g.add_argument("--base-url", metavar="URL", help="evaluate the model a running OpenAI-compatible server serves "
                   "(MODEL = its served name; key in $GNDPO_EVAL_API_KEY) instead of starting vLLM")
    g.add_argument("--max-model-len", type=int, default=None, help="vLLM context (default: new tokens + 8192, "
                   "within the model's limit)")
    g.add_argument("--dtype", default="auto", help="vLLM dtype of the served model")
    g.add_argument("--vllm-args", default="", metavar="'ARGS'", help="more options for vLLM's server, e.g. "
                   "'--tensor-parallel-size 2 --limit-mm-per-prompt {\"image\":4}'")
    g.add_argument("--request-timeout", type=int, default=3600, help="seconds per request to the model server")
    g.add_argument("--api-nproc", type=int, default=8, help="parallel requests to the model server")
    g = p.add_argument_group("MODEL DATA")
    g.add_argument("--engine", choices=("auto", "hf", "vllm"), default="hf",
                   help="hf (default): gndpo's decode loop; vllm: a vLLM engine (checked against the HF model); "
                   "auto: vllm where installed, else hf")
    g.add_argument("--split", default="test", help="the split of a dataset directory or hub dataset (default: test; "
                   "a single file is read whole)")
    g.add_argument("--format", default="auto")
    g.add_argument("--prompt-key", default="problem")
    g.add_argument("--answer-key", default="answer")
    g.add_argument("--image-key", default="images")
    g.add_argument("--limit", type=int, default=None, help="evaluate the first N records")
    g.add_argument("--suffix", default="paper", help="'paper', 'none' or literal text appended to each problem")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--device", default="auto")
    p.set_defaults(func=_eval)

    p = sub.add_parser("inspect", help="one HTML page of a run's per-token outliers (r_t, A_t), runs side by side")
    p.add_argument("runs", nargs="+", help="run directories (metrics.jsonl; rollouts/ when saved)")
    p.add_argument("--out", help="output HTML file (default: RUN/inspect.html of the first run)")
    p.add_argument("--labels", nargs="+", help="one name per run")
    p.add_argument("--summary", action="store_true",
                   help="print each run's median outlier metrics over its steps (a table) instead of the page")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("lab", help="the offline lab: GSPO vs OPD vs GNDPO on a synthetic multimodal task")
    p.add_argument("action", nargs="?", default="run", choices=("run", "bootstrap"),
                   help="run (default): the comparison; bootstrap: retrain the shipped teacher/student")
    p.add_argument("--out", default=None, help="output directory (default: lab_out; lab_out/long, "
                   "lab_out/small-batch for those settings)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per method")
    p.add_argument("--steps", type=int, default=None, help="training steps per run")
    p.add_argument("--methods", nargs="+", default=None, help="subset of gspo opd gndpo, gndpo-running (GNDPO with "
                   "algorithm.norm_stats=running), and with --dense fkl-topk-loss rkl-topk-loss rkl-topk-gndpo")
    p.add_argument("--quick", action="store_true", help="smoke version (CI): few steps, small eval")
    p.add_argument("--stress", action="store_true", help="also run the stress setting (OPD vs GNDPO at high temperature)")
    p.add_argument("--dense", action="store_true", help="dense (top-k) distillation: forward and reverse KL over the "
                   "teacher's top-8 as losses and reverse KL as a GNDPO-normalized reward, beside OPD and GNDPO "
                   "(in the stress setting too with --stress)")
    p.add_argument("--long", action="store_true", help="the horizon: 240 steps, each run evaluated at steps 60, 120, "
                   "180 and 240 (a table and accuracy_steps.png); about an hour on 2 cores")
    p.add_argument("--small-batch", action="store_true", help="4 prompts x 4 samples per step (same 60 steps): OPD vs "
                   "GNDPO with batch vs running statistics, normal and stress; ~12 min on 2 cores")
    p.add_argument("--eval-every", type=int, default=None, metavar="N", help="also evaluate every N-th step's "
                   "checkpoint of each run (default: the last step only; 60 with --long)")
    p.add_argument("--teachers", action="store_true", help="also run GNDPO with two specialist teachers, one per half "
                   "of the task, against one teacher for both (docs/LAB.md)")
    p.add_argument("--self-distill", action="store_true", help="also run GNDPO self-distillation: the student as "
                   "its own teacher, given the reference answer as privileged context (docs/LAB.md)")
    p.add_argument("--variants", nargs="+", default=None, metavar="NAME", help="only these runs of --teachers "
                   "(2teachers, 2teachers-per_teacher, sum_teacher) and --self-distill (self, self-initial, "
                   "self-in-prompt); default all")
    p.add_argument("--jobs", type=int, default=None, metavar="N", help="worker processes for the runs and "
                   "evaluations, one torch thread each (default: one per CPU core); 1 = in sequence, in this process")
    p.add_argument("--resume", action="store_true", help="keep every run that --out already holds finished with the "
                   "same configuration (not trained again) and every evaluation it cached; train the others")
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
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="weights dtype of a full-model export (checkpoints hold the trainer's float32 masters); "
                        "auto = the dtype the student's own config.json named (InternVL3.5: bfloat16)")
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
    p.add_argument("--max-topk", type=int, default=20, help="largest top-k a client may ask for at each position "
                                                           "(algorithm.distill=topk; default 20)")
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
    except Interrupted as exc:
        print(str(exc), file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
