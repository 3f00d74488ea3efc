"""End-to-end training on CPU with tiny models: every method, text and VLM, resume, accumulation."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from gndpo.config import load_config
from gndpo.core.advantages import compute_advantages
from gndpo.train import train

pytestmark = pytest.mark.slow

REQUIRED_KEYS = {
    "loss", "grad_norm", "entropy", "reward_mean", "reward_std", "reward_min", "reward_max", "clamp_frac",
    "accuracy", "response_length", "truncated_frac", "time/rollout", "time/old_logprobs", "time/teacher",
    "time/advantages", "time/update", "time/step", "tokens_per_sec", "clip_frac", "approx_kl", "lr",
}


def make_cfg(tiny_dir, out, *, kind="text", method="gndpo", steps=3, extra=()):
    data = tiny_dir / "text.jsonl" if kind == "text" else tiny_dir / "vlm" / "train.jsonl"
    overrides = [
        f"model.path={tiny_dir / f'{kind}_student'}", f"teacher.path={tiny_dir / f'{kind}_teacher'}",
        f"data.train={data}", "data.prompt_suffix=Answer in \\boxed{}.", f"algorithm.method={method}",
        "rollout.n=4", "rollout.max_new_tokens=8", "rollout.micro_batch_size=16",
        "trainer.prompts_per_step=2", "trainer.micro_batch_size=4", f"trainer.total_steps={steps}",
        "trainer.device=cpu", f"trainer.output_dir={out}", "optim.lr=1e-3", "logging.progress=false",
        "logging.tensorboard=false", "checkpoint.every=0", "trainer.seed=7", *extra,
    ]
    if kind == "text":
        overrides.append("data.image_key=null")
    return load_config(None, overrides)


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


def final_weights(out, step):
    return load_file(str(out / "checkpoints" / f"step-{step:06d}" / "model.safetensors"))


@pytest.mark.parametrize("kind", ["text", "vlm"])
@pytest.mark.parametrize("method", ["gspo", "opd", "gndpo"])
def test_three_steps_every_method(tiny_dir, tmp_path, monkeypatch, kind, method):
    import gndpo.forward
    import gndpo.teacher.hf

    teacher_processors, image_calls = [], []
    real_score, real_encode = gndpo.teacher.hf.HFTeacher.score, gndpo.forward.encode_prompts

    def spy_score(self, rollouts):
        teacher_processors.append(self.processor)
        return real_score(self, rollouts)

    def spy_encode(processor, records, **kw):
        out = real_encode(processor, records, **kw)
        if any(processor is p for p in teacher_processors):
            image_calls.append(("pixel_values" in out, sum(len(r.images) for r in records)))
        return out

    monkeypatch.setattr(gndpo.teacher.hf.HFTeacher, "score", spy_score)
    monkeypatch.setattr(gndpo.forward, "encode_prompts", spy_encode)

    cfg = make_cfg(tiny_dir, tmp_path / "run", kind=kind, method=method)
    before = {k: v.clone() for k, v in load_file(str(tiny_dir / f"{kind}_student" / "model.safetensors")).items()}
    train(cfg)
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert REQUIRED_KEYS <= row.keys(), REQUIRED_KEYS - row.keys()
        assert math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"]) and math.isfinite(row["entropy"])
    after = final_weights(tmp_path / "run", 3)
    assert any(not torch.equal(before[k], after[k]) for k in before if k in after), "weights did not change"
    if method == "gspo":
        assert not teacher_processors, "gspo must not call the teacher"
    else:
        assert teacher_processors, "teacher never scored"
        if kind == "vlm":
            assert image_calls and all(has_px and n > 0 for has_px, n in image_calls), "teacher got no images"


def test_loop_advantages_equal_core(tiny_dir, tmp_path):
    seen = []
    train(make_cfg(tiny_dir, tmp_path / "run", steps=2), callbacks=[seen.append])
    assert len(seen) == 2
    for rec in seen:
        expected, _ = compute_advantages("gndpo", teacher_logprobs=rec.teacher_logprobs,
                                         student_logprobs=rec.old_logprobs, response_mask=rec.rollouts.response_mask)
        torch.testing.assert_close(rec.advantages, expected, rtol=0, atol=0)
        valid = rec.rollouts.response_mask
        assert abs(float(rec.advantages[valid].mean())) < 1e-5


@pytest.mark.parametrize("kind", ["text", "vlm"])  # vlm: LLaVA's last vision layer norm never gets a gradient
def test_resume_equals_uninterrupted(tiny_dir, tmp_path, kind):
    full = tmp_path / "full"
    train(make_cfg(tiny_dir, full, kind=kind, steps=4, extra=["checkpoint.every=2"]))
    split = tmp_path / "split"
    train(make_cfg(tiny_dir, split, kind=kind, steps=2))  # stops after step 2 (final checkpoint)
    train(make_cfg(tiny_dir, split, kind=kind, steps=4, extra=["trainer.resume=true"]))
    a, b = final_weights(full, 4), final_weights(split, 4)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    assert [r["step"] for r in read_jsonl(split / "metrics.jsonl")] == [1, 2, 3, 4]


def test_gradient_accumulation_equals_full_batch(tiny_dir, tmp_path):
    rows = {}
    for micro in (8, 2):
        out = tmp_path / f"m{micro}"
        train(make_cfg(tiny_dir, out, steps=1, extra=[f"trainer.micro_batch_size={micro}"]))
        rows[micro] = read_jsonl(out / "metrics.jsonl")[0]
    for key in ("loss", "grad_norm", "entropy", "reward_mean"):
        assert rows[8][key] == pytest.approx(rows[2][key], rel=1e-4, abs=1e-6), key


def test_epochs_and_mini_batches_change_the_update(tiny_dir, tmp_path):
    weights = {}
    for name, extra in {"base": [], "epochs": ["algorithm.epochs=2"], "minis": ["algorithm.mini_batches=2"]}.items():
        out = tmp_path / name
        train(make_cfg(tiny_dir, out, steps=1, extra=extra))
        weights[name] = final_weights(out, 1)
    for other in ("epochs", "minis"):
        assert any(not torch.equal(weights["base"][k], weights[other][k]) for k in weights["base"]), other


def test_skipping_the_redundant_old_logprob_pass_keeps_results(tiny_dir, tmp_path):
    rows = {}
    for reuse in ("true", "false"):
        out = tmp_path / reuse
        train(make_cfg(tiny_dir, out, method="gspo", steps=2, extra=[f"algorithm.reuse_logprobs={reuse}"]))
        rows[reuse] = read_jsonl(out / "metrics.jsonl")
    for a, b in zip(rows["true"], rows["false"]):
        for key in ("loss", "grad_norm", "entropy", "accuracy"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), key
    assert rows["true"][0]["clip_frac"] == 0.0
    a, b = final_weights(tmp_path / "true", 2), final_weights(tmp_path / "false", 2)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_rollout_engine_option_changes_draws_not_the_policy(tiny_dir, tmp_path):
    """loop and generate sample the same distribution with different draws; the loop also reports its own
    log-probs, which match the trainer's recomputation (the rollouts are exactly on-policy)."""
    seen = {}
    for engine in ("loop", "generate"):
        out = tmp_path / engine
        recs = []
        train(make_cfg(tiny_dir, out, steps=1, extra=[f"rollout.engine={engine}"]), callbacks=[recs.append])
        seen[engine] = (recs[0], read_jsonl(out / "metrics.jsonl")[0])
    (loop, loop_row), (gen, gen_row) = seen["loop"], seen["generate"]
    assert loop_row["rollout/logprob_diff_max"] < 1e-4
    assert "rollout/logprob_diff_max" not in gen_row
    assert loop.rollouts.texts != gen.rollouts.texts


def test_sampler_old_logprobs_skip_the_recompute_pass(tiny_dir, tmp_path, monkeypatch):
    import gndpo.train

    calls = []
    real = gndpo.train.rollout_stats
    monkeypatch.setattr(gndpo.train, "rollout_stats", lambda *a, **k: calls.append(1) or real(*a, **k))
    seen = {}
    for mode in ("recompute", "sampler"):
        calls.clear()
        recs = []
        train(make_cfg(tiny_dir, tmp_path / mode, steps=1, extra=[f"algorithm.old_logprobs={mode}"]),
              callbacks=[recs.append])
        seen[mode] = (recs[0], len(calls))
    (rec_a, calls_a), (rec_b, calls_b) = seen["recompute"], seen["sampler"]
    assert calls_a == 1 and calls_b == 0
    assert rec_b.old_logprobs is rec_b.rollouts.sampler_logprobs
    # same draws (same seed, same sampler); old log-probs and hence advantages differ only by float rounding
    assert rec_a.rollouts.texts == rec_b.rollouts.texts
    assert not torch.equal(rec_a.old_logprobs, rec_b.old_logprobs)
    torch.testing.assert_close(rec_a.old_logprobs, rec_b.old_logprobs, rtol=0, atol=1e-5)
    torch.testing.assert_close(rec_a.advantages, rec_b.advantages, rtol=0, atol=1e-3)


def test_sampler_old_logprobs_fall_back_to_recompute(tiny_dir, tmp_path, monkeypatch, caplog):
    """A model the decode loop cannot drive is sampled by generate(), which reports no log-probs: recompute."""
    import gndpo.rollout.hf
    import gndpo.train

    monkeypatch.setattr(gndpo.rollout.hf, "supports_decode_loop", lambda model, inputs=None: False)
    calls = []
    real = gndpo.train.rollout_stats
    monkeypatch.setattr(gndpo.train, "rollout_stats", lambda *a, **k: calls.append(1) or real(*a, **k))
    recs = []
    with caplog.at_level("WARNING"):
        train(make_cfg(tiny_dir, tmp_path / "run", steps=2, extra=["algorithm.old_logprobs=sampler"]),
              callbacks=[recs.append])
    assert len(calls) == 2 and all(r.rollouts.sampler_logprobs is None for r in recs)
    assert all(r.old_logprobs is not None for r in recs)
    assert sum("reports no log-probs; recomputing them" in m for m in caplog.messages) == 1
