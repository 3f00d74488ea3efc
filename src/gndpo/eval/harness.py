"""VLMEvalKit in its own virtualenv, created on first use, driven as a subprocess.

The harness pins what gndpo cannot share (antlr4 through omegaconf / math-verify / latex2sympy2, its own
transformers), so it never enters gndpo's environment: ``ensure_harness()`` builds a virtualenv with
``ms-vlmeval`` (``pandas<3``: 3.x removed an API its WeMath scorer calls; torch and torchvision pinned to the pair
that imports on CPUs, see DESIGN.md) and :func:`run_job` runs :mod:`gndpo.eval.vlmeval_driver` in it. The
virtualenv lives in ``$GNDPO_EVAL_VENV``, else ``~/.cache/gndpo/venv-vlmeval-<version>``; a stamp file records a
finished install, so an interrupted one is redone.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
import venv
from pathlib import Path
from typing import Callable

from gndpo.errors import GndpoError
from gndpo.eval.benchmarks import HARNESS
from gndpo.eval.vlmeval_driver import scrubbed

REQUIREMENTS = (f"{HARNESS['package']}=={HARNESS['version']}", "pandas<3", "torch==2.14.1", "torchvision==0.29.1")
DRIVER = Path(__file__).with_name("vlmeval_driver.py")


class HarnessError(GndpoError):
    """The evaluation harness could not be installed or failed on a benchmark."""


def harness_dir() -> Path:
    default = Path.home() / ".cache" / "gndpo" / f"venv-vlmeval-{HARNESS['version']}"
    return Path(os.environ.get("GNDPO_EVAL_VENV", default))


def _python(root: Path) -> Path:
    return root / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def ensure_harness(log=print) -> Path:
    """The harness's python, installing it first if needed (~3 minutes and ~7 GB, once)."""
    root = harness_dir()
    stamp = root / ".gndpo-harness-stamp"
    key = "\n".join(REQUIREMENTS)
    if stamp.exists() and stamp.read_text() == key:
        return _python(root)
    log(f"installing {HARNESS['name']} ({' '.join(REQUIREMENTS)}) into {root} (first use only, a few minutes)")
    try:
        if not _python(root).exists():
            venv.EnvBuilder(with_pip=True).create(root)
        subprocess.run([str(_python(root)), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        *REQUIREMENTS], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    except subprocess.CalledProcessError as exc:
        last = (exc.stderr or "").strip().splitlines()[-1:] or ["no output"]
        raise HarnessError(f"could not install {HARNESS['package']} into {root}: {last[0]} (set GNDPO_EVAL_VENV "
                           f"to another directory, or check that PyPI is reachable)") from None
    except OSError as exc:
        raise HarnessError(f"could not create the harness virtualenv {root}: {exc}") from None
    stamp.write_text(key)
    return _python(root)


def run_job(python: Path, job: dict, *, log_file: Path, env: dict[str, str],
            on_result: Callable[[dict], None] = lambda r: None) -> list[dict]:
    """Run the driver on ``job``, calling ``on_result`` as each dataset's result arrives; returns them all (one per
    dataset; the last is an error when the driver stopped on one). The driver's own output goes to ``log_file``."""
    result_file = Path(job["result_file"])
    result_file.parent.mkdir(parents=True, exist_ok=True)
    result_file.unlink(missing_ok=True)
    job_file = result_file.with_name(result_file.name.replace(".results.jsonl", ".job.json"))
    job_file.write_text(json.dumps(job, indent=1))
    # no credentials or API endpoints of this environment reach the harness: only the keys gndpo passes in ``env``
    child_env = scrubbed({k: v for k, v in os.environ.items() if not k.startswith(("GNDPO_EVAL_", "PYTHON"))})
    child_env.update(env, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    Path(job["work_dir"]).mkdir(parents=True, exist_ok=True)
    results: list[dict] = []

    def collect() -> None:
        lines = result_file.read_text().splitlines() if result_file.exists() else []
        for line in lines[len(results):]:
            if not line.endswith("}"):
                break  # still being written
            results.append(json.loads(line))
            on_result(results[-1])

    with open(log_file, "a", encoding="utf-8") as log:
        proc = subprocess.Popen([str(python), str(DRIVER), str(job_file)], stdout=log, stderr=subprocess.STDOUT,
                                env=child_env, cwd=job["work_dir"])
        try:
            while proc.poll() is None:
                time.sleep(1.0)
                collect()
        except BaseException:
            proc.terminate()
            proc.wait()
            raise
    collect()
    if proc.returncode and not any("error" in r for r in results):
        raise HarnessError(f"the harness exited with code {proc.returncode} before reporting a result; see "
                           f"{log_file}")
    return results


def harness_version(python: Path) -> str:
    """The version of VLMEvalKit installed beside ``python`` (what eval.json records), or a one-line error."""
    try:
        out = subprocess.run([str(python), "-c", f"import importlib.metadata as m; print(m.version("
                              f"{HARNESS['package']!r}))"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise HarnessError(f"cannot run the harness's python {python}: {exc}") from None
    version = out.stdout.strip()
    if out.returncode or not version:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise HarnessError(f"cannot read the installed {HARNESS['package']} version with {python}: {last}")
    return version

