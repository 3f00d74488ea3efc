"""Outlier metrics with numbers worked out by hand, and the rollout samples saved for gndpo inspect."""
import math
from types import SimpleNamespace

import pytest
import torch

from gndpo.report.outliers import OutlierReport, load_rollouts, outlier_metrics


def test_max_abs_r_and_kurtosis_by_hand():
    r = torch.tensor([[1.0, -2.0, 3.0, 99.0]])
    mask = torch.tensor([[True, True, True, False]])  # the padded 99 is ignored
    m = outlier_metrics(r, torch.zeros(1, 4), mask)
    assert m["outlier/max_abs_r"] == 3.0
    # mean 2/3; deviations 1/3, -8/3, 7/3: m2 = 114/27, m4 = 6498/243, m4 / m2^2 = 1.5 -> excess -1.5
    assert m["outlier/kurtosis_r"] == pytest.approx(-1.5)
    # -inf (a token the teacher rules out) is left to clamp_frac, not to these
    r2 = torch.tensor([[1.0, -2.0, 3.0, -math.inf]])
    assert outlier_metrics(r2, torch.zeros(1, 4), torch.ones(1, 4, dtype=torch.bool))["outlier/max_abs_r"] == 3.0


def test_top1pct_share_by_hand():
    adv = torch.ones(2, 100)
    adv[1, 7] = -101.0  # one dominant token among 200
    m = outlier_metrics(None, adv, torch.ones(2, 100, dtype=torch.bool))
    # top 1 % = ceil(2) tokens: 101 + 1 of a total 199 + 101 = 300
    assert m["outlier/top1pct_adv_share"] == pytest.approx(102 / 300)
    assert "outlier/max_abs_r" not in m  # outcome-reward runs have no r_t
    flat = outlier_metrics(None, torch.ones(1, 300), torch.ones(1, 300, dtype=torch.bool))
    assert flat["outlier/top1pct_adv_share"] == pytest.approx(3 / 300)  # every token alike


class Tok:
    def decode(self, ids):
        return "".join(chr(ord("a") + i) for i in ids)


def step_record(step=5):
    teacher = torch.tensor([[-1.0, -9.0, -1.0], [-1.0, -1.0, -1.0], [-0.5, -0.5, 0.0]])
    student = torch.tensor([[-1.0, -1.0, -1.0], [-1.2, -1.0, -1.0], [-0.5, -0.5, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False], [True, False, False]])
    rollouts = SimpleNamespace(response_mask=mask, response_ids=torch.tensor([[0, 1, 2], [3, 4, 0], [5, 0, 0]]),
                               prompt_index=torch.tensor([0, 0, 1]),
                               records=[SimpleNamespace(id="p0", prompt="q0", answer="1"),
                                        SimpleNamespace(id="p1", prompt="q1", answer="2")])
    return SimpleNamespace(step=step, rollouts=rollouts, old_logprobs=student, teacher_logprobs=teacher,
                           outcome_rewards=torch.tensor([0.0, 1.0, 0.0]), advantages=teacher - student,
                           metrics={"loss": 0.1, "grad_norm": float("nan")})


def test_report_saves_the_extreme_responses_first(tmp_path):
    rec = step_record()
    OutlierReport(tmp_path, Tok(), every=5, per_step=2, clamp=5.0, extreme=2)(rec)
    assert rec.metrics["outlier/max_abs_r"] == pytest.approx(8.0)
    assert rec.metrics["outlier/extreme_tokens"].startswith("'b'=-8.00")
    [saved] = load_rollouts(tmp_path)
    assert saved["step"] == 5 and [r["row"] for r in saved["responses"]] == [0, 1]  # row 0 holds r = -8
    first = saved["responses"][0]
    assert first["tokens"] == ["a", "b", "c"] and first["r"] == [0.0, -8.0, 0.0]
    assert first["clamped"] == [False, True, False] and first["prompt_id"] == "p0"
    assert saved["responses"][1]["tokens"] == ["d", "e"]  # only the response's own tokens
    assert "grad_norm" not in saved["metrics"]  # NaN is not JSON
    rec = step_record(step=6)
    OutlierReport(tmp_path, Tok(), every=5, per_step=2, clamp=5.0)(rec)  # not a saving step
    assert len(load_rollouts(tmp_path)) == 1 and "outlier/kurtosis_r" in rec.metrics


def test_samples_are_saved_at_the_first_the_last_and_every_nth_step():
    report = OutlierReport("unused", Tok(), every=10, per_step=2, clamp=5.0, last_step=25)
    assert [s for s in range(1, 26) if report.saves(s)] == [1, 10, 20, 25]
    short = OutlierReport("unused", Tok(), every=10, per_step=2, clamp=5.0, last_step=3)
    assert [s for s in range(1, 4) if short.saves(s)] == [1, 3]  # a short run still has samples to inspect
    never = OutlierReport("unused", Tok(), every=0, per_step=2, clamp=5.0, last_step=3)
    assert not any(never.saves(s) for s in range(1, 4))  # 0 = never, the first and last steps included


@pytest.mark.slow
def test_grad_share_diagnostic_measures_without_changing_the_update(tiny_dir, tmp_path):
    import json

    from safetensors.torch import load_file

    from gndpo.config import load_config
    from gndpo.train import train

    finals = {}
    for on in (False, True):
        out = tmp_path / f"share-{on}"
        train(load_config(None, [
            f"model.path={tiny_dir / 'text_student'}", f"teacher.path={tiny_dir / 'text_teacher'}",
            f"data.train={tiny_dir / 'text.jsonl'}", "data.image_key=null", "rollout.n=4", "rollout.max_new_tokens=8",
            "trainer.prompts_per_step=2", "trainer.micro_batch_size=4", "trainer.total_steps=2", "trainer.device=cpu",
            "trainer.seed=7", f"trainer.output_dir={out}", "logging.progress=false", "logging.tensorboard=false",
            f"logging.outlier_grad_share={str(on).lower()}"]))
        finals[on] = load_file(str(out / "checkpoints" / "step-000002" / "model.safetensors"))
        rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
        shares = [r.get("outlier/top1pct_grad_share") for r in rows]
        if on:
            assert all(0.0 < s <= 1.0 for s in shares), shares  # one token of ~64 carries part of the gradient
        else:
            assert shares == [None, None]
    assert all(torch.equal(finals[False][k], finals[True][k]) for k in finals[False])
