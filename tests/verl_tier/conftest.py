"""The verl tier: gndpo's verl plugin against the real verl 0.9.1 package, in its own virtualenv.

``python3 run.py test`` builds ``.venv-verl`` (GNDPO_VERL_VENV) on first use: a CPU torch, verl installed without its
dependencies plus the few that the modules exercised here import (requirements/verl.txt), and gndpo installed
without dependencies, so verl finds the plugin through its ``verl.plugins`` entry point. verl pins transformers
< 5.11, gndpo's own loop needs >= 5.17: hence the separate virtualenv. Elsewhere the tier is skipped.
"""
import importlib.util
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
SKIP_REASON = "verl is not installed in this virtualenv (python3 run.py test runs this tier in .venv-verl)"


def pytest_collection_modifyitems(config, items):
    if importlib.util.find_spec("verl") is not None:
        return
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.skip(reason=SKIP_REASON))
