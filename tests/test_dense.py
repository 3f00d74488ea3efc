"""Dense (top-k) distillation end to end on tiny models: the teacher's top-k, the divergence as a loss and as a
GNDPO-normalized reward, each option changing the result, resume, and the one-line errors."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from gndpo.config import load_config
from gndpo.core.advantages import compute_advantages
from gndpo.core.divergences import topk_divergence
from gndpo.errors import ConfigError
from gndpo.train import train

pytestmark = pytest.mark.slow


def dense_cfg(tiny_dir, out, *extra, steps=2, kind="text"):
    data = tiny_dir / "text.jsonl" if kind == "text" else tiny_dir / "vlm" / "train.jsonl"
    overrides = [
        f"model.path={tiny_dir / f'{kind}_student'}", f"teacher.path={tiny_dir / f'{kind}_teacher'}",
        f"data.train={data}", "data.prompt_suffix=none", "algorithm.method=gndpo", "algorithm.distill=topk",
        "algorithm.topk=5", "rollout.n=4", "rollout.max_new_tokens=8", "trainer.prompts_per_step=2",
        "trainer.micro_batch_size=4", f"trainer.total_steps={steps}", "trainer.device=cpu", f"trainer.output_dir={out}",
        "optim.lr=1e-3", "logging.progress=false", "logging.tensorboard=false", "trainer.seed=7", *extra]
    if kind == "text":
        overrides.append("data.image_key=null")
    return load_config(None, overrides)


def weights(out, step):
    return load_file(str(out / "checkpoints" / f"step-{step:06d}" / "model.safetensors"))


def test_the_hf_teacher_reports_its_topk_and_the_dense_loss_equals_a_full_softmax(tiny_dir):
    """objective.micro_batch_loss in dense loss mode against the divergence computed from the student's full
    logits: the same loss and the same gradients."""
    from gndpo.forward import encode_each, pad_token_id
    from gndpo.models import load_model
    from gndpo.objective import micro_batch_loss
    from gndpo.rollout.hf import HFRollout
    from gndpo.rollout.base import SamplingParams
    from gndpo.teacher.hf import HFTeacher
    from gndpo.data.loaders import load_records

    student = load_model(str(tiny_dir / "text_student"))
    teacher = load_model(str(tiny_dir / "text_teacher"))
    records = load_records(str(tiny_dir / "text.jsonl"), image_key=None)[:2]
    rollouts = HFRollout(student.model, student.processor, suffix=None).generate(
        records, SamplingParams(n=3, max_new_tokens=6, seed=1))
    scores = HFTeacher(teacher.model, teacher.processor, suffix=None, topk=4).score(rollouts)
    mask = rollouts.response_mask
    assert scores.topk_ids.shape == (*mask.shape, 4)
    # the teacher's top-k is its full softmax's top-k, in order, and holds the sampled token's log-prob when there
    enc = encode_each(teacher.processor, records, suffix=None, system_prompt=None)
    for b in range(rollouts.size):
        n = int(mask[b].sum())
        ids = torch.cat([torch.as_tensor(enc[int(rollouts.prompt_index[b])]["input_ids"]).flatten(),
                         rollouts.response_ids[b, :n]])
        with torch.no_grad():
            full = torch.log_softmax(teacher.model(ids[None]).logits[0, -n - 1:-1].float(), -1)  # (n, V)
        top = full.topk(4, -1)
        torch.testing.assert_close(scores.topk_logprobs[b, :n], top.values, atol=1e-5, rtol=0)
        assert torch.equal(scores.topk_ids[b, :n], top.indices)
        torch.testing.assert_close(scores.logprobs[b, :n], full.gather(1, rollouts.response_ids[b, :n, None])[:, 0],
                                   atol=1e-5, rtol=0)
    cfg = dense_cfg(tiny_dir, "unused", "algorithm.divergence=forward_kl", "algorithm.loss_agg_mode=token-mean")
    model = student.model
    enc_s = encode_each(student.processor, records, suffix=None, system_prompt=None)
    totals = torch.tensor([float(mask.sum()), float(rollouts.size)], dtype=torch.float64)
    model.zero_grad()
    loss, metrics, _ = micro_batch_loss(cfg, model, enc_s, rollouts, old_lp=None, advantages=torch.zeros(mask.shape),
                                        teacher=scores, totals=totals, pad_id=pad_token_id(student.processor),
                                        with_entropy=False)
    loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    # reference: one sequence at a time through the model's own forward and a full log-softmax
    model.zero_grad()
    ref = 0.0
    for b in range(rollouts.size):
        n = int(mask[b].sum())
        ids = torch.cat([torch.as_tensor(enc_s[int(rollouts.prompt_index[b])]["input_ids"]).flatten(),
                         rollouts.response_ids[b, :n]])
        logp = torch.log_softmax(model(ids[None]).logits[0, -n - 1:-1].float(), -1)  # (n, V)
        gather = scores.topk_ids[b, :n]
        d, _, _ = topk_divergence("forward_kl", teacher_topk_logprobs=scores.topk_logprobs[b, :n],
                                  student_topk_logprobs=logp.gather(1, gather),
                                  student_rest=torch.logsumexp(logp.scatter(1, gather, float("-inf")), 1))
        ref = ref + d.sum() / float(mask.sum())
    ref.backward()
    assert float(loss) == pytest.approx(float(ref), rel=1e-5)
    assert metrics["distill/divergence"] == pytest.approx(float(ref), rel=1e-5)  # token-mean = mean divergence
    for name, grad in ours.items():
        torch.testing.assert_close(grad, dict(model.named_parameters())[name].grad, atol=1e-5, rtol=1e-4)


def test_dense_reward_gives_every_candidate_its_normalized_reward(tiny_dir, tmp_path):
    """dense_mode=reward: each candidate of the teacher's top-k and tail gets -dD/dq under the pre-update student
    (reverse KL: r = log p_T - log p_S), z-scored with expectations under the old student, A = (r - mu) / sigma;
    the step's per-token advantage is the sampled token's candidate's. (core/candidates.py tests the gradient.)"""
    seen = []
    train(dense_cfg(tiny_dir, tmp_path / "r", "algorithm.dense_mode=reward", steps=1), callbacks=[seen.append])
    rec, row = seen[0], json.loads(open(tmp_path / "r" / "metrics.jsonl").readline())
    mask = rec.rollouts.response_mask
    cand = rec.candidates
    assert rec.divergence is not None and bool((rec.divergence[mask] >= 0).all())
    assert cand.advantages.shape == cand.old_logprobs.shape == (*mask.shape, 6)  # topk 5 + the tail
    log_q = cand.old_logprobs.double()[mask]  # (N, 6)
    adv = cand.advantages.double()[mask]  # (N, 6)
    n = len(adv)
    assert log_q.exp().sum(-1).tolist() == pytest.approx([1.0] * n, abs=1e-5)
    # expectations under the old student: mean 0 over the batch, second moment (N - 1) / N (the unbiased variance)
    assert float((log_q.exp() * adv).sum()) / n == pytest.approx(0.0, abs=1e-5)
    assert float((log_q.exp() * adv ** 2).sum()) / (n - 1) == pytest.approx(1.0, rel=1e-4)
    # undo the normalization: log p_T = A sigma + mu + log q is the teacher's distribution over the buckets (sums to
    # 1; no clamp reached on these near-uniform tiny models), and at a sampled token of the top-k its log-prob
    assert row["clamp_frac"] == 0.0
    sigma = math.sqrt(row["reward_std"] ** 2 + 1e-8)
    log_p = adv * sigma + row["reward_mean"] + log_q  # (N, 6)
    assert log_p.exp().sum(-1).tolist() == pytest.approx([1.0] * n, abs=1e-4)
    sampled = cand.sampled[mask]
    top = sampled < 5
    assert bool(top.any())
    torch.testing.assert_close(log_p.gather(-1, sampled[:, None].long())[:, 0][top],
                               rec.teacher_logprobs[mask].double()[top], rtol=0, atol=1e-4)
    # the record's per-token advantages are the sampled token's candidate's
    torch.testing.assert_close(rec.advantages[mask].double(), adv.gather(-1, sampled[:, None].long())[:, 0])
    assert row["distill/divergence"] == pytest.approx(float(rec.divergence[mask].mean()), rel=1e-5)
    assert 0 <= row["distill/teacher_tail"] <= 1 and 0 <= row["distill/student_tail"] <= 1
    assert row["grad_norm"] > 0 and math.isfinite(row["loss"]) and 0 < row["ratio_mean"] <= 1 + 1e-5


def test_every_dense_option_changes_the_result(tiny_dir, tmp_path):
    settings = {"base": [], "forward_kl": ["algorithm.divergence=forward_kl"], "jsd": ["algorithm.divergence=jsd"],
                "jsd_beta": ["algorithm.divergence=jsd", "algorithm.jsd_beta=0.2"], "topk": ["algorithm.topk=2"],
                "reward": ["algorithm.dense_mode=reward"], "sampled": ["algorithm.distill=sampled"],
                "agg": ["algorithm.loss_agg_mode=seq-mean-token-sum"]}
    got, loss = {}, {}
    for name, extra in settings.items():
        train(dense_cfg(tiny_dir, tmp_path / name, *extra, steps=1))
        got[name] = weights(tmp_path / name, 1)
        loss[name] = json.loads(open(tmp_path / name / "metrics.jsonl").readline())["loss"]
    for name in settings:
        if name == "agg":  # the loss's scale (Adam's first step does not see it): summed over each response's tokens
            assert loss["agg"] > 2 * loss["base"] > 0
        elif name != "base":
            other = "jsd" if name == "jsd_beta" else "base"
            assert any(not torch.equal(got[other][k], got[name][k]) for k in got[name]), name


def test_dense_runs_resume_bit_exact(tiny_dir, tmp_path):
    for mode in ("loss", "reward"):
        extra = [f"algorithm.dense_mode={mode}", "checkpoint.every=1", "checkpoint.keep_last=null"]
        train(dense_cfg(tiny_dir, tmp_path / f"full-{mode}", *extra, steps=3, kind="vlm"))
        train(dense_cfg(tiny_dir, tmp_path / f"split-{mode}", *extra, steps=1, kind="vlm"))
        train(dense_cfg(tiny_dir, tmp_path / f"split-{mode}", *extra, "trainer.resume=true", steps=3, kind="vlm"))
        a, b = weights(tmp_path / f"full-{mode}", 3), weights(tmp_path / f"split-{mode}", 3)
        assert all(torch.equal(a[k], b[k]) for k in a), mode


@pytest.mark.parametrize("extra, message", [
    (["algorithm.topk=0"], "algorithm.topk=0 must be >= 1 with algorithm.distill=topk"),
    (["algorithm.method=gspo"], "algorithm.distill=topk compares the student with a teacher, which "
                                "algorithm.method=gspo (advantage grpo) has none"),
    (["algorithm.divergence=jsd", "algorithm.jsd_beta=1.0"], "algorithm.jsd_beta=1.0 must be in (0, 1)"),
    (["algorithm.dense_mode=reward", "algorithm.old_logprobs=sampler"],
     "algorithm.dense_mode=reward scores the teacher's top-k under the student before the update"),
    (["algorithm.divergence=kl"], "algorithm.divergence='kl' is not one of: forward_kl, reverse_kl, jsd"),
    (["algorithm.dense_mode=reward", "algorithm.policy_loss=reinforce"],
     "algorithm.policy_loss=reinforce does not apply with algorithm.distill=topk"),
    (["algorithm.policy_loss=ppo"], "algorithm.policy_loss=ppo does not apply with algorithm.distill=topk"),
])
def test_bad_dense_settings_are_one_line_before_any_model_loads(tiny_dir, extra, message):
    with pytest.raises(ConfigError) as err:
        dense_cfg(tiny_dir, "unused", *extra)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_dense_loss_trains_lora_adapters(tiny_dir, tmp_path):
    from gndpo.checkpoint import export_checkpoint

    train(dense_cfg(tiny_dir, tmp_path / "lora", "model.lora.rank=4", steps=1))
    out, what = export_checkpoint(tmp_path / "lora")
    assert "LoRA adapters" in what and (out / "adapter_model.safetensors").is_file()
    row = json.loads(open(tmp_path / "lora" / "metrics.jsonl").readline())
    assert row["grad_norm"] > 0 and row["distill/divergence"] > 0


def test_the_inspector_can_colour_tokens_by_the_divergence(tiny_dir, tmp_path):
    from gndpo.report.inspect import write_report
    from gndpo.report.outliers import load_rollouts

    seen = []
    train(dense_cfg(tiny_dir, tmp_path / "run", "algorithm.dense_mode=reward", "logging.rollouts_every=1", steps=1),
          callbacks=[seen.append])
    saved = load_rollouts(tmp_path / "run")[0]
    resp = saved["responses"][0]
    n = len(resp["tokens"])
    expected = [round(v, 4) for v in seen[0].divergence[resp["row"], :n].tolist()]
    assert resp["div"] == pytest.approx(expected, abs=1e-4)
    html = write_report([str(tmp_path / "run")], tmp_path / "page.html").read_text()
    assert 'value="div"' in html and '"div":' in html.replace(" ", "")


@pytest.mark.parametrize("mode", ["loss", "reward"])
def test_the_outlier_gradient_share_runs_in_both_dense_modes(tiny_dir, tmp_path, mode):
    """logging.outlier_grad_share re-runs the update's backward, which needs the teacher's top-k in both modes. In
    reward mode the top 1 % are the positions with the largest |A_t(c)| over their candidates, a part of the
    gradient; the loss mode has no advantages to restrict, so its share is the whole (1)."""
    train(dense_cfg(tiny_dir, tmp_path / mode, f"algorithm.dense_mode={mode}", "logging.outlier_grad_share=true",
                    steps=1))
    row = json.loads(open(tmp_path / mode / "metrics.jsonl").readline())
    share = row["outlier/top1pct_grad_share"]
    assert share == pytest.approx(1.0) if mode == "loss" else 0 < share < 1
