"""The fault-injection tier's CI part: kill -9 at random moments (benchmarks/soak_kill9.py runs many more)."""
import pytest
from kill9 import soak

pytestmark = pytest.mark.slow


def test_kill9_at_random_moments_then_resume_is_bit_exact(tmp_path):
    result = soak(tmp_path, kills=5, steps=40, seed=1)
    assert result["kills"] >= 4
    assert result["bit_equal"], "the resumed run's final weights differ from the uninterrupted run's"
    assert result["steps_logged"] == result["expected_steps"]  # no step missing, none logged twice
