"""Race gndpo against TRL on identical work on this machine (issue 5). Not a test.

    python3 run.py bench race_trl.py --quick     # smoke run, under a minute
    python3 run.py bench race_trl.py --full      # the recorded run, ~6 minutes on the 2-core CPU

Both tools train the same tiny Qwen2 student against the same tiny Qwen2 teacher, built offline from configs
with a byte-level BPE tokenizer trained offline by ``tokenizers`` (cached under ``--workdir``): the same
prompts, samples per prompt, max new tokens, micro-batch size, optimizer steps, learning rate, AdamW settings
and thread count. Pairs raced:

  distill   gndpo ``algorithm.method=gndpo`` (and ``opd`` with --full)  vs  TRL ``DistillationTrainer``
            (trl 1.16 ships it as ``trl.DistillationTrainer``: fully on-policy, generalized JSD with ``beta=1``,
            the reverse KL, over the full vocabulary)
  gspo      gndpo ``algorithm.method=gspo``  vs  TRL ``GRPOTrainer(importance_sampling_level="sequence",
            loss_type="grpo", beta=0)`` with a reward that calls ``gndpo.rewards.math.math_reward``

TRL's DistillationTrainer samples one completion per prompt, so it gets each prompt repeated ``n`` times: both
tools then generate ``prompts x n`` sequences per step in one ``generate`` call. Every response has exactly
``max_new_tokens`` tokens on both sides: gndpo gets ``rollout.min_new_tokens=max_new_tokens``, TRL the same value
in ``generation_kwargs`` (and the student's ``generation_config.json`` carries it too); the table reports the
completion tokens each tool logged. Throughput is completion
tokens per second of wall time of a whole optimizer step.

Method:
- every (tool, method) runs in its own subprocess, so its peak RSS (``ru_maxrss``) is its own;
- the workers of a pair start together, load their models, then run in lockstep: the driver releases one
  worker for exactly one optimizer step while the others wait, A B A B ...; a step's time runs from its
  release to its end (so each tool's logging of the previous step is included, waiting is not);
- step times are measured the same way for both tools, step 1 is excluded, medians are over steady steps;
  the ratio is taken per pair of adjacent steps (same load), then its median; rounds of fresh processes
  alternate which tool goes first;
- generation is timed by wrapping the call that turns encoded prompts into sampled ids: TRL's
  ``GenerationMixin.generate``, gndpo's ``gndpo.rollout.decode.decode`` (or ``generate`` with
  ``--gndpo-engine generate``); prompt encoding and text decoding are outside both;
- every worker runs with ``OMP_WAIT_POLICY=PASSIVE`` (``--omp-wait-policy``): on this 2-core machine shared
  with other jobs, OpenMP's default spin-waiting made whole runs 10-35x slower whenever another process held a
  core (one gndpo generate() call: 15.5 s with the default policy, 0.45 s with PASSIVE, alternating runs).

Also runnable as ``--worker NAME --spec JSON`` (internal: one worker, driven through stdin/stdout).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# (hidden, layers, heads, kv heads, mlp); tied embeddings, like the small Qwen2 models.
SIZES = {"student": (256, 4, 4, 2, 768), "teacher": (512, 6, 8, 4, 1536)}

PRESETS = {
    # prompts per step, samples per prompt, max new tokens, micro-batch, optimizer steps per run, rounds
    "quick": dict(prompts=4, n=4, max_new_tokens=32, micro_batch=8, steps=3, rounds=1, opd=False),
    "full": dict(prompts=8, n=4, max_new_tokens=64, micro_batch=8, steps=5, rounds=3, opd=True),
}
PAIRS = {"distill": ("gndpo:gndpo", "trl:distill"), "gspo": ("gndpo:gspo", "trl:grpo")}


# ---------------------------------------------------------------- shared assets


def _corpus(rng: random.Random) -> list[str]:
    from gndpo.data.templates import PAPER_SUFFIX

    lines = []
    for _ in range(6000):
        a, b = rng.randint(0, 9999), rng.randint(0, 999)
        op, val = rng.choice([("+", a + b), ("-", a - b), ("*", a * b)])
        lines.append(f"What is {a} {op} {b}? {PAPER_SUFFIX}")
        lines.append(f"<think> First, {a} {op} {b}. Let me compute step by step: the result is {val}. </think> "
                     f"The final answer is \\boxed{{{val}}}.")
    return lines


def build_assets(workdir: Path, num_prompts: int = 64, vocab: int = 4096, seed: int = 0) -> dict:
    """Tokenizer, student, teacher and prompts under ``workdir`` (built once, reused while the recipe is unchanged)."""
    recipe = json.dumps({"sizes": SIZES, "num_prompts": num_prompts, "vocab": vocab, "seed": seed, "v": 2})
    key = hashlib.sha256(recipe.encode()).hexdigest()[:12]
    out = workdir / f"assets-{key}"
    meta_path = out / "assets.json"
    if meta_path.is_file():
        return json.loads(meta_path.read_text())

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    rng = random.Random(seed)
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(_corpus(rng), trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=list(SPECIALS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  padding_side="left", model_max_length=2048)
    tok.chat_template = CHAT_TEMPLATE
    params = {}
    for i, (name, (hidden, layers, heads, kv, mlp)) in enumerate(SIZES.items()):
        config = Qwen2Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2048,
                             tie_word_embeddings=True, bos_token_id=None, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
        torch.manual_seed(seed + i)
        model = Qwen2ForCausalLM(config)
        model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        model.save_pretrained(out / name)
        tok.save_pretrained(out / name)
        params[name] = sum(p.numel() for p in model.parameters())
    prompts = []
    for i in range(num_prompts):
        a, b = rng.randint(10, 999), rng.randint(10, 999)
        prompts.append({"id": f"p{i}", "problem": f"What is {a} + {b}?", "answer": str(a + b)})
    with open(out / "prompts.jsonl", "w") as f:
        for p in prompts:
            f.write(json.dumps(p) + "\n")
    meta = {"dir": str(out), "student": str(out / "student"), "teacher": str(out / "teacher"),
            "prompts": str(out / "prompts.jsonl"), "vocab": len(tok), "params": params,
            "hidden": {k: v[0] for k, v in SIZES.items()}, "layers": {k: v[1] for k, v in SIZES.items()}}
    meta_path.write_text(json.dumps(meta, indent=1))
    return meta


def set_fixed_length(student_dir: str, max_new_tokens: int) -> None:
    """Make every response exactly ``max_new_tokens`` long: EOS is suppressed until then (both tools)."""
    path = Path(student_dir) / "generation_config.json"
    cfg = json.loads(path.read_text())
    if cfg.get("min_new_tokens") != max_new_tokens:
        cfg["min_new_tokens"] = max_new_tokens
        path.write_text(json.dumps(cfg, indent=2))


# ---------------------------------------------------------------- worker


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def _rss_now_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class Probe:
    """Step boundaries, generate() calls and wrapped methods, recorded the same way for both tools.

    ``gate()`` blocks until the driver releases this worker (one line on stdin): the driver runs the workers of
    a pair in lockstep, one step each in turn, so the two tools' steps alternate A B A B under the same load.
    A step's period runs from the release before it to its end, so time spent waiting is never counted.
    """

    def __init__(self):
        self.releases: list[tuple[float, float]] = []  # (wall, cpu) when released
        self.ends: list[tuple[float, float]] = []  # (wall, cpu) at each step end
        self.gen_calls: list[dict] = []
        self.calls: dict[str, list[tuple[float, float]]] = {}  # label -> (end time, seconds)

    def gate(self) -> None:
        print("@gate", flush=True)
        if not sys.stdin.readline():
            raise SystemExit("driver went away")
        self.releases.append((time.perf_counter(), _cpu_seconds()))

    def step_end(self) -> None:
        self.ends.append((time.perf_counter(), _cpu_seconds()))
        self.gate()

    def wrap_generate(self, gate_first: bool) -> None:
        """Time every GenerationMixin.generate and gndpo decode call; optionally hold the first at the gate."""
        import gndpo.rollout.hf
        from transformers.generation.utils import GenerationMixin

        probe = self

        def timed(original, new_tokens):
            def wrapper(*args, **kwargs):
                if gate_first and not probe.releases:
                    probe.gate()
                t0, c0 = time.perf_counter(), _cpu_seconds()
                out = original(*args, **kwargs)
                t1, c1 = time.perf_counter(), _cpu_seconds()
                seqs, new = new_tokens(out, args, kwargs)
                probe.gen_calls.append({"end": t1, "seconds": t1 - t0, "cpu": c1 - c0, "seqs": seqs,
                                        "new_tokens": new})
                return out
            return wrapper

        def hf_tokens(out, args, kwargs):
            ids = kwargs.get("input_ids", args[1] if len(args) > 1 else None)  # args[0] is the model
            return int(out.shape[0]), int(out.shape[1] - ids.shape[1] if ids is not None else out.shape[1])

        GenerationMixin.generate = timed(GenerationMixin.generate, hf_tokens)
        gndpo.rollout.hf.decode = timed(gndpo.rollout.hf.decode,
                                        lambda out, a, k: (int(out[0].shape[0]), int(out[0].shape[1])))

    def wrap_method(self, obj, name: str, label: str) -> None:
        original = getattr(obj, name)
        calls = self.calls.setdefault(label, [])

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                t1 = time.perf_counter()
                calls.append((t1, t1 - t0))

        setattr(obj, name, timed)

    def per_step(self) -> dict:
        """Periods, CPU seconds, generate calls and wrapped-method seconds bucketed by step."""
        steps = []
        for k, (end, cpu_end) in enumerate(self.ends):
            start, cpu_start = self.releases[k]
            gens = [g for g in self.gen_calls if start < g["end"] <= end]
            row = {"period": end - start, "cpu": cpu_end - cpu_start,
                   "gen_seconds": sum(g["seconds"] for g in gens),
                   "gen_tokens": sum(g["seqs"] * g["new_tokens"] for g in gens),
                   "gen_new_tokens": max((g["new_tokens"] for g in gens), default=0), "gen_calls": len(gens)}
            for label, calls in self.calls.items():
                row[label] = sum(dt for t, dt in calls if start < t <= end)
            steps.append(row)
        return {"steps": steps}


def _gndpo_overrides(spec: dict) -> list[str]:
    """The work of ``spec`` as gndpo config overrides (also used by profile_step.py)."""
    method = spec["worker"].split(":")[1]
    return [
        f"model.path={spec['student']}", f"teacher.path={spec['teacher']}", f"data.train={spec['prompts_file']}",
        "data.image_key=null", f"algorithm.method={method}", f"rollout.n={spec['n']}",
        f"rollout.max_new_tokens={spec['max_new_tokens']}", f"rollout.min_new_tokens={spec['max_new_tokens']}",
        f"rollout.engine={spec.get('gndpo_engine', 'loop')}", f"rollout.micro_batch_size={spec['prompts'] * spec['n']}",
        f"trainer.prompts_per_step={spec['prompts']}", f"trainer.micro_batch_size={spec['micro_batch']}",
        f"teacher.micro_batch_size={spec['micro_batch']}", f"trainer.total_steps={spec['steps']}",
        f"trainer.threads={spec['threads']}", "trainer.device=cpu", f"trainer.output_dir={spec['out_dir']}",
        f"optim.lr={spec['lr']}", "logging.tensorboard=false", "logging.progress=false",
        "checkpoint.save_final=false", "checkpoint.every=0", f"trainer.seed={spec['seed']}",
        *spec.get("gndpo_set", ()),
    ]


def _gndpo_worker(spec: dict, probe: Probe) -> dict:
    from gndpo.config import load_config
    from gndpo.train import train

    cfg = load_config(None, _gndpo_overrides(spec))
    probe.wrap_generate(gate_first=True)  # models load inside train(); the first step starts at its first sample
    train(cfg, callbacks=[lambda record: probe.step_end()])
    rows = [json.loads(line) for line in (Path(spec["out_dir"]) / "metrics.jsonl").read_text().splitlines()]
    B = spec["prompts"] * spec["n"]
    return {"completion_tokens": [r["response_length"] * B for r in rows],
            "phases": [{k: v for k, v in r.items() if k.startswith("time/")} for r in rows]}


def _math_reward_fn(prompts, completions, answer, **_):
    from gndpo.rewards.math import math_reward

    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [math_reward(t, a) for t, a in zip(texts, answer)]


def _trl_worker(spec: dict, probe: Probe) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback

    from gndpo.data.templates import PAPER_SUFFIX

    kind = spec["worker"].split(":")[1]
    rows = [json.loads(line) for line in Path(spec["prompts_file"]).read_text().splitlines()]
    # The same user message gndpo renders (problem, a space, the paper's suffix), as a conversational prompt.
    data = [{"prompt": [{"role": "user", "content": f"{r['problem']} {PAPER_SUFFIX}"}], "answer": r["answer"]}
            for r in rows]
    B = spec["prompts"] * spec["n"]
    common = dict(
        output_dir=spec["out_dir"], per_device_train_batch_size=spec["micro_batch"],
        gradient_accumulation_steps=B // spec["micro_batch"], max_steps=spec["steps"], learning_rate=spec["lr"],
        weight_decay=0.01, max_grad_norm=1.0, lr_scheduler_type="constant", warmup_steps=0,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, optim="adamw_torch",
        max_completion_length=spec["max_new_tokens"], temperature=1.0, top_p=1.0, top_k=0,
        generation_kwargs={"min_new_tokens": spec["max_new_tokens"]},
        bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True, seed=spec["seed"],
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0,
        model_init_kwargs={"dtype": "float32"},
    )
    tok = AutoTokenizer.from_pretrained(spec["student"])
    if kind == "distill":
        from trl import DistillationConfig, DistillationTrainer

        # DistillationTrainer samples one completion per prompt: each prompt is repeated n times for the same work.
        data = [d for d in data for _ in range(spec["n"])]
        args = DistillationConfig(**common, beta=1.0, teacher_model_init_kwargs={"dtype": "float32"})
        trainer = DistillationTrainer(model=spec["student"], teacher_model=spec["teacher"], args=args,
                                      train_dataset=Dataset.from_list(data), processing_class=tok)
    elif kind == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        args = GRPOConfig(**common, num_generations=spec["n"], importance_sampling_level="sequence",
                          loss_type="grpo", beta=0.0, epsilon=0.2, scale_rewards="group")
        trainer = GRPOTrainer(model=spec["student"], reward_funcs=_math_reward_fn, args=args,
                              train_dataset=Dataset.from_list(data), processing_class=tok)
    else:
        raise ValueError(f"unknown TRL worker {kind!r}")
    # training_step includes _prepare_inputs, which generates and scores once per optimizer step.
    probe.wrap_method(trainer, "_generate_and_score_completions", "generate_and_score")
    probe.wrap_method(trainer, "training_step", "training_step")
    probe.wrap_method(trainer, "compute_loss", "compute_loss")
    logs: list[dict] = []

    class Recorder(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            probe.step_end()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                records.append(dict(logs))

    records = logs
    trainer.add_callback(Recorder())
    probe.wrap_generate(gate_first=False)
    torch.set_num_threads(spec["threads"])
    probe.gate()
    trainer.train()
    return {"completion_tokens": [r.get("completions/mean_length", float("nan")) * B for r in logs],
            "trl_logs": logs}


def worker(spec: dict) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    if spec["worker"].startswith("trl:"):
        import trl  # noqa: F401
    import gndpo.train  # noqa: F401

    rss_import = _rss_now_mib()
    probe = Probe()
    extra = (_gndpo_worker if spec["worker"].startswith("gndpo:") else _trl_worker)(spec, probe)
    print("@result " + json.dumps({
        "worker": spec["worker"], **probe.per_step(), "peak_rss_mib": _peak_rss_mib(),
        "rss_after_import_mib": rss_import, "threads": torch.get_num_threads(), **extra}, default=float), flush=True)


# ---------------------------------------------------------------- driver


class Worker:
    """One worker subprocess driven through its gates."""

    def __init__(self, name: str, spec: dict, workdir: Path, tag: str):
        import shutil

        self.name = name
        out_dir = workdir / "runs" / f"{name.replace(':', '-')}-{tag}"
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True)
        s = dict(spec, worker=name, out_dir=str(out_dir))
        s.pop("pairs", None)
        env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]),
                   TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   HF_DATASETS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore",
                   TQDM_DISABLE="1")
        if spec.get("omp_wait_policy"):
            env["OMP_WAIT_POLICY"] = spec["omp_wait_policy"]
        self.log_path = out_dir / "worker.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", name, "--spec", json.dumps(s)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env=env, cwd=ROOT, bufsize=1)
        self.result: dict | None = None

    def wait_gate(self) -> bool:
        """Read until the worker blocks at a gate (True) or prints its result and ends (False)."""
        for line in self.proc.stdout:
            if line.startswith("@gate"):
                return True
            if line.startswith("@result "):
                self.result = json.loads(line[len("@result "):])
                self.proc.wait()
                return False
        self.proc.wait()
        self.log.flush()
        tail = self.log_path.read_text()[-3000:]
        raise SystemExit(f"worker {self.name} died (rc={self.proc.returncode}):\n{tail}")

    def release(self) -> None:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()


def run_group(names: list[str], spec: dict, workdir: Path, tag: str) -> dict[str, dict]:
    """Start the workers together (loading overlaps), then run one step of each in turn until all end."""
    workers = [Worker(n, spec, workdir, tag) for n in names]
    alive = [w for w in workers if w.wait_gate()]
    while alive:
        nxt = []
        for w in alive:  # A B (C) A B (C) ...: exactly one of ours runs at any time
            w.release()
            if w.wait_gate():
                nxt.append(w)
        alive = nxt
    return {w.name: w.result for w in workers}


def _median(xs):
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")


def step_rows(r: dict) -> list[dict]:
    """Steady-state steps of one run (step 1 excluded) with completion tokens and throughputs."""
    rows = []
    for k, st in enumerate(r["steps"]):
        if k == 0:
            continue
        tokens = r["completion_tokens"][k]
        rows.append(dict(st, tokens=tokens, tok_per_s=tokens / st["period"],
                         gen_tok_per_s=st["gen_tokens"] / st["gen_seconds"] if st["gen_seconds"] else float("nan")))
    return rows


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "cpu": _cpu_name(), "cores": os.cpu_count()}
    for pkg in ("torch", "transformers", "trl", "accelerate", "tokenizers", "gndpo"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "-"
    return out


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def fmt_table(rows: list[list], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _phase_breakdown(name: str, rows: list[dict], runs: list[dict]) -> str:
    """Median seconds per step of each tool's own phases (steady state)."""
    if name.startswith("gndpo:"):
        phases = [p for r in runs for p in r["phases"][1:]]
        keys = ["time/rollout", "time/old_logprobs", "time/teacher", "time/reward", "time/advantages", "time/update"]
        parts = [(k.split("/")[1], _median([p[k] for p in phases])) for k in keys]
    else:
        gen = _median([x["gen_seconds"] for x in rows])
        score = _median([x["generate_and_score"] - x["gen_seconds"] for x in rows])
        fwd = _median([x["compute_loss"] for x in rows])
        bwd = _median([x["training_step"] - x["generate_and_score"] - x["compute_loss"] for x in rows])
        rest = _median([x["period"] - x["training_step"] for x in rows])
        parts = [("generate", gen), ("score (rewards, log-probs)", score), ("loss forward(s)", fwd),
                 ("backward", bwd), ("optimizer + loop + logging", rest)]
    return ", ".join(f"{k} {v:.2f}" for k, v in parts)


def report(results: dict[str, list[dict]], spec: dict, meta: dict, wall: float) -> str:
    B = spec["prompts"] * spec["n"]
    out = [f"work per step: {spec['prompts']} prompts x {spec['n']} samples = {B} sequences x "
           f"{spec['max_new_tokens']} new tokens (fixed length); micro-batch {spec['micro_batch']}; "
           f"{spec['steps']} optimizer steps per run, step 1 excluded; {spec['rounds']} round(s) of lockstep-"
           f"interleaved workers; {spec['threads']} threads; "
           f"OMP_WAIT_POLICY={spec.get('omp_wait_policy') or 'default'}; gndpo rollout.engine="
           f"{spec.get('gndpo_engine', 'loop')}" + "".join(f", {kv}" for kv in spec.get("gndpo_set", ())),
           f"student {meta['params']['student'] / 1e6:.2f} M params (hidden {meta['hidden']['student']}, "
           f"{meta['layers']['student']} layers), teacher {meta['params']['teacher'] / 1e6:.2f} M (hidden "
           f"{meta['hidden']['teacher']}, {meta['layers']['teacher']} layers), vocab {meta['vocab']}; "
           f"harness wall time {wall / 60:.1f} min", ""]
    steady = {name: [row for r in runs for row in step_rows(r)] for name, runs in results.items()}
    table = []
    for name, rows in steady.items():
        runs = results[name]
        table.append([name, len(rows), f"{_median([x['period'] for x in rows]):.2f}",
                      f"{min(x['period'] for x in rows):.2f}", f"{_median([x['tokens'] for x in rows]):.0f}",
                      f"{_median([x['tok_per_s'] for x in rows]):.0f}",
                      f"{_median([x['gen_seconds'] for x in rows]):.2f}",
                      f"{_median([x['gen_tok_per_s'] for x in rows]):.0f}",
                      f"{_median([x['cpu'] / x['period'] for x in rows]):.2f}",
                      f"{_median([r['peak_rss_mib'] for r in runs]):.0f}",
                      f"{_median([r['rss_after_import_mib'] for r in runs]):.0f}"])
    out.append(fmt_table(table, ["run", "steps", "step median (s)", "step best (s)", "completion tok/step",
                                 "train tok/s (median)", "generate (s)", "generate tok/s", "CPU/wall",
                                 "peak RSS (MiB)", "RSS after imports (MiB)"]))
    out.append("")
    ratio_rows = []
    for pair, (a, b) in spec["pairs"].items():
        if a not in results or b not in results:
            continue
        tput, gen, rss = [], [], []
        for ra, rb in zip(results[a], results[b]):  # same round
            for xa, xb in zip(step_rows(ra), step_rows(rb)):  # adjacent steps of the lockstep
                tput.append(xa["tok_per_s"] / xb["tok_per_s"])
                gen.append(xa["gen_tok_per_s"] / xb["gen_tok_per_s"])
            rss.append(ra["peak_rss_mib"] / rb["peak_rss_mib"])
        q = statistics.quantiles(tput, n=4) if len(tput) >= 2 else [float("nan")] * 3
        ratio_rows.append([f"{a} / {b}", len(tput), f"{_median(tput):.2f}", f"{q[0]:.2f} - {q[2]:.2f}",
                           f"{_median(gen):.2f}", f"{_median(rss):.2f}"])
    out.append(fmt_table(ratio_rows, ["pair (gndpo / TRL)", "step pairs", "train tok/s ratio (median)",
                                      "ratio IQR", "generate tok/s ratio (median)", "peak RSS ratio (median)"]))
    out.append("")
    out.append("median seconds per steady step, by each tool's own phases:")
    for name, rows in steady.items():
        out.append(f"- {name}: {_phase_breakdown(name, rows, results[name])}")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="small smoke run (the default)")
    mode.add_argument("--full", action="store_true", help="the recorded configuration")
    parser.add_argument("--rounds", type=int, help="rounds of fresh worker processes (override the preset)")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (override the preset)")
    parser.add_argument("--pairs", default="distill,gspo", help="comma list of: " + ", ".join(PAIRS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--omp-wait-policy", default="PASSIVE", choices=("PASSIVE", "ACTIVE", ""),
                        help="OMP_WAIT_POLICY of every worker ('' = the runtime's default); see the module doc")
    parser.add_argument("--gndpo-engine", default="loop", choices=("loop", "generate"),
                        help="gndpo's rollout.engine (generate = transformers generate, as before the decode loop)")
    parser.add_argument("--gndpo-set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra gndpo config override, e.g. algorithm.old_logprobs=sampler (repeatable)")
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "race_trl"))
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.spec))
        return

    preset = dict(PRESETS["full" if args.full else "quick"])
    for key in ("rounds", "steps"):
        if getattr(args, key):
            preset[key] = getattr(args, key)
    with_opd = preset.pop("opd")
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    meta = build_assets(workdir)
    set_fixed_length(meta["student"], preset["max_new_tokens"])
    pairs = {p: PAIRS[p] for p in args.pairs.split(",")}
    groups = [list(ab) for ab in pairs.values()]
    if with_opd and "distill" in pairs:
        pairs["distill-opd"] = ("gndpo:opd", "trl:distill")
        groups[list(pairs).index("distill")].insert(1, "gndpo:opd")
    spec = dict(preset, threads=args.threads, lr=1e-5, seed=0, student=meta["student"], teacher=meta["teacher"],
                prompts_file=meta["prompts"], omp_wait_policy=args.omp_wait_policy, pairs=pairs,
                gndpo_engine=args.gndpo_engine, gndpo_set=args.gndpo_set)
    print(json.dumps(versions()), flush=True)
    results: dict[str, list[dict]] = {n: [] for g in groups for n in g}
    for rnd in range(spec["rounds"]):
        for group in groups:
            order = group if rnd % 2 == 0 else group[::-1]  # who goes first alternates between rounds
            for name, r in run_group(order, spec, workdir, f"r{rnd}").items():
                results[name].append(r)
                rows = step_rows(r)
                print(f"round {rnd + 1} {name:12s} steps {[round(s['period'], 2) for s in r['steps']]} s; steady "
                      f"{_median([x['tok_per_s'] for x in rows]):.0f} tok/s, generate "
                      f"{_median([x['gen_tok_per_s'] for x in rows]):.0f} tok/s, peak RSS {r['peak_rss_mib']:.0f} MiB",
                      flush=True)
    wall = time.perf_counter() - t0
    text = report(results, spec, meta, wall)
    print("\n" + text)
    if args.json:
        Path(args.json).write_text(json.dumps({"spec": spec, "meta": meta, "versions": versions(),
                                               "results": results}, indent=1, default=float))


if __name__ == "__main__":
    main()
