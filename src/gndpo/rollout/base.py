"""What every sampler returns, and the protocol a sampler implements (hf: rollout/hf.py; vllm: rollout/vllm.py)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import torch

from gndpo.data.records import PromptRecord


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 512
    min_new_tokens: int = 0  # EOS suppressed before this many tokens (benchmarks)
    greedy: bool = False
    # Base seed of this call (the trainer derives one per step): sample s of prompt p draws from a seed of
    # (seed, p.id, s) alone (request_seed), whatever else the batch, the micro-batch or the rank holds; the hf
    # decode loop and vllm do so. None (and transformers generate): torch's global generator.
    seed: int | None = None


def request_seed(base: int, *parts: Any) -> int:
    """A 63-bit seed from ``base`` and identifying parts (prompt id, sample index): a sample's draws depend on
    what it is, never on which batch or rank it lands in."""
    digest = hashlib.blake2b(repr((base, *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


@dataclass(frozen=True)
class Rollouts:
    """``B = len(records) * n`` sampled responses; response ``i`` answers ``records[prompt_index[i]]``.

    Responses are right-padded with the pad id; the mask covers the generated tokens up to and
    including the first EOS (padding excluded).
    """

    records: tuple[PromptRecord, ...]  # (P,)
    prompt_index: torch.Tensor  # (B,) long: group id of each response
    response_ids: torch.Tensor  # (B, R) long
    response_mask: torch.Tensor  # (B, R) bool
    texts: tuple[str, ...]  # (B,) decoded responses, special tokens removed
    truncated: torch.Tensor  # (B,) bool: hit max_new_tokens before EOS
    prompt_lengths: torch.Tensor  # (B,) long: prompt tokens, images included
    # (B, R) float32: the sampler's own log-prob of each token at the sampling temperature (0 outside the
    # mask), where the backend reports it; the trainer recomputes log-probs and only compares against these.
    sampler_logprobs: torch.Tensor | None = None
    # Backend measurements of this call (e.g. time/weight_sync, rollout/sync_gap), merged into the step's metrics.
    stats: dict = field(default_factory=dict)

    @property
    def size(self) -> int:
        return int(self.response_ids.shape[0])

    def select(self, index: torch.Tensor | Sequence[int]) -> "Rollouts":
        """Subset of responses (records kept whole, so prompt_index stays valid)."""
        idx = torch.as_tensor(index, dtype=torch.long)
        R = int(self.response_mask[idx].sum(-1).max().item()) if len(idx) else 0
        R = max(R, 1)
        return Rollouts(self.records, self.prompt_index[idx], self.response_ids[idx][:, :R],
                        self.response_mask[idx][:, :R], tuple(self.texts[i] for i in idx.tolist()),
                        self.truncated[idx], self.prompt_lengths[idx],
                        None if self.sampler_logprobs is None else self.sampler_logprobs[idx][:, :R])


class RolloutBackend(Protocol):
    def generate(self, records: Sequence[PromptRecord], sampling: SamplingParams, *,
                 encoded: Sequence[dict] | None = None) -> Rollouts:
        """``encoded``: the prompts already encoded by :func:`gndpo.forward.encode_each` with the student's
        processor, for backends that can use them (others ignore it)."""
        ...

    def weights_changed(self) -> None:
        """The trainer's model changed (an optimizer step): a backend holding its own copy of the weights must
        take the new ones before it samples again."""
        ...

    def close(self) -> None:
        """Free what the backend holds (an engine's memory) at the end of a run."""
        ...
