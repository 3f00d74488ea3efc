"""Batches and a thread all-reduce shared by the verl tier's tests."""
import threading

import torch

PATTERNS = ("right", "holes", "full", "empty_row")


def random_batch(seed: int, batch: int, length: int, pattern: str):
    """Teacher / student log-probs (B, L) float32 and a 0/1 response mask of the given padding pattern.

    right: verl's right-padded responses of random length; holes: masked positions inside responses (multi-turn
    tool tokens); full: no padding; empty_row: right padding plus one response without tokens (verl's balance
    padding). Log-ratios reach beyond the +-5 clamp; padding holds junk (NaN, inf, 1e4) that must never matter.
    """
    g = torch.Generator().manual_seed(seed)
    student = -torch.rand(batch, length, generator=g) * 4.0  # (B, L)
    teacher = student + torch.randn(batch, length, generator=g) * 3.0  # (B, L), |log-ratio| up to ~12
    if pattern == "full":
        mask = torch.ones(batch, length, dtype=torch.long)
    else:
        lengths = torch.randint(1, length + 1, (batch,), generator=g)
        mask = (torch.arange(length)[None, :] < lengths[:, None]).long()  # (B, L)
        if pattern == "holes":
            mask = mask * (torch.rand(batch, length, generator=g) > 0.3).long()
            mask[0, 0] = mask[-1, 0] = 1  # at least 2 valid tokens
        if pattern == "empty_row" and batch > 2:
            mask[1] = 0
    junk = torch.tensor([float("nan"), float("inf"), 1e4])
    pad = junk[torch.randint(0, 3, (batch, length), generator=g)]
    teacher = torch.where(mask.bool(), teacher, pad)
    student = torch.where(mask.bool(), student, -pad)
    return teacher, student, mask


class ThreadAllReduce:
    """An all-reduce among ``world`` threads, standing in for torch.distributed across data-parallel ranks."""

    def __init__(self, world: int):
        self.world, self.barrier, self.slots = world, threading.Barrier(world), [None] * world

    def for_rank(self, rank: int):
        def reduce(tensor: torch.Tensor, op: str) -> torch.Tensor:
            self.slots[rank] = tensor
            self.barrier.wait()
            stacked = torch.stack(self.slots)
            out = {"sum": stacked.sum(0), "min": stacked.amin(0), "max": stacked.amax(0)}[op]
            self.barrier.wait()
            return out

        return reduce


def run_ranks(world: int, work):
    """work(rank, reduce) in ``world`` threads; returns the results by rank (re-raising a rank's error)."""
    fake, results, errors = ThreadAllReduce(world), [None] * world, []

    def target(rank):
        try:
            results[rank] = work(rank, fake.for_rank(rank))
        except BaseException as err:  # noqa: BLE001  (re-raised below)
            errors.append(err)
            fake.barrier.abort()

    threads = [threading.Thread(target=target, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results
