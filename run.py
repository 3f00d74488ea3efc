#!/usr/bin/env python3
"""Set-up-free entry point: creates (or reuses) the project's virtualenv, then runs a command in it.

    python3 run.py lab [gndpo lab options]     # the main job: the offline lab
    python3 run.py test [pytest options]       # the test suite
    python3 run.py gndpo ARGS...               # any gndpo command
    python3 run.py bench ARGS...               # a script under benchmarks/

Only the standard library is used here, so a fresh clone with `python3` alone works.
The virtualenv lives in `.venv/` (override with GNDPO_VENV). It is reinstalled only when
pyproject.toml or requirements/constraints.txt change.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("GNDPO_VENV", ROOT / ".venv"))
CONSTRAINTS = ROOT / "requirements" / "constraints.txt"
STAMP = VENV / ".gndpo-install-stamp"


def _python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _fingerprint(extras: str) -> str:
    h = hashlib.sha256(extras.encode())
    for f in (ROOT / "pyproject.toml", CONSTRAINTS):
        h.update(f.read_bytes())
    return h.hexdigest()


def _pip(*args: str) -> None:
    cmd = [str(_python()), "-m", "pip", "install", "--disable-pip-version-check", *args]
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def ensure_venv(extras: str = "dev") -> Path:
    if not _python().exists():
        print(f"creating virtualenv in {VENV} (first run only; torch is a large install, a few minutes)", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    if STAMP.exists() and STAMP.read_text() in (_fingerprint(extras), _fingerprint("dev,bench")):
        return _python()
    # torch first and pinned, so no later requirement can pull a different build.
    _pip("-q", "-c", str(CONSTRAINTS), "torch", "torchvision")
    _pip("-q", "-c", str(CONSTRAINTS), "-e", f"{ROOT}[{extras}]")
    STAMP.write_text(_fingerprint(extras))
    return _python()


def main(argv: list[str]) -> int:
    if not argv or argv[0] in {"-h", "--help"}:
        print(__doc__)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    py = str(ensure_venv("dev,bench" if cmd == "bench" else "dev"))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if cmd == "test":
        rc = subprocess.call([py, "-m", "pytest", *rest], cwd=ROOT, env=env)
        if rc == 5:  # pytest: no tests collected -- never report that as success
            print("error: pytest collected no tests", file=sys.stderr)
            return 1
        return rc
    if cmd == "lab":
        return subprocess.call([py, "-m", "gndpo.cli", "lab", *rest], cwd=ROOT, env=env)
    if cmd == "gndpo":
        return subprocess.call([py, "-m", "gndpo.cli", *rest], cwd=ROOT, env=env)
    if cmd == "bench":
        if not rest:
            print("usage: python3 run.py bench SCRIPT [ARGS...]", file=sys.stderr)
            return 2
        return subprocess.call([py, str(ROOT / "benchmarks" / rest[0]), *rest[1:]], cwd=ROOT, env=env)
    print(f"error: unknown command {cmd!r}; use one of: lab, test, gndpo, bench", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
