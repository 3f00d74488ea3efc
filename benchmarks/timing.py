"""Side-by-side timing shared by the benchmarks: variants run back to back, alternating who goes first, so
background load on a shared machine hits each alike; ratios are taken pair by pair."""
from __future__ import annotations

import statistics
import time


def interleaved(variants: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds of each zero-argument callable per repeat, run A B, B A, A B ...; the callables are already warm."""
    times = {k: [] for k in variants}
    for r in range(repeats):
        for k in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
            t0 = time.perf_counter()
            variants[k]()
            times[k].append(time.perf_counter() - t0)
    return times


def speedup(fast: list[float], slow: list[float]) -> float:
    """Median over repeats of slow / fast: each pair ran back to back, under the same load."""
    return statistics.median(s / f for f, s in zip(fast, slow))
