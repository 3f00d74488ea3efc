"""rollout.backend=vllm and teacher.backend=vllm against the Hugging Face paths they replace (float32, CPU)."""
import math

import pytest
import torch

from gndpo.data.loaders import load_records
from gndpo.forward import encode_prompts, rollout_logprobs
from gndpo.models import load_model
from gndpo.rollout.base import SamplingParams
from gndpo.rollout.vllm import SyncError, VLLMRollout
from gndpo.teacher.hf import HFTeacher
from gndpo.teacher.vllm import VLLMTeacher
from gndpo.train import train
from gndpo.vllm_engine import EngineOptions

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def vlm_records(vllm_dir):
    return load_records(str(vllm_dir / "vlm" / "train.jsonl"))[:3]


def trainer_lp(model, processor, temperature=1.0):
    def score(rollouts):
        with torch.no_grad():
            return rollout_logprobs(model, processor, rollouts, micro_batch_size=8, suffix=None, system_prompt=None,
                                    temperature=temperature)
    return score


@pytest.fixture
def lab_sampler(lab_pair, vlm_records):
    """The lab student in HF and a VLLMRollout of it (check on every call). One per test: engines in a process
    end together (gndpo.vllm_engine), so none may outlive a test that ends its own."""
    loaded = load_model(lab_pair[0])
    sampler = VLLMRollout(loaded.model, loaded.processor, path=lab_pair[0],
                          options=EngineOptions(max_model_len=512, max_images=1), suffix=None, system_prompt=None,
                          score_fn=trainer_lp(loaded.model, loaded.processor), check_every=1)
    yield loaded, sampler
    sampler.close()


def test_engine_runs_the_ids_the_trainer_scores(lab_sampler, vlm_records):
    """Token ids with one placeholder per image + raw images: vLLM's expanded prompt equals the processor's."""
    from gndpo import vllm_engine as engine

    loaded, sampler = lab_sampler
    ids = engine.prompt_ids(loaded.processor, vlm_records, suffix=None, system_prompt=None)
    image_token = loaded.processor.image_token_id
    assert all(row.count(image_token) == 1 for row in ids)  # unexpanded: one per image
    outs = sampler.llm.generate([engine.engine_input(i, r.images) for i, r in zip(ids, vlm_records)],
                                sampling_params=engine.import_vllm().SamplingParams(max_tokens=1), use_tqdm=False)
    for out, rec in zip(outs, vlm_records):
        expected = encode_prompts(loaded.processor, [rec], suffix=None, system_prompt=None)["input_ids"][0].tolist()
        assert list(out.prompt_token_ids) == expected and expected.count(image_token) == 16


def test_rollout_logprobs_equal_the_trainers(lab_sampler, vlm_records):
    loaded, sampler = lab_sampler
    ro = sampler.generate(vlm_records, SamplingParams(n=3, max_new_tokens=24, seed=1))
    assert ro.sampler_logprobs is not None and ro.size == 9
    lp = trainer_lp(loaded.model, loaded.processor)(ro)
    torch.testing.assert_close(ro.sampler_logprobs, lp, rtol=0, atol=1e-4)
    assert ro.stats["rollout/sync_gap"] < 1e-5
    expanded = [encode_prompts(loaded.processor, [r], suffix=None, system_prompt=None)["input_ids"].shape[1]
                for r in vlm_records]
    assert ro.prompt_lengths.tolist() == [n for n in expanded for _ in range(3)]  # image tokens included
    # the mask ends at the first EOS and placeholders or padding are never sampled
    lengths = ro.response_mask.sum(-1)
    for row, n, trunc in zip(ro.response_ids, lengths, ro.truncated):
        assert trunc or int(row[n - 1]) in sampler.eos_ids
    assert not torch.isin(ro.response_ids[ro.response_mask], torch.tensor(list(sampler.bias))).any()


def test_draws_are_keyed_per_prompt_and_sample_not_per_batch(lab_sampler, vlm_records):
    _, sampler = lab_sampler
    sampling = SamplingParams(n=2, max_new_tokens=16, seed=11)
    together = sampler.generate(vlm_records, sampling)
    alone = sampler.generate(vlm_records[2:], sampling)
    assert torch.equal(together.response_ids[4:, :alone.response_ids.shape[1]], alone.response_ids)
    other_step = sampler.generate(vlm_records[2:], SamplingParams(n=2, max_new_tokens=16, seed=12))
    assert not torch.equal(other_step.response_ids, alone.response_ids)


def test_min_new_tokens_and_greedy_match_the_hf_sampler(lab_sampler, vlm_records):
    from gndpo.rollout.hf import HFRollout

    loaded, sampler = lab_sampler
    hf = HFRollout(loaded.model, loaded.processor, suffix=None)
    greedy = SamplingParams(n=1, max_new_tokens=20, min_new_tokens=8, greedy=True)
    a, b = sampler.generate(vlm_records, greedy), hf.generate(vlm_records, greedy)
    assert int(a.response_mask.sum(-1).min()) >= 8
    assert torch.equal(a.response_ids, b.response_ids) and a.texts == b.texts


def test_top_p_or_temperature_report_no_sampler_logprobs_but_still_check(lab_sampler, vlm_records):
    """vLLM reports the truncated (or temperature-scaled, bias-shifted) distribution there, not the trainer's
    quantity: no sampler log-probs, and the sync check still scores both sides at temperature 1."""
    _, sampler = lab_sampler
    for sampling in (SamplingParams(n=2, max_new_tokens=12, top_p=0.9, seed=3),
                     SamplingParams(n=2, max_new_tokens=12, temperature=0.7, seed=3)):
        ro = sampler.generate(vlm_records[:1], sampling)
        assert ro.sampler_logprobs is None and ro.stats["rollout/sync_gap"] < 1e-5


def test_stale_weights_stop_the_run(lab_pair, vlm_records):
    """Change the trainer's weights without telling the engine: the next rollout's check fires."""
    loaded = load_model(lab_pair[0])
    sampler = VLLMRollout(loaded.model, loaded.processor, path=lab_pair[0],
                          options=EngineOptions(max_model_len=512, max_images=1), suffix=None, system_prompt=None,
                          score_fn=trainer_lp(loaded.model, loaded.processor), check_every=1)
    try:
        sampling = SamplingParams(n=2, max_new_tokens=12, seed=2)
        sampler.generate(vlm_records[:1], sampling)
        with torch.no_grad():
            for p in loaded.model.parameters():
                p.mul_(1.05)
        with pytest.raises(SyncError, match=r"vLLM's log-probs differ from the trainer's by .* \(tolerance 0.0001 "
                                            r"for float32\)"):
            sampler.generate(vlm_records[:1], sampling)
        sampler.weights_changed()  # told: the push repairs it
        assert sampler.generate(vlm_records[:1], sampling).stats["rollout/sync_gap"] < 1e-5
    finally:
        sampler.close()


def test_bf16_engine_sync_passes_healthy_steps_and_stops_a_one_step_stale_push(lab_pair, vlm_records):
    """The presets' precision: a bfloat16 engine, float32 masters computing in bfloat16. At lr 1e-6 a stale engine
    is as close to the trainer in log-probs as a synced one (measured here: mean gap 0.004-0.005 synced, 0.004
    one step stale), so the log-prob check only catches gross errors; the weight fingerprint catches the stale
    push exactly (drift 0 to 2e-16 synced, ~1e-6 one step stale)."""
    from gndpo.forward import ResponseScorer

    loaded = load_model(lab_pair[0], dtype="float32")
    scorer = ResponseScorer(loaded.model, autocast=torch.bfloat16)
    sampler = VLLMRollout(loaded.model, loaded.processor, path=lab_pair[0],
                          options=EngineOptions(dtype="bfloat16", max_model_len=512, max_images=1), suffix=None,
                          system_prompt=None, score_fn=trainer_lp(scorer, loaded.processor), check_every=1,
                          check_responses=8)
    optimizer = torch.optim.AdamW(loaded.model.parameters(), lr=1e-6)

    def step(ro):
        optimizer.zero_grad(set_to_none=True)
        rollout_logprobs(scorer, loaded.processor, ro, micro_batch_size=8, suffix=None, system_prompt=None).sum() \
            .backward()
        optimizer.step()

    try:
        ro = sampler.generate(vlm_records, SamplingParams(n=2, max_new_tokens=12, seed=0))
        if "rollout/sync_weight_drift" not in ro.stats:
            pytest.skip("this CPU's vLLM kernels repack bfloat16 linear weights (AMX): no weight fingerprint here")
        for seed in (1, 2):
            step(ro)
            sampler.weights_changed()
            ro = sampler.generate(vlm_records, SamplingParams(n=2, max_new_tokens=12, seed=seed))
            assert ro.stats["rollout/sync_weight_drift"] <= 1e-12 and ro.stats["rollout/sync_gap"] < 2e-2
        step(ro)  # not told: the engine stays one step behind
        with pytest.raises(SyncError, match=r"the vLLM engine does not hold the trainer's current weights \(weight "
                                            r"fingerprints differ by .* relative, tolerance 1e-09\)"):
            sampler.generate(vlm_records, SamplingParams(n=2, max_new_tokens=12, seed=3))
    finally:
        sampler.close()


def test_no_false_sync_error_where_the_cpu_kernels_repack_weights_of_a_large_vocabulary_model(tmp_path, monkeypatch):
    """InternVL3.5's shapes at tiny widths: the real 151,936-row vocabulary, untied head, so the embeddings and head
    hold 98.8 % of the elements. vLLM's float32 CPU kernels repack the linear weights and leave empty
    parameters, so a push changes what the engine computes with but no parameter the fingerprint reads. Before
    the fix the element count (over 90 % held) switched the fingerprint on, and the first healthy step after it
    raised SyncError (paper_smoke.py --cpu: drift 6.8e-9). The fingerprint stays off there (placeholders), and
    on when the engine holds plain parameters, where two healthy steps keep it at 0."""
    import json

    from PIL import Image

    from gndpo import vllm_engine as engine
    from gndpo.lab import shapes

    real = shapes.internvl3_5_config

    def tiny(*args):
        config = real(*args)
        config["vision_config"].update(hidden_size=64, intermediate_size=128, num_attention_heads=2)
        return config

    monkeypatch.setattr(shapes, "internvl3_5_config", tiny)
    monkeypatch.setitem(shapes.SIZES, "tiny", (64, 128, 1, 2, 1))
    path = str(shapes.save_random_model(tmp_path / "model", "tiny", layers=1))
    Image.new("RGB", (448, 448), (40, 120, 200)).save(tmp_path / "img.png")
    (tmp_path / "d.jsonl").write_text(json.dumps({"id": "p0", "problem": "What colour is it?", "answer": "blue",
                                                  "images": [str(tmp_path / "img.png")]}) + "\n")
    records = load_records(str(tmp_path / "d.jsonl"))
    loaded = load_model(path, dtype="float32")
    embeddings = sum(p.numel() for n, p in loaded.model.named_parameters() if "embed_tokens" in n or "lm_head" in n)
    assert embeddings >= 0.98 * sum(p.numel() for p in loaded.model.parameters())
    sampler = VLLMRollout(loaded.model, loaded.processor, path=path,
                          options=EngineOptions(max_model_len=512, max_images=1), suffix=None, system_prompt=None,
                          score_fn=trainer_lp(loaded.model, loaded.processor), check_every=1)
    optimizer = torch.optim.AdamW(loaded.model.parameters(), lr=1e-4)
    try:
        ro = sampler.generate(records, SamplingParams(n=2, max_new_tokens=8, seed=0))
        for seed in (1, 2):
            optimizer.zero_grad(set_to_none=True)
            rollout_logprobs(loaded.model, loaded.processor, ro, micro_batch_size=8, suffix=None,
                             system_prompt=None).sum().backward()
            optimizer.step()
            sampler.weights_changed()
            ro = sampler.generate(records, SamplingParams(n=2, max_new_tokens=8, seed=seed))  # no SyncError
            assert ro.stats["rollout/sync_gap"] < 1e-4
            assert ro.stats.get("rollout/sync_weight_drift", 0.0) <= 1e-12
        assert (sampler.offset is False) == (engine.engine_fingerprint(sampler.llm).placeholders > 0)
    finally:
        sampler.close()


@pytest.mark.parametrize("kind", ["vlm", "text"])
def test_vllm_teacher_equals_the_hf_teacher(lab_pair, lab_sampler, vllm_dir, vlm_records, kind):
    from gndpo import vllm_engine as engine  # noqa: F401  (engine env before HF loads)

    if kind == "vlm":
        student, teacher_path, records = lab_sampler[1], lab_pair[1], vlm_records
        ro = student.generate(records, SamplingParams(n=2, max_new_tokens=16, seed=4))
    else:
        from gndpo.rollout.hf import HFRollout

        teacher_path = str(vllm_dir / "text_teacher")
        s = load_model(str(vllm_dir / "text_student"))
        records = load_records(str(vllm_dir / "text.jsonl"), image_key=None)[:3]
        torch.manual_seed(0)
        ro = HFRollout(s.model, s.processor, suffix=None).generate(records, SamplingParams(n=2, max_new_tokens=16))
    hf_t = load_model(teacher_path)
    expected = HFTeacher(hf_t.model, hf_t.processor, suffix=None).score(ro).logprobs
    teacher = VLLMTeacher(teacher_path, hf_t.processor, options=EngineOptions(max_model_len=512,
                                                                              max_images=int(kind == "vlm")),
                          suffix=None, micro_batch_size=4)
    try:
        got = teacher.score(ro).logprobs
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
        assert bool((got[~ro.response_mask] == 0).all())
        if kind == "vlm":  # the images really arrive: another image changes the teacher's scores
            from dataclasses import replace

            swapped = tuple(replace(r, images=records[(i + 1) % len(records)].images) for i, r in enumerate(records))
            other = teacher.score(replace(ro, records=swapped)).logprobs
            assert (other - got).abs().max() > 1e-2
    finally:
        teacher.close()


def test_minus_infinity_reaches_the_clamp(monkeypatch, vlm_records):
    """A token the teacher gives zero probability scores -inf (not NaN) and the reward's clamp bounds it."""
    from types import SimpleNamespace

    from gndpo import vllm_engine as engine
    from gndpo.core.advantages import compute_advantages
    from gndpo.rollout.base import Rollouts

    def fake_generate(requests, params, use_tqdm=False):
        outs = []
        for req in requests:
            ids = req["prompt_token_ids"]
            lps = [None] + [{t: SimpleNamespace(logprob=-float("inf") if t == 7 else -1.0)} for t in ids[1:]]
            outs.append(SimpleNamespace(prompt_token_ids=ids, prompt_logprobs=lps))
        return outs

    responses = [engine_ids + [2] for engine_ids in ([5, 7, 9], [7, 8, 6])]
    got = engine.score(SimpleNamespace(generate=fake_generate), [{"prompt_token_ids": [1, 2, 3]}] * 2, responses)
    assert got[0][1] == got[1][0] == -math.inf and not any(math.isnan(x) for row in got for x in row)
    teacher = torch.tensor(got)
    mask = torch.ones_like(teacher, dtype=torch.bool)
    ro = Rollouts((), torch.zeros(2, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long), mask, ("", ""),
                  torch.zeros(2, dtype=torch.bool), torch.zeros(2))
    adv, metrics = compute_advantages("gndpo", teacher_logprobs=teacher, student_logprobs=torch.full_like(teacher, -2.0),
                                      response_mask=ro.response_mask)
    assert torch.isfinite(adv).all() and metrics["reward_min"] == -5.0


@pytest.mark.parametrize("method", ["gndpo", "opd", "gspo"])
def test_three_steps_with_vllm_rollouts(lab_pair, vllm_dir, tmp_path, run_cfg, read_metrics, method):
    """Every method trains with the vLLM sampler; the engine follows the weights (logprob gap after each step)."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    train(run_cfg(lab_pair, vllm_dir / "vlm" / "train.jsonl", out, method=method,
                  extra=["rollout.backend=vllm", "rollout.sync_check_every=1"]))
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert math.isfinite(r["loss"]) and r["rollout/sync_gap"] < 1e-5 and "time/weight_sync" in r
        if method != "gspo":  # gspo skips the separate old log-prob pass: nothing to compare every step
            assert r["rollout/logprob_diff_max"] < 1e-4
    before = load_file(f"{lab_pair[0]}/model.safetensors")
    after = load_file(str(out / "checkpoints" / "step-000003" / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before if k in after)


def test_gndpo_with_vllm_rollout_and_teacher_text(vllm_dir, tmp_path, run_cfg, read_metrics):
    out = tmp_path / "run"
    pair = (vllm_dir / "text_student", vllm_dir / "text_teacher")
    train(run_cfg(pair, vllm_dir / "text.jsonl", out, text=True,
                  extra=["rollout.backend=vllm", "teacher.backend=vllm"]))
    rows = read_metrics(out)
    assert len(rows) == 3 and all(r["rollout/logprob_diff_max"] < 1e-4 and math.isfinite(r["loss"]) for r in rows)


def test_lora_adapters_reach_the_engine_merged(lab_pair, vllm_dir, tmp_path, run_cfg, read_metrics):
    pytest.importorskip("peft")
    out = tmp_path / "run"
    train(run_cfg(lab_pair, vllm_dir / "vlm" / "train.jsonl", out, extra=[
        "rollout.backend=vllm", "rollout.sync_check_every=1", "model.lora.rank=4", "optim.lr=1e-2"]))
    rows = read_metrics(out)
    assert all(r["rollout/logprob_diff_max"] < 1e-4 and r["rollout/sync_gap"] < 1e-5 for r in rows)


def test_a_skipped_sync_stops_training_with_one_line(lab_pair, vllm_dir, tmp_path, run_cfg, monkeypatch, capsys):
    from gndpo.cli import main

    calls = []
    real = VLLMRollout.weights_changed
    monkeypatch.setattr(VLLMRollout, "weights_changed", lambda self: calls.append(1) if len(calls) == 0 else real(self))
    rc = main(["train", f"model.path={lab_pair[0]}", f"teacher.path={lab_pair[1]}",
               f"data.train={vllm_dir / 'vlm' / 'train.jsonl'}", "rollout.backend=vllm", "rollout.sync_check_every=1",
               "rollout.n=4", "rollout.max_new_tokens=16", "trainer.prompts_per_step=2", "trainer.micro_batch_size=4",
               "trainer.total_steps=3", "trainer.device=cpu", f"trainer.output_dir={tmp_path / 'run'}",
               "optim.lr=1e-3", "logging.progress=false", "trainer.threads=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and calls == [1]
    assert err[-1].startswith("error: vLLM's log-probs differ from the trainer's by") and "stale" in err[-1]


@pytest.mark.parametrize("family", ["internvl", "qwen2_5_vl", "qwen3_vl"])
def test_families_sample_on_vllm_as_the_trainer_scores(wide_families, family_dir, family):
    """InternVL tiles and Qwen-VL's dynamic resolution and multimodal RoPE, with prompts holding 0-2 images of
    different sizes: vLLM runs the trainer's ids and its log-probs equal the trainer's."""
    path = wide_families[family]
    loaded = load_model(str(path))
    records = load_records(str(family_dir / "mixed" / "train.jsonl"))[:3]
    assert sorted(len(r.images) for r in records) == [0, 1, 2]
    sampler = VLLMRollout(loaded.model, loaded.processor, path=str(path),
                          options=EngineOptions(max_model_len=1024, max_images=2), suffix=None, system_prompt=None,
                          score_fn=trainer_lp(loaded.model, loaded.processor), check_every=1)
    try:
        ro = sampler.generate(records, SamplingParams(n=2, max_new_tokens=12, seed=6))
        expanded = [encode_prompts(loaded.processor, [r], suffix=None, system_prompt=None)["input_ids"].shape[1]
                    for r in records]
        assert ro.prompt_lengths.tolist() == [n for n in expanded for _ in range(2)]
        torch.testing.assert_close(ro.sampler_logprobs, trainer_lp(loaded.model, loaded.processor)(ro), rtol=0,
                                   atol=1e-4)
        assert ro.stats["rollout/sync_gap"] < 1e-5
    finally:
        sampler.close()


@pytest.mark.parametrize("family,setting,kwargs", [
    ("internvl", dict(max_tiles=1), {"max_patches": 1}),
    ("qwen2_5_vl", dict(max_pixels=1024), {"size": {"shortest_edge": 256, "longest_edge": 1024}}),
])
def test_image_options_reach_the_engine(wide_families, family, setting, kwargs):
    """data.max_image_tiles / data.max_pixels cut images the same way in vLLM as in the trainer (fewer tokens)."""
    from gndpo.models import configure_images
    from gndpo.vllm_engine import image_settings

    from PIL import Image

    from gndpo.data.records import PromptRecord

    path = wide_families[family]
    loaded = load_model(str(path))
    # larger than one 32-px tile and than 1024 pixels, so both settings must shrink them
    records = [PromptRecord("w", "Wide picture?", "1", (Image.new("RGB", (128, 40), (200, 30, 30)),)),
               PromptRecord("s", "Square picture?", "2", (Image.new("RGB", (96, 96), (30, 200, 30)),))]
    before = [encode_prompts(loaded.processor, [r], suffix=None, system_prompt=None)["input_ids"].shape[1]
              for r in records]
    full = {**dict(max_tiles=None, min_pixels=None, max_pixels=None), **setting}
    configure_images(loaded.processor, **setting)
    settings = image_settings(loaded.processor, **full)
    assert dict(settings) == kwargs
    sampler = VLLMRollout(loaded.model, loaded.processor, path=str(path),
                          options=EngineOptions(max_model_len=1024, max_images=2, processor_kwargs=settings),
                          suffix=None, system_prompt=None, score_fn=trainer_lp(loaded.model, loaded.processor))
    try:
        ro = sampler.generate(records, SamplingParams(n=1, max_new_tokens=4, seed=1))
        after = [encode_prompts(loaded.processor, [r], suffix=None, system_prompt=None)["input_ids"].shape[1]
                 for r in records]
        assert ro.prompt_lengths.tolist() == after and all(a < b for a, b in zip(after, before))
    finally:
        sampler.close()


@pytest.fixture(scope="module")
def two_ranks_vllm(tmp_path_factory, vllm_dir):
    """gndpo, opd and gspo with the vLLM sampler (and, for gndpo, the vLLM teacher): one torchrun of 2 gloo ranks
    running the three in turn, and the same runs in this process. GSPO's 0/1 outcome is a stable hash of the text
    (the random text student never earns the real one)."""
    import json
    import os
    import socket
    import subprocess
    import sys
    import zlib
    from pathlib import Path

    import gndpo.train
    from gndpo.config import load_config

    root = tmp_path_factory.mktemp("ranks")
    pair = (vllm_dir / "text_student", vllm_dir / "text_teacher")

    def args(method, out):
        teacher = ["teacher.backend=vllm"] if method == "gndpo" else []
        return [f"model.path={pair[0]}", f"teacher.path={pair[1]}", f"data.train={vllm_dir / 'text.jsonl'}",
                "data.image_key=null", "rollout.backend=vllm", "rollout.sync_check_every=1", "rollout.n=4",
                "rollout.max_new_tokens=12", "trainer.prompts_per_step=4", "trainer.micro_batch_size=4",
                "trainer.total_steps=2", "trainer.device=cpu", f"trainer.output_dir={out}", "optim.lr=1e-3",
                f"algorithm.method={method}", "logging.progress=false", "logging.tensorboard=false",
                "trainer.threads=1", *teacher]

    real = gndpo.train.get_reward
    gndpo.train.get_reward = lambda name: (lambda texts, answers: [float(zlib.crc32(t.encode()) % 2) for t in texts])
    try:
        for method in ("gndpo", "opd", "gspo"):
            train(load_config(None, args(method, root / f"one-{method}")))
    finally:
        gndpo.train.get_reward = real
    (root / "engines").mkdir()
    spec = root / "spec.json"
    spec.write_text(json.dumps({"runs": [{"overrides": args(m, root / f"two-{m}")} for m in ("gndpo", "opd", "gspo")],
                                "hash_reward": True, "engines": str(root / "engines")}))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = Path(__file__).resolve().parents[1] / "dist" / "worker.py"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                             "--master-addr", "127.0.0.1", "--master-port", str(port), str(worker), str(spec)],
                            capture_output=True, text=True, timeout=1200, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def test_each_rank_runs_its_own_engines_in_the_trainers_group(two_ranks_vllm):
    """vLLM's external_launcher: an engine per rank (rollout, and the teacher for gndpo), data-parallel rank = the
    torchrun rank, in the trainer's process group of 2 (on GPUs the device follows LOCAL_RANK)."""
    import json

    for rank in (0, 1):
        engines = [json.loads(line) for line in open(two_ranks_vllm / "engines" / f"rank{rank}.jsonl")]
        assert len(engines) == 4  # gndpo: sampler + teacher; opd: sampler (hf teacher); gspo: sampler
        for e in engines:
            assert (e["backend"], e["dp_rank"], e["dp_size"], e["world_size"]) == ("external_launcher", rank, 2, 2)


@pytest.mark.parametrize("method", ["gndpo", "opd", "gspo"])
def test_two_ranks_with_vllm_rollouts_train_as_one_process(two_ranks_vllm, method):
    """torchrun + FSDP2 with one vLLM engine per rank: the weights are gathered one parameter at a time for the
    push, and the run ends equal to a single process's (same keyed rollouts, summed gradients)."""
    import json

    from safetensors.torch import load_file

    one = [json.loads(line) for line in open(two_ranks_vllm / f"one-{method}" / "metrics.jsonl")]
    two = [json.loads(line) for line in open(two_ranks_vllm / f"two-{method}" / "metrics.jsonl")]
    assert len(one) == len(two) == 2
    for a, b in zip(one, two):
        assert math.isclose(a["grad_norm"], b["grad_norm"], rel_tol=1e-4) and b["rollout/sync_gap"] < 1e-5
        assert a["grad_norm"] > 0
    a = load_file(str(two_ranks_vllm / f"one-{method}" / "checkpoints" / "step-000002" / "model.safetensors"))
    b = load_file(str(two_ranks_vllm / f"two-{method}" / "checkpoints" / "step-000002" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["text", "vlm"])
def test_an_export_loads_in_vllm(lab_pair, vllm_dir, tmp_path, run_cfg, kind):
    """A trained run's export (float32 masters written as bfloat16) is a directory vLLM's own loader reads (LLaVA's
    after gndpo's renaming, as gndpo eval serves it), and the engine scores as transformers does on it. Both sides
    compute in float32 on the exported bfloat16 values, so the comparison is tight: bfloat16 kernels on both sides
    differ by 0.02-0.06 per token on some CPUs, which would hide a misread weight."""
    from gndpo.checkpoint import export_checkpoint
    from gndpo.data.loaders import load_records
    from gndpo.vllm_engine import engine_input, prompt_ids, score, shutdown, start_engine, vllm_readable

    text = kind == "text"
    paths = (vllm_dir / "text_student", vllm_dir / "text_teacher") if text else lab_pair
    data = vllm_dir / ("text.jsonl" if text else "vlm/train.jsonl")
    train(run_cfg(paths, data, tmp_path / "run", steps=1, text=text))
    out, what = export_checkpoint(tmp_path / "run", dtype="bfloat16")
    assert what.endswith("in bfloat16")
    from safetensors import safe_open

    with safe_open(str(next(out.glob("*.safetensors"))), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    path = vllm_readable(str(out), tmp_path / "renamed")
    llm, loaded = start_engine(path, EngineOptions(dtype="float32", max_model_len=512, max_images=0 if text else 1))
    try:
        assert loaded  # vLLM read the checkpoint itself: no placeholders, no push
        exported = load_model(str(out), dtype="float32")
        records = load_records(str(data), image_key=None if text else "images")[:2]
        ids = prompt_ids(exported.processor, records, suffix=None, system_prompt=None)
        responses = [[5, 6, 7, 8], [9, 10, 11]]
        ours = score(llm, [engine_input(i, r.images) for i, r in zip(ids, records)], responses)
        from gndpo.rollout.base import Rollouts

        mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
        rollouts = Rollouts(tuple(records), torch.arange(2), torch.tensor([[5, 6, 7, 8], [9, 10, 11, 0]]), mask,
                            ("", ""), torch.zeros(2, dtype=torch.bool), torch.zeros(2, dtype=torch.long))
        theirs = trainer_lp(exported.model, exported.processor)(rollouts)
        gaps = [abs(a - float(theirs[i, j])) for i, row in enumerate(ours) for j, a in enumerate(row)]
        assert max(gaps) < 1e-4  # float32 kernels on both sides, on the same bfloat16-rounded weights
    finally:
        shutdown(llm)


@pytest.mark.parametrize("mode", ["loss", "reward"])
def test_dense_distillation_with_vllm_sampler_and_teacher(lab_pair, vllm_dir, tmp_path, run_cfg, read_metrics, mode):
    """Dense (top-k) distillation on the engines: the vLLM teacher's top-k (prompt_logprobs=K) against a student
    sampled by vLLM; two steps train and log the divergence."""
    extra = ["rollout.backend=vllm", "teacher.backend=vllm", "algorithm.distill=topk", "algorithm.topk=5",
             f"algorithm.dense_mode={mode}", "rollout.sync_check_every=1"]
    train(run_cfg(lab_pair, vllm_dir / "vlm" / "train.jsonl", tmp_path / mode, steps=2, extra=extra))
    rows = read_metrics(tmp_path / mode)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["distill/divergence"] > 0 and r["grad_norm"] > 0 and r["rollout/sync_gap"] < 1e-4 for r in rows)
