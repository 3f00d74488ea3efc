import pytest


@pytest.fixture(autouse=True)
def no_harness_install(monkeypatch):
    """These tests never install VLMEvalKit (tests/eval_tier runs it)."""
    import gndpo.eval.harness as harness

    def refuse(log=print):
        raise AssertionError("a unit test reached the harness install")

    monkeypatch.setattr(harness, "ensure_harness", refuse)
