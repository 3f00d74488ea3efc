"""Reward registry: names, batch shape, errors."""
from __future__ import annotations

import pytest

from gndpo.rewards import Reward, available_rewards, get_reward, register_reward


def test_registered_names():
    assert {"math", "math_format"} <= set(available_rewards())


def test_math_reward_scores_a_batch():
    reward = get_reward("math")
    assert isinstance(reward, Reward)
    assert reward(["\\boxed{1/2}", "\\boxed{2}", "no answer"], ["0.5", "3", "1"]) == [1.0, 0.0, 0.0]
    assert reward([], []) == []


def test_math_format_reward_batch():
    scores = get_reward("math_format")(["<think>a</think>\\boxed{3}", "\\boxed{3}", "<think>a</think>\\boxed{4}"],
                                       ["3", "3", "3"])
    assert scores == pytest.approx([1.0, 0.9, 0.1])


def test_unknown_reward_lists_the_names():
    with pytest.raises(ValueError, match=r"unknown reward 'acc'; available: .*math, math_format"):
        get_reward("acc")


def test_length_mismatch():
    with pytest.raises(ValueError, match="2 responses but 1 references"):
        get_reward("math")(["a", "b"], ["a"])


def test_register_reward_and_duplicates():
    name = "test_length_reward"
    register_reward(name)(lambda response, reference: float(len(response) == len(reference)))
    assert get_reward(name)(["ab", "a"], ["xy", "xy"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="already registered"):
        register_reward(name)(lambda response, reference: 0.0)
