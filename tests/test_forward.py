"""Prompt encoding, response log-probs and the sampler agree with plain Hugging Face computations."""
import pytest
import torch

from gndpo.forward import collate_prompts, encode_each, encode_prompts, pad_token_id, rollout_logprobs
from gndpo.rollout.base import Rollouts, SamplingParams
from gndpo.rollout.hf import HFRollout, response_mask_from_ids


def test_collated_single_encodings_equal_batched_encoding(student_and_records):
    loaded, records = student_and_records
    batched = encode_prompts(loaded.processor, records, suffix="Go.", system_prompt=None)
    each = encode_each(loaded.processor, records, suffix="Go.", system_prompt=None)
    collated = collate_prompts(each, pad_id=pad_token_id(loaded.processor))
    assert batched.keys() == collated.keys()
    for key in batched:
        assert torch.equal(batched[key], collated[key]), key


def test_recomputed_logprobs_equal_the_samplers_own(student_and_records):
    """On-policy: the trainer's recomputed log-probs equal those of the distribution generate() sampled from."""
    loaded, records = student_and_records
    model, processor = loaded.model, loaded.processor
    sampler = HFRollout(model, processor, suffix=None, micro_batch_size=8)
    inputs = encode_prompts(processor, records, suffix=None, system_prompt=None)
    config = sampler._generation_config(SamplingParams(n=1, max_new_tokens=6), 1)
    config.return_dict_in_generate, config.output_logits, config.output_scores = True, True, True
    torch.manual_seed(0)
    out = model.generate(**inputs, generation_config=config)
    resp = out.sequences[:, inputs["input_ids"].shape[1]:]
    sampled_lp = torch.stack([torch.log_softmax(x.float(), -1) for x in out.logits], 1).gather(-1, resp[..., None])[..., 0]
    # The distribution actually sampled from (after every logits processor) must be the full softmax, up to
    # the tiny mass of the suppressed placeholder/pad tokens: no hidden top-k or top-p truncation.
    processed_lp = torch.stack([torch.log_softmax(x.float(), -1) for x in out.scores], 1).gather(-1, resp[..., None])[..., 0]
    valid = response_mask_from_ids(resp, sampler.eos_ids)[0]
    assert ((processed_lp - sampled_lp).abs() * valid).max() < 0.05
    mask, truncated = response_mask_from_ids(resp, sampler.eos_ids)
    rollouts = Rollouts(tuple(records), torch.arange(len(records)), resp, mask, ("",) * len(records), truncated,
                        torch.zeros(len(records)))
    with torch.no_grad():
        lp = rollout_logprobs(model, processor, rollouts, micro_batch_size=2, suffix=None, system_prompt=None)
    torch.testing.assert_close(lp * mask, sampled_lp * mask, rtol=0, atol=1e-5)


def test_sampler_masks_eos_and_never_emits_placeholders(student_and_records):
    loaded, records = student_and_records
    sampler = HFRollout(loaded.model, loaded.processor, suffix=None, micro_batch_size=8)
    torch.manual_seed(1)
    ro = sampler.generate(records, SamplingParams(n=3, temperature=1.5, max_new_tokens=12))
    assert ro.response_ids.shape[0] == 15 and ro.prompt_index.tolist() == [i for i in range(5) for _ in range(3)]
    assert not torch.isin(ro.response_ids[ro.response_mask], torch.tensor(sampler.suppress)).any()
    lengths = ro.response_mask.sum(-1)
    for row, n, trunc in zip(ro.response_ids, lengths, ro.truncated):
        if not trunc:  # ends with EOS, included in the mask
            assert int(row[n - 1]) in sampler.eos_ids
        else:
            assert int(n) == 12


def test_response_mask_from_ids_hand_example():
    ids = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8]])
    mask, truncated = response_mask_from_ids(ids, [2])
    assert mask.tolist() == [[True, True, False, False], [True, True, True, True]]
    assert truncated.tolist() == [False, True]


@pytest.mark.parametrize("path", ["packed", "kv-cache"])
def test_shared_prefix_path_equals_one_row_per_response(student_and_records, path, monkeypatch):
    """Running each prompt once for all its samples gives the same log-probs and gradients, both packed
    (prompt + all its samples in one row under a 4-D mask) and through a shared KV cache."""
    import gndpo.forward
    from gndpo.forward import micro_batch_inputs, response_logprobs, shares_prefixes

    monkeypatch.setattr(gndpo.forward, "PACK_TOKENS", 4096 if path == "packed" else 0)
    used = []
    for name in ("_packed_prefix_hidden", "_shared_prefix_hidden"):
        real = getattr(gndpo.forward, name)
        monkeypatch.setattr(gndpo.forward, name, lambda *a, _n=name, _r=real, **k: used.append(_n) or _r(*a, **k))
    loaded, records = student_and_records
    model, processor = loaded.model, loaded.processor
    assert shares_prefixes(model)
    sampler = HFRollout(model, processor, suffix=None, micro_batch_size=16)
    torch.manual_seed(2)
    ro = sampler.generate(records[:3], SamplingParams(n=3, max_new_tokens=7))
    ro = ro.select([4, 0, 1, 8, 6, 7])  # unordered, 1-2-3 samples per prompt, as a micro-batch may hold
    encoded = encode_each(processor, ro.records, suffix=None, system_prompt=None)
    pad = pad_token_id(processor)
    results = []
    for shared in (True, False):
        model.zero_grad()
        if shared:
            inputs, rows = micro_batch_inputs(model, encoded, ro.prompt_index, pad_id=pad, device="cpu")
            assert inputs["input_ids"].shape[0] == 3 and rows is not None
        else:
            inputs, rows = collate_prompts([encoded[int(i)] for i in ro.prompt_index], pad_id=pad), None
        lp, ent = response_logprobs(model, inputs, ro.response_ids, ro.response_mask, prompt_index=rows,
                                    with_entropy=True)
        (lp.sum() + 0.0).backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        results.append((lp.detach(), ent, grads))
    assert used == ["_packed_prefix_hidden" if path == "packed" else "_shared_prefix_hidden"]
    (lp_a, ent_a, g_a), (lp_b, ent_b, g_b) = results
    torch.testing.assert_close(lp_a, lp_b, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent_a, ent_b, rtol=0, atol=1e-5)
    assert len(g_a) == len(g_b)
    for a, b in zip(g_a, g_b):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    model.zero_grad()


def test_mixed_batch_scores_equal_each_prompt_alone(student_and_records, request):
    """Prompts with two images, one or none, of different sizes (InternVL tiles, Qwen-VL grids) in one
    micro-batch: every response's log-probs equal those computed with its prompt alone."""
    loaded, records = student_and_records
    model, processor = loaded.model, loaded.processor
    if loaded.is_vlm and request.node.callspec.params["student_and_records"] != "vlm":  # the lab's are uniform
        counts = sorted({len(r.images) for r in records})
        sizes = {im.size for r in records for im in r.images}
        assert counts == [0, 1, 2] and len(sizes) >= 3, (counts, sizes)
    torch.manual_seed(4)
    ro = HFRollout(model, processor, suffix=None, micro_batch_size=16).generate(
        records, SamplingParams(n=2, temperature=1.2, max_new_tokens=6))
    with torch.no_grad():
        together = rollout_logprobs(model, processor, ro, micro_batch_size=ro.size, suffix=None, system_prompt=None)
        alone = torch.cat([_alone(model, processor, ro, i) for i in range(ro.size)])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)


def _alone(model, processor, ro, i):
    """Log-probs (1, R) of response i with its prompt encoded and scored on its own."""
    one = ro.select([i])
    one = Rollouts((ro.records[int(ro.prompt_index[i])],), torch.zeros(1, dtype=torch.long), one.response_ids,
                   one.response_mask, one.texts, one.truncated, one.prompt_lengths)
    lp = rollout_logprobs(model, processor, one, micro_batch_size=1, suffix=None, system_prompt=None)
    return torch.nn.functional.pad(lp, (0, ro.response_ids.shape[1] - lp.shape[1]))
