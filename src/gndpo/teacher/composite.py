"""Several teachers as one (the ``teachers:`` list): each response is scored by the teacher its prompt record
names in ``data.teacher_key`` (records without it: the default teacher), and the loop still calls one
``score(rollouts)``.

Each member scores only its share of the batch, as a smaller :class:`gndpo.rollout.base.Rollouts` holding just
the prompts it answers; the scores are put back in place, top-k included (every member is built with the same
K), and :attr:`TeacherScores.teacher_ids` says which member scored each response, for per-teacher statistics and
metrics (:mod:`gndpo.core.advantages`). Under torchrun each rank scores its own share of each teacher; a member
whose scoring is a collective (``collective``: the student's own weights under FSDP2) is called on every rank,
with an empty share where a rank has none.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Sequence

import torch

from gndpo.data.records import PromptRecord
from gndpo.errors import DataError
from gndpo.rollout.base import Rollouts
from gndpo.teacher.base import TeacherScores


def router(names: Sequence[str], key: str | None, default: str | None = None) -> Callable[[PromptRecord], int]:
    """The index in ``names`` of the teacher a record's ``key`` field names (``default``, else the first, when the
    field is missing). A name not in ``names`` raises DataError: :func:`check_routes` finds it before training."""
    index = {name: i for i, name in enumerate(names)}
    fallback = index[default if default is not None else names[0]]

    def route(record: PromptRecord) -> int:
        value = record.fields.get(key) if key else None
        if value is None:
            return fallback
        if value not in index:
            raise DataError(f"record {record.id!r} names the teacher {value!r} in its {key!r} field (data.teacher_key), "
                            f"which is not in the teachers: list ({', '.join(names)}); fix the record or add the "
                            "teacher")
        return index[value]

    return route


def check_routes(records: Sequence[PromptRecord], route: Callable[[PromptRecord], int]) -> list[int]:
    """Every record's teacher index; the first record naming an unknown teacher raises its one line."""
    out = []
    for i, record in enumerate(records):
        try:
            out.append(route(record))
        except DataError as exc:
            raise DataError(f"{exc} (record {i} of data.train)") from None
    return out


def share(rollouts: Rollouts, rows: torch.Tensor) -> Rollouts:
    """Responses ``rows`` with only the prompts they answer (``prompt_index`` renumbered)."""
    part = rollouts.select(rows)
    used, local = torch.unique(part.prompt_index, return_inverse=True)
    return replace(part, records=tuple(rollouts.records[int(u)] for u in used), prompt_index=local.reshape(-1))


class RoutedTeacher:
    def __init__(self, members: Sequence[tuple[str, object]], route: Callable[[PromptRecord], int], *, topk: int = 0):
        self.names = tuple(name for name, _ in members)
        self.members = [teacher for _, teacher in members]
        self.route, self.topk = route, topk
        self.collective = any(getattr(t, "collective", False) for t in self.members)

    def assign(self, rollouts: Rollouts) -> torch.Tensor:
        """(B,) long: the member that scores each response."""
        per_prompt = torch.tensor([self.route(r) for r in rollouts.records], dtype=torch.long)  # (P,)
        return per_prompt[rollouts.prompt_index] if len(per_prompt) else torch.zeros(0, dtype=torch.long)

    def score(self, rollouts: Rollouts) -> TeacherScores:
        ids = self.assign(rollouts)  # (B,)
        B, R = rollouts.response_ids.shape
        K = self.topk
        logprobs = torch.zeros(B, R, dtype=torch.float32)  # (B, R)
        top_ids = torch.zeros(B, R, K, dtype=torch.long) if K else None  # (B, R, K)
        top_lps = torch.zeros(B, R, K, dtype=torch.float32) if K else None  # (B, R, K)
        for k, teacher in enumerate(self.members):
            rows = torch.nonzero(ids == k).flatten()  # (n,)
            if not len(rows) and not getattr(teacher, "collective", False):
                continue
            scores = teacher.score(share(rollouts, rows))
            L = min(scores.logprobs.shape[1], R)
            logprobs[rows, :L] = scores.logprobs[:, :L].float()
            if K:
                top_ids[rows, :L] = scores.topk_ids[:, :L]
                top_lps[rows, :L] = scores.topk_logprobs[:, :L].float()
        return TeacherScores(logprobs, top_ids, top_lps, ids)

    def close(self) -> None:
        errors = []
        for teacher in self.members:  # every member frees what it holds, even when one fails to
            try:
                teacher.close()
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)
        if errors:
            raise errors[0]
