"""Boxed-answer extraction and math-verify equivalence for the outcome reward."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gndpo.rewards.math as math_rewards
from gndpo.rewards.math import (
    MAX_ANSWER_CHARS,
    extract_boxed,
    format_reward,
    math_format_reward,
    math_reward,
    verify_answer,
)


# ---------------------------------------------------------------- extraction


@pytest.mark.parametrize("text, expected", [
    ("so \\boxed{42}.", "42"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces
    ("\\boxed{{a}{b{c}}}", "{a}{b{c}}"),
    ("first \\boxed{1}, then \\boxed{2}", "2"),  # the last box wins
    ("\\fbox{7}", "7"),
    ("\\boxed{1} or \\fbox{3}", "3"),
    ("\\boxed {5}", "5"),
    ("$\\boxed 5$", "5"),  # MATH-style space form
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces do not count
    ("\\boxed{}", ""),
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize("text", [
    "no box here", "", "\\boxed{1", "\\boxed{1} then \\boxed{2", "\\boxed{\\frac{1}{2}", "\\boxed", "\\boxedx{1}",
    "\\boxed{\\}",
])
def test_extract_boxed_missing_or_unbalanced(text):
    assert extract_boxed(text) is None


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.text(alphabet=st.sampled_from(list("\\boxedfbx{} $12")), max_size=40) | st.text(max_size=40))
def test_extract_boxed_never_raises_and_returns_a_substring(text):
    out = extract_boxed(text)
    assert out is None or out in text


# ---------------------------------------------------------------- equivalence (math-verify 0.9 behaviour)


@pytest.mark.parametrize("prediction, reference", [
    ("0.5", "1/2"),
    ("\\frac{1}{2}", "0.5"),
    ("\\dfrac{1}{2}", "\\frac12"),
    ("\\sqrt{12}", "2\\sqrt{3}"),
    ("10.0", "10"),
    ("x=3", "3"),  # math-verify compares an equation "symbol = value" by its right-hand side
    ("3", "x = 3"),
    ("60^\\circ", "60"),  # degrees are normalized away
    ("\\frac{15}{2}", "7.5"),
    ("13.333333", "\\frac{40}{3}"),  # numbers agree to float_rounding=6 places
    ("\\{2, 1\\}", "\\{1,2\\}"),
    ("  42 ", "42"),
    ("$\\frac{1}{2}$", "0.5"),  # already delimited
    ("\\sin(x)^2+\\cos(x)^2", "1"),
    ("x^2+2x+1", "(x+1)^2"),
    ("1267650600228229401496703205376", "2^{100}"),  # big but reasonable numbers pass the pre-checks
])
def test_equivalent_answers(prediction, reference):
    assert verify_answer(prediction, reference)


@pytest.mark.parametrize("prediction, reference", [
    ("4", "3"),
    ("13.33", "\\frac{40}{3}"),  # too few digits
    ("3.14159", "\\pi"),
    ("\\sqrt{3}", "2\\sqrt{3}"),
    ("-0.5", "1/2"),
    ("", "3"),
    ("3", ""),
    ("", ""),
])
def test_different_answers(prediction, reference):
    assert not verify_answer(prediction, reference)


@pytest.mark.parametrize("garbage", [
    "}}}{{", "\\frac{1}{0}", "\\boxed{", "$$", "\x00", "\\sqrt{-1}", "nan", "\\left(", "1/0", "^^^",
    "9^{9^{9^{9}}}",  # sympy would evaluate this exactly and never return
    "(10^{10})!",
    "\\frac{1}{" * 30 + "2" + "}" * 30,  # deep nesting stalls sympy's simplify
    "\\sin(x)^{1000}",  # minutes of trigonometric rewriting without the guard
    "(x+1)^{999}",
    "1" * (MAX_ANSWER_CHARS + 1),
])
def test_garbage_never_raises_and_is_fast(garbage):
    start = time.perf_counter()
    assert verify_answer(garbage, "3") is False
    assert math_reward(f"\\boxed{{{garbage}}}", "3") == 0.0
    assert time.perf_counter() - start < 5.0


@pytest.mark.parametrize("bad", [None, 3, b"\\boxed{3}", ["\\boxed{3}"]])
def test_non_string_inputs_score_zero(bad):
    assert verify_answer(bad, "3") is False
    assert verify_answer("3", bad) is False
    assert math_reward(bad, "3") == 0.0
    assert format_reward(bad) == 0.0


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(alphabet=st.sampled_from(list("0123456789+-*/^(){}\\fracsqrt x=.,$ ")), max_size=16))
def test_math_reward_never_raises_on_random_latex(text):
    assert math_reward(f"\\boxed{{{text}}}", "1/2") in (0.0, 1.0)


# ---------------------------------------------------------------- rewards


def test_math_reward():
    assert math_reward("<think>half</think> The answer is \\boxed{\\frac{1}{2}}.", "0.5") == 1.0
    assert math_reward("The answer is 0.5", "0.5") == 0.0  # no box, no reward
    assert math_reward("\\boxed{0.5} no wait \\boxed{3}", "0.5") == 0.0  # only the last box counts
    assert math_reward("\\boxed{0.5", "0.5") == 0.0


def test_format_reward():
    assert format_reward("<think>reasoning</think> so \\boxed{3}") == 1.0
    assert format_reward("  <think>\nmulti\nline\n</think>\n\\boxed{3}") == 1.0
    assert format_reward("\\boxed{3}") == 0.0  # no thinking
    assert format_reward("<think>\\boxed{3}</think>") == 0.0  # the answer must follow the thinking
    assert format_reward("<think>unfinished \\boxed{3}") == 0.0
    assert format_reward("<think>x</think> \\boxed{3") == 0.0


def test_math_format_reward_weights():
    good, reference = "<think>x</think> \\boxed{3}", "3"
    assert math_format_reward(good, reference) == pytest.approx(1.0)
    assert math_format_reward("\\boxed{3}", reference) == pytest.approx(0.9)
    assert math_format_reward("<think>x</think> \\boxed{4}", reference) == pytest.approx(0.1)
    assert math_format_reward(good, reference, format_weight=0.5) == pytest.approx(1.0)
    assert math_format_reward("\\boxed{3}", reference, format_weight=0.5) == pytest.approx(0.5)


def test_math_reward_from_worker_threads():
    # math-verify's default timeouts use signal.alarm, which raises off the main thread.
    cases = [("\\boxed{\\frac{1}{2}}", "0.5", 1.0), ("\\boxed{\\sqrt{12}}", "2\\sqrt{3}", 1.0),
             ("\\boxed{4}", "3", 0.0), ("\\boxed{x=3}", "3", 1.0), ("\\boxed{\\sin(x)^{1000}}", "3", 0.0),
             ("\\boxed{9^{9^{9}}}", "3", 0.0)] * 2
    seen_threads = set()

    def score(case):
        seen_threads.add(threading.current_thread().name)
        return math_reward(case[0], case[1])

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=3) as pool:
        assert list(pool.map(score, cases)) == [c[2] for c in cases]
    assert time.perf_counter() - start < 10.0  # no signal timeouts here: the pre-checks must hold
    assert threading.main_thread().name not in seen_threads


def test_signal_timeouts_only_on_the_main_thread(monkeypatch):
    seen = []

    def parse(text, parsing_timeout):
        seen.append(("parse", parsing_timeout))
        return [text]

    def verify(gold, target, timeout_seconds):
        seen.append(("verify", timeout_seconds))
        return False

    monkeypatch.setattr(math_rewards, "_math_verify", lambda: (parse, verify))
    verify_answer("1", "2")
    assert seen == [("parse", math_rewards.TIMEOUT_S)] * 2 + [("verify", math_rewards.TIMEOUT_S)]
    seen.clear()
    worker = threading.Thread(target=verify_answer, args=("1", "2"))
    worker.start()
    worker.join()
    assert seen == [("parse", None)] * 2 + [("verify", None)]
