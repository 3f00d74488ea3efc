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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from docs_blocks import COMMAND_LANGS, MarkerError, check_output, looks_like_commands, parse_page

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
            blocks += [b for b in parse_page(page) if b.lang in COMMAND_LANGS or b.action or looks_like_commands(b)]
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
    unmarked = [f"{_id(b)} ({b.lang or 'no language: label it bash'})" for b in BLOCKS
                if b.action not in ("run", "skip")]
    assert not unmarked, ('command blocks without <!-- docs-test: run --> or <!-- docs-test: skip="reason" --> '
                          "on the line before them:\n" + "\n".join(unmarked))


def test_the_pages_execute_something():
    assert sum(b.action == "run" for b in BLOCKS) >= 10, "the docs tier would execute almost nothing"


def _python_for(block) -> str | None:
    if block.env == "main":
        return sys.executable
    py = os.environ.get(ENVS[block.env][0])
    return py if py and Path(py).exists() else None


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


def _execute(block, cwd: Path) -> str | None:
    """Run one block in ``cwd``: None when it passed, else why it failed."""
    py = _python_for(block)
    env = dict(os.environ, PATH=f"{Path(py).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               DOCS_TIER=str(Path(__file__).resolve().parent), COLUMNS="200",
               VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    env.pop("PYTEST_CURRENT_TEST", None)
    try:
        script = block.script()
    except MarkerError as exc:
        return str(exc)
    for command in block.setup:
        rc, out = _run(["bash", "-c", command], cwd, env, block.timeout)
        if rc != 0:
            return f"setup {command!r} failed ({rc}):\n{out[-3000:]}"
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
    if rc is None:
        return f"still running after {block.timeout} s (timeout=... in its marker); output:\n{out[-3000:]}"
    if rc != 0:
        return f"exit status {rc} after {took:.0f} s; the script:\n{script}\n--- output:\n{out[-4000:]}"
    return check_output(block.expected(), out, block.numbers)


def _run_page(blocks, cwd: Path) -> dict:
    """The page's run blocks in order, in one directory; after a failure the rest are not run."""
    results, failed = {}, None
    for block in blocks:
        if failed:
            results[_id(block)] = f"not run: {failed} failed before it"
            continue
        results[_id(block)] = _execute(block, cwd)
        failed = _id(block) if results[_id(block)] else None
    return results


@pytest.fixture(scope="module")
def executed(request, tmp_path_factory):
    """The selected blocks' pages, started at once and run GNDPO_DOCS_JOBS pages at a time (default: one per CPU
    core; the blocks are single-threaded and mostly start-up), longest first. A page runs its blocks up to the last
    selected one, since a block may use what an earlier one wrote. Returns block id -> future of its page's results."""
    selected = {_id(item.callspec.params["block"]) for item in request.session.items
                if getattr(item, "callspec", None) and "block" in item.callspec.params}
    pages: dict[Path, list] = {}
    for b in RUNNABLE:
        if b.action == "run" and _python_for(b) is not None:
            pages.setdefault(b.path, []).append(b)
    for page, blocks in list(pages.items()):
        last = max((i for i, b in enumerate(blocks) if _id(b) in selected), default=-1)
        if last < 0:
            del pages[page]
        else:
            pages[page] = blocks[:last + 1]
    jobs = int(os.environ.get("GNDPO_DOCS_JOBS", os.cpu_count() or 1))
    pool = ThreadPoolExecutor(max_workers=max(1, jobs))
    futures = {}
    for page, blocks in sorted(pages.items(), key=lambda kv: -sum(b.timeout + 200 * (b.env != "main")
                                                                   for b in kv[1])):
        cwd = tmp_path_factory.mktemp(page.stem.lower())
        for name in LINKED:
            if (ROOT / name).exists():
                (cwd / name).symlink_to(ROOT / name)
        future = pool.submit(_run_page, blocks, cwd)
        futures.update({_id(b): future for b in blocks})
    yield futures
    pool.shutdown(wait=True)


@pytest.mark.parametrize("block", RUNNABLE, ids=_id)
def test_block(block, executed):
    if block.action == "skip":
        pytest.skip(f"{_id(block)}: {block.reason}")
    if _python_for(block) is None:
        var, what = ENVS[block.env]
        pytest.skip(f"needs {what} (${var}; python3 run.py test builds it where this machine can run that tier)")
    problem = executed[_id(block)].result()[_id(block)]
    assert problem is None, f"{_id(block)}: {problem}"
