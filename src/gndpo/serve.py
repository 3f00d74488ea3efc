"""``gndpo serve-teacher``: a teacher on its own GPUs or node, scoring the student's tokens over HTTP.

One in-process vLLM engine (:mod:`gndpo.vllm_engine`: placeholder weights, then the teacher's safetensors pushed
in place) behind a small FastAPI app run by uvicorn. Clients (:class:`gndpo.teacher.client.ServerTeacher`) send
token ids rendered with the student's processor, one placeholder per image, plus the images themselves; the
engine expands the placeholders for the teacher's own vision tower, as the in-process vLLM teacher does.

The wire format (JSON, UTF-8):

- ``GET /health`` -> ``{"status": "ok"}`` once the engine is up (no key needed: it reveals nothing).
- ``GET /fingerprint[?vocab=1]`` -> the model (path, type, limits) and ``tokenizer``:
  :func:`gndpo.models.tokenizer_fingerprint` of the teacher's processor, so a client runs the same compatibility
  check as for an in-process teacher (``vocab=1`` adds the whole vocabulary, for a detailed mismatch message).
- ``POST /score`` with ``{"requests": [{"prompt_token_ids": [int], "images": [base64 PNG], "response_token_ids":
  [int]}, ...]}`` -> ``{"logprobs": [[float | "-Infinity", ...], ...]}``, one list per request, one value per
  response token. A request may instead name a shared prompt, ``{"prompt": k, "response_token_ids": [...]}``
  with ``k`` indexing a top-level ``"prompts": [{"prompt_token_ids": [...], "images": [...]}]`` list, so the G
  samples of one prompt carry its images once.
- Top-k (wire protocol 2): a body's ``"topk": K`` (0 to the server's ``max_topk``, 0 by default) adds
  ``"topk_ids": [[[int] * K per token], ...]`` and ``"topk_logprobs"`` (same shape, descending) to the answer: the
  teacher's K most likely tokens at each response position.
- Versions: ``/fingerprint`` carries ``"protocol": 2`` and ``"max_topk"``; every /score body carries
  ``"protocol": 2``. A server refuses a body without it (an older client) with 400, and a client refuses a server
  whose fingerprint has no protocol 2 (an older server), each with one line saying which side to upgrade.
- Log-probs are plain JSON numbers, except a token the teacher gives zero probability: JSON has no infinities
  (bare ``-Infinity`` breaks strict parsers, and Starlette's own encoder refuses it), so ``-inf`` is the string
  ``"-Infinity"``. NaN or ``+inf`` is never sent: the request fails with 500 instead.
- Errors: ``{"error": "one line"}`` with 400 (malformed request), 401 (missing or wrong key), 500 (engine).

Security: loopback by default; any other address needs an API key (``Authorization: Bearer KEY``), given in the
environment (``GNDPO_TEACHER_API_KEY``) rather than on the command line, where ``ps`` shows it. The key is
never printed or logged. Plain HTTP: across machines, use a private network or an SSH tunnel.
"""
# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations (Request) at run time.

import base64
import binascii
import concurrent.futures
import contextlib
import hmac
import io
import ipaddress
import json
import math
import queue
import signal
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from gndpo.errors import ConfigError, GndpoError, ModelError

API_KEY_ENV = "GNDPO_TEACHER_API_KEY"
DEFAULT_PORT = 8100
WIRE_PROTOCOL = 2  # 1: log-probs of the sampled tokens; 2: + the teacher's top-k, and the version itself
DEFAULT_MAX_TOPK = 20
NEG_INF = "-Infinity"  # how -inf travels: JSON has no infinities


# ---------------------------------------------------------------- wire format (shared with the client)


def encode_logprobs(rows: Sequence[Sequence[float]]) -> list[list[float | str]]:
    """Rows of log-probs as JSON-safe lists; raises ValueError on NaN or +inf, which a log-prob never is."""
    out = []
    for i, row in enumerate(rows):
        enc: list[float | str] = []
        for j, v in enumerate(row):
            v = float(v)
            if math.isfinite(v):
                enc.append(v)
            elif v == -math.inf:
                enc.append(NEG_INF)
            else:
                raise ValueError(f"the engine returned {v} as the log-prob of request {i} token {j}")
        out.append(enc)
    return out


def decode_logprob(value: Any) -> float:
    """One log-prob off the wire; ValueError for anything but a finite number or ``"-Infinity"``."""
    if value == NEG_INF:
        return -math.inf
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{value!r} is not a log-prob (a number, or \"{NEG_INF}\" for -inf)")
    return float(value)


def strict_json_loads(body: bytes | str) -> Any:
    """``json.loads`` without Python's extensions: a bare NaN or Infinity is an error, not a float."""
    def reject(name: str):
        raise ValueError(f"bare {name} is not JSON (-inf must be the string \"{NEG_INF}\")")

    return json.loads(body, parse_constant=reject)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name other than localhost may resolve to anything
        return False


def check_bind(host: str, api_key: str | None) -> None:
    if not is_loopback(host) and not api_key:
        raise ConfigError(f"--host {host} accepts connections from other machines, which needs an API key: "
                          f"export {API_KEY_ENV}=<secret> (the clients set the same), or keep the default "
                          f"--host 127.0.0.1 and reach it through an SSH tunnel")


# ---------------------------------------------------------------- requests


class BadRequest(GndpoError):
    """A malformed /score request: answered with 400 and this one line."""


@dataclass(frozen=True)
class Limits:
    vocab_size: int  # token ids must be below this (the model's embedding rows)
    max_model_len: int
    max_images: int
    max_topk: int = DEFAULT_MAX_TOPK


def _token_ids(value: Any, where: str, limits: Limits, *, allow_empty: bool) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise BadRequest(f"{where} must be a list of token ids (integers)")
    if not value and not allow_empty:
        raise BadRequest(f"{where} is empty")
    bad = next((t for t in value if not 0 <= t < limits.vocab_size), None)
    if bad is not None:
        raise BadRequest(f"{where} holds token id {bad}, outside the model's vocabulary [0, {limits.vocab_size})")
    return value


def _images(value: Any, where: str, limits: Limits) -> list:
    from PIL import Image

    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadRequest(f"{where} must be a list of base64-encoded image files")
    if len(value) > limits.max_images:
        raise BadRequest(f"{where} holds {len(value)} images; this server takes at most {limits.max_images} per "
                         f"prompt (restart it with a larger --max-images)" if limits.max_images else
                         f"{where} holds images, but this server's model is served text-only (--max-images 0)")
    images = []
    for k, text in enumerate(value):
        try:
            image = Image.open(io.BytesIO(base64.b64decode(text, validate=True)))
            image.load()  # decode now: a broken file is the client's error, not the engine's
        except (binascii.Error, OSError, ValueError, Image.DecompressionBombError) as exc:
            raise BadRequest(f"{where}[{k}] is not a decodable image ({type(exc).__name__}: {exc})") from None
        images.append(image)
    return images


def parse_score_request(body: Any, limits: Limits) -> tuple[list[dict], list[list[int]], int]:
    """The engine inputs, responses and top-k of a /score body, or BadRequest naming the first problem."""
    from gndpo.vllm_engine import engine_input

    if not isinstance(body, dict) or not isinstance(body.get("requests"), list):
        raise BadRequest('the body must be a JSON object {"requests": [...]}')
    if body.get("protocol") != WIRE_PROTOCOL:
        raise BadRequest(f"this server speaks gndpo wire protocol {WIRE_PROTOCOL}; the client sent protocol "
                         f"{body.get('protocol', 1)}: upgrade gndpo on the trainer's side")
    topk = body.get("topk", 0)
    if not isinstance(topk, int) or isinstance(topk, bool) or not 0 <= topk <= limits.max_topk:
        raise BadRequest(f"topk={topk!r} must be an integer in [0, {limits.max_topk}] (this server's --max-topk)")
    shared = body.get("prompts", [])
    if not isinstance(shared, list):
        raise BadRequest('"prompts" must be a list')
    prompts = []
    for k, p in enumerate(shared):
        if not isinstance(p, dict):
            raise BadRequest(f"prompts[{k}] must be an object")
        prompts.append(engine_input(_token_ids(p.get("prompt_token_ids"), f"prompts[{k}].prompt_token_ids", limits,
                                               allow_empty=False),
                                    _images(p.get("images"), f"prompts[{k}].images", limits)))
    inputs, responses = [], []
    for i, r in enumerate(body["requests"]):
        if not isinstance(r, dict):
            raise BadRequest(f"requests[{i}] must be an object")
        if "prompt" in r:
            k = r["prompt"]
            if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k < len(prompts):
                raise BadRequest(f"requests[{i}].prompt={k!r} names no entry of \"prompts\" ({len(prompts)} given)")
            inp = prompts[k]
        else:
            inp = engine_input(_token_ids(r.get("prompt_token_ids"), f"requests[{i}].prompt_token_ids", limits,
                                          allow_empty=False),
                               _images(r.get("images"), f"requests[{i}].images", limits))
        resp = _token_ids(r.get("response_token_ids"), f"requests[{i}].response_token_ids", limits, allow_empty=True)
        # +1: the engine generates one token after the scored sequence (placeholders expand further: vLLM checks)
        total = len(inp["prompt_token_ids"]) + len(resp) + 1
        if total > limits.max_model_len:
            raise BadRequest(f"requests[{i}] holds {total - 1} tokens, over the server's --max-model-len "
                             f"{limits.max_model_len} (with one generated token)")
        inputs.append(inp)
        responses.append(resp)
    return inputs, responses, topk


# ---------------------------------------------------------------- the engine worker


class Scorer:
    """One engine, driven from one thread. Requests that arrive while it is busy join its next call (those asking
    for the same top-k): vLLM batches them, and no two threads ever enter the engine.

    ``score_fn(inputs, responses, topk)``: per response, (log-probs, top-k ids, top-k log-probs)."""

    def __init__(self, score_fn: Callable[[list[dict], list[list[int]], int], list[tuple]]):
        self._score = score_fn
        self._jobs: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="gndpo-engine", daemon=True)
        self._thread.start()

    def submit(self, inputs: list[dict], responses: list[list[int]], topk: int = 0) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((inputs, responses, topk, future))
        return future

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=60)

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            jobs = [job]
            while True:
                try:
                    more = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._run_all(jobs)
                    return
                jobs.append(more)
            self._run_all(jobs)

    def _run_all(self, jobs: list) -> None:
        for topk in dict.fromkeys(job[2] for job in jobs):  # one engine call per top-k asked
            self._run([job for job in jobs if job[2] == topk], topk)

    def _run(self, jobs: list, topk: int) -> None:
        try:
            rows = self._score([i for job in jobs for i in job[0]], [r for job in jobs for r in job[1]], topk)
        except Exception as exc:
            if len(jobs) > 1:  # one bad request must not fail the others it was merged with
                for job in jobs:
                    self._run([job], topk)
                return
            jobs[0][3].set_exception(exc)
            return
        start = 0
        for inputs, _, _, future in jobs:
            future.set_result(rows[start:start + len(inputs)])
            start += len(inputs)


# ---------------------------------------------------------------- the app


def build_app(scorer: Scorer, limits: Limits, fingerprint: Callable[[bool], dict], *, api_key: str | None):
    """The FastAPI app. ``fingerprint(with_vocab)``: the body of GET /fingerprint."""
    import asyncio

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response

    from gndpo.vllm_engine import _first_line

    app = FastAPI(title="gndpo teacher", docs_url=None, redoc_url=None, openapi_url=None)
    rejected: tuple[type[BaseException], ...] = (ValueError, ModelError)
    try:  # vLLM's own class for errors the request caused
        from vllm.exceptions import VLLMClientError

        rejected += (VLLMClientError,)
    except ImportError:
        pass
    expected = api_key.encode() if api_key else None

    def error(status: int, message: str) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    def refused(request: Request) -> JSONResponse | None:
        if expected is None:
            return None
        given = request.headers.get("authorization", "")
        if not given.startswith("Bearer "):
            return error(401, "this server requires an API key (header Authorization: Bearer KEY)")
        if not hmac.compare_digest(given[len("Bearer "):].encode(), expected):  # constant time: no timing oracle
            return error(401, "API key refused")
        return None

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/fingerprint")
    async def get_fingerprint(request: Request):
        if (denied := refused(request)) is not None:
            return denied
        return JSONResponse(fingerprint(request.query_params.get("vocab") in ("1", "true")))

    @app.post("/score")
    async def score(request: Request):
        if (denied := refused(request)) is not None:
            return denied
        try:
            body = strict_json_loads(await request.body())
        except (ValueError, UnicodeDecodeError) as exc:
            return error(400, f"the body is not valid JSON ({_first_line(exc)})")
        try:  # image decoding is CPU work: off the event loop
            inputs, responses, topk = await asyncio.to_thread(parse_score_request, body, limits)
        except BadRequest as exc:
            return error(400, str(exc))
        try:
            rows = await asyncio.wrap_future(scorer.submit(inputs, responses, topk))
        except rejected as exc:  # inputs the engine cannot run: a prompt too long once its images are expanded,
            return error(400, _first_line(exc))  # placeholders that do not match the model
        except Exception as exc:  # noqa: BLE001 - the engine's failure, as one line to the client
            return error(500, f"the engine failed: {_first_line(exc)}")
        try:
            payload = {"logprobs": encode_logprobs([row[0] for row in rows])}
            if topk:
                payload["topk_ids"] = [row[1] for row in rows]
                payload["topk_logprobs"] = [encode_logprobs(row[2]) for row in rows]
        except ValueError as exc:
            return error(500, str(exc))
        return Response(json.dumps(payload, allow_nan=False), media_type="application/json")

    return app


# ---------------------------------------------------------------- the server


def engine_dtype(dtype: str) -> str:
    import torch

    if dtype != "auto":
        return dtype
    return "bfloat16" if torch.cuda.is_available() else "float32"


WARM_UP_PROMPT, WARM_UP_RESPONSE = "1 + 1 =", " 2"


def warm_up(score_fn: Callable[[list[dict], list[list[int]], int], list[tuple]], processor, model: str) -> None:
    """Score one short sequence as a client would, before the server says it is up; a failure is one line naming
    the cause and the fix (:func:`gndpo.vllm_engine.engine_start_error`), and the server does not start."""
    from gndpo.models import tokenizer_of
    from gndpo.vllm_engine import engine_input, engine_start_error

    tok = tokenizer_of(processor)
    prompt = tok(WARM_UP_PROMPT, add_special_tokens=False)["input_ids"] or [0]
    response = tok(WARM_UP_RESPONSE, add_special_tokens=False)["input_ids"] or [0]
    try:
        rows = [row[0] for row in score_fn([engine_input(prompt, [])], [response], 0)]
        if len(rows) != 1 or len(rows[0]) != len(response):
            raise ValueError(f"the engine returned {[len(r) for r in rows]} log-probs for one response of "
                             f"{len(response)} tokens")
        encode_logprobs(rows)  # NaN or +inf: a broken engine
    except Exception as exc:  # noqa: BLE001 - whatever the engine raised, as one line with its fix
        error = engine_start_error(model, exc)
        message = str(error) if error.known else (f"the teacher engine for {model} started but cannot score a short "
                                                  f"sequence ({str(error).split(': ', 1)[-1]}); the server was not "
                                                  f"started")
        raise ModelError(message) from None


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); pick another --port") from None
    return sock


def serve_teacher(model: str, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT, api_key: str | None = None,
                  dtype: str = "auto", max_model_len: int | None = None, gpu_memory_utilization: float = 0.9,
                  max_images: int | None = None, max_topk: int = DEFAULT_MAX_TOPK,
                  announce: Callable[[str], None] = print) -> None:
    """Serve ``model`` until SIGINT/SIGTERM. ``port=0`` takes a free port; ``announce`` gets the URL once the
    engine is up and the socket listens. ``max_model_len``/``max_images``: None = the model's own limit / 4
    images for a vision-language model, 0 for a text one."""
    check_bind(host, api_key)
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port} is not a TCP port (0-65535; 0 = any free port)")
    if not 0 < gpu_memory_utilization <= 1:
        raise ConfigError(f"--gpu-memory-utilization {gpu_memory_utilization} must be in (0, 1]")
    if max_model_len is not None and max_model_len < 2:
        raise ConfigError(f"--max-model-len {max_model_len} must be >= 2")
    if max_images is not None and max_images < 0:
        raise ConfigError(f"--max-images {max_images} must be >= 0")
    if max_topk < 0:
        raise ConfigError(f"--max-topk {max_topk} must be >= 0")
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as exc:
        raise ModelError(f"gndpo serve-teacher needs vLLM's server packages ({exc}); pip install 'gndpo[vllm]'") \
            from None
    sock = _bind(host, port)  # before anything loads: a taken port should cost a second, not a minute
    try:
        _serve(model, sock, host=host, api_key=api_key, dtype=dtype, max_model_len=max_model_len,
               gpu_memory_utilization=gpu_memory_utilization, max_images=max_images, max_topk=max_topk,
               announce=announce,
               server_class=_quiet_exit(uvicorn.Server), server_config=uvicorn.Config)
    finally:
        sock.close()


def _serve(model: str, sock: socket.socket, *, host: str, api_key: str | None, dtype: str, max_model_len: int | None,
           gpu_memory_utilization: float, max_images: int | None, max_topk: int, announce: Callable[[str], None],
           server_class, server_config) -> None:
    from gndpo import __version__
    from gndpo import vllm_engine as engine
    from gndpo.models import context_limit, is_vision_language, load_config, load_processor, tokenizer_fingerprint

    config = load_config(model, what="teacher")
    text = getattr(config, "text_config", None) or config
    vlm = is_vision_language(config)
    if max_images is None:
        max_images = 4 if vlm else 0
    if max_images and not vlm:
        raise ConfigError(f"{model} is a text model; --max-images applies to vision-language models")
    if max_model_len is None:
        max_model_len = context_limit(config) or 4096
    processor = load_processor(model, what="teacher", config=config)
    options = engine.EngineOptions(dtype=engine_dtype(dtype), max_model_len=max_model_len,
                                   gpu_memory_utilization=gpu_memory_utilization, max_images=max_images,
                                   max_logprobs=max_topk)
    started = time.perf_counter()
    llm = engine.start_engine_with_weights(model, options, config=config)
    try:
        score_fn = lambda inputs, responses, topk: engine.score_topk(llm, inputs, responses, topk)  # noqa: E731
        warm_up(score_fn, processor, model)  # "up" means it scores: a model it loads but cannot run fails here
        limits = Limits(vocab_size=int(text.vocab_size), max_model_len=max_model_len, max_images=max_images,
                        max_topk=max_topk)
        info = {"gndpo": __version__, "protocol": WIRE_PROTOCOL, "model": model, "model_type": config.model_type,
                "vision_language": vlm, "dtype": options.dtype, "max_model_len": max_model_len,
                "max_images": max_images, "max_topk": max_topk, "vocab_size": limits.vocab_size}
        plain, full = tokenizer_fingerprint(processor), tokenizer_fingerprint(processor, vocab=True)
        scorer = Scorer(score_fn)
        app = build_app(scorer, limits, lambda with_vocab: {**info, "tokenizer": full if with_vocab else plain},
                        api_key=api_key)
        server = server_class(server_config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5))
        url = f"http://{f'[{host}]' if ':' in host else host}:{sock.getsockname()[1]}"

        def announce_when_listening() -> None:
            while not server.started and not server.should_exit:
                time.sleep(0.05)
            if server.started:
                announce(f"serving teacher {model} at {url} (engine up in {time.perf_counter() - started:.0f} s; "
                         f"{'API key required' if api_key else 'no API key: loopback only'}); Ctrl-C stops")

        threading.Thread(target=announce_when_listening, daemon=True).start()
        try:
            server.run(sockets=[sock])
        finally:
            scorer.close()
    finally:
        engine.shutdown(llm)
    if not server.started:
        raise ModelError(f"the teacher server could not start on {url}")
    announce(f"stopped serving {url}")


def _quiet_exit(base):
    """``base`` (uvicorn.Server) that ends on SIGINT/SIGTERM without re-raising the signal afterwards, as uvicorn
    does: that would end the process with a traceback or a signal status, and a teacher asked to stop has
    succeeded."""

    class Server(base):
        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Server
