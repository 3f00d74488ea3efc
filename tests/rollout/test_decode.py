"""gndpo's decode loop samples the distribution the trainer scores, and equals ``generate`` when greedy."""
from dataclasses import replace

import pytest
import torch

from gndpo.forward import encode_prompts, rollout_logprobs
from gndpo.rollout.base import SamplingParams
from gndpo.rollout.decode import decode, filter_logits, sample_tokens, supports_decode_loop
from gndpo.rollout.hf import HFRollout


def _frequent_eos(model, processor, records, k: int = 12) -> list[int]:
    """Ids the tiny random model emits often, used as extra EOS ids so rows end at different steps."""
    inputs = encode_prompts(processor, records, suffix=None, system_prompt=None)
    with torch.no_grad():
        logits = model(**inputs).logits[:, -1]  # (U, V)
    return torch.topk(logits.softmax(-1).mean(0), k).indices.tolist()


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = lambda p: torch.isfinite(filter_logits(logits, SamplingParams(top_p=p))).tolist()[0]  # noqa: E731
    assert kept(0.8) == [True, True, False, False]  # 0.5 + 0.3 reaches 0.8 (to float precision)
    assert kept(0.81) == [True, True, True, False]
    assert kept(0.1) == [True, False, False, False]  # the most likely token always stays
    assert kept(1.0) == [True] * 4


def test_top_k_keeps_ties_and_suppression_removes_ids():
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0]])
    out = filter_logits(logits, SamplingParams(top_k=2), suppress=[0])
    # token 0 is suppressed first, so the top-2 of the rest are the tied 2.0s
    assert torch.isfinite(out).tolist()[0] == [False, False, True, True, False]


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.9), (0.6, 20, 0.95)])
def test_filter_logits_equals_transformers_warpers(temperature, top_k, top_p):
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 50, generator=g) * 3
    ref = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1.0:
        ref = TopPLogitsWarper(top_p)(None, ref)
    ours = filter_logits(logits, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p))
    assert torch.equal(torch.isfinite(ours), torch.isfinite(ref))
    torch.testing.assert_close(ours.softmax(-1), ref.softmax(-1), rtol=0, atol=1e-6)


def test_inverse_cdf_draws_follow_the_probabilities():
    probs = torch.tensor([0.5, 0.25, 0.0, 0.125, 0.0625, 0.0625])
    logits = probs.log().expand(200_000, -1)  # the zero-probability token has logit -inf
    draws = sample_tokens(logits, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=6).double() / draws.numel()
    assert freq[2] == 0
    # 4.5 standard errors of a binomial proportion at p=0.5 and N=200k is 0.005
    torch.testing.assert_close(freq, probs.double(), rtol=0, atol=0.005)
    assert sample_tokens(torch.tensor([[0.1, 2.0, -1.0]]), greedy=True).tolist() == [1]


def test_decode_first_token_distribution_matches_the_model(student_and_records):
    loaded, records = student_and_records
    model, processor = loaded.model, loaded.processor
    sampling = SamplingParams(n=4000, temperature=0.7, top_k=20, max_new_tokens=1)
    inputs = encode_prompts(processor, records[:1], suffix=None, system_prompt=None)
    with torch.no_grad():
        probs = filter_logits(model(**inputs).logits[:, -1], sampling).softmax(-1)[0]  # (V,)
    torch.manual_seed(0)
    ids, _ = decode(model, inputs, sampling, eos_ids=[-1], pad_id=0)
    assert ids.shape == (4000, 1)
    assert bool((probs[ids[:, 0]] > 0).all())  # only top-20 tokens are drawn
    freq = torch.bincount(ids[:, 0], minlength=probs.numel()).float() / 4000
    assert 0.5 * (freq - probs).abs().sum() < 0.06  # total variation; ~0.03 expected from 4000 draws


@pytest.mark.parametrize("room", [256, 1])
def test_decode_logprobs_equal_the_trainers_recomputation(student_and_records, room, monkeypatch):
    """Shared prefill, EOS rows leaving the batch mid-way, left padding and (room=1) the KV buffer growing at
    every few steps keep every conditional right."""
    import gndpo.rollout.decode

    monkeypatch.setattr(gndpo.rollout.decode, "INITIAL_ROOM", room)
    loaded, records = student_and_records
    model, processor = loaded.model, loaded.processor
    sampler = HFRollout(model, processor, suffix=None, micro_batch_size=12)  # 4 prompts per call, 2 calls
    sampler.eos_ids = _frequent_eos(model, processor, records)
    torch.manual_seed(3)
    ro = sampler.generate(records, SamplingParams(n=3, temperature=1.3, max_new_tokens=9))
    lengths = ro.response_mask.sum(-1)
    assert lengths.min() < lengths.max() and bool(ro.truncated.any()) and not bool(ro.truncated.all())
    with torch.no_grad():
        lp = rollout_logprobs(model, processor, ro, micro_batch_size=4, suffix=None, system_prompt=None,
                              temperature=1.3)
    assert ro.sampler_logprobs is not None
    torch.testing.assert_close(ro.sampler_logprobs, lp, rtol=0, atol=1e-5)


@pytest.mark.parametrize("n", [1, 3])
def test_greedy_loop_equals_generate(student_and_records, n):
    loaded, records = student_and_records
    model, processor = loaded.model, loaded.processor
    eos = _frequent_eos(model, processor, records, k=4)
    outs = []
    for engine in ("loop", "generate"):
        sampler = HFRollout(model, processor, suffix=None, micro_batch_size=6, engine=engine)
        sampler.eos_ids = eos
        outs.append(sampler.generate(records, SamplingParams(n=n, max_new_tokens=10, greedy=True)))
    loop, gen = outs
    assert loop.sampler_logprobs is not None and gen.sampler_logprobs is None
    assert torch.equal(loop.response_ids, gen.response_ids)
    assert torch.equal(loop.response_mask, gen.response_mask)
    assert loop.texts == gen.texts and torch.equal(loop.truncated, gen.truncated)
    assert torch.equal(loop.prompt_lengths, gen.prompt_lengths)


def test_loop_is_seeded_and_differs_from_generate_in_draws(student_and_records):
    loaded, records = student_and_records
    model, processor = loaded.model, loaded.processor
    sampling = SamplingParams(n=4, max_new_tokens=8)
    runs = {}
    for engine in ("loop", "loop", "generate"):
        torch.manual_seed(5)
        ro = HFRollout(model, processor, suffix=None, engine=engine).generate(records, sampling)
        runs.setdefault(engine, []).append(ro.response_ids)
    assert torch.equal(runs["loop"][0], runs["loop"][1])
    assert not torch.equal(runs["loop"][0], runs["generate"][0])  # same distribution, different draws


def test_supports_decode_loop(student_and_records):
    loaded, records = student_and_records
    inputs = encode_prompts(loaded.processor, records, suffix=None, system_prompt=None)
    assert supports_decode_loop(loaded.model, inputs)
    # a sequence-aligned input the loop would have to extend at every step: leave it to generate()
    assert not supports_decode_loop(loaded.model, {**inputs, "token_type_ids": torch.zeros_like(inputs["input_ids"])})


def test_unknown_engine_is_a_clear_error(student_and_records):
    loaded, _ = student_and_records
    with pytest.raises(ValueError, match="unknown rollout engine 'vllm'; choose one of loop, generate"):
        HFRollout(loaded.model, loaded.processor, suffix=None, engine="vllm")


def test_min_new_tokens_suppresses_eos_in_both_engines(student_and_records):
    loaded, records = student_and_records
    model, processor = loaded.model, loaded.processor
    eos = _frequent_eos(model, processor, records, k=4)
    outs = {}
    for engine in ("loop", "generate"):
        sampler = HFRollout(model, processor, suffix=None, engine=engine)
        sampler.eos_ids = eos
        free = sampler.generate(records, SamplingParams(n=1, max_new_tokens=10, greedy=True))
        outs[engine] = sampler.generate(records, SamplingParams(n=1, max_new_tokens=10, min_new_tokens=6,
                                                                greedy=True))
        assert int(free.response_mask.sum(-1).min()) < 6  # without it some rows end earlier
        assert int(outs[engine].response_mask.sum(-1).min()) >= 6
    assert torch.equal(outs["loop"].response_ids, outs["generate"].response_ids)


def test_keyed_uniforms_are_uniform_and_depend_on_key_and_step_only():
    from gndpo.rollout.decode import keyed_uniforms

    keys = torch.arange(100_000, dtype=torch.long) * 7919 + 12345
    u = keyed_uniforms(keys, 0)
    assert u.dtype == torch.float64 and bool(((u >= 0) & (u < 1)).all())
    # mean 0.5 +- 4.5 standard errors (sqrt(1/12/1e5) = 9e-4); deciles within 4.5 binomial standard errors
    assert abs(float(u.mean()) - 0.5) < 0.004
    counts = torch.histc(u.float(), bins=10, min=0, max=1)
    assert bool(((counts - 10_000).abs() < 4.5 * (100_000 * 0.1 * 0.9) ** 0.5).all())
    assert torch.equal(keyed_uniforms(keys[5:9], 3), keyed_uniforms(keys, 3)[5:9])  # a row's draw is its own
    assert not torch.equal(keyed_uniforms(keys, 1), u)
    assert abs(float(torch.corrcoef(torch.stack([u, keyed_uniforms(keys, 1)]))[0, 1])) < 0.02


def test_seeded_samples_do_not_depend_on_the_batch(student_and_records):
    """With SamplingParams.seed, sample s of a prompt is the same alone, in a batch or in another micro-batch
    split: what the data-parallel trainer needs (and what vLLM's per-request seeds give)."""
    loaded, records = student_and_records
    sampling = SamplingParams(n=3, temperature=1.3, max_new_tokens=8, seed=99)
    together = HFRollout(loaded.model, loaded.processor, suffix=None, micro_batch_size=15).generate(records, sampling)
    split = HFRollout(loaded.model, loaded.processor, suffix=None, micro_batch_size=3).generate(records, sampling)
    alone = HFRollout(loaded.model, loaded.processor, suffix=None).generate(records[3:4], sampling)
    assert torch.equal(together.response_ids, split.response_ids)
    R = alone.response_ids.shape[1]
    assert torch.equal(together.response_ids[9:12, :R], alone.response_ids)
    other = HFRollout(loaded.model, loaded.processor, suffix=None).generate(records[3:4], replace(sampling, seed=100))
    assert not torch.equal(other.response_ids, alone.response_ids)


def test_seeded_first_tokens_follow_the_model(student_and_records):
    loaded, records = student_and_records
    model, processor = loaded.model, loaded.processor
    sampling = SamplingParams(n=4000, temperature=0.7, top_k=20, max_new_tokens=1, seed=3)
    inputs = encode_prompts(processor, records[:1], suffix=None, system_prompt=None)
    with torch.no_grad():
        probs = filter_logits(model(**inputs).logits[:, -1], sampling).softmax(-1)[0]  # (V,)
    from gndpo.rollout.base import request_seed

    keys = torch.tensor([request_seed(3, records[0].id, s) for s in range(4000)], dtype=torch.long)
    ids, _ = decode(model, inputs, sampling, eos_ids=[-1], pad_id=0, keys=keys)
    freq = torch.bincount(ids[:, 0], minlength=probs.numel()).float() / 4000
    assert bool((probs[ids[:, 0]] > 0).all()) and 0.5 * (freq - probs).abs().sum() < 0.06
