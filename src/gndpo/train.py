"""The training loop: rollout -> score -> advantages -> clipped policy update -> log -> checkpoint.

GNDPO (arXiv 2606.09091): the per-token reward ``clamp(log p_teacher - log p_student, -5, 5)`` is z-scored
over every response token of the batch and used as the advantage of a GSPO token-level clipped loss
(arXiv 2507.18071). The same loop runs the paper's baselines: OPD (raw clamped log-ratio) and GSPO with
0/1 outcome rewards normalized per prompt group.

Departures from the official verl code, on purpose:
- the loss aggregation mode is honoured (the official GSPO loss ignores it);
- micro-batch losses are scaled by whole-mini-batch denominators, so gradient accumulation gives exactly
  the full-batch gradient whatever the micro-batch size.

This is the only module that knows the whole flow; everything it calls is a pure function or a small
object behind a Protocol. Data-parallel runs change only ``dist`` (its ``all_reduce`` feeds the batch
statistics and the loss denominators).
"""
from __future__ import annotations

import logging
import math
import random
import signal
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import numpy as np
import torch

from gndpo import checkpoint as ckpt
from gndpo.backends import build_rollout, build_teacher, check_teacher_records
from gndpo.config import RunConfig, to_dict
from gndpo.core.advantages import compute_advantages
from gndpo.core.logprobs import TokenStats
from gndpo.core.normstats import Moments, running_step
from gndpo.data.loaders import load_records
from gndpo.data.sampler import PromptSampler
from gndpo.data.templates import PAPER_SUFFIX
from gndpo.dist import LOCAL, DistContext, apply_fsdp, clip_grad_norm
from gndpo.errors import ConfigError, DataError, Interrupted, TrainingError
from gndpo.forward import ResponseScorer, encode_each, pad_token_id, prompt_lengths, repeat_for_samples, rollout_stats
from gndpo.guards import BAD_KEYS, SignalFlag, nonfinite_counts
from gndpo.lora import apply_lora
from gndpo.models import configure_images, dtype_name, load_model, resolve_device, student_dtypes, tokenizer_of
from gndpo.objective import (
    CandidateAdvantages, candidate_step, dense_reward, divergence, divergence_metrics, micro_batch_loss,
    token_advantages,
)
from gndpo.report.loggers import MultiLogger, build_loggers
from gndpo.report.outliers import OutlierReport
from gndpo.rewards import get_reward
from gndpo.rollout.base import Rollouts, SamplingParams
from gndpo.teacher.base import TeacherScores

log = logging.getLogger("gndpo")


@dataclass
class StepRecord:
    """Everything one step computed, handed to callbacks (tests, custom analysis)."""

    step: int
    rollouts: Rollouts
    old_logprobs: torch.Tensor  # (B, R)
    teacher_logprobs: torch.Tensor | None  # (B, R)
    outcome_rewards: torch.Tensor  # (B,)
    advantages: torch.Tensor  # (B, R); dense_mode=reward: its sampled token's candidate's (token_advantages)
    metrics: dict = field(default_factory=dict)
    divergence: torch.Tensor | None = None  # (B, R): the top-k divergence per token (algorithm.distill=topk)
    candidates: CandidateAdvantages | None = None  # dense_mode=reward: every candidate's advantage (B, R, K + 1)


def resolve_suffix(value: str) -> str | None:
    return {"paper": PAPER_SUFFIX, "none": None, "": None}.get(value, value)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------- phases


def compute_step_advantages(cfg: RunConfig, rollouts: Rollouts, old_lp: torch.Tensor, teacher: TeacherScores | None,
                            outcome: torch.Tensor, dist: DistContext, old_stats: TokenStats | None = None,
                            norm: Moments | None = None
                            ) -> tuple[torch.Tensor, dict, torch.Tensor | None, Moments | None]:
    """The step's advantages, their metrics, the per-token top-k divergence under the pre-update student
    (``algorithm.distill=topk``, when ``old_stats`` scored the teacher's top-k; else None), and the running reward
    statistics after this step (``norm``: before it; None unless algorithm.norm_stats=running; core/normstats.py)."""
    a = cfg.algorithm
    mask = rollouts.response_mask
    reduce = dist.all_reduce if dist.distributed else None
    if a.advantage == "grpo":  # groups are whole on a rank: the advantages are local, the metrics pooled
        adv, metrics = compute_advantages("grpo", rewards=outcome, group_ids=rollouts.prompt_index,
                                          response_mask=mask, norm_by_std=a.norm_by_std, reduce=reduce)
        # The reward of an outcome run is the per-response 0/1 score; no log-ratio is clamped.
        n = float(outcome.numel())
        pooled = dist.pool(sums={"mean": (float(outcome.sum()), n), "sq": (float((outcome ** 2).sum()), n)},
                           maxima={"max": float(outcome.max())}, minima={"min": float(outcome.min())})
        total = n * dist.world_size  # every rank holds the same number of responses
        var = max(pooled["sq"] - pooled["mean"] ** 2, 0.0) * total / (total - 1) if total > 1 else 0.0
        metrics = {"reward_mean": pooled["mean"], "reward_std": math.sqrt(var), "reward_min": pooled["min"],
                   "reward_max": pooled["max"], "clamp_frac": 0.0, **metrics}
        return adv, metrics, None, None
    div, extra = None, {}
    if old_stats is not None and old_stats.gathered is not None:  # dense: D_t under the pre-update student
        values = divergence(cfg, teacher.topk_logprobs, old_stats)
        div, extra = values[0], dist.pool(sums=divergence_metrics(values, mask))
    if dense_reward(cfg):  # a reward for every candidate of the teacher's top-k and tail (objective.py)
        adv, metrics, norm = candidate_step(cfg, rollouts.response_ids, mask, teacher, old_stats, reduce, norm,
                                            rollouts.prompt_index)
        return adv, {**metrics, **extra}, div, norm
    norm, norm_metrics = running_step(norm, a.norm_decay, teacher.logprobs, old_lp, mask, a.reward_clamp,
                                      reduce) if a.norm_stats == "running" else (None, {})
    # several teachers: per-teacher metrics, and per-teacher statistics with algorithm.teacher_norm=per_teacher
    scope = "teacher" if a.teacher_norm == "per_teacher" else a.scope
    adv, metrics = compute_advantages(a.advantage, teacher_logprobs=teacher.logprobs, student_logprobs=old_lp,
                                      response_mask=mask, clamp=a.reward_clamp, scope=scope, reduce=reduce,
                                      group_ids=rollouts.prompt_index, moments=norm,
                                      teacher_ids=teacher.teacher_ids, teacher_names=tuple(t.name for t in cfg.teachers))
    return adv, {**metrics, **extra, **norm_metrics}, div, norm


def backward_micro_batches(cfg: RunConfig, model, rollouts: Rollouts, encoded: Sequence[dict], seq: torch.Tensor,
                           old_lp: torch.Tensor | None, advantages: torch.Tensor, totals: torch.Tensor, *,
                           pad_id: int, with_entropy: bool, teacher: TeacherScores | None = None
                           ) -> tuple[float, list, tuple[float, float]]:
    """Forward and backward the loss of rows ``seq`` (``objective.micro_batch_loss``) micro-batch by micro-batch,
    gradients accumulating to the whole mini-batch's (``totals``: its token and sequence counts over all ranks).
    Returns the loss sum, per micro-batch (token count, loss metrics), and (entropy sum, token count)."""
    loss_sum, mb_metrics, ent_sum, ent_count = 0.0, [], 0.0, 0.0
    for start in range(0, len(seq), cfg.trainer.micro_batch_size):
        idx = seq[start:start + cfg.trainer.micro_batch_size]
        part = rollouts.select(idx)
        R = part.response_ids.shape[1]
        loss, lm, ent = micro_batch_loss(cfg, model, encoded, part, old_lp=None if old_lp is None else old_lp[idx, :R],
                                         advantages=advantages[idx, :R], totals=totals, pad_id=pad_id,
                                         teacher=None if teacher is None else teacher.select(idx),
                                         with_entropy=with_entropy)
        loss.backward()
        loss_sum += float(loss.detach())
        mb_metrics.append((float(part.response_mask.sum()), lm))
        if ent is not None:
            ent_sum += float((ent * part.response_mask.to(ent.device)).sum())
            ent_count += float(part.response_mask.sum())
    return loss_sum, mb_metrics, (ent_sum, ent_count)


def top_token_grad_share(cfg: RunConfig, model, rollouts: Rollouts, encoded: Sequence[dict], old_lp, advantages, *,
                         pad_id: int, dist: DistContext, top_frac: float = 0.01,
                         teacher: TeacherScores | None = None) -> float:
    """Opt-in diagnostic (``logging.outlier_grad_share``): the gradient norm of this step's loss restricted to the
    1 % of tokens with the largest |A_t|, over the norm of the whole loss, at the pre-update weights. Two extra
    backward passes; gradients are cleared after."""
    mask = rollouts.response_mask.bool()
    k = max(1, math.ceil(top_frac * int(mask.sum())))
    top = torch.zeros_like(mask)
    top.view(-1)[advantages.abs().masked_fill(~mask, -1.0).flatten().topk(k).indices] = True
    params = [p for p in model.parameters() if p.requires_grad]
    seq = torch.arange(rollouts.size)
    totals = dist.all_reduce(torch.tensor([float(mask.sum()), float(rollouts.size)], dtype=torch.float64))
    norms = []
    for adv in (advantages, advantages * top):
        for p in params:
            p.grad = None
        backward_micro_batches(cfg, model, rollouts, encoded, seq, old_lp, adv, totals, pad_id=pad_id,
                               with_entropy=False, teacher=teacher)
        norms.append(clip_grad_norm(params, math.inf, dist))
    for p in params:
        p.grad = None
    return norms[1] / norms[0] if norms[0] > 0 else 0.0


def update_policy(cfg: RunConfig, model, optimizer, scheduler, rollouts: Rollouts, encoded: Sequence[dict],
                  old_lp: torch.Tensor | None, advantages: torch.Tensor, *, pad_id: int, dist: DistContext,
                  generator: torch.Generator, teacher: TeacherScores | None = None) -> dict:
    """Epochs x mini-batches of clipped policy-gradient steps, each accumulated over micro-batches.

    ``encoded``: the prompts of ``rollouts.records`` encoded once by :func:`encode_each`. ``old_lp`` None:
    the first forward's own log-probs, detached, serve as the old policy's (exact for a single update).
    """
    a = cfg.algorithm
    params = [p for p in model.parameters() if p.requires_grad]
    n_groups = len(rollouts.records)
    groups_per_mini = n_groups // a.mini_batches
    stats: dict[str, list[float]] = {}
    ent_sum, ent_count = 0.0, 0.0
    model.train()
    for epoch in range(a.epochs):
        # Mini-batches hold whole prompt groups (group statistics stay on one rank/mini-batch).
        group_order = torch.randperm(n_groups, generator=generator) if a.mini_batches > 1 else torch.arange(n_groups)
        for m in range(a.mini_batches):
            groups = group_order[m * groups_per_mini:(m + 1) * groups_per_mini]
            seq = torch.nonzero(torch.isin(rollouts.prompt_index, groups)).flatten()  # (S,)
            mask = rollouts.response_mask[seq]
            # Whole-mini-batch denominators (all ranks), so the accumulated gradient is the full-batch one.
            totals = dist.all_reduce(torch.tensor([float(mask.sum()), float(len(seq))], dtype=torch.float64))
            optimizer.zero_grad(set_to_none=True)
            loss_sum, mb_metrics, ent = backward_micro_batches(cfg, model, rollouts, encoded, seq, old_lp, advantages,
                                                               totals, pad_id=pad_id, with_entropy=epoch == 0,
                                                               teacher=teacher)
            ent_sum, ent_count = ent_sum + ent[0], ent_count + ent[1]
            # the global norm over every rank's gradient shards (FSDP2), clipped in place
            grad_norm = clip_grad_norm(params, cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf, dist)
            if math.isfinite(grad_norm):
                optimizer.step()
                scheduler.step()
            else:  # a non-finite gradient would destroy the weights: skip this step and say so
                log.warning("non-finite grad norm; optimizer step skipped")
            optimizer.zero_grad(set_to_none=True)
            stats.setdefault("loss", []).append(float(dist.all_reduce(torch.tensor(loss_sum, dtype=torch.float64))))
            stats.setdefault("grad_norm", []).append(grad_norm)
            stats.setdefault("update_skipped", []).append(0.0 if math.isfinite(grad_norm) else 1.0)
            tok = sum(w for w, _ in mb_metrics)  # token-weighted over the micro-batches of all ranks
            pooled = dist.pool(sums={key: (sum(w * lm[key] for w, lm in mb_metrics), tok) for key in mb_metrics[0][1]})
            for key, value in pooled.items():
                stats.setdefault(key, []).append(value)
    out = {k: float(np.mean(v)) for k, v in stats.items()}
    out["grad_norm_max"] = float(np.max(stats["grad_norm"]))
    out["entropy"] = dist.pool(sums={"entropy": (ent_sum, ent_count)})["entropy"]
    out["lr"] = scheduler.get_last_lr()[0]
    return out


def old_logprobs_redundant(cfg: RunConfig) -> bool:
    """True when the pre-update log-probs are needed only as the ratio's denominator of a single update."""
    a = cfg.algorithm
    return a.reuse_logprobs and a.advantage == "grpo" and a.epochs == 1 and a.mini_batches == 1


def rollout_metrics(rollouts: Rollouts, outcome: torch.Tensor, old_lp: torch.Tensor | None = None,
                    dist: DistContext = LOCAL) -> dict:
    """Per-response means and maxima over every rank's rollouts."""
    lengths = rollouts.response_mask.sum(-1).float()
    n = float(outcome.numel())
    maxima = {"response_length_max": float(lengths.max())}
    if old_lp is not None and rollouts.sampler_logprobs is not None and old_lp is not rollouts.sampler_logprobs:
        # sampler vs trainer log-probs of the same tokens: at most ~5e-5 when both run the same fp32 model; a
        # large value means the rollouts are off-policy (dtype, kernels or a stale sampler)
        diff = (old_lp - rollouts.sampler_logprobs).abs()[rollouts.response_mask]
        maxima["rollout/logprob_diff_max"] = float(diff.max()) if diff.numel() else 0.0
    return dist.pool(sums={"accuracy": (float(outcome.sum()), n), "response_length": (float(lengths.sum()), n),
                           "truncated_frac": (float(rollouts.truncated.float().sum()), n),
                           "prompt_length": (float(rollouts.prompt_lengths.float().sum()), n)}, maxima=maxima)


# ---------------------------------------------------------------- setup


def read_records(cfg: RunConfig) -> list:
    d = cfg.data
    fmt = "auto" if d.format in ("jsonl", "parquet", "datasets") else d.format
    return load_records(d.train, split=d.split, format=fmt, prompt_key=d.prompt_key, answer_key=d.answer_key,
                        image_key=d.image_key, id_key=d.id_key, limit=d.limit)


def drop_long_prompts(cfg: RunConfig, records: list, processor, suffix) -> tuple[list, int]:
    """Records whose rendered prompt fits ``data.max_prompt_length``, and how many were skipped."""
    d = cfg.data
    lengths = prompt_lengths(processor, records, suffix=suffix, system_prompt=d.system_prompt)
    keep = [r for r, n in zip(records, lengths) if n <= d.max_prompt_length]
    skipped = len(records) - len(keep)
    if not keep:
        raise DataError(f"every prompt in {d.train} is longer than data.max_prompt_length={d.max_prompt_length} tokens "
                        f"(shortest: {min(lengths)}); raise data.max_prompt_length")
    if skipped:
        log.warning("skipped %d of %d prompts longer than data.max_prompt_length=%d", skipped, len(records),
                    d.max_prompt_length)
    return keep, skipped


def build_optimizer(cfg: RunConfig, model):
    o = cfg.optim
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)
    warm = o.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
    return optimizer, scheduler


def train(cfg: RunConfig, *, dist: DistContext = LOCAL,
          callbacks: Sequence[Callable[[StepRecord], None]] = ()) -> dict:
    """Run (or resume) training as configured, on this process's share of every step when ``dist`` spans several
    (torchrun). Returns the last step's metrics."""
    t_cfg, a = cfg.trainer, cfg.algorithm
    if t_cfg.threads:
        torch.set_num_threads(t_cfg.threads)
    if t_cfg.prompts_per_step % dist.world_size:  # whole prompt groups per rank, equal shares
        raise ConfigError(f"trainer.prompts_per_step={t_cfg.prompts_per_step} is not divisible by the "
                          f"{dist.world_size} processes; use a multiple of {dist.world_size}")
    if dist.distributed and cfg.model.lora.rank > 0:
        raise ConfigError("LoRA (model.lora.rank > 0) trains in one process only for now; drop torchrun or LoRA")
    resume_from = dist.on_main(lambda: ckpt.prepare_run_dir(t_cfg.output_dir, config=to_dict(cfg),
                                                            resume=t_cfg.resume))
    seed_everything(t_cfg.seed + dist.rank)
    device = resolve_device(t_cfg.device)
    suffix = resolve_suffix(cfg.data.prompt_suffix)

    records = read_records(cfg)  # data errors surface before any model loads
    check_teacher_records(cfg, records)  # context fields, teacher names
    # float32 masters, bf16 compute on GPUs: autocast in one process, FSDP2's MixedPrecisionPolicy under torchrun
    stored, compute = student_dtypes(cfg.model.dtype, cfg.model.compute_dtype, device, lora=cfg.model.lora.rank > 0)
    mixed = compute if compute != stored else None
    if stored != torch.float32 and cfg.model.lora.rank == 0:
        log.warning("model.dtype=%s keeps no float32 master weights: AdamW steps below half a %s ulp (at lr %g, "
                    "most of them) round away; use model.dtype=float32 model.compute_dtype=%s", dtype_name(stored),
                    dtype_name(stored), cfg.optim.lr, dtype_name(stored))
    student = load_model(cfg.model.path, what="model", dtype=dtype_name(stored), device=device,
                         trust_remote_code=cfg.model.trust_remote_code, attn_implementation=cfg.model.attn_implementation,
                         allow_pickle=cfg.model.allow_pickle)
    model, processor = student.model, student.processor
    images = dict(max_tiles=cfg.data.max_image_tiles, min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels)
    configure_images(processor, **images)
    if cfg.model.gradient_checkpointing:  # renamed activation_checkpointing_enable in transformers 5.24
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    adapters = apply_lora(model, cfg.model.lora)  # None unless model.lora.rank > 0; `model` stays the compute path
    saved = adapters if adapters is not None else model  # what checkpoints hold: the adapters, or the full model
    scorer = ResponseScorer(model, autocast=None if dist.distributed else mixed)  # every student pass enters here
    if dist.distributed:  # the scorer is FSDP2's root
        apply_fsdp(scorer, model, param_dtype=mixed, reduce_dtype=_dtype(cfg.dist.reduce_dtype),
                   cpu_offload=cfg.dist.cpu_offload)
    records, skipped_prompts = drop_long_prompts(cfg, records, processor, suffix)
    teacher = None
    if a.advantage in ("gndpo", "opd"):
        teacher = build_teacher(cfg, processor, suffix=suffix, records=records, device=device, images=images, dist=dist,
                                scorer=scorer)
    rollout = build_rollout(cfg, model, processor, suffix=suffix, records=records, device=device, scorer=scorer,
                            dist=dist)
    reward_fn = get_reward(a.outcome_reward)
    sampling = SamplingParams(n=cfg.rollout.n, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                              top_k=cfg.rollout.top_k, max_new_tokens=cfg.rollout.max_new_tokens,
                              min_new_tokens=cfg.rollout.min_new_tokens)
    optimizer, scheduler = build_optimizer(cfg, scorer)
    sampler = PromptSampler(len(records), t_cfg.prompts_per_step, seed=t_cfg.seed, shuffle=cfg.data.shuffle)
    minibatch_gen = torch.Generator().manual_seed(t_cfg.seed)

    start_step, last_record, norm = 0, None, None  # norm: running reward statistics (algorithm.norm_stats=running)
    if resume_from is not None:
        state = ckpt.load_checkpoint(resume_from, model=saved, optimizer=optimizer, scheduler=scheduler)
        rollout.weights_changed()
        start_step = int(state["step"])
        sampler.load_state_dict(state["sampler"])
        minibatch_gen.set_state(state["minibatch_generator"])
        last_record = state.get("metrics")  # the checkpoint's own step line, should the kill have cut it
        norm = Moments(*state["norm_moments"]) if state.get("norm_moments") else None
        log.info("resumed from %s at step %d", resume_from, start_step)

    loggers = build_loggers(t_cfg.output_dir, tensorboard=cfg.logging.tensorboard, wandb=cfg.logging.wandb,
                            wandb_project=cfg.logging.wandb_project, run_name=cfg.logging.run_name,
                            config=to_dict(cfg), resume_step=start_step if t_cfg.resume else None,
                            resume_record=last_record) \
        if dist.is_main else MultiLogger([])
    from tqdm.auto import tqdm

    bar = tqdm(total=t_cfg.total_steps, initial=start_step, desc=f"{a.method}", unit="step",
               disable=not (cfg.logging.progress and dist.is_main), dynamic_ncols=True)
    metrics: dict = {}
    share = t_cfg.prompts_per_step // dist.world_size
    outliers = OutlierReport(t_cfg.output_dir, tokenizer_of(processor), every=cfg.logging.rollouts_every,
                             per_step=cfg.logging.rollouts_per_step, clamp=a.reward_clamp if teacher else None,
                             enabled=dist.is_main, last_step=t_cfg.total_steps)  # metrics + samples for gndpo inspect
    bad_run = 0  # consecutive steps with non-finite values
    signals = SignalFlag()  # SIGTERM/SIGINT: finish the step, then stop (checkpoint.on_signal)
    try:
        for step in range(start_step, t_cfg.total_steps):
            timer = time.perf_counter()
            # the same global batch on every rank (same seed); each takes its slice of whole prompt groups
            batch = [records[i] for i in sampler.next_batch()[dist.rank * share:(dist.rank + 1) * share]]
            encoded = encode_each(processor, batch, suffix=suffix, system_prompt=cfg.data.system_prompt)
            rollouts = rollout.generate(batch, replace(sampling, seed=t_cfg.seed * 1_000_003 + step), encoded=encoded)
            t_rollout = time.perf_counter()
            scores = teacher.score(rollouts) if teacher is not None else None  # TeacherScores (+ its top-k)
            teacher_lp = scores.logprobs if scores is not None else None
            t_teacher = time.perf_counter()
            old_lp, old_stats = None, None  # taken from the update's own forward when the separate pass is redundant
            if a.old_logprobs == "sampler" and rollouts.sampler_logprobs is not None:
                old_lp = rollouts.sampler_logprobs
            elif not old_logprobs_redundant(cfg):
                if a.old_logprobs == "sampler" and step == start_step:
                    log.warning("algorithm.old_logprobs=sampler: this model is sampled with transformers "
                                "generate, which reports no log-probs; recomputing them")
                model.eval()  # the pre-update policy without dropout, as the sampler ran it (the update sets train())
                with torch.no_grad():  # (and the student's probabilities of the teacher's top-k, when dense)
                    old_stats = rollout_stats(scorer, processor, rollouts, micro_batch_size=t_cfg.micro_batch_size,
                                              suffix=suffix, system_prompt=cfg.data.system_prompt,
                                              temperature=cfg.rollout.temperature, encoded=encoded,
                                              gather=scores.topk_ids if scores is not None else None)
                old_lp = old_stats.logprobs
            t_old = time.perf_counter()
            outcome = torch.tensor(reward_fn(rollouts.texts, [r.answer for r in repeat_for_samples(
                rollouts.records, rollouts.prompt_index)]), dtype=torch.float32)  # (B,)
            t_reward = time.perf_counter()
            # a step with NaN/inf where it matters is skipped on every rank alike: nothing reaches the weights
            bad = nonfinite_counts(rollouts.response_mask, old_lp, teacher_lp, None)
            skip = dist.pool(maxima={"bad": float(any(bad.values()))})["bad"]
            advantages, adv_metrics, div = torch.zeros(rollouts.response_mask.shape), {"reward_mean": math.nan}, None
            if not skip:
                advantages, adv_metrics, div, new_norm = compute_step_advantages(cfg, rollouts, old_lp, scores, outcome,
                                                                                 dist, old_stats, norm)
                bad.update(nonfinite_counts(rollouts.response_mask, old_lp, teacher_lp, token_advantages(advantages)))
                skip = dist.pool(maxima={"bad": float(any(bad.values()))})["bad"]
                norm = norm if skip else new_norm  # a skipped step leaves the running statistics as they were
            t_adv = time.perf_counter()
            if skip:
                upd = {"loss": math.nan, "grad_norm": math.nan, "grad_norm_max": math.nan, "entropy": math.nan,
                       "update_skipped": 1.0, "lr": scheduler.get_last_lr()[0]}  # nothing reaches the weights
            else:
                if cfg.logging.outlier_grad_share:
                    adv_metrics["outlier/top1pct_grad_share"] = top_token_grad_share(
                        cfg, scorer, rollouts, encoded, old_lp, advantages, pad_id=pad_token_id(processor), dist=dist,
                        teacher=scores)
                upd = update_policy(cfg, scorer, optimizer, scheduler, rollouts, encoded, old_lp, advantages,
                                    pad_id=pad_token_id(processor), dist=dist, generator=minibatch_gen, teacher=scores)
            bad["bad/gradients"] = float(upd["update_skipped"] > 0 and not any(bad.values()))
            rollout.weights_changed()  # a vLLM engine takes the new weights before its next rollout
            t_update = time.perf_counter()

            n_tokens = float(dist.all_reduce(torch.tensor(float(rollouts.response_mask.sum()))))  # all ranks
            metrics = {**upd, **adv_metrics, **rollout_metrics(rollouts, outcome, old_lp, dist), **rollouts.stats,
                       "skipped_prompts": float(skipped_prompts), "epoch": float(sampler.epoch),
                       "time/rollout": t_rollout - timer, "time/teacher": t_teacher - t_rollout,
                       "time/old_logprobs": t_old - t_teacher, "time/reward": t_reward - t_old,
                       "time/advantages": t_adv - t_reward, "time/update": t_update - t_adv, **bad,
                       "bad_step": float(any(bad.values()))}
            for cb in (outliers, *callbacks):
                cb(StepRecord(step + 1, rollouts, old_lp, teacher_lp, outcome, token_advantages(advantages), metrics,
                              div, advantages if isinstance(advantages, CandidateAdvantages) else None))
            done = step + 1
            # the same on every rank: a skipped step is skipped everywhere, and update_skipped follows the global norm
            bad_run = bad_run + 1 if metrics["bad_step"] else 0
            stop = dist.pool(maxima={"stop": float(signals.received)})["stop"]  # every rank stops at the same step
            if should_save(cfg, done) or (stop and cfg.checkpoint.on_signal == "save"):
                ckpt.save_checkpoint(t_cfg.output_dir, done, model=saved, optimizer=optimizer, scheduler=scheduler,
                                     processor=processor, config=to_dict(cfg), keep_last=cfg.checkpoint.keep_last,
                                     state={"step": done, "sampler": sampler.state_dict(), "metrics": dict(metrics),
                                            "minibatch_generator": minibatch_gen.get_state(),
                                            "norm_moments": tuple(norm) if norm else None,
                                            "source_dtype": student.source_dtype}, dist=dist)
            t_end = time.perf_counter()
            metrics["time/checkpoint"] = t_end - t_update
            metrics["time/step"] = t_end - timer
            metrics["tokens_per_sec"] = n_tokens / max(t_end - timer, 1e-9)
            if device.type == "cuda":  # the fullest rank's peak since the run started
                metrics.update(dist.pool(maxima={"memory/max_allocated_gib": torch.cuda.max_memory_allocated() / 2**30}))
            if dist.is_main:
                loggers.log(metrics, done)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", gnorm=f"{metrics['grad_norm']:.3f}",
                            reward=f"{metrics['reward_mean']:.3f}", acc=f"{metrics['accuracy']:.3f}", refresh=False)
            bar.update(1)
            if t_cfg.max_bad_steps and bad_run >= t_cfg.max_bad_steps:
                raise TrainingError(f"{bad_run} consecutive steps (up to step {done}) had non-finite values "
                                    f"({', '.join(k for k in BAD_KEYS if metrics.get(k))}); none updated the "
                                    f"weights. Check the teacher and the data, lower optim.lr, or raise "
                                    f"trainer.max_bad_steps")
            if stop:
                saved_note = (f"checkpoint step-{done:06d} written; resume with --resume"
                              if cfg.checkpoint.on_signal == "save" else "no checkpoint written (checkpoint."
                              "on_signal=exit); --resume continues from the last one")
                raise Interrupted(int(stop), f"stopped by {signal.Signals(int(stop)).name} after step {done}: "
                                             f"{saved_note}")
    finally:
        signals.restore()
        bar.close()
        loggers.close()
        rollout.close()
        if teacher is not None:
            teacher.close()
    return metrics


def _dtype(name: str | None) -> torch.dtype | None:
    return None if name is None else getattr(torch, name)


def should_save(cfg: RunConfig, step: int) -> bool:
    c = cfg.checkpoint
    return (c.every > 0 and step % c.every == 0) or (c.save_final and step == cfg.trainer.total_steps)
