"""One `gndpo lab --quick` shared by the lab tests that only read its results (CI time: a quick lab is ~1 min)."""
import contextlib
import io

import pytest


@pytest.fixture(scope="session")
def quick_lab(tmp_path_factory):
    """``(out, stderr)`` of ``gndpo lab --quick --jobs 2``: the README's main command in its CI-sized form, in two
    worker processes (whatever the machine's core count)."""
    from gndpo.cli import main

    out = tmp_path_factory.mktemp("quick") / "lab"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["lab", "--quick", "--jobs", "2", "--out", str(out)])
    assert rc == 0, err.getvalue()
    return out, err.getvalue()
