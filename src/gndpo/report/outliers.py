"""Per-token diagnostics of a step: the outlier metrics logged every step, and rollout samples saved for
``gndpo inspect``.

GNDPO exists because a few sampled tokens the teacher finds near-impossible produce huge log-ratios that dominate
the gradient (arXiv 2606.09091, section 3.1). Per step, over the response tokens:

- ``outlier/max_abs_r``: the largest |r_t|, r_t = log p_teacher - log p_student before the clamp;
- ``clamp_frac`` (logged by the advantage estimator): the share of tokens whose r_t hit the clamp;
- ``outlier/top1pct_adv_share``: the share of sum |A_t| carried by the 1 % of tokens with the largest |A_t|
  (at least one token): 0.01 when every token weighs alike, near 1 when a few dominate;
- ``outlier/kurtosis_r``: the excess kurtosis of r_t (0 for a normal distribution; heavy tails are large);
- ``outlier/extreme_tokens``: the step's most extreme tokens as ``text=r`` (metrics.jsonl only).

Under torchrun each rank's metrics are its own share's; rank 0 logs and saves its own.

At the first step, every ``logging.rollouts_every`` steps and at the last step (``last_step``), so that a short
run has samples too, ``logging.rollouts_per_step`` responses go to
``RUN/rollouts/step-NNNNNN.json.gz`` (gzip JSON, columnar per response: token texts, student and teacher
log-probs, r_t, A_t, clamp flags, the outcome reward), always including the responses that hold the step's most
extreme tokens.
"""
from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import torch

from gndpo.atomic import fsync_dir

ROLLOUTS_DIR = "rollouts"


def log_ratios(teacher_lp: torch.Tensor, student_lp: torch.Tensor) -> torch.Tensor:
    """r_t before the clamp (-inf where the teacher rules a token out)."""
    return teacher_lp.float() - student_lp.float()


def outlier_metrics(r: torch.Tensor | None, advantages: torch.Tensor, mask: torch.Tensor,
                    top_frac: float = 0.01) -> dict[str, float]:
    """The step's outlier metrics over the response tokens (``mask``); ``r`` None for outcome-reward runs."""
    mask = mask.bool()
    out: dict[str, float] = {}
    a = advantages.float()[mask].abs()
    if a.numel():
        k = max(1, math.ceil(top_frac * a.numel()))
        total = float(a.sum())
        out["outlier/top1pct_adv_share"] = float(a.topk(k).values.sum()) / total if total > 0 else 0.0
    if r is not None:
        x = r.float()[mask]
        x = x[torch.isfinite(x)]
        if x.numel():
            out["outlier/max_abs_r"] = float(x.abs().max())
            d = x.double() - x.double().mean()
            var = float((d ** 2).mean())
            out["outlier/kurtosis_r"] = float((d ** 4).mean()) / var ** 2 - 3.0 if var > 0 else 0.0
    return out


def _finite(v: float, nd: int | None = None):
    """A JSON-safe number: rounded when finite, else "inf", "-inf" or "nan"."""
    if math.isfinite(v):
        return round(v, nd) if nd is not None else v
    return str(v)


def _token_texts(tokenizer, ids: list[int]) -> list[str]:
    return [tokenizer.decode([i]) for i in ids]


class OutlierReport:
    """A training-loop callback (``train(..., callbacks=...)``): adds the outlier metrics to each step's
    ``metrics`` and saves rollout samples. ``clamp``: the reward clamp (None: no teacher)."""

    def __init__(self, run_dir: str | Path, tokenizer, *, every: int, per_step: int, clamp: float | None,
                 extreme: int = 8, enabled: bool = True, last_step: int | None = None):
        self.dir = Path(run_dir) / ROLLOUTS_DIR
        self.tokenizer, self.every, self.per_step, self.clamp = tokenizer, every, per_step, clamp
        self.extreme, self.enabled, self.last_step = extreme, enabled, last_step

    def saves(self, step: int) -> bool:
        """Whether ``step`` (1-based) keeps samples: the first, every ``every``-th and the last; none when every=0."""
        return self.every > 0 and (step == 1 or step % self.every == 0 or step == self.last_step)

    def __call__(self, rec) -> None:
        mask = rec.rollouts.response_mask.bool()
        r = None
        if rec.teacher_logprobs is not None and rec.old_logprobs is not None:
            r = log_ratios(rec.teacher_logprobs, rec.old_logprobs)
        rec.metrics.update(outlier_metrics(r, rec.advantages, mask))
        top = self.extreme_tokens(rec, r, mask)
        if top:
            rec.metrics["outlier/extreme_tokens"] = " ".join(
                f"{t['text']!r}={t['value']:.2f}" if isinstance(t["value"], float) else f"{t['text']!r}={t['value']}"
                for t in top[:5])
        if self.enabled and self.saves(rec.step):
            self.save(rec, r, mask, top)

    def extreme_tokens(self, rec, r, mask) -> list[dict]:
        """The tokens with the largest |r_t| (|A_t| for outcome runs), most extreme first."""
        score = (r if r is not None else rec.advantages).float().abs()
        score = torch.where(mask & ~torch.isnan(score), score, torch.full_like(score, -1.0))
        score = torch.where(torch.isinf(score), torch.full_like(score, 1e30), score)
        k = min(self.extreme, int(mask.sum()))
        if k == 0:
            return []
        values, flat = score.flatten().topk(k)
        ids = rec.rollouts.response_ids
        cols = score.shape[1]
        found = []
        for v, f in zip(values.tolist(), flat.tolist()):
            row, pos = divmod(f, cols)
            value = _finite((r if r is not None else rec.advantages)[row, pos].item())
            found.append({"row": row, "pos": pos, "value": value, "text": self.tokenizer.decode([int(ids[row, pos])]),
                          "kind": "r" if r is not None else "A"})
        return found

    def save(self, rec, r, mask, top: list[dict]) -> Path:
        rows = list(dict.fromkeys(t["row"] for t in top))  # the extreme tokens' responses first
        rows += [i for i in range(mask.shape[0]) if i not in rows]
        rows = rows[:max(self.per_step, 1)]
        records = rec.rollouts.records
        responses = []

        def col(x, i, n, nd=4):
            return None if x is None else [_finite(v, nd) for v in x[i, :n].float().tolist()]

        for i in rows:
            n = int(mask[i].sum())
            ids = rec.rollouts.response_ids[i, :n].tolist()
            clamped = None
            if r is not None and self.clamp is not None:
                clamped = [bool(not math.isfinite(v) or abs(v) > self.clamp) for v in r[i, :n].tolist()]
            record = records[int(rec.rollouts.prompt_index[i])]
            responses.append({
                "row": i, "prompt_id": record.id, "prompt": record.prompt, "answer": record.answer,
                "outcome": float(rec.outcome_rewards[i]), "tokens": _token_texts(self.tokenizer, ids),
                "student": col(rec.old_logprobs, i, n), "teacher": col(rec.teacher_logprobs, i, n),
                "r": col(r, i, n), "adv": col(rec.advantages, i, n), "clamped": clamped,
                "div": col(getattr(rec, "divergence", None), i, n)})  # the top-k divergence D_t, dense runs
        payload = {"step": rec.step, "clamp": self.clamp, "extreme": top,
                   "metrics": {k: v for k, v in rec.metrics.items()
                               if isinstance(v, (int, float)) and math.isfinite(v)},
                   "responses": responses}
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"step-{rec.step:06d}.json.gz"
        tmp = path.with_name(path.name + ".tmp")
        with gzip.open(tmp, "wt", encoding="utf-8") as f:
            json.dump(payload, f, allow_nan=False, separators=(",", ":"))
        tmp.replace(path)
        fsync_dir(self.dir)
        return path


def load_rollouts(run_dir: str | Path) -> list[dict]:
    """The saved rollout samples of a run, by step."""
    out = []
    for path in sorted((Path(run_dir) / ROLLOUTS_DIR).glob("step-*.json.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            out.append(json.load(f))
    return out
