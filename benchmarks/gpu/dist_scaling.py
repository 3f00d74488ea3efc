"""Data-parallel scaling on GPUs: the same global batch on 1, 2, 4, ... N GPUs (torchrun + FSDP2), with random
weights of real sizes, and the peak memory per rank.

    python benchmarks/gpu/dist_scaling.py [--gpus 1,2,4,8] [--steps 4] [--quick]

Student: a Qwen2 of Qwen2.5-1.5B's shape; teacher: Qwen2.5-7B's shape (both bf16, tied embeddings as
published, random weights built from configs, no download). Work: `--prompts` prompts x 16 samples x exactly
`--tokens` response tokens per step (min_new_tokens = max_new_tokens), the hf sampler (the lent image has no
vLLM), gndpo's paper loss. For each GPU count it reports the median over steps 2.. of tokens/s, time per phase
(rollout, old log-probs, teacher, update), the update phase's scaling efficiency against 1 GPU
(t_update(1) / (N * t_update(N))), and the largest rank's peak allocated memory. Targets (issue 11): >= 85 %
update efficiency at 8 GPUs; GNDPO statistics one all-reduce per step (by construction, gndpo.core.advantages).
Writes one JSON line per GPU count and a markdown table to stdout and, when set, to $OUT.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SHAPES = {  # published config.json values of Qwen2.5-1.5B and -7B (hidden, MLP, layers, heads, KV heads, tie)
    "student": (1536, 8960, 28, 12, 2, True),
    "teacher": (3584, 18944, 28, 28, 4, False),
}


def fail(msg: str) -> None:
    sys.exit(f"error: {msg}")


def build(root: Path, quick: bool) -> tuple[Path, Path, Path]:
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
    from conftest import build_bpe_tokenizer  # the tests' offline BPE tokenizer with a chat template

    tok = build_bpe_tokenizer(vocab_size=2000)
    paths = []
    for kind, (h, mlp, layers, heads, kv, tie) in SHAPES.items():
        if quick:
            layers = 2
        cfg = Qwen2Config(vocab_size=151936, hidden_size=h, intermediate_size=mlp, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=tie,
                          max_position_embeddings=32768, bos_token_id=None, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, torch_dtype="bfloat16")
        with torch.device("cuda"):
            model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
        model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        path = root / kind
        model.save_pretrained(path)
        tok.save_pretrained(path)
        paths.append(path)
        del model
        torch.cuda.empty_cache()
    data = root / "prompts.jsonl"
    data.write_text("".join(json.dumps({"id": f"p{i}", "problem": f"What is {i} plus {2 * i}? Explain.",
                                        "answer": str(3 * i)}) + "\n" for i in range(512)))
    return paths[0], paths[1], data


def run(gpus: int, student: Path, teacher: Path, data: Path, out: Path, opts) -> dict:
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    free = port.getsockname()[1]
    port.close()
    args = [f"model.path={student}", f"teacher.path={teacher}", f"data.train={data}", "data.image_key=null",
            "model.dtype=float32", "model.compute_dtype=bfloat16", "teacher.dtype=bfloat16",
            "model.gradient_checkpointing=true",
            "rollout.n=16", f"rollout.max_new_tokens={opts.tokens}", f"rollout.min_new_tokens={opts.tokens}",
            "rollout.micro_batch_size=64", f"trainer.prompts_per_step={opts.prompts}", "trainer.micro_batch_size=8",
            "teacher.micro_batch_size=16", f"trainer.total_steps={opts.steps}", "trainer.device=cuda",
            f"trainer.output_dir={out}", "logging.progress=false", "checkpoint.save_final=false"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(gpus), "--master-addr",
           "127.0.0.1", "--master-port", str(free), "-m", "gndpo.cli", "train", *args]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
        fail(f"{gpus}-GPU run failed: {result.stderr.strip().splitlines()[-1] if result.stderr.strip() else '?'}")
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")][1:] or \
        [json.loads(line) for line in open(out / "metrics.jsonl")]
    med = lambda key: statistics.median(r[key] for r in rows)  # noqa: E731
    return {"gpus": gpus, "tokens_per_sec": med("tokens_per_sec"), "time/step": med("time/step"),
            "time/rollout": med("time/rollout"), "time/old_logprobs": med("time/old_logprobs"),
            "time/teacher": med("time/teacher"), "time/update": med("time/update"),
            "peak_gib": max(r.get("memory/max_allocated_gib", float("nan")) for r in rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", default=None, help="comma-separated GPU counts (default: 1, 2, 4, ... up to all)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=32, help="prompts per step (divisible by every GPU count)")
    parser.add_argument("--tokens", type=int, default=512, help="response tokens per sample (fixed)")
    parser.add_argument("--quick", action="store_true", help="2-layer models, 2 steps, 64 tokens: checks the script")
    opts = parser.parse_args()
    try:
        import torch
    except ImportError:
        fail("torch is not installed")
    if not torch.cuda.is_available():
        fail("no CUDA device: this script measures GPUs (benchmarks/bench_dist.py is the CPU one)")
    available = torch.cuda.device_count()
    counts = [int(x) for x in opts.gpus.split(",")] if opts.gpus else \
        [n for n in (1, 2, 4, 8, 16) if n <= available]
    if any(n > available for n in counts):
        fail(f"asked for {max(counts)} GPUs, {available} visible")
    if opts.quick:
        opts.steps, opts.tokens = 2, 64
    root = Path(tempfile.mkdtemp(prefix="dist_scaling-"))
    student, teacher, data = build(root, opts.quick)
    results = [run(n, student, teacher, data, root / f"run{n}", opts) for n in counts]
    base = results[0]
    lines = ["| GPUs | tokens/s | s/step | rollout | old lp | teacher | update | update efficiency | peak GiB/rank |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        r["update_efficiency"] = base["time/update"] * base["gpus"] / (r["time/update"] * r["gpus"])
        lines.append(f"| {r['gpus']} | {r['tokens_per_sec']:.0f} | {r['time/step']:.2f} | {r['time/rollout']:.2f} | "
                     f"{r['time/old_logprobs']:.2f} | {r['time/teacher']:.2f} | {r['time/update']:.2f} | "
                     f"{100 * r['update_efficiency']:.0f} % | {r['peak_gib']:.1f} |")
    text = "\n".join(json.dumps(r) for r in results) + "\n\n" + "\n".join(lines) + "\n"
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "dist_scaling.md").write_text(text)


if __name__ == "__main__":
    main()
