"""vLLM against gndpo's Hugging Face paths at real model sizes, on one GPU. Not a test.

    python benchmarks/gpu/vllm_rollout.py                # the issue's work, ~9 minutes (estimated, not yet run)
    python benchmarks/gpu/vllm_rollout.py --quick        # validates the script: 4 prompts x 4 samples x 64 tokens
    python benchmarks/gpu/vllm_rollout.py --parts rollout,teacher   # split a run over two device leases
    python benchmarks/gpu/vllm_rollout.py --dry-build    # on a CPU: build the assets at 1 layer, no timing

Models: random weights of real sizes, built from Qwen2 configs (no download; the GPU machine has no network):
a student of Qwen2.5-0.5B's shape and a teacher of Qwen2.5-1.5B's shape, both with Qwen's 151,936-entry vocabulary
and tied embeddings, bfloat16. The tokenizer is a byte-level BPE trained offline on arithmetic text (about
3,400 tokens, ChatML template); the models' vocabulary is larger than the tokenizer's, as Qwen's is (ids beyond the
tokenizer decode to nothing, so decoded texts are short; no timed path depends on them).

Work (the issue's): 32 prompts x 16 samples x exactly 1,024 new tokens (``min_new_tokens == max_new_tokens``).
Three parts, each in its own process (vLLM engines in one process start and end together):

- ``rollout``: ``VLLMRollout`` against ``HFRollout(engine="loop")`` (gndpo's decode loop) on the same prompts;
  rollout tokens/s, the seconds each vLLM call spends waking the engine and pushing the weights (it sleeps
  between rollouts on CUDA, so every call pays both, as in training), peak GPU memory of each;
- ``teacher``: ``VLLMTeacher`` against ``HFTeacher`` scoring the same 512 responses (random token ids: the cost of
  a prefill does not depend on which tokens it scores); tokens/s, peak GPU memory;
- ``train``: a few steps of ``gndpo.train`` with ``rollout.backend=vllm teacher.backend=vllm`` on the same work:
  ``time/weight_sync`` against ``time/step`` (first step excluded).

Checks before timing: every response has exactly ``new_tokens`` tokens; the vLLM sampler's and the decode loop's
log-probs match the trainer's recomputation (mean |diff| within the bf16 sync tolerance, 2e-2); the teachers agree
within the same bound; in training, ``rollout/logprob_diff_max`` and the engine's sync check at step 1. Timed calls
run interleaved A B A B ..., after one warm-up each; medians.

Peak GPU memory: for the HF paths ``torch.cuda.max_memory_allocated`` over the call (weights included); for vLLM the
device memory the engine holds once started (total minus free, as nvidia-smi reports it) and the KV cache's
capacity in tokens.

Prints one JSON line and a markdown table; with ``$OUT`` set, writes ``vllm_rollout.json`` and ``vllm_rollout.md``
there. Results go to docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 151_936  # Qwen2.5's embedding rows (its tokenizer has 151,665 tokens)
# Qwen2.5-0.5B and Qwen2.5-1.5B, from their published configs; random weights.
SHAPES = {
    "student": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                    intermediate_size=4864),
    "teacher": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                    intermediate_size=8960),
}
WORK = dict(prompts=32, n=16, new_tokens=1024, repeats=2, steps=3, micro_batch=16)
QUICK = dict(prompts=4, n=4, new_tokens=64, repeats=1, steps=2, micro_batch=4)
PARTS = ("rollout", "teacher", "train")
TOLERANCE = 2e-2  # mean |log-prob difference| between bf16 kernels (gndpo's sync-check default for bf16)
# Memory fractions: the rollout engine and the teacher engine share the GPU with the trainer in the train part.
MEMORY = {"student": 0.35, "teacher": 0.3}
CHATML = ("{%- for message in messages %}"
          "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
          "{%- endfor %}"
          "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


# ---------------------------------------------------------------- assets


def problems(count: int) -> list[tuple[str, str]]:
    """``count`` (question, answer) pairs, the same every run."""
    return [(f"What is {37 * i % 911 + 10} + {53 * i % 997 + 10}?", str(37 * i % 911 + 53 * i % 997 + 20))
            for i in range(count)]


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from gndpo.data.templates import PAPER_SUFFIX

    corpus = [f"{q} {PAPER_SUFFIX} <think> {q[8:-1]} is {a}. </think> \\boxed{{{a}}}" for q, a in problems(3000)]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=4096, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  padding_side="left", model_max_length=32768)
    tok.chat_template = CHATML
    return tok


def qwen2_config(shape: dict, tok):
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=VOCAB, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                       tie_word_embeddings=True, bos_token_id=None, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, **shape)


def build_assets(root: Path, *, device: str, layers: int | None = None, prompts: int = 32) -> dict:
    """Tokenizer, random student and teacher (``layers``: override the depth, for --dry-build) and a prompt file."""
    import torch
    from transformers import GenerationConfig, Qwen2ForCausalLM

    tok = build_tokenizer()
    out = dict(params={})
    for i, (name, shape) in enumerate(SHAPES.items()):
        with torch.device("meta"):  # the full-size parameter count, without allocating it
            out["params"][name] = sum(p.numel() for p in Qwen2ForCausalLM(qwen2_config(shape, tok)).parameters())
        torch.manual_seed(i)
        with torch.device(device):
            model = Qwen2ForCausalLM(qwen2_config(dict(shape, num_hidden_layers=layers or shape["num_hidden_layers"]),
                                                  tok)).to(torch.bfloat16)
        model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = str(root / name)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()  # the parts run in other processes: leave them the whole device
    with open(root / "prompts.jsonl", "w") as f:
        for i, (q, a) in enumerate(problems(prompts)):
            f.write(json.dumps({"id": f"p{i}", "problem": q, "answer": a}) + "\n")
    return dict(out, data=str(root / "prompts.jsonl"), tokenizer_size=len(tok))


# ---------------------------------------------------------------- parts (each in its own process)


def device_used_gib() -> float:
    """Memory in use on the device, by every allocator and process (what nvidia-smi reports)."""
    import torch

    free, total = torch.cuda.mem_get_info()
    return (total - free) / 2**30


def kv_cache_tokens(llm) -> int | None:
    cache = getattr(getattr(getattr(llm, "llm_engine", None), "vllm_config", None), "cache_config", None)
    if cache is None or not cache.num_gpu_blocks:
        return None
    return int(cache.num_gpu_blocks * cache.block_size)


def timed(fn):
    """(seconds, result) of ``fn()``, with the GPU's queued work finished on both sides."""
    import torch

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0, result


def weights_gib(model) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30


def hf_peak_gib(model, fn) -> float:
    """The model's weights plus the most ``fn()`` allocated beyond what was held before it. (vLLM's memory, held
    in the same process and still counted by torch's allocator while the engine sleeps, stays out.)"""
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return weights_gib(model) + (torch.cuda.max_memory_allocated() - before) / 2**30


def mean_gap(a, b, mask) -> tuple[float, float]:
    diff = (a.float().cpu() - b.float().cpu()).abs()[mask.cpu()]
    return float(diff.mean()), float(diff.max())


def part_rollout(spec: dict, a: dict) -> dict:
    import torch

    from gndpo.data.loaders import load_records
    from gndpo.data.templates import PAPER_SUFFIX
    from gndpo.forward import rollout_logprobs
    from gndpo.models import load_model
    from gndpo.rollout.base import SamplingParams
    from gndpo.rollout.hf import HFRollout
    from gndpo.rollout.vllm import VLLMRollout
    from gndpo.vllm_engine import EngineOptions

    w = spec["work"]
    records = load_records(a["data"], image_key=None)[:w["prompts"]]
    hf_records = records[:spec["hf_prompts"] or w["prompts"]]
    L = w["new_tokens"]
    sampling = SamplingParams(n=w["n"], max_new_tokens=L, min_new_tokens=L, seed=0)
    student = load_model(a["student"], dtype="bfloat16", device="cuda")

    def trainer_lp(ro):
        with torch.no_grad():
            return rollout_logprobs(student.model.eval(), student.processor, ro, micro_batch_size=w["micro_batch"],
                                    suffix=PAPER_SUFFIX, system_prompt=None)

    before = device_used_gib()
    v = VLLMRollout(student.model, student.processor, path=a["student"], suffix=PAPER_SUFFIX, system_prompt=None,
                    options=EngineOptions(dtype="bfloat16", max_model_len=2048, enforce_eager=False,
                                          gpu_memory_utilization=MEMORY["student"]),
                    score_fn=trainer_lp, check_every=10**9)  # the sync check runs on the first call only
    out = dict(vllm_engine_gib=device_used_gib() - before, vllm_kv_tokens=kv_cache_tokens(v.llm))
    h = HFRollout(student.model, student.processor, suffix=PAPER_SUFFIX, micro_batch_size=len(hf_records) * w["n"])

    # Warm-up and checks: fixed length; each sampler's log-probs against the trainer's on a few responses.
    k = torch.arange(min(16, len(hf_records) * w["n"]))
    for name, ro in (("vllm", v.generate(records, sampling)), ("hf", h.generate(hf_records, sampling))):
        assert ro.response_ids.shape[1] == L and int(ro.response_mask.sum()) == ro.size * L, (name, "not fixed")
        sub = ro.select(k)
        out[f"{name}_lp_gap"] = mean_gap(sub.sampler_logprobs, trainer_lp(sub), sub.response_mask)
        assert out[f"{name}_lp_gap"][0] <= TOLERANCE, (name, out[f"{name}_lp_gap"])
        if name == "vllm":
            out["sync_gap"] = ro.stats["rollout/sync_gap"]

    times = {"vllm": [], "hf": []}
    sync, decode, hf_peak = [], [], []
    for r in range(spec["repeats"]):
        for name in (("vllm", "hf") if r % 2 == 0 else ("hf", "vllm")):
            if name == "vllm":  # asleep since its last call: this one wakes it and pushes the weights
                dt, ro = timed(lambda: v.generate(records, sampling))
                sync.append(ro.stats["time/weight_sync"])
                decode.append(ro.stats["time/decode"])
            else:
                dt, peak = timed(lambda: hf_peak_gib(student.model, lambda: h.generate(hf_records, sampling)))
                hf_peak.append(peak)
            times[name].append(dt)
    med = statistics.median
    tokens = {"vllm": len(records) * w["n"] * L, "hf": len(hf_records) * w["n"] * L}
    v.close()
    return dict(out, times=times, vllm_tok_s=tokens["vllm"] / med(times["vllm"]),
                vllm_decode_tok_s=tokens["vllm"] / med(decode), hf_tok_s=tokens["hf"] / med(times["hf"]),
                sync_s=med(sync), hf_peak_gib=max(hf_peak), hf_prompts=len(hf_records))


def part_teacher(spec: dict, a: dict) -> dict:
    import torch

    from gndpo.data.loaders import load_records
    from gndpo.data.templates import PAPER_SUFFIX
    from gndpo.forward import prompt_lengths
    from gndpo.models import load_model
    from gndpo.rollout.base import Rollouts
    from gndpo.teacher.hf import HFTeacher
    from gndpo.teacher.vllm import VLLMTeacher
    from gndpo.vllm_engine import EngineOptions

    w = spec["work"]
    records = tuple(load_records(a["data"], image_key=None)[:w["prompts"]])
    B, L = w["prompts"] * w["n"], w["new_tokens"]
    teacher = load_model(a["teacher"], dtype="bfloat16", device="cuda")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (B, L), generator=g)  # any ids but the 3 specials; the prefill cost is the same
    index = torch.arange(w["prompts"]).repeat_interleave(w["n"])
    plens = torch.tensor(prompt_lengths(teacher.processor, records, suffix=PAPER_SUFFIX, system_prompt=None))[index]
    ro = Rollouts(records, index, ids, torch.ones(B, L, dtype=torch.bool), ("",) * B, torch.ones(B, dtype=torch.bool),
                  plens)
    before = device_used_gib()
    v = VLLMTeacher(a["teacher"], teacher.processor, suffix=PAPER_SUFFIX, micro_batch_size=B,
                    options=EngineOptions(dtype="bfloat16", max_model_len=2048, enforce_eager=False,
                                          gpu_memory_utilization=MEMORY["teacher"]))
    out = dict(vllm_engine_gib=device_used_gib() - before, vllm_kv_tokens=kv_cache_tokens(v.llm))
    h = HFTeacher(teacher.model, teacher.processor, suffix=PAPER_SUFFIX, micro_batch_size=w["micro_batch"])
    out["gap"] = mean_gap(v.score(ro).logprobs, h.score(ro).logprobs, ro.response_mask)  # also the warm-up
    assert out["gap"][0] <= TOLERANCE, ("teacher", out["gap"])
    times, peak = {"vllm": [], "hf": []}, []
    for r in range(spec["repeats"]):
        for name in (("vllm", "hf") if r % 2 == 0 else ("hf", "vllm")):
            if name == "vllm":
                times[name].append(timed(lambda: v.score(ro))[0])
            else:
                dt, p = timed(lambda: hf_peak_gib(teacher.model, lambda: h.score(ro)))
                times[name].append(dt)
                peak.append(p)
    v.close()
    med = statistics.median
    return dict(out, times=times, vllm_tok_s=B * L / med(times["vllm"]), hf_tok_s=B * L / med(times["hf"]),
                hf_peak_gib=max(peak))


def part_train(spec: dict, a: dict) -> dict:
    import torch

    from gndpo.config import load_config
    from gndpo.train import train

    w = spec["work"]
    out_dir = Path(tempfile.mkdtemp(prefix="train-", dir=spec["workdir"]))
    used = []
    cfg = load_config(None, [
        f"model.path={a['student']}", f"teacher.path={a['teacher']}", f"data.train={a['data']}", "data.image_key=null",
        "model.dtype=float32", "model.compute_dtype=bfloat16", "teacher.dtype=bfloat16", "algorithm.method=gndpo",
        "rollout.backend=vllm",
        "teacher.backend=vllm", f"rollout.n={w['n']}", f"rollout.max_new_tokens={w['new_tokens']}",
        f"rollout.min_new_tokens={w['new_tokens']}", "rollout.vllm.max_model_len=2048",
        "teacher.vllm.max_model_len=2048", f"rollout.vllm.gpu_memory_utilization={MEMORY['student']}",
        f"teacher.vllm.gpu_memory_utilization={MEMORY['teacher']}", f"trainer.prompts_per_step={w['prompts']}",
        f"trainer.micro_batch_size={w['micro_batch']}", f"teacher.micro_batch_size={w['prompts'] * w['n']}",
        f"trainer.total_steps={w['steps']}", "trainer.device=cuda", f"trainer.output_dir={out_dir}",
        "logging.progress=false", "logging.tensorboard=false", "checkpoint.every=0", "checkpoint.save_final=false"])
    train(cfg, callbacks=[lambda record: used.append(device_used_gib())])
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["response_length"] == w["new_tokens"] for r in rows), "not fixed-length"
    steady = rows[1:] or rows
    med = statistics.median
    return dict(steps=[{k: v for k, v in r.items() if k.startswith("time/")} for r in rows],
                step_s=med(r["time/step"] for r in steady), sync_s=med(r["time/weight_sync"] for r in steady),
                phases={k: med(r[k] for r in steady) for k in ("time/rollout", "time/old_logprobs", "time/teacher",
                                                                "time/update")},
                logprob_diff_max=max(r["rollout/logprob_diff_max"] for r in rows),
                sync_gap=rows[0].get("rollout/sync_gap"), torch_peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                device_used_max_gib=max(used))


# ---------------------------------------------------------------- driver


def run_part(part: str, spec: dict, assets: dict) -> dict:
    log = Path(spec["workdir"]) / f"{part}.log"
    with open(log, "w") as err:
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(dict(spec, part=part, assets=assets))],
                              stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT,
                              env=dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false"))
    for line in proc.stdout.splitlines():
        if line.startswith("@result "):
            return json.loads(line[len("@result "):])
    tail = [x for x in log.read_text().splitlines() if x.strip()][-15:]
    return {"error": f"rc={proc.returncode}", "log_tail": tail}


def table(res: dict) -> str:
    w, rows = res["work"], []
    ro, te, tr = res.get("rollout", {}), res.get("teacher", {}), res.get("train", {})
    if "times" in ro:
        note = "" if ro["hf_prompts"] == w["prompts"] else f" (measured on {ro['hf_prompts']} prompts)"
        rows += [["rollout tok/s (whole call)", f"{ro['vllm_tok_s']:.0f}", f"{ro['hf_tok_s']:.0f}{note}",
                  f"{ro['vllm_tok_s'] / ro['hf_tok_s']:.1f}×", "≥ 10×"],
                 ["rollout tok/s (decode only, vLLM)", f"{ro['vllm_decode_tok_s']:.0f}", "", "", ""],
                 ["wake + weight push per rollout (s)", f"{ro['sync_s']:.2f}", "", "", ""],
                 ["peak GPU memory, rollout (GiB)", f"{ro['vllm_engine_gib']:.1f} held ({ro['vllm_kv_tokens']} KV "
                  "tokens)", f"{ro['hf_peak_gib']:.1f}", "", ""]]
    if "times" in te:
        rows += [["teacher scoring tok/s", f"{te['vllm_tok_s']:.0f}", f"{te['hf_tok_s']:.0f}",
                  f"{te['vllm_tok_s'] / te['hf_tok_s']:.1f}×", ""],
                 ["peak GPU memory, teacher (GiB)", f"{te['vllm_engine_gib']:.1f} held ({te['vllm_kv_tokens']} KV "
                  "tokens)", f"{te['hf_peak_gib']:.1f}", "", ""]]
    if "step_s" in tr:
        rows += [["weight sync / step (gndpo.train, vLLM backends)",
                  f"{tr['sync_s']:.2f} s / {tr['step_s']:.1f} s = {100 * tr['sync_s'] / tr['step_s']:.1f} %", "", "",
                  "< 5 %"]]
    for part in PARTS:
        if "error" in res.get(part, {}):
            last = (res[part]["log_tail"] or ["(empty log)"])[-1][:200].replace("|", "/")
            rows.append([f"{part}: FAILED ({res[part]['error']})", last, "", "", ""])
    lines = ["| measure | vLLM | gndpo HF | vLLM / HF | target |", "|---|---|---|---|---|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def dry_build() -> None:
    """On a CPU: the assets at 1 layer per model (full width and vocabulary), loaded and sampled through gndpo."""
    from gndpo.data.loaders import load_records
    from gndpo.data.templates import PAPER_SUFFIX
    from gndpo.models import load_model
    from gndpo.rollout.base import SamplingParams
    from gndpo.rollout.hf import HFRollout

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        a = build_assets(Path(tmp), device="cpu", layers=1, prompts=2)
        student = load_model(a["student"], dtype="bfloat16")
        ro = HFRollout(student.model, student.processor, suffix=PAPER_SUFFIX).generate(
            load_records(a["data"], image_key=None), SamplingParams(n=2, max_new_tokens=4, min_new_tokens=4))
        assert ro.response_ids.shape == (4, 4) and student.model.config.vocab_size == VOCAB
        print(json.dumps(dict(params_full_size=a["params"], tokenizer_size=a["tokenizer_size"],
                              prompt_tokens=ro.prompt_lengths.tolist(), dtype=str(student.model.dtype),
                              seconds=round(time.perf_counter() - t0, 1))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="validate the script: 4 prompts x 4 samples x 64 tokens")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma list of: " + ", ".join(PARTS))
    parser.add_argument("--repeats", type=int, help="timed calls per variant after the warm-up (default 2)")
    parser.add_argument("--hf-prompts", type=int, default=0,
                        help="run the HF loop on only this many prompts (tokens/s measured there; default: all)")
    parser.add_argument("--dry-build", action="store_true", help="on a CPU: build the models at 1 layer and exit")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        fn = {"rollout": part_rollout, "teacher": part_teacher, "train": part_train}[spec["part"]]
        print("@result " + json.dumps(fn(spec, spec["assets"]), default=float), flush=True)
        return
    if args.dry_build:
        return dry_build()
    parts = args.parts.split(",")
    if set(parts) - set(PARTS):
        parser.error(f"unknown parts {sorted(set(parts) - set(PARTS))}; valid: {', '.join(PARTS)}")
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("vllm_rollout.py: no CUDA device (torch.cuda.is_available() is False); run it on a GPU")
    try:
        import vllm
    except Exception as exc:
        raise SystemExit(f"vllm_rollout.py: vLLM does not import ({type(exc).__name__}: {exc}); "
                         "pip install 'gndpo[vllm]'") from None

    work = dict(QUICK if args.quick else WORK)
    work["repeats"] = args.repeats or work["repeats"]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gndpo-gpu-") as tmp:
        assets = build_assets(Path(tmp), device="cuda", prompts=work["prompts"])
        spec = dict(work=work, repeats=work["repeats"], hf_prompts=args.hf_prompts, workdir=tmp)
        res = dict(work=work, device=torch.cuda.get_device_name(), vllm=vllm.__version__, torch=torch.__version__,
                   params=assets["params"], build_s=time.perf_counter() - t0)
        for part in parts:
            res[part] = run_part(part, spec, assets)
            print(f"{part}: {'failed' if 'error' in res[part] else 'done'} ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    res["wall_s"] = time.perf_counter() - t0
    md = (f"{work['prompts']} prompts × {work['n']} samples × {work['new_tokens']} tokens, bf16, {res['device']}, "
          f"vLLM {res['vllm']}, torch {res['torch']}; student {res['params']['student'] / 1e6:.0f} M, teacher "
          f"{res['params']['teacher'] / 1e6:.0f} M parameters (random); {work['repeats']} interleaved repeats, "
          f"medians; wall {res['wall_s']:.0f} s\n\n" + table(res))
    if res.get("rollout", {}).get("hf_prompts", work["prompts"]) != work["prompts"]:
        md += ("\n\nThe HF loop ran on fewer prompts: its tokens/s at the full batch is likely higher (decoding is "
               "bound by per-step overhead there), so the vLLM / HF ratio above overstates vLLM's lead.")
    print(json.dumps(res, default=float))
    print(md)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "vllm_rollout.json").write_text(json.dumps(res, indent=1, default=float))
        Path(os.environ["OUT"], "vllm_rollout.md").write_text(md + "\n")


if __name__ == "__main__":
    main()
