"""Every command block of the README and docs/ marked runnable is executed, and its shown output checked.

The marking convention is in ``docs_blocks.py``. Run blocks use the lab's tiny models and the pages' own commands,
shortened by their markers where a page shows a longer run; a renamed option, a changed message or a missing file
fails here. Blocks that need GPUs, the network or a model hub are skipped, each with the reason its marker gives.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from docs_blocks import COMMAND_LANGS, MarkerError, check_output, parse_page

ROOT = Path(__file__).resolve().parents[2]
# The pages: the README and every hand-written page of the site (the generated ones have no command blocks).
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINKED = ("configs", "src", "run.py", "benchmarks", "requirements")  # what the pages' relative paths refer to
ENVS = {  # env=NAME in a marker -> the variable naming that virtualenv's python (set by run.py's docs tier)
    "vllm": ("GNDPO_DOCS_VLLM_PYTHON", "the vLLM tier's virtualenv"),
    "verl": ("GNDPO_DOCS_VERL_PYTHON", "the verl tier's virtualenv"),
}


def _collect():
    blocks, errors = [], []
    for page in PAGES:
        try:
            blocks += [b for b in parse_page(page) if b.lang in COMMAND_LANGS or b.action]
        except MarkerError as exc:
            errors.append(str(exc))
    return blocks, errors


BLOCKS, MARKER_ERRORS = _collect()
RUNNABLE = [b for b in BLOCKS if b.action in ("run", "skip")]


def _id(block) -> str:
    return f"{block.path.relative_to(ROOT)}:{block.line}"


def test_every_marker_parses():
    assert not MARKER_ERRORS, "\n".join(MARKER_ERRORS)


def test_every_command_block_is_marked():
    unmarked = [f"{_id(b)} ({b.lang})" for b in BLOCKS if b.action not in ("run", "skip")]
    assert not unmarked, ('command blocks without <!-- docs-test: run --> or <!-- docs-test: skip="reason" --> '
                          "on the line before them:\n" + "\n".join(unmarked))


def test_the_pages_execute_something():
    assert sum(b.action == "run" for b in BLOCKS) >= 10, "the docs tier would execute almost nothing"


@pytest.fixture(scope="module")
def page_dirs(tmp_path_factory):
    """One working directory per page, shared by its blocks in order, with the checkout's paths linked in."""
    made = {}

    def get(page: Path) -> Path:
        if page not in made:
            d = tmp_path_factory.mktemp(page.stem.lower())
            for name in LINKED:
                if (ROOT / name).exists():
                    (d / name).symlink_to(ROOT / name)
            made[page] = d
        return made[page]

    return get


def _python_for(block) -> str:
    if block.env == "main":
        return sys.executable
    var, what = ENVS[block.env]
    py = os.environ.get(var)
    if not py or not Path(py).exists():
        pytest.skip(f"needs {what} (${var}; python3 run.py test builds it where this machine can run that tier)")
    return py


def _run(argv, cwd: Path, env: dict, timeout: int) -> tuple[int | None, str]:
    """(exit status, or None on a timeout; stdout and stderr together). The command runs in a process group of
    its own, so background jobs it leaves die with it."""
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        rc = None
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return rc, out


@pytest.mark.parametrize("block", RUNNABLE, ids=_id)
def test_block(block, page_dirs):
    if block.action == "skip":
        pytest.skip(f"{_id(block)}: {block.reason}")
    py = _python_for(block)
    cwd = page_dirs(block.path)
    env = dict(os.environ, PATH=f"{Path(py).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"), COLUMNS="200")
    env.pop("PYTEST_CURRENT_TEST", None)
    script = block.script()
    for i, command in enumerate(block.setup):
        rc, out = _run(["bash", "-c", command], cwd, env, block.timeout)
        assert rc == 0, f"{_id(block)}: setup {command!r} failed ({rc}):\n{out[-3000:]}"
    if block.lang in ("python", "py"):
        path = cwd / f"block_{block.line}.py"
        path.write_text(script + "\n")
        argv = [py, str(path)]
    else:
        path = cwd / f"block_{block.line}.sh"
        path.write_text("set -eo pipefail\n" + script + "\n")
        argv = ["bash", str(path)]
    start = time.monotonic()
    rc, out = _run(argv, cwd, env, block.timeout)
    took = time.monotonic() - start
    assert rc is not None, (f"{_id(block)}: still running after {block.timeout} s (timeout=... in its marker); "
                            f"output:\n{out[-3000:]}")
    assert rc == 0, f"{_id(block)}: exit status {rc} after {took:.0f} s; the script:\n{script}\n--- output:\n{out[-4000:]}"
    problem = check_output(block.expected(), out, block.numbers)
    assert problem is None, f"{_id(block)}: {problem}"
