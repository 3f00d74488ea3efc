"""Hypothesis-fuzzed overrides: whatever keys and values a user types, load_config either returns a valid config
or raises ConfigError (one line) -- never another exception, never a traceback.

CI runs the same 400 examples every time (derandomized, so it cannot flake). A longer random sweep, by hand:
``GNDPO_FUZZ_EXAMPLES=4000 GNDPO_FUZZ_RANDOM=1 pytest tests/reliability/test_config_fuzz.py``.
"""
import dataclasses
import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gndpo.config import RunConfig, load_config
from gndpo.errors import ConfigError


def known_keys() -> list[str]:
    keys = []
    for section in dataclasses.fields(RunConfig):
        default = getattr(RunConfig(), section.name)
        if not dataclasses.is_dataclass(default):  # a list section (teachers:): fuzz its whole value
            keys.append(section.name)
            continue
        for f in dataclasses.fields(default):
            keys.append(f"{section.name}.{f.name}")
    return keys


KEYS = known_keys()
values = st.one_of(
    st.integers(-10**12, 10**12).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["", "null", "true", "False", "[1, 2]", "{a: 1}", "nan", "-inf", "1e400", "0x10", "~", "'",
                     "\"", "${oops}", "${trainer.seed}", "a=b", "é✓数据", "\x00", " ", "[", "}"]),
    st.text(max_size=12),
)
keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=16),
                 st.sampled_from(KEYS).map(lambda k: k + ".x"), st.sampled_from(["model", "trainer", ".", "a..b"]))
overrides = st.lists(st.tuples(keys, values).map(lambda kv: f"{kv[0]}={kv[1]}"), max_size=4)


@settings(max_examples=int(os.environ.get("GNDPO_FUZZ_EXAMPLES", 400)), deadline=None,
          derandomize=os.environ.get("GNDPO_FUZZ_RANDOM") != "1", suppress_health_check=[HealthCheck.too_slow])
@given(overrides)
def test_fuzzed_overrides_are_valid_or_one_line(items):
    try:
        load_config(None, items)
    except ConfigError as exc:
        assert len(str(exc).splitlines()) <= 1, str(exc)


def test_a_key_holding_line_breaks_is_quoted_on_one_line():
    for sep in ("\n", "\r", "\u2028", "\x85", "\x1e"):
        try:
            load_config(None, [f"trainer.a{sep}b=1"])
        except ConfigError as exc:
            assert len(str(exc).splitlines()) == 1 and "trainer.a" in str(exc)
        else:
            raise AssertionError("an unknown key was accepted")
