"""The evaluation-harness tier: VLMEvalKit (ms-vlmeval) in its own virtualenv, driven by ``gndpo eval --suite``.

``python3 run.py test`` builds that virtualenv (``.venv-eval``, GNDPO_EVAL_VENV) and runs this tier; elsewhere it
is skipped with the reason. The model under test and the judge are a fake OpenAI-compatible server on loopback
(``tests/eval/fake_openai.py``)
with canned replies to the fixture rows (``evalkit_fixtures.py``); the test that serves the
lab's model needs vLLM as well (the vLLM virtualenv).
"""
import sys
from pathlib import Path

import pytest

from gndpo.eval.harness import harness_dir

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "eval"))  # fake_openai.py


def pytest_collection_modifyitems(config, items):
    if (harness_dir() / ".gndpo-harness-stamp").exists():
        return
    reason = (f"VLMEvalKit's virtualenv is not built at {harness_dir()} (python3 run.py test builds it; "
              f"GNDPO_EVAL_VENV names another)")
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def fixture_data(tmp_path_factory):
    """(data dir with the seven fixture TSVs, the fake servers' rules)."""
    from evalkit_fixtures import write_fixtures

    root = tmp_path_factory.mktemp("lmudata")
    return root, write_fixtures(root)
