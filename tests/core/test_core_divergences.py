"""Top-k divergences (gndpo.core.divergences): numbers worked out by hand, invariants, the registry."""
import math

import pytest
import torch

from gndpo.core.divergences import TAIL_FLOOR, divergence_names, teacher_rest, topk_divergence

LN = math.log


def one_token(name, p_top, q_top, q_rest=None, beta=None):
    """Teacher top-1 probability p_top (tail 1 - p_top), student q_top with rest q_rest (default 1 - q_top)."""
    q_rest = 1 - q_top if q_rest is None else q_rest
    value, t_tail, s_tail = topk_divergence(
        name, teacher_topk_logprobs=torch.tensor([[LN(p_top)]], dtype=torch.float64),
        student_topk_logprobs=torch.tensor([[LN(q_top)]], dtype=torch.float64),
        student_rest=torch.tensor([LN(q_rest)], dtype=torch.float64), beta=beta)
    return float(value[0]), float(t_tail[0]), float(s_tail[0])


def test_by_hand_on_one_token_and_its_tail():
    # teacher p = [0.5, 0.5 (tail)], student q = [0.25, 0.75]
    # forward KL = 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75) = 0.5 (0.693147 - 0.405465) = 0.143841
    value, t_tail, s_tail = one_token("forward_kl", 0.5, 0.25)
    assert value == pytest.approx(0.1438410362, abs=1e-9) and t_tail == pytest.approx(0.5) and s_tail == pytest.approx(0.75)
    # reverse KL = 0.25 ln(0.25/0.5) + 0.75 ln(0.75/0.5) = -0.173287 + 0.304099 = 0.130812
    assert one_token("reverse_kl", 0.5, 0.25)[0] == pytest.approx(0.1308120359, abs=1e-9)
    # JSD(0.5): m = [0.375, 0.625]; KL(p||m) = 0.5 ln(0.5/0.375) + 0.5 ln(0.5/0.625) = 0.032269;
    # KL(q||m) = 0.25 ln(0.25/0.375) + 0.75 ln(0.75/0.625) = 0.035375; mean 0.033822
    assert one_token("jsd", 0.5, 0.25, beta=0.5)[0] == pytest.approx(0.0338221, abs=1e-6)
    # beta weights the two sides: beta = 0.9 -> m = [0.475, 0.525]
    m = (0.475, 0.525)
    expected = 0.9 * (0.5 * LN(0.5 / m[0]) + 0.5 * LN(0.5 / m[1])) + 0.1 * (0.25 * LN(0.25 / m[0]) + 0.75 * LN(0.75 / m[1]))
    assert one_token("jsd", 0.5, 0.25, beta=0.9)[0] == pytest.approx(expected, abs=1e-9)


def test_the_tail_carries_the_mass_outside_the_topk():
    # Top-2 teacher [0.6, 0.3] (tail 0.1); student gives the same two tokens [0.3, 0.15] and the rest 0.55: it
    # agrees on their ratio, so renormalizing over the top-k alone would call them equal. With the tail:
    # forward KL = 0.6 ln 2 + 0.3 ln 2 + 0.1 ln(0.1/0.55) = 0.623832 - 0.170475 = 0.453357
    value, _, _ = topk_divergence("forward_kl", teacher_topk_logprobs=torch.tensor([[LN(0.6), LN(0.3)]]),
                                  student_topk_logprobs=torch.tensor([[LN(0.3), LN(0.15)]]),
                                  student_rest=torch.tensor([LN(0.55)]))
    assert float(value[0]) == pytest.approx(0.453357, abs=1e-5)


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd"])
def test_zero_when_equal_positive_otherwise_and_student_gradients_only(name):
    torch.manual_seed(0)
    beta = 0.3 if name == "jsd" else None
    full_t = torch.log_softmax(torch.randn(4, 6, 10, dtype=torch.float64), -1)  # (B, L, V)
    top_lp, top_ids = full_t.topk(3, -1)
    rest_t = torch.logsumexp(full_t.scatter(-1, top_ids, float("-inf")), -1)
    same, _, _ = topk_divergence(name, teacher_topk_logprobs=top_lp, student_topk_logprobs=top_lp.clone(),
                                 student_rest=rest_t, beta=beta)
    torch.testing.assert_close(same, torch.zeros(4, 6, dtype=torch.float64), atol=1e-12, rtol=0)
    logits_s = torch.randn(4, 6, 10, dtype=torch.float64, requires_grad=True)
    full_s = torch.log_softmax(logits_s, -1)
    s_top = full_s.gather(-1, top_ids)
    s_rest = torch.logsumexp(full_s.scatter(-1, top_ids, float("-inf")), -1)
    t_top = top_lp.clone().requires_grad_(True)
    value, _, _ = topk_divergence(name, teacher_topk_logprobs=t_top, student_topk_logprobs=s_top,
                                  student_rest=s_rest, beta=beta)
    assert value.shape == (4, 6) and bool((value > 0).all())
    value.sum().backward()
    assert logits_s.grad is not None and t_top.grad is None  # the teacher is a target


def test_teacher_tail_is_floored_where_the_topk_holds_all_its_mass():
    # two tokens of 0.5 each: 1 - sum is 0 (or a rounding error below it): the floor
    rest = teacher_rest(torch.tensor([[LN(0.5), LN(0.5)], [LN(0.7), LN(0.2)]]))
    assert float(rest[0]) == pytest.approx(LN(TAIL_FLOOR)) and float(rest[1]) == pytest.approx(LN(0.1), rel=1e-5)


def test_registry_and_bad_arguments():
    assert divergence_names() == ["forward_kl", "jsd", "reverse_kl"]
    t = torch.tensor([[LN(0.5)]])
    with pytest.raises(ValueError, match="unknown divergence 'kl'; valid names: forward_kl, jsd, reverse_kl"):
        topk_divergence("kl", teacher_topk_logprobs=t, student_topk_logprobs=t, student_rest=torch.tensor([LN(0.5)]))
    with pytest.raises(ValueError, match="jsd needs 0 < beta < 1, got 1.0"):
        topk_divergence("jsd", teacher_topk_logprobs=t, student_topk_logprobs=t, student_rest=torch.tensor([LN(0.5)]),
                        beta=1.0)
    with pytest.raises(ValueError, match=r"expected \(\.\.\., k\)"):
        topk_divergence("forward_kl", teacher_topk_logprobs=t, student_topk_logprobs=torch.zeros(1, 2),
                        student_rest=torch.zeros(1))
