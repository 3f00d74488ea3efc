"""Seeded, resumable order of prompts: a fresh permutation each epoch, batches never straddle epochs."""
from __future__ import annotations

import torch


class PromptSampler:
    def __init__(self, num_records: int, batch_size: int, *, seed: int, shuffle: bool = True):
        if num_records < 1:
            raise ValueError("PromptSampler needs at least one record")
        self.num_records = num_records
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_records))
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.num_records, generator=g).tolist()

    def next_batch(self) -> list[int]:
        """Indices of the next ``batch_size`` prompts; wraps into a new epoch (and permutation) as needed."""
        out: list[int] = []
        while len(out) < self.batch_size:
            order = self._order()
            take = order[self.position:self.position + self.batch_size - len(out)]
            out.extend(take)
            self.position += len(take)
            if self.position >= self.num_records:
                self.epoch += 1
                self.position = 0
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_records": self.num_records}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
