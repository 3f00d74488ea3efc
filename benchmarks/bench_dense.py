"""Memory and time of the student's side of a top-k divergence at Qwen's vocabulary (V = 151,936): gndpo's chunked
path against the naive full log-softmax, forward and backward.

    python3 run.py bench bench_dense.py [--tokens 2048] [--topk 20] [--hidden 1024]

Work: final hidden states (N, H) and an LM head (V, H), float32, with gradients; the teacher's top-k ids and
log-probs per token (random, fixed); the loss is the mean forward KL over the top-k plus the tail bucket
(gndpo.core.divergences). Variants:
  naive    logits = h @ W.T (N, V); log_softmax; gather the top-k; the tail by logsumexp over the rest
  chunked  gndpo.core.logprobs.hidden_token_stats(gather=top-k): C = 1024 rows of logits at a time, recomputed in
           backward, the head's gradient accumulated in float32 (what gndpo's update runs)
Both compute the same loss and gradients (checked, 1e-4 relative). Peak tensor memory is measured by torch's
profiler (gndpo.plan.measured_peak_bytes), inputs included; time is the median of --reps calls.
"""
from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--topk", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from gndpo.core.divergences import topk_divergence
    from gndpo.core.logprobs import hidden_token_stats
    from gndpo.plan import measured_peak_bytes

    torch.set_num_threads(args.threads)
    N, H, V, K = args.tokens, args.hidden, args.vocab, args.topk
    g = torch.Generator().manual_seed(0)
    hidden0 = torch.randn(N, H, generator=g) * 0.5
    weight0 = torch.randn(V, H, generator=g) * 0.02
    ids = torch.randint(0, V, (N,), generator=g)
    top_ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(N)])  # (N, K) distinct
    top_lp = torch.log_softmax(torch.randn(N, K + 1, generator=g) * 2, -1)[:, :K]  # a teacher's top-k log-probs

    def loss_of(student_topk, student_rest):
        d, _, _ = topk_divergence("forward_kl", teacher_topk_logprobs=top_lp, student_topk_logprobs=student_topk,
                                  student_rest=student_rest)
        return d.mean()

    def naive(hidden, weight):
        logp = torch.log_softmax(hidden @ weight.t(), -1)  # (N, V)
        rest = torch.logsumexp(logp.scatter(1, top_ids, float("-inf")), 1)
        return loss_of(logp.gather(1, top_ids), rest)

    def chunked(hidden, weight):
        stats = hidden_token_stats(hidden, weight, ids, gather=top_ids, chunk_size=1024)
        return loss_of(stats.gathered, stats.rest)

    results, grads = {}, {}
    for name, fn in (("naive", naive), ("chunked", chunked)):
        times, peak = [], 0
        for rep in range(args.reps):
            start = time.perf_counter()
            if rep == 0:  # the inputs are made inside the profile, so the peak counts them
                with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                    hidden = hidden0.clone().requires_grad_(True)
                    weight = weight0.clone().requires_grad_(True)
                    loss = fn(hidden, weight)
                    loss.backward()
                peak = measured_peak_bytes(prof)
            else:
                hidden = hidden0.clone().requires_grad_(True)
                weight = weight0.clone().requires_grad_(True)
                loss = fn(hidden, weight)
                loss.backward()
            times.append(time.perf_counter() - start)
        results[name] = (peak, statistics.median(times[1:] or times), float(loss.detach()))
        grads[name] = (hidden.grad, weight.grad)
    for a, b in zip(grads["naive"], grads["chunked"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    inputs = (N * H + V * H) * 4 * 2  # the two inputs and their gradients
    print(f"# {N} tokens, V = {V:,}, H = {H}, top-{K} + tail, float32, {args.threads} threads; forward + backward; "
          f"inputs and their gradients alone: {inputs / 2**30:.2f} GiB")
    print("| variant | peak tensor memory (GiB) | beyond inputs + gradients (GiB) | time (s) | loss |")
    print("|---|---|---|---|---|")
    for name, (peak, seconds, loss) in results.items():
        print(f"| {name} | {peak / 2**30:.2f} | {(peak - inputs) / 2**30:.2f} | {seconds:.2f} | {loss:.6f} |")
    (pn, tn, _), (pc, tc, _) = results["naive"], results["chunked"]
    print(f"chunked / naive: memory beyond the inputs {(pc - inputs) / (pn - inputs):.3f}x, time {tc / tn:.2f}x")


if __name__ == "__main__":
    main()
