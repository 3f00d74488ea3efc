"""Benchmark: token log-probs + entropy, chunked (gndpo.core.logprobs) vs the naive full log-softmax.

Not a test. Each measurement runs in a fresh subprocess so its peak memory can be read from
``ru_maxrss``: the worker builds the float32 logits, records its peak RSS, runs the variant ``--reps``
times and reports the peak RSS growth ("extra") and the wall time of each call. Variants run
interleaved (A B C A B C ...) and the summary reports medians.

    .venv/bin/python benchmarks/bench_logprobs.py                      # T=8192, V=151851, 2 threads
    .venv/bin/python benchmarks/bench_logprobs.py --tokens 1024        # quick check

Variants (all under torch.no_grad, float32):
  naive     logp = log_softmax(logits); lp = logp.gather(ids); ent = -(exp(logp) * logp).sum(-1)
            (the product is taken in place, so the naive path holds two [T, V] tensors, not three)
  chunked   token_logprobs_and_entropy(logits, ids): one log-softmax per chunk, both outputs
  separate  token_logprobs(logits, ids) then token_entropy(logits): two passes over the logits
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

VARIANTS = ("naive", "chunked", "separate")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def worker(args: argparse.Namespace) -> None:
    import torch

    from gndpo.core.logprobs import token_entropy, token_logprobs, token_logprobs_and_entropy

    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(args.tokens, args.vocab, generator=g)  # (T, V) float32
    ids = torch.randint(0, args.vocab, (args.tokens,), generator=g)  # (T,)

    def naive():
        logp = torch.log_softmax(logits, dim=-1)  # (T, V)
        lp = logp.gather(-1, ids[:, None]).squeeze(-1)  # (T,)
        p = logp.exp()  # (T, V)
        ent = -p.mul_(logp).sum(-1)  # (T,)
        return lp, ent

    def chunked():
        return token_logprobs_and_entropy(logits, ids, chunk_size=args.chunk_size)

    def separate():
        lp = token_logprobs(logits, ids, chunk_size=args.chunk_size)
        return lp, token_entropy(logits, chunk_size=args.chunk_size)

    fn = {"naive": naive, "chunked": chunked, "separate": separate}[args.worker]
    baseline = _peak_rss_bytes()
    times = []
    with torch.no_grad():
        for _ in range(args.reps):
            start = time.perf_counter()
            lp, ent = fn()
            times.append(time.perf_counter() - start)
            checksum = float(lp.double().sum() + ent.double().sum())
            del lp, ent
    extra = _peak_rss_bytes() - baseline
    print(json.dumps({"variant": args.worker, "times": times, "extra_bytes": extra, "checksum": checksum}))


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=151_851)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds, one process per variant each")
    parser.add_argument("--reps", type=int, default=2, help="timed calls per subprocess")
    parser.add_argument("--chunk-size", type=int, default=None, help="tokens per chunk (default: 128 MiB of logits)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    full = args.tokens * args.vocab * 4  # bytes of one [T, V] float32 tensor (the full log-softmax)
    need = 3.2 * full + 2**30  # naive worst case: logits + logp + exp, plus the interpreter
    if _available_bytes() < need:
        sys.exit(f"need ~{need / 2**30:.1f} GiB available memory, have {_available_bytes() / 2**30:.1f} GiB")
    variants = args.variants.split(",")
    results: dict[str, list[dict]] = {v: [] for v in variants}
    cmd = [sys.executable, __file__, "--tokens", str(args.tokens), "--vocab", str(args.vocab),
           "--threads", str(args.threads), "--reps", str(args.reps)]
    if args.chunk_size:
        cmd += ["--chunk-size", str(args.chunk_size)]
    for round_ in range(args.rounds):
        for variant in variants:
            out = subprocess.run(cmd + ["--worker", variant], check=True, capture_output=True, text=True).stdout
            record = json.loads(out.strip().splitlines()[-1])
            results[variant].append(record)
            print(f"round {round_ + 1} {variant:9s} times {[round(t, 2) for t in record['times']]} s, "
                  f"extra {record['extra_bytes'] / 2**20:.0f} MiB", flush=True)

    print(f"\nT={args.tokens} V={args.vocab} fp32, {args.threads} threads; "
          f"full log-softmax = {full / 2**20:.0f} MiB; medians over {args.rounds} processes per variant")
    print("| variant | first call (s) | later calls (s) | later / naive later | peak extra (MiB) "
          "| extra / full log-softmax |")
    print("|---|---|---|---|---|---|")

    def median_time(variant: str, calls: slice) -> float:
        return statistics.median(t for r in results[variant] for t in r["times"][calls])

    later = slice(1, None) if args.reps > 1 else slice(None)
    base = median_time("naive", later) if "naive" in results else None
    for variant in variants:
        first, rest = median_time(variant, slice(0, 1)), median_time(variant, later)
        extra = statistics.median(r["extra_bytes"] for r in results[variant])
        ratio = f"{rest / base:.2f}" if base else "-"
        share = f"1/{full / max(extra, 1):.1f}"
        print(f"| {variant} | {first:.2f} | {rest:.2f} | {ratio} | {extra / 2**20:.0f} | {share} |")
    checksums = {v: results[v][0]["checksum"] for v in variants}
    print(f"\nchecksums (sum of log-probs + entropies, should agree): {checksums}")


if __name__ == "__main__":
    main()
