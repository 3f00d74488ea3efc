"""A teacher behind HTTP (``teacher.backend=server``): ``gndpo serve-teacher`` (text and vision-language
teachers), or a stock vLLM OpenAI server (``vllm serve``, text-only teachers).

Prompts are rendered with the *student's* processor (the compatibility check guarantees the teacher renders them
the same) and tokenized with one placeholder per image; the images travel as PNG files and the server's engine
expands the placeholders for its own vision tower, as the in-process vLLM teacher does. The wire format is
documented in :mod:`gndpo.serve`.

Sequences go in requests of ``micro_batch_size``, several in flight at once. A request that may succeed when
repeated (no connection, a timeout, a 5xx, 408 or 429 answer) is retried with exponential backoff and jitter;
anything else, or the last retry, stops the run with one line naming the server and the cause. A step is never
trained on partial or made-up scores.

The first contact waits for a server that is still starting (one job script that launches ``gndpo serve-teacher``
and the training together): while connections are refused it retries for up to ``connect_timeout`` seconds,
saying once what it waits for; any answer, an error included, ends the wait at once.

OpenAI mode, chosen when the server has no ``/fingerprint`` but answers ``/v1/models``: one ``/v1/completions``
call per request, the prompt + response ids as the prompt, ``max_tokens=1`` and vLLM's ``prompt_logprobs=0``
(exactly the given token's log-prob: ``k > 0`` adds up to k others). vLLM's server writes ``-inf`` as ``-9999.0``;
it is read back as ``-inf``. Images cannot be sent this way, and the compatibility check can only probe what
vLLM's ``/tokenize`` answers (a warning says what is left unchecked).

Standard library only, so the trainer's environment needs nothing from vLLM.
"""
from __future__ import annotations

import base64
import concurrent.futures
import http.client
import io
import json
import logging
import math
import random
import socket
import time
import urllib.error
import urllib.request
from typing import Any

import torch

from gndpo.errors import ModelError
from gndpo.rollout.base import Rollouts
from gndpo.serve import WIRE_PROTOCOL, decode_logprob, strict_json_loads
from gndpo.teacher.base import TeacherScores

log = logging.getLogger("gndpo")

MAX_IN_FLIGHT = 8  # concurrent requests per score call: enough to keep a server's engine batching
WAIT_POLL = 1.0  # seconds between connection attempts to a server that is still starting
OPENAI_NEG_INF = -9999.0  # vLLM's OpenAI server clamps -inf to this in its JSON
_PNG_MODES = ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA")


class _Refused(Exception):
    """An HTTP answer that retrying cannot change (4xx)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class ServerTeacher:
    """Teacher log-probs from a scoring server at ``url``. Contacts the server at once: a wrong URL, a refused
    key or a server that is neither gndpo's nor vLLM's fails here, before any model is trained."""

    def __init__(self, url: str, *, api_key: str | None, processor, suffix: str | None,
                 system_prompt: str | None = None, micro_batch_size: int = 8, timeout: float = 600.0,
                 retries: int = 3, backoff: float = 1.0, connect_timeout: float = 600.0, topk: int = 0):
        self.url = url.rstrip("/")
        self.topk = topk
        self.api_key = api_key
        self.processor = processor
        self.suffix, self.system_prompt = suffix, system_prompt
        self.micro_batch_size = micro_batch_size
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.connect_timeout, self._waiting = connect_timeout, False
        self.mode, self.info = self._discover()
        if self.mode == "gndpo":
            self._check_protocol()

    def _check_protocol(self) -> None:
        """One line when the server speaks another version of the wire format, or cannot send the top-k asked."""
        theirs = self.info.get("protocol", 1)
        if theirs != WIRE_PROTOCOL:
            side = "the server" if not isinstance(theirs, int) or theirs < WIRE_PROTOCOL else "this trainer"
            raise ModelError(f"teacher server {self.url} speaks gndpo wire protocol {theirs}, this trainer "
                             f"{WIRE_PROTOCOL}; upgrade gndpo on {side}")
        most = self.info.get("max_topk", 0)
        if self.topk > most:
            raise ModelError(f"teacher server {self.url} sends at most the top {most} tokens per position "
                             f"(its --max-topk); set algorithm.topk <= {most} or restart it with --max-topk "
                             f"{self.topk}")

    def close(self) -> None:
        """Nothing to free: each request opens and closes its own connection; the server keeps running."""

    # ------------------------------------------------------------ connection

    def _discover(self) -> tuple[str, dict]:
        try:
            return "gndpo", self._call("GET", "/fingerprint", wait_for_start=True)
        except _Refused as exc:
            if exc.status != 404:
                raise self._refused("/fingerprint", exc) from None
        try:
            models = self._call("GET", "/v1/models")
        except _Refused as exc:
            raise ModelError(f"teacher server {self.url} is neither a gndpo serve-teacher (no /fingerprint) nor an "
                             f"OpenAI-compatible vLLM server (/v1/models: HTTP {exc.status}); check teacher.url") \
                from None
        data = models.get("data") if isinstance(models, dict) else None
        if not data or not isinstance(data[0], dict) or "id" not in data[0]:
            raise ModelError(f"teacher server {self.url}: /v1/models lists no model")
        return "openai", {"model": data[0]["id"]}

    def _call(self, method: str, path: str, payload: Any = None, *, wait_for_start: bool = False) -> Any:
        """The JSON answer of one request, retried while the failure may pass. Raises _Refused for 4xx and a
        one-line ModelError for everything else. ``wait_for_start``: refused connections are retried for up to
        ``connect_timeout`` seconds before the attempts are counted (a server whose engine is still loading)."""
        data = None if payload is None else json.dumps(payload, allow_nan=False).encode()
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        attempts = self.retries + 1
        wait_until = time.monotonic() + self.connect_timeout if wait_for_start and self.connect_timeout > 0 else None
        attempt = 0
        while attempt < attempts:
            request = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    body = response.read()
            except urllib.error.HTTPError as exc:
                wait_until = None  # it answered: the server is up
                message = _error_message(exc)
                if exc.code < 500 and exc.code not in (408, 429):  # a proxy's timeout or rate limit passes
                    raise _Refused(exc.code, message) from None
                cause = f"HTTP {exc.code} ({message})"
            except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
                cause = _network_cause(exc, self.timeout)
                if wait_until is not None and isinstance(getattr(exc, "reason", exc), ConnectionRefusedError):
                    if time.monotonic() < wait_until:
                        if not self._waiting:
                            self._waiting = True
                            log.info("teacher server %s does not accept connections yet; waiting up to %g s for it "
                                     "to start (teacher.connect_timeout)", self.url, self.connect_timeout)
                        time.sleep(min(WAIT_POLL, max(wait_until - time.monotonic(), 0.0)))
                        continue
                    raise ModelError(f"teacher server {self.url} failed {method} {path}: {cause}; waited "
                                     f"{self.connect_timeout:g} s for it to start (teacher.connect_timeout)")
            else:
                try:
                    return strict_json_loads(body)
                except (ValueError, UnicodeDecodeError) as exc:
                    raise ModelError(f"teacher server {self.url} answered {path} with invalid JSON ({exc}; "
                                     f"{len(body)} bytes, truncated?)") from None
            attempt += 1
            if attempt < attempts:
                time.sleep(self.backoff * 2 ** (attempt - 1) * random.uniform(0.5, 1.5))
        raise ModelError(f"teacher server {self.url} failed {method} {path} on all {attempts} attempts: {cause}")

    def _refused(self, path: str, exc: _Refused) -> ModelError:
        if exc.status in (401, 403):
            given = "refused the API key" if self.api_key else "requires an API key and none was given"
            return ModelError(f"teacher server {self.url} {given} (HTTP {exc.status}: {exc.message}); set the "
                              f"server's key in the environment variable teacher.api_key_env names "
                              f"(GNDPO_TEACHER_API_KEY by default)")
        if exc.status == 404:
            return ModelError(f"teacher server {self.url} has no {path} (HTTP 404); is teacher.url a gndpo "
                              f"serve-teacher or vLLM server?")
        return ModelError(f"teacher server {self.url} rejected {path} (HTTP {exc.status}: {exc.message})")

    # ------------------------------------------------------------ compatibility

    def check_compatible(self, student_processor) -> None:
        """Raise ModelError unless the served teacher tokenizes as the student does (see
        :func:`gndpo.models.check_compatible`)."""
        from gndpo.models import compare_fingerprints, tokenizer_fingerprint

        if self.mode == "openai":
            self._check_openai(student_processor)
            return
        student = tokenizer_fingerprint(student_processor)
        teacher = self.info.get("tokenizer")
        if not isinstance(teacher, dict):
            raise ModelError(f"teacher server {self.url}: /fingerprint holds no tokenizer fingerprint")
        if teacher.get("vocab_sha256") != student["vocab_sha256"]:  # the whole table, for a message that says how
            student = tokenizer_fingerprint(student_processor, vocab=True)
            teacher = self._json("GET", "/fingerprint?vocab=1").get("tokenizer", teacher)
        try:
            compare_fingerprints(student, teacher)
        except (KeyError, TypeError):
            raise ModelError(f"teacher server {self.url}: /fingerprint is not what this gndpo version expects "
                             f"(server gndpo {self.info.get('gndpo')})") from None
        except ModelError as exc:
            raise ModelError(f"{exc} (teacher served at {self.url})") from None

    def _check_openai(self, student_processor) -> None:
        from gndpo.models import PROBE_MESSAGES, PROBE_TEXT, tokenizer_fingerprint, tokenizer_of

        tok = tokenizer_of(student_processor)
        fp = tokenizer_fingerprint(student_processor)
        name = self.info["model"]
        try:
            text = self._call("POST", "/tokenize", {"model": name, "prompt": PROBE_TEXT, "add_special_tokens": False})
        except _Refused as exc:
            if exc.status != 404:
                raise self._refused("/tokenize", exc) from None
            log.warning("teacher server %s (OpenAI mode) has no /tokenize: student/teacher tokenizer compatibility "
                        "is NOT checked; serve the teacher with gndpo serve-teacher for the full check", self.url)
            return
        checks = [("the probe text", text, fp["probe_ids"])]
        chat = self._json("POST", "/tokenize", {"model": name, "messages": PROBE_MESSAGES,
                                                 "add_generation_prompt": True, "add_special_tokens": False})
        checks.append(("the chat template's probe prompt", chat,
                       tok(fp["probe_prompt"], add_special_tokens=False)["input_ids"]))
        for token, tid in fp["special_tokens"].items():
            checks.append((f"special token {token!r}", self._json("POST", "/tokenize", {
                "model": name, "prompt": token, "add_special_tokens": False}), [tid]))
        for what, answer, expected in checks:
            got = answer.get("tokens") if isinstance(answer, dict) else None
            if got != expected:
                raise ModelError(f"student and teacher tokenize {what} differently (the student: {expected[:12]}, "
                                 f"teacher served at {self.url}: {None if got is None else got[:12]}); distillation "
                                 f"needs the same tokenizer")
        log.warning("teacher server %s (OpenAI mode): checked the probe text, chat template and %d special tokens "
                    "through /tokenize; the full vocabulary is not compared (gndpo serve-teacher compares it)",
                    self.url, len(fp["special_tokens"]))

    def _json(self, method: str, path: str, payload: Any = None) -> Any:
        try:
            return self._call(method, path, payload)
        except _Refused as exc:
            raise self._refused(path.split("?")[0], exc) from None

    # ------------------------------------------------------------ scoring

    def score(self, rollouts: Rollouts) -> TeacherScores:
        """:class:`TeacherScores`: log-probs ``(B, R)`` float32 of the response tokens, 0 outside the mask, ``-inf``
        kept; with ``topk`` the teacher's top-k ids and log-probs ``(B, R, K)``."""
        from gndpo.vllm_engine import prompt_ids

        if self.mode == "openai" and any(r.images for r in rollouts.records):
            raise ModelError(f"teacher server {self.url} is an OpenAI-compatible server, which cannot take images "
                             f"as token-id prompts; serve a vision-language teacher with gndpo serve-teacher")
        ids = prompt_ids(self.processor, rollouts.records, suffix=self.suffix, system_prompt=self.system_prompt)
        lengths = rollouts.response_mask.sum(-1).tolist()
        rows = [b for b in range(rollouts.size) if lengths[b] > 0]
        responses = {b: rollouts.response_ids[b, :int(lengths[b])].tolist() for b in rows}
        images: dict[int, list[str]] = {}
        chunks = [rows[i:i + self.micro_batch_size] for i in range(0, len(rows), self.micro_batch_size)]
        jobs = []
        for chunk in chunks:
            prompts = [int(rollouts.prompt_index[b]) for b in chunk]
            if self.mode == "gndpo":
                for p in prompts:
                    if p not in images:
                        images[p] = [_png_base64(im) for im in rollouts.records[p].images]
                jobs.append({"protocol": WIRE_PROTOCOL, "topk": self.topk,
                             **self._gndpo_payload(prompts, [responses[b] for b in chunk], ids, images)})
            else:
                jobs.append({"model": self.info["model"], "max_tokens": 1, "temperature": 1.0,
                             "prompt_logprobs": self.topk,
                             "prompt": [ids[p] + responses[b] for p, b in zip(prompts, chunk)]})
        B, R = rollouts.response_ids.shape
        out = torch.zeros(B, R, dtype=torch.float32)  # (B, R)
        top_ids = torch.zeros(B, R, self.topk, dtype=torch.long) if self.topk else None  # (B, R, K)
        top_lps = torch.zeros(B, R, self.topk, dtype=torch.float32) if self.topk else None  # (B, R, K)
        if not jobs:
            return TeacherScores(out, top_ids, top_lps)
        send = self._send_gndpo if self.mode == "gndpo" else self._send_openai
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(len(jobs), MAX_IN_FLIGHT)) as pool:
            futures = [pool.submit(send, job, [responses[b] for b in chunk]) for job, chunk in zip(jobs, chunks)]
            try:
                results = [f.result() for f in futures]
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
        for chunk, scores in zip(chunks, results):
            for b, (row, row_ids, row_lps) in zip(chunk, scores):
                out[b, :len(row)] = torch.tensor(row, dtype=torch.float32)
                if self.topk and row:
                    top_ids[b, :len(row)] = torch.tensor(row_ids, dtype=torch.long)
                    top_lps[b, :len(row)] = torch.tensor(row_lps, dtype=torch.float32)
        return TeacherScores(out, top_ids, top_lps)

    @staticmethod
    def _gndpo_payload(prompts: list[int], responses: list[list[int]], ids: list[list[int]],
                       images: dict[int, list[str]]) -> dict:
        local: dict[int, int] = {}
        for p in prompts:  # each prompt (and its images) once per request, whatever its sample count
            local.setdefault(p, len(local))
        return {"prompts": [{"prompt_token_ids": ids[p], "images": images[p]} for p in local],
                "requests": [{"prompt": local[p], "response_token_ids": r} for p, r in zip(prompts, responses)]}

    def _send_gndpo(self, payload: dict, responses: list[list[int]]) -> list[tuple]:
        answer = self._json("POST", "/score", payload)
        rows = answer.get("logprobs") if isinstance(answer, dict) else None
        if not isinstance(rows, list) or len(rows) != len(responses):
            got = len(rows) if isinstance(rows, list) else "no"
            raise ModelError(f"teacher server {self.url} returned {got} log-prob rows for {len(responses)} responses")
        sampled = [self._row(row, len(resp), i) for i, (row, resp) in enumerate(zip(rows, responses))]
        if not self.topk:
            return [(row, [], []) for row in sampled]
        ids, lps = answer.get("topk_ids"), answer.get("topk_logprobs")
        if not isinstance(ids, list) or not isinstance(lps, list) or not len(ids) == len(lps) == len(responses):
            raise ModelError(f"teacher server {self.url} returned no top-{self.topk} tokens (topk_ids/topk_logprobs)")
        return [(row, self._topk_ids(i_row, len(row), i), [self._row(pos, self.topk, i) for pos in self._row_list(
            l_row, len(row), i)]) for i, (row, i_row, l_row) in enumerate(zip(sampled, ids, lps))]

    def _row_list(self, row: Any, length: int, i: int) -> list:
        if not isinstance(row, list) or len(row) != length:
            raise ModelError(f"teacher server {self.url} returned top-k for {len(row) if isinstance(row, list) else 0} "
                             f"of {length} positions (row {i})")
        return row

    def _topk_ids(self, row: Any, length: int, i: int) -> list[list[int]]:
        positions = self._row_list(row, length, i)
        if not all(isinstance(p, list) and len(p) == self.topk and all(isinstance(t, int) for t in p)
                   for p in positions):
            raise ModelError(f"teacher server {self.url} returned malformed top-{self.topk} token ids (row {i})")
        return positions

    def _row(self, row: Any, length: int, i: int) -> list[float]:
        if not isinstance(row, list) or len(row) != length:
            got = len(row) if isinstance(row, list) else type(row).__name__
            raise ModelError(f"teacher server {self.url} returned {got} log-probs for a response of {length} tokens "
                             f"(row {i}); server and client disagree on the sequence")
        try:
            return [decode_logprob(v) for v in row]
        except ValueError as exc:
            raise ModelError(f"teacher server {self.url} returned a non-finite or non-numeric log-prob in row {i}: "
                             f"{exc}") from None

    def _send_openai(self, payload: dict, responses: list[list[int]]) -> list[list[float]]:
        answer = self._json("POST", "/v1/completions", payload)
        choices = answer.get("choices") if isinstance(answer, dict) else None
        if not isinstance(choices, list) or len(choices) != len(responses):
            got = len(choices) if isinstance(choices, list) else "no"
            raise ModelError(f"teacher server {self.url} returned {got} completions for {len(responses)} prompts")
        rows = []
        for choice, full, resp in zip(sorted(choices, key=lambda c: c.get("index", 0)), payload["prompt"], responses):
            lps = choice.get("prompt_logprobs")
            if not isinstance(lps, list) or len(lps) != len(full):
                raise ModelError(f"teacher server {self.url} returned no prompt_logprobs for a sequence of "
                                 f"{len(full)} tokens; a vLLM server is needed (prompt_logprobs is vLLM's extension)")
            start = len(full) - len(resp)
            row, top_ids, top_lps = [], [], []
            for j, tid in enumerate(resp):
                entry = lps[start + j]
                value = entry.get(str(tid)) if isinstance(entry, dict) else None
                if not isinstance(value, dict):
                    raise ModelError(f"teacher server {self.url} returned no log-prob for token {tid} at position "
                                     f"{start + j}")
                row.append(value.get("logprob"))
                if self.topk:  # vLLM's entry: the actual token plus the top-k, each with its rank
                    ranked = sorted((v.get("rank"), int(t), v.get("logprob")) for t, v in entry.items()
                                    if isinstance(v, dict) and isinstance(v.get("rank"), int) and v["rank"] <= self.topk)
                    if len(ranked) != self.topk:
                        raise ModelError(f"teacher server {self.url} returned {len(ranked)} of the top {self.topk} "
                                         f"tokens at position {start + j}; start vLLM with --max-logprobs "
                                         f"{self.topk} or more")
                    top_ids.append([t for _, t, _ in ranked])
                    top_lps.append(self._row([v for _, _, v in ranked], self.topk, len(rows)))
            row = self._row(row, len(resp), len(rows))
            neg = lambda values: [-math.inf if v <= OPENAI_NEG_INF else v for v in values]  # noqa: E731
            rows.append((neg(row), top_ids, [neg(p) for p in top_lps]))
        return rows


def _png_base64(image) -> str:
    buf = io.BytesIO()
    if image.mode not in _PNG_MODES:  # e.g. a CMYK JPEG: image processors convert to RGB anyway
        image = image.convert("RGB")
    image.save(buf, format="PNG")  # lossless: the server sees the pixels the student saw
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _error_message(exc: urllib.error.HTTPError) -> str:
    """The one-line cause in an error answer: gndpo's {"error": ...}, FastAPI's {"detail": ...} or vLLM's
    {"error": {"message": ...}}; else the status text."""
    try:
        body = json.loads(exc.read() or b"null")
    except (ValueError, OSError):
        body = None
    if isinstance(body, dict):
        value = body.get("error", body.get("detail", body.get("message")))
        if isinstance(value, dict):
            value = value.get("message")
        if value:
            return str(value).strip().splitlines()[0][:400]
    return exc.reason if isinstance(exc.reason, str) else f"HTTP {exc.code}"


def _network_cause(exc: BaseException, timeout: float) -> str:
    reason = getattr(exc, "reason", exc)
    if isinstance(reason, (socket.timeout, TimeoutError)):
        return f"no answer within teacher.timeout={timeout:g} s"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused (is gndpo serve-teacher running there, on that port?)"
    if isinstance(reason, socket.gaierror):
        return f"unknown host ({reason.strerror or reason})"
    text = str(getattr(reason, "strerror", None) or reason) or type(reason).__name__
    return f"{type(reason).__name__}: {text}"[:300]
