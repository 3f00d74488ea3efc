"""Where the time of one gndpo training step goes (issue 5). Not a test.

    python3 run.py bench profile_step.py                               # GNDPO, all parts, ~3 minutes
    python3 run.py bench profile_step.py --method gspo --parts peak,phases

Same tiny Qwen2 student/teacher and the same work as ``race_trl.py --full`` (8 prompts x 4 samples x 64
new tokens, micro-batch 8, 2 threads, ``OMP_WAIT_POLICY=PASSIVE``; see race_trl.py). Five parts, each in its
own subprocess:

1. ``peak``    fp32 ``torch.matmul`` FLOP/s at 2 threads: a large square GEMM (the machine's peak) and the
               GEMM shapes of the student's own linear layers (what a micro-batch can reach at best).
2. ``phases``  a plain ``gndpo.train`` run: per-phase seconds (rollout, student old log-probs, teacher,
               reward, advantages, update, logging = step period minus ``time/step``) and share of the step,
               steady state (first step excluded, median over steps); estimated FLOPs per phase
               (2 x params x tokens per forward, 6 x params x tokens per forward + backward; generation
               counted as one forward over prompt + response) and achieved FLOP/s against the peak.
3. ``cprofile`` the same run under cProfile, from the end of step 1 to the end of the last update: chosen
               gndpo, transformers and torch functions with calls and cumulative seconds per step, and the
               functions with the most self time.
4. ``ops``     ``torch.profiler`` over one steady step: the aten operators with the most self CPU time.
5. ``whatif``  prototypes of the speed-ups the profile points at, each checked against gndpo's own result and
               timed against it on one real rollout batch: a shared prompt prefix (KV cache of each prompt
               computed once for its n samples) in teacher scoring, old log-probs and the update; a minimal
               sampling loop (prefill once per prompt, inverse-CDF sampling, sampled-token log-probs kept);
               gndpo's sampler with ``top_k=0`` passed explicitly; micro-batch size; AdamW variants.

cProfile adds overhead to Python-heavy code (generation's per-token loop most); use part 2 for absolute
times and part 3 for where, within a phase, the time goes.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import race_trl  # noqa: E402  (shared assets: tokenizer, student, teacher, prompts)

ROOT = race_trl.ROOT
WORK = dict(prompts=8, n=4, max_new_tokens=64, micro_batch=8, threads=2, lr=1e-5, seed=0)

# (label, target): "module:Qualname" is one exact function; "file part|name" sums every function of that name in
# matching files (only for names that do not nest). Cumulative seconds and calls per steady step are reported.
FUNCTIONS = [
    ("HFRollout.generate (whole rollout)", "gndpo.rollout.hf:HFRollout.generate"),
    ("- gndpo decode loop (rollout.engine=loop)", "gndpo.rollout.decode:decode"),
    ("- - filter_logits", "gndpo.rollout.decode:filter_logits"),
    ("- - sample_tokens (inverse-CDF)", "gndpo.rollout.decode:sample_tokens"),
    ("- - KV cache write (reserved layers)", "gndpo/rollout/decode.py|update"),
    ("- GenerationMixin.generate (rollout.engine=generate)", "transformers.generation.utils:GenerationMixin.generate"),
    ("- _sample (decode loop)", "transformers.generation.utils:GenerationMixin._sample"),
    ("- logits processors (LogitsProcessorList)",
     "transformers.generation.logits_process:LogitsProcessorList.__call__"),
    ("- - of which TopKLogitsWarper", "transformers.generation.logits_process:TopKLogitsWarper.__call__"),
    ("- stopping criteria (StoppingCriteriaList)",
     "transformers.generation.stopping_criteria:StoppingCriteriaList.__call__"),
    ("- prepare_inputs_for_generation", "transformers.generation.utils:GenerationMixin.prepare_inputs_for_generation"),
    ("- _update_model_kwargs_for_generation",
     "transformers.generation.utils:GenerationMixin._update_model_kwargs_for_generation"),
    ("- DynamicLayer.update (KV cache append)", "transformers.cache_utils:DynamicLayer.update"),
    ("- batch_decode of responses", "transformers.tokenization_utils_base:PreTrainedTokenizerBase.batch_decode"),
    ("Qwen2ForCausalLM.forward (generation)", "transformers.models.qwen2.modeling_qwen2:Qwen2ForCausalLM.forward"),
    ("Qwen2Model.forward (all: generation + scoring + update)",
     "transformers.models.qwen2.modeling_qwen2:Qwen2Model.forward"),
    ("- create_causal_mask", "transformers.masking_utils:create_causal_mask"),
    ("- Qwen2DecoderLayer.forward", "transformers.models.qwen2.modeling_qwen2:Qwen2DecoderLayer.forward"),
    ("- Qwen2Attention.forward", "transformers.models.qwen2.modeling_qwen2:Qwen2Attention.forward"),
    ("- Qwen2MLP.forward", "transformers.models.qwen2.modeling_qwen2:Qwen2MLP.forward"),
    ("- Qwen2RMSNorm.forward", "transformers.models.qwen2.modeling_qwen2:Qwen2RMSNorm.forward"),
    ("- Qwen2RotaryEmbedding.forward", "transformers.models.qwen2.modeling_qwen2:Qwen2RotaryEmbedding.forward"),
    ("rollout_stats (student old log-probs + teacher)", "gndpo.forward:rollout_stats"),
    ("HFTeacher.score", "gndpo.teacher.hf:HFTeacher.score"),
    ("response_stats (old + teacher + update)", "gndpo.forward:response_stats"),
    ("- _HiddenLogprobs.forward (chunked LM head)", "gndpo.core.logprobs:_HiddenLogprobs.forward"),
    ("- _HiddenLogprobs.backward", "gndpo.core.logprobs:_HiddenLogprobs.backward"),
    ("encode_prompts (rollout + old + teacher + update)", "gndpo.forward:encode_prompts"),
    ("- render_prompts (chat template)", "gndpo.forward:render_prompts"),
    ("- tokenizer __call__", "transformers.tokenization_utils_base:PreTrainedTokenizerBase.__call__"),
    ("Rollouts.select", "gndpo.rollout.base:Rollouts.select"),
    ("reward: math_reward", "gndpo.rewards.math:math_reward"),
    ("compute_step_advantages", "gndpo.train:compute_step_advantages"),
    ("update_policy", "gndpo.train:update_policy"),
    ("- compute_policy_loss", "gndpo.core.losses:compute_policy_loss"),
    ("- torch.autograd.backward", "torch.autograd:backward"),
    ("- clip_grad_norm_", "torch/nn/utils/clip_grad.py|clip_grad_norm_"),
    ("- AdamW.step", "torch.optim.adamw:AdamW.step"),
    ("metrics loggers", "gndpo.report.loggers:MultiLogger.log"),
]


def _resolve(target: str):
    """(filename, first line, name) of a "module:Qualname" target, or None when it does not resolve."""
    import importlib
    import inspect

    mod, _, qual = target.partition(":")
    try:
        obj = importlib.import_module(mod)
        for part in qual.split("."):
            obj = getattr(obj, part)
        code = inspect.unwrap(obj).__code__
    except (ImportError, AttributeError):
        return None
    return code.co_filename, code.co_firstlineno, code.co_name


def _spec(meta: dict, method: str, steps: int, out_dir: Path) -> dict:
    return dict(WORK, worker=f"gndpo:{method}", steps=steps, student=meta["student"], teacher=meta["teacher"],
                prompts_file=meta["prompts"], out_dir=str(out_dir))


def _config(spec: dict):
    from gndpo.config import load_config

    return load_config(None, race_trl._gndpo_overrides(spec))


# ---------------------------------------------------------------- part 1: matmul peak


def part_peak(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])

    def gflops(m, k, n, reps):
        a, b = torch.randn(m, k), torch.randn(k, n)
        torch.matmul(a, b)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.matmul(a, b)
            times.append(time.perf_counter() - t0)
        return 2 * m * k * n / statistics.median(times) / 1e9, 2 * m * k * n / min(times) / 1e9

    big = [gflops(2048, 2048, 2048, 5) for _ in range(3)]
    # A student micro-batch: 8 sequences x ~110 tokens through its linear layers (hidden 256, MLP 768, vocab 4096)
    # and one decode step of 32 sequences.
    shapes = {"train micro-batch x q/o proj (880x256 @ 256x256)": (880, 256, 256),
              "train micro-batch x MLP up (880x256 @ 256x768)": (880, 256, 768),
              "train micro-batch x LM head (512x256 @ 256x4096)": (512, 256, 4096),
              "decode step x MLP up (32x256 @ 256x768)": (32, 256, 768),
              "decode step x LM head (32x256 @ 256x4096)": (32, 256, 4096)}
    small = {name: gflops(*s, 30)[0] for name, s in shapes.items()}
    return {"peak_gflops_median": statistics.median(x[0] for x in big), "peak_gflops_best": max(x[1] for x in big),
            "shapes_gflops": small, "threads": torch.get_num_threads()}


# ---------------------------------------------------------------- part 2: phases


def part_phases(spec: dict) -> dict:
    import torch

    from gndpo.train import train

    ends: list[float] = []
    shapes: list[dict] = []

    def callback(record):
        ends.append(time.perf_counter())
        shapes.append({"B": int(record.rollouts.size), "R": int(record.rollouts.response_ids.shape[1]),
                       "prompts": len(record.rollouts.records),
                       "prompt_len_mean": float(record.rollouts.prompt_lengths.float().mean()),
                       "response_tokens": int(record.rollouts.response_mask.sum())})

    cfg = _config(spec)
    train(cfg, callbacks=[callback])
    rows = [json.loads(line) for line in (Path(spec["out_dir"]) / "metrics.jsonl").read_text().splitlines()]
    periods = [b - a for a, b in zip(ends, ends[1:])]  # step 2..N, end to end
    return {"rows": rows, "periods": periods, "shapes": shapes, "threads": torch.get_num_threads()}


# ---------------------------------------------------------------- part 3: cProfile


def part_cprofile(spec: dict) -> dict:
    from gndpo.train import train

    prof = cProfile.Profile()
    state = {"n": 0}

    def callback(record):
        state["n"] += 1
        if state["n"] == 1:
            prof.enable()
        elif state["n"] == spec["steps"]:
            prof.disable()

    train(_config(spec), callbacks=[callback])
    st = pstats.Stats(prof)
    steps = spec["steps"] - 1
    rows = []
    for label, target in FUNCTIONS:
        calls, cum = 0, 0.0
        if "|" in target:
            file_part, name = target.split("|")
            for (file, _line, fn), (cc, nc, tt, ct, _callers) in st.stats.items():
                if fn == name and file_part in file:
                    calls, cum = calls + nc, cum + ct
        else:
            key = _resolve(target)
            if key in st.stats:
                cc, nc, tt, ct, _callers = st.stats[key]
                calls, cum = nc, ct
        rows.append({"label": label, "calls_per_step": calls / steps, "s_per_step": cum / steps})
    top = sorted(st.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:30]
    top_rows = [{"function": f"{Path(file).name}:{line}({fn})", "calls_per_step": v[1] / steps,
                 "self_s_per_step": v[2] / steps, "cum_s_per_step": v[3] / steps}
                for (file, line, fn), v in top]
    total = sum(v[2] for v in st.stats.values()) / steps
    return {"functions": rows, "top_self": top_rows, "profiled_s_per_step": total}


# ---------------------------------------------------------------- part 4: torch.profiler


def part_ops(spec: dict) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from gndpo.train import train

    prof = profile(activities=[ProfilerActivity.CPU], record_shapes=False)
    state = {"n": 0}

    def callback(record):
        state["n"] += 1
        if state["n"] == spec["steps"] - 1:
            prof.__enter__()
        elif state["n"] == spec["steps"]:
            prof.__exit__(None, None, None)

    train(_config(spec), callbacks=[callback])
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:25]
    return {"total_self_s": total,
            "ops": [{"op": e.key, "calls": e.count, "self_s": e.self_cpu_time_total / 1e6} for e in rows]}


# ---------------------------------------------------------------- part 5: what-if experiments
#
# Prototypes of the speed-ups the profile points at, timed against gndpo's own code on one real rollout batch.
# They live here only as evidence (not a gndpo API): each is checked against gndpo's result before it is timed.


def _timeit(variants: dict, reps: int) -> dict:
    """Median seconds of each zero-argument callable, run interleaved A B C A B C ... after one warm-up call."""
    for fn in variants.values():
        fn()
    times = {k: [] for k in variants}
    for _ in range(reps):
        for k, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def shared_prefix_hidden(model, prompts: dict, response_ids, response_mask, n: int):
    """Hidden states ``(G*n, R, H)`` predicting each response token, with each prompt run once (G prompts).

    The prompt's KV cache is computed once and repeated for its n samples; gradients flow through the repeat,
    so this serves the update as well as the no-grad scoring passes.
    """
    import torch

    pmask = prompts["attention_mask"]  # (G, P)
    base = model.model(input_ids=prompts["input_ids"], attention_mask=pmask,
                       position_ids=(pmask.cumsum(-1) - 1).clamp(min=0), use_cache=True)
    cache = base.past_key_values
    cache.batch_repeat_interleave(n)
    attn = torch.cat([pmask.repeat_interleave(n, 0), response_mask.long()], 1)  # (G*n, P+R)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)[:, pmask.shape[1]:]
    hid = model.model(input_ids=response_ids, attention_mask=attn, position_ids=pos, past_key_values=cache,
                      use_cache=True).last_hidden_state  # (G*n, R, H)
    return torch.cat([base.last_hidden_state[:, -1:].repeat_interleave(n, 0), hid[:, :-1]], 1)


def shared_prefix_logprobs(model, processor, rollouts, *, suffix, prompts_per_call: int, with_entropy=False,
                           weights=None):
    """(B, R) log-probs with :func:`shared_prefix_hidden`; with ``weights`` also backpropagates sum(w * lp)."""
    import torch

    from gndpo.core.logprobs import hidden_logprobs
    from gndpo.forward import encode_prompts

    n = rollouts.size // len(rollouts.records)
    head = model.get_output_embeddings()
    out = torch.zeros(rollouts.response_ids.shape, dtype=torch.float32)  # (B, R)
    for g0 in range(0, len(rollouts.records), prompts_per_call):
        recs = rollouts.records[g0:g0 + prompts_per_call]
        rows = torch.arange(g0 * n, (g0 + len(recs)) * n)  # their responses (prompt-major order)
        ids, rmask = rollouts.response_ids[rows], rollouts.response_mask[rows]
        h = shared_prefix_hidden(model, encode_prompts(processor, recs, suffix=suffix, system_prompt=None), ids, rmask,
                                 n)
        lp, _ = hidden_logprobs(h, head.weight, ids, bias=head.bias, with_entropy=with_entropy)
        lp = torch.where(rmask, lp, torch.zeros_like(lp))
        if weights is not None:
            (lp * weights[rows]).sum().backward()
        out[rows] = lp.detach()
    return out


def sample_inverse_cdf(logits):
    """One draw per row from softmax(logits): a uniform per row and a search in the CDF (vs V exponentials)."""
    import torch

    cdf = torch.softmax(logits, -1).cumsum_(-1)  # (B, V)
    u = torch.rand(cdf.shape[0], 1) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).clamp_(max=cdf.shape[-1] - 1)  # (B, 1)


def sample_multinomial(logits):
    import torch

    return torch.multinomial(torch.softmax(logits, -1), 1)  # what transformers' _sample does


def own_decode(model, prompts: dict, n: int, max_new: int, *, shared_prefill: bool, sampler):
    """Minimal sampling loop (fixed length, temperature 1, no top-k/p): ids (B, R) and their log-probs (B, R).

    The log-probs of the sampled tokens come for free from the logits the loop already has.
    """
    import torch

    ids_p, mask_p = prompts["input_ids"], prompts["attention_mask"]  # (G, P)
    with torch.no_grad():
        if shared_prefill:
            o = model(input_ids=ids_p, attention_mask=mask_p, position_ids=(mask_p.cumsum(-1) - 1).clamp(min=0),
                      use_cache=True, logits_to_keep=1)
            o.past_key_values.batch_repeat_interleave(n)
            logits = o.logits[:, -1].repeat_interleave(n, 0)
        else:
            ids_p, mask_p = ids_p.repeat_interleave(n, 0), mask_p.repeat_interleave(n, 0)
            o = model(input_ids=ids_p, attention_mask=mask_p, position_ids=(mask_p.cumsum(-1) - 1).clamp(min=0),
                      use_cache=True, logits_to_keep=1)
            logits = o.logits[:, -1]
        cache = o.past_key_values
        B = logits.shape[0]
        mask = mask_p.repeat_interleave(n, 0) if shared_prefill else mask_p
        pos = mask.sum(-1, keepdim=True) - 1
        ids, lps = torch.empty(B, max_new, dtype=torch.long), torch.empty(B, max_new)
        for t in range(max_new):
            nxt = sampler(logits)  # (B, 1)
            ids[:, t:t + 1] = nxt
            lps[:, t] = torch.log_softmax(logits, -1).gather(1, nxt).squeeze(1)
            mask = torch.cat([mask, mask.new_ones(B, 1)], 1)
            logits = model(input_ids=nxt, attention_mask=mask, position_ids=pos + 1 + t, past_key_values=cache,
                           use_cache=True).logits[:, -1]
    return ids, lps


def part_whatif(spec: dict) -> dict:
    import torch
    from transformers import GenerationConfig

    from gndpo.data.loaders import load_records
    from gndpo.data.templates import PAPER_SUFFIX
    from gndpo.forward import (collate_prompts, encode_each, encode_prompts, pad_token_id, response_logprobs,
                               rollout_logprobs)
    from gndpo.models import load_model
    from gndpo.rollout.base import Rollouts, SamplingParams
    from gndpo.rollout.hf import HFRollout

    torch.manual_seed(0)
    student, teacher = load_model(spec["student"]), load_model(spec["teacher"])
    model, proc = student.model.eval(), student.processor
    records = load_records(spec["prompts_file"], image_key=None)[:spec["prompts"]]
    n, R, B = spec["n"], spec["max_new_tokens"], spec["prompts"] * spec["n"]
    sampler = HFRollout(model, proc, suffix=PAPER_SUFFIX, micro_batch_size=B)
    sampling = SamplingParams(n=n, max_new_tokens=R)
    rollouts = sampler.generate(records, sampling)
    res: dict = {"B": B, "R": int(rollouts.response_ids.shape[1]),
                 "prompt_len": float(rollouts.prompt_lengths.float().mean())}
    enc = encode_prompts(proc, records, suffix=PAPER_SUFFIX, system_prompt=None)

    # (a) generation. gndpo passes top_k=None for top_k=0, and transformers then applies its default top-k 50.
    base_cfg = sampler._generation_config(sampling, n)
    res["merged_top_k"] = model._prepare_generation_config(base_cfg)[0].top_k
    cfg = GenerationConfig(**{**base_cfg.to_dict(), "return_dict_in_generate": True, "output_logits": True})
    out = model.generate(**enc, generation_config=cfg)
    raw = torch.stack(out.logits, 1)  # (B, R, V) logits before any processor
    sampled = out.sequences[:, enc["input_ids"].shape[1]:]
    rank = (raw > raw.gather(-1, sampled[..., None])).sum(-1)  # 0 = the most likely token
    res["sampled_rank_max"], res["vocab"] = int(rank.max()), int(raw.shape[-1])

    def hf(**over):
        c = GenerationConfig(**{**base_cfg.to_dict(), **over})
        return lambda: model.generate(**enc, generation_config=c)

    def own(**kw):
        return lambda: own_decode(model, enc, n, R, **kw)

    res["generate"] = _timeit({
        "gndpo HFRollout config (top-k 50 applied)": hf(),
        "same with top_k=0 (what the config asks, TRL's setting)": hf(top_k=0),
        "own loop: prefill per sample, torch.multinomial": own(shared_prefill=False, sampler=sample_multinomial),
        "own loop: prefill once per prompt, torch.multinomial": own(shared_prefill=True, sampler=sample_multinomial),
        "own loop: prefill once per prompt, inverse-CDF sampling": own(shared_prefill=True, sampler=sample_inverse_cdf),
    }, reps=3)
    # the own loop's log-probs of its sampled tokens vs gndpo's recomputation of them
    ids, lps = own_decode(model, enc, n, R, shared_prefill=True, sampler=sample_inverse_cdf)
    ro = Rollouts(rollouts.records, rollouts.prompt_index, ids, torch.ones_like(ids, dtype=torch.bool), ("",) * B,
                  torch.ones(B, dtype=torch.bool), rollouts.prompt_lengths)
    with torch.no_grad():
        recomputed = rollout_logprobs(model, proc, ro, micro_batch_size=8, suffix=PAPER_SUFFIX, system_prompt=None)
    res["sampler_vs_recomputed_lp_max_abs_diff"] = float((recomputed - lps).abs().max())
    for V in (res["vocab"], 151936):  # this vocabulary, and Qwen's
        logits = torch.randn(B, V)
        res[f"one sampling step, ({B}, {V}) logits"] = _timeit({
            "torch.multinomial (transformers)": lambda lg=logits: sample_multinomial(lg),
            "inverse-CDF": lambda lg=logits: sample_inverse_cdf(lg)}, reps=10)
    # where one generate() call spends its time, by aten operator
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        hf()()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    res["generate_ops"] = [{"op": e.key, "calls": e.count, "share": e.self_cpu_time_total / total}
                           for e in sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:8]]

    # (b) no-grad scoring: as gndpo runs it (micro-batch 8) vs the whole batch at once vs a shared prompt prefix.
    encoded = encode_each(proc, rollouts.records, suffix=PAPER_SUFFIX, system_prompt=None)
    with torch.inference_mode():
        ref = rollout_logprobs(teacher.model, teacher.processor, rollouts, micro_batch_size=8, suffix=PAPER_SUFFIX,
                               system_prompt=None)
        got = shared_prefix_logprobs(teacher.model, teacher.processor, rollouts, suffix=PAPER_SUFFIX,
                                     prompts_per_call=8 // n)
        res["shared_prefix_teacher_lp_max_abs_diff"] = float((ref - got).abs().max())
        for who, m, p, enc_each in (("teacher", teacher.model.eval(), teacher.processor, None),
                                    ("student old log-probs", model, proc, encoded)):
            def plain(mb, m=m, p=p, e=enc_each):
                return lambda: rollout_logprobs(m, p, rollouts, micro_batch_size=mb, suffix=PAPER_SUFFIX,
                                                system_prompt=None, encoded=e)

            def shared(ppc, m=m, p=p):
                return lambda: shared_prefix_logprobs(m, p, rollouts, suffix=PAPER_SUFFIX, prompts_per_call=ppc)

            res[who] = _timeit({"gndpo (micro-batch 8)": plain(8), f"gndpo with micro-batch {B}": plain(B),
                                f"shared prompt prefix, {8 // n} prompts x {n} per call": shared(8 // n)}, reps=3)

    # (c) the update's forward + backward (micro-batches of 8, loss = sum(w * lp), entropy on as in epoch 0)
    model.train()
    weights = torch.randn(rollouts.response_ids.shape)  # (B, R)
    pad = pad_token_id(proc)

    def update_plain():
        model.zero_grad(set_to_none=True)
        for s0 in range(0, B, 8):
            part = rollouts.select(torch.arange(s0, s0 + 8))
            inputs = collate_prompts([encoded[int(i)] for i in part.prompt_index], pad_id=pad)
            lp, _ = response_logprobs(model, inputs, part.response_ids, part.response_mask, with_entropy=True)
            (lp * weights[s0:s0 + 8, :lp.shape[1]]).sum().backward()

    def update_shared():
        model.zero_grad(set_to_none=True)
        shared_prefix_logprobs(model, proc, rollouts, suffix=PAPER_SUFFIX, prompts_per_call=8 // n,
                               with_entropy=True, weights=weights)

    update_plain()
    g_plain = [q.grad.clone() for q in model.parameters()]
    update_shared()
    res["shared_prefix_grad_max_rel_diff"] = max(float((a - q.grad).abs().max() / a.abs().max().clamp_min(1e-12))
                                                 for a, q in zip(g_plain, model.parameters()))
    res["update fwd+bwd"] = _timeit({"gndpo (micro-batch 8)": update_plain,
                                     f"shared prompt prefix, {8 // n} prompts x {n} per micro-batch": update_shared},
                                    reps=3)

    # (d) small things: one prompt encoding, optimizer step variants, gradient clipping
    res["encode_each (all prompts of a step)"] = _timeit(
        {"x": lambda: encode_each(proc, rollouts.records, suffix=PAPER_SUFFIX, system_prompt=None)}, reps=5)["x"]
    params = list(model.parameters())
    for q in params:
        q.grad = torch.randn_like(q) * 1e-3
    opts = {name: torch.optim.AdamW(params, lr=1e-12, weight_decay=0.01, **kw)
            for name, kw in (("AdamW default (for-loop on CPU)", {}), ("AdamW foreach=True", {"foreach": True}),
                             ("AdamW fused=True", {"fused": True}))}
    res["optimizer step"] = _timeit({k: o.step for k, o in opts.items()}, reps=5)
    return res


def render_whatif(w: dict) -> str:
    out = [f"what-if on one rollout batch (B={w['B']}, R={w['R']}, prompt {w['prompt_len']:.0f} tokens), medians of "
           "3-10 interleaved repeats:",
           f"- top-k actually used by gndpo's sampler for rollout.top_k=0: {w['merged_top_k']}; the largest rank of a "
           f"sampled token among {w['vocab']} under the raw logits: {w['sampled_rank_max']}",
           f"- own-loop sampled-token log-probs vs gndpo's recomputation: max |diff| "
           f"{w['sampler_vs_recomputed_lp_max_abs_diff']:.1e}; shared-prefix teacher log-probs vs gndpo's: "
           f"{w['shared_prefix_teacher_lp_max_abs_diff']:.1e}; shared-prefix gradient vs gndpo's: max rel diff "
           f"{w['shared_prefix_grad_max_rel_diff']:.1e}"]
    rows = []
    sections = ["generate"] + [k for k in w if k.startswith("one sampling step")] + [
        "teacher", "student old log-probs", "update fwd+bwd", "optimizer step"]
    for section in sections:
        base = next(iter(w[section].values()))
        for k, v in w[section].items():
            rows.append([section, k, f"{v * 1e3:.1f}", f"{base / v:.2f}x"])
    rows.append(["prompt encoding", "encode_each, all prompts of a step",
                 f"{w['encode_each (all prompts of a step)'] * 1e3:.1f}", "-"])
    out.append(race_trl.fmt_table(rows, ["part", "variant", "ms", "speed-up vs the part's first row"]))
    if w.get("generate_ops"):
        out.append("one generate() call (gndpo's config), self CPU time by operator: " + ", ".join(
            f"{o['op']} {100 * o['share']:.0f} %" for o in w["generate_ops"]))
    return "\n".join(out)


# ---------------------------------------------------------------- driver


def flops_per_phase(meta: dict, shape: dict, method: str) -> dict:
    """Rough FLOPs: 2 x params x tokens per forward, 6 x for forward + backward (attention scores ignored).

    Tokens are those a pass must process: each prompt once (gndpo runs it once for all its samples) plus
    every response token; a tool that runs the prompt once per sample does more work for the same result.
    """
    ps, pt = meta["params"]["student"], meta["params"]["teacher"]
    prompts = shape.get("prompts", shape["B"])
    tokens = prompts * shape["prompt_len_mean"] + shape["response_tokens"]
    out = {"time/rollout": 2 * ps * tokens, "time/old_logprobs": 2 * ps * tokens, "time/update": 6 * ps * tokens}
    if method in ("gndpo", "opd"):
        out["time/teacher"] = 2 * pt * tokens
    return out


def _run_part(part: str, spec: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]),
               OMP_WAIT_POLICY="PASSIVE", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")
    if Path(spec["out_dir"]).exists():
        import shutil

        shutil.rmtree(spec["out_dir"])
    proc = subprocess.run([sys.executable, __file__, "--part", part, "--spec", json.dumps(spec)], capture_output=True,
                          text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"part {part} failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", default="gndpo", choices=("gndpo", "opd", "gspo"))
    parser.add_argument("--steps", type=int, default=6, help="steps of the timed run (first excluded)")
    parser.add_argument("--parts", default="peak,phases,cprofile,ops,whatif")
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "race_trl"))
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument("--part", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part:
        import torch

        spec = json.loads(args.spec)
        torch.set_num_threads(spec["threads"])
        fn = {"peak": part_peak, "phases": part_phases, "cprofile": part_cprofile, "ops": part_ops,
              "whatif": part_whatif}[args.part]
        print(json.dumps(fn(spec), default=float))
        return

    workdir = Path(args.workdir)
    meta = race_trl.build_assets(workdir)
    race_trl.set_fixed_length(meta["student"], WORK["max_new_tokens"])
    parts = args.parts.split(",")
    res: dict = {"versions": race_trl.versions(), "meta": meta, "work": WORK, "method": args.method}
    for part in parts:
        steps = args.steps if part in ("phases", "cprofile") else 3
        spec = _spec(meta, args.method, steps, workdir / "runs" / f"profile-{args.method}-{part}")
        t0 = time.perf_counter()
        res[part] = _run_part(part, spec)
        print(f"[{part} done in {time.perf_counter() - t0:.0f} s]", file=sys.stderr, flush=True)
    print(render(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


def render(res: dict) -> str:
    out = [f"method {res['method']}; work {res['work']}; student {res['meta']['params']['student'] / 1e6:.2f} M, "
           f"teacher {res['meta']['params']['teacher'] / 1e6:.2f} M params, vocab {res['meta']['vocab']}", ""]
    peak = res.get("peak")
    if peak:
        out.append(f"fp32 matmul peak at {peak['threads']} threads: {peak['peak_gflops_median']:.1f} GFLOP/s median "
                   f"(best {peak['peak_gflops_best']:.1f}) for 2048^3")
        out.append(race_trl.fmt_table([[k, f"{v:.1f}"] for k, v in peak["shapes_gflops"].items()],
                                      ["GEMM shape of the student", "GFLOP/s"]))
        out.append("")
    ph = res.get("phases")
    if ph:
        rows = ph["rows"][1:]
        keys = ["time/rollout", "time/old_logprobs", "time/teacher", "time/reward", "time/advantages", "time/update",
                "time/checkpoint"]
        med = {k: statistics.median(r[k] for r in rows) for k in keys}
        period = statistics.median(ph["periods"])
        step = statistics.median(r["time/step"] for r in rows)
        med["logging + loop (period - time/step)"] = max(period - step, 0.0)
        shape = ph["shapes"][-1]
        # a phase that did not run (gspo's old log-probs come from the update's own forward) did no work
        flops = {k: f for k, f in flops_per_phase(res["meta"], shape, res["method"]).items() if med.get(k, 0) > 0.01}
        pk = peak["peak_gflops_median"] if peak else float("nan")
        table = []
        for k, v in med.items():
            f = flops.get(k)
            gf = f / v / 1e9 if f and v > 0 else None
            table.append([k, f"{v:.3f}", f"{100 * v / period:.1f} %", f"{f / 1e9:.1f}" if f else "-",
                          f"{gf:.1f}" if gf else "-", f"{100 * gf / pk:.0f} %" if gf else "-"])
        total_f = sum(flops.values())
        table.append(["step period (end to end)", f"{period:.3f}", "100 %", f"{total_f / 1e9:.1f}",
                      f"{total_f / period / 1e9:.1f}", f"{100 * total_f / period / 1e9 / pk:.0f} %"])
        out.append(f"per-phase profile, median over steps 2..{len(ph['rows'])} (B={shape['B']} sequences, "
                   f"prompt {shape['prompt_len_mean']:.0f} + response {shape['response_tokens'] / shape['B']:.0f} "
                   f"tokens; step periods {[round(p, 2) for p in ph['periods']]})")
        out.append(race_trl.fmt_table(table, ["phase", "seconds", "share of step", "est. GFLOP (prompts once)", "GFLOP/s",
                                              "of matmul peak"]))
        out.append("")
    cp = res.get("cprofile")
    if cp:
        out.append(f"cProfile, per steady step (profiled Python self time {cp['profiled_s_per_step']:.2f} s/step)")
        out.append(race_trl.fmt_table([[r["label"], f"{r['calls_per_step']:.0f}",
                                        f"{r['s_per_step']:.3f}"] for r in cp["functions"]],
                                      ["function", "calls/step", "cumulative s/step"]))
        out.append("")
        out.append(race_trl.fmt_table([[r["function"], f"{r['calls_per_step']:.0f}", f"{r['self_s_per_step']:.3f}",
                                        f"{r['cum_s_per_step']:.3f}"] for r in cp["top_self"][:20]],
                                      ["top self time", "calls/step", "self s/step", "cum s/step"]))
        out.append("")
    ops = res.get("ops")
    if ops:
        out.append(f"torch.profiler, one steady step: {ops['total_self_s']:.2f} s of operator self time")
        out.append(race_trl.fmt_table([[o["op"], o["calls"], f"{o['self_s']:.3f}",
                                        f"{100 * o['self_s'] / ops['total_self_s']:.1f} %"] for o in ops["ops"][:18]],
                                      ["aten op", "calls", "self s", "share"]))
    if res.get("whatif"):
        out.append("")
        out.append(render_whatif(res["whatif"]))
    return "\n".join(out)


if __name__ == "__main__":
    main()
