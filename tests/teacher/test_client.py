"""The served teacher's client against small fake HTTP servers (no vLLM, no FastAPI): the wire format, batching,
retries, and the one-line error of every failure."""
import base64
import collections
import http.server
import io
import json
import logging
import math
import socket
import threading
import time

import pytest
import torch
from PIL import Image

from gndpo.data.records import PromptRecord
from gndpo.errors import ModelError
from gndpo.lab.tiny import build_processor, build_tokenizer
from gndpo.models import tokenizer_fingerprint
from gndpo.rollout.base import Rollouts
from gndpo.serve import NEG_INF, WIRE_PROTOCOL, decode_logprob, encode_logprobs, strict_json_loads
from gndpo.teacher.client import ServerTeacher

NEG_INF_TOKEN = 50  # the fake teachers give this token zero probability


class FakeServer:
    """An HTTP server in a thread; ``routes`` maps a path to ``fn(body, full_path) -> (status, dict | bytes)``."""

    def __init__(self, routes, port=0):
        self.routes, self.calls, self.paths = routes, collections.Counter(), []
        self.auth, self.in_flight, self.max_in_flight = [], 0, 0
        lock, fake = threading.Lock(), self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _handle(self):
                size = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(size)) if size else None
                path = self.path.split("?")[0]
                with lock:
                    fake.calls[path] += 1
                    fake.paths.append(self.path)
                    fake.auth.append(self.headers.get("Authorization"))
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                try:
                    route = fake.routes.get(path)
                    status, payload = (404, {"detail": "Not Found"}) if route is None else route(body, self.path)
                finally:
                    with lock:
                        fake.in_flight -= 1
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout tests)
                    pass

            do_GET = do_POST = _handle

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(routes, port=0):
        servers.append(FakeServer(routes, port))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


@pytest.fixture(scope="module")
def vlm_processor():
    return build_processor()


def fake_logprob(token: int, position: int) -> float:
    """The fake teacher: a log-prob that depends on the token and where it sits in the response."""
    return -math.inf if token == NEG_INF_TOKEN else -0.01 * token - 0.001 * position


def make_rollouts(*, images=True, lengths=(3, 2, 4, 1)):
    colors = [(200, 10, 10), (10, 200, 10)]
    records = tuple(PromptRecord(f"p{k}", f"What is {k} plus 2?", str(k + 2),
                                 images=(Image.new("RGB", (32, 32), colors[k]),) if images else ())
                    for k in range(2))
    B, R = len(lengths), max(lengths)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 99, (B, R), generator=gen)
    ids[0, 1] = NEG_INF_TOKEN
    mask = torch.arange(R)[None, :] < torch.tensor(lengths)[:, None]
    ids[~mask] = 0  # padding
    return Rollouts(records, torch.tensor([0, 0, 1, 1])[:B], ids, mask, ("",) * B, torch.zeros(B, dtype=torch.bool),
                    torch.zeros(B, dtype=torch.long))


def expected_scores(rollouts):
    out = torch.zeros(rollouts.response_ids.shape)
    for b in range(rollouts.size):
        for j in range(int(rollouts.response_mask[b].sum())):
            out[b, j] = fake_logprob(int(rollouts.response_ids[b, j]), j)
    return out


def fingerprint_route(processor, protocol=WIRE_PROTOCOL, max_topk=20):
    plain, full = tokenizer_fingerprint(processor), tokenizer_fingerprint(processor, vocab=True)
    extra = {} if protocol is None else {"protocol": protocol, "max_topk": max_topk}
    return lambda body, path: (200, {"gndpo": "test", **extra, "tokenizer": full if "vocab=1" in path else plain})


def fake_topk(position: int, k: int) -> tuple[list[int], list[float]]:
    """The fake teacher's top-k at a position: ids 7, 8, ... and log-probs -0.5, -1.5, ... shifted by position."""
    return [7 + i for i in range(k)], [-0.5 - i - 0.01 * position for i in range(k)]


def score_route(processor, seen=None, *, delay=0.0):
    """A /score that checks each prompt carries one placeholder per image and the body its protocol, then answers
    with fake_logprob (and fake_topk when asked)."""
    tok = processor.tokenizer

    def route(body, path):
        time.sleep(delay)
        assert body["protocol"] == WIRE_PROTOCOL
        prompts = body["prompts"]
        for p in prompts:
            assert p["prompt_token_ids"].count(tok.convert_tokens_to_ids("<image>")) == len(p["images"])
            if seen is not None:
                seen.extend(Image.open(io.BytesIO(base64.b64decode(i))).getpixel((0, 0)) for i in p["images"])
        rows = [[fake_logprob(t, j) for j, t in enumerate(r["response_token_ids"])] for r in body["requests"]]
        answer = {"logprobs": encode_logprobs(rows)}
        if body.get("topk"):
            tops = [[fake_topk(j, body["topk"]) for j in range(len(r["response_token_ids"]))] for r in body["requests"]]
            answer["topk_ids"] = [[ids for ids, _ in row] for row in tops]
            answer["topk_logprobs"] = [encode_logprobs([lps for _, lps in row]) for row in tops]
        return 200, answer

    return route


def client(url, processor, **kw):
    kw = {"api_key": None, "suffix": None, "micro_batch_size": 2, "timeout": 5.0, "retries": 0, "backoff": 0.01,
          "connect_timeout": 0.0, **kw}
    return ServerTeacher(url, processor=processor, **kw)


def one_line_error(fn, match):
    with pytest.raises(ModelError, match=match) as info:
        fn()
    assert "\n" not in str(info.value)
    return str(info.value)


# ---------------------------------------------------------------- wire format


def test_neg_inf_is_an_explicit_string_and_everything_else_round_trips_exactly():
    values = [[-0.1234567, -math.inf, 0.0, float(torch.tensor(-3.3, dtype=torch.float32))]]
    text = json.dumps({"logprobs": encode_logprobs(values)}, allow_nan=False)  # strict JSON: no bare -Infinity
    assert '"-Infinity"' in text and NEG_INF == "-Infinity"
    decoded = [[decode_logprob(v) for v in row] for row in strict_json_loads(text)["logprobs"]]
    assert decoded == values
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match="engine returned"):
            encode_logprobs([[bad]])
    for junk in ("NaN", None, True, "-inf", [1.0]):
        with pytest.raises(ValueError):
            decode_logprob(junk)
    with pytest.raises(ValueError, match="bare NaN"):
        strict_json_loads('{"logprobs": [[NaN]]}')  # Python's json.loads would accept it


# ---------------------------------------------------------------- scoring


def test_scores_in_concurrent_micro_batches_with_images_once_per_prompt(serve, vlm_processor):
    seen = []
    fake = serve({"/fingerprint": fingerprint_route(vlm_processor),
                  "/score": score_route(vlm_processor, seen, delay=0.3)})
    rollouts = make_rollouts(lengths=(3, 2, 4, 1, 2, 3, 1, 2))
    rollouts = Rollouts(rollouts.records, torch.tensor([0, 0, 1, 1, 0, 0, 1, 1]), *(
        getattr(rollouts, f) for f in ("response_ids", "response_mask", "texts", "truncated", "prompt_lengths")))
    teacher = client(fake.url, vlm_processor, micro_batch_size=2, api_key="k3y")
    teacher.check_compatible(vlm_processor)
    start = time.perf_counter()
    scores = teacher.score(rollouts).logprobs
    elapsed = time.perf_counter() - start
    assert scores.dtype == torch.float32 and scores.shape == rollouts.response_ids.shape
    assert torch.equal(scores, expected_scores(rollouts))  # 0 outside the mask, -inf kept
    assert scores[0, 1] == -math.inf
    assert fake.calls["/score"] == 4 and fake.max_in_flight >= 2 and elapsed < 4 * 0.3
    # each request carries each of its prompts once: the two samples of a prompt share its image
    assert len(seen) == 4 and set(seen) == {(200, 10, 10), (10, 200, 10)}
    assert set(fake.auth) == {"Bearer k3y"}


def test_empty_responses_are_not_sent(serve, vlm_processor):
    fake = serve({"/fingerprint": fingerprint_route(vlm_processor), "/score": score_route(vlm_processor)})
    rollouts = make_rollouts(lengths=(3, 0, 2, 0))
    scores = client(fake.url, vlm_processor, micro_batch_size=8).score(rollouts).logprobs
    assert fake.calls["/score"] == 1 and torch.equal(scores, expected_scores(rollouts))


# ---------------------------------------------------------------- failures, each one line


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed when the block ends: nobody listens there


def test_unreachable_url(vlm_processor):
    port = closed_port()
    message = one_line_error(lambda: client(f"http://127.0.0.1:{port}", vlm_processor, retries=1),
                             "failed GET /fingerprint on all 2 attempts: connection refused")
    assert f"127.0.0.1:{port}" in message


def test_a_server_that_comes_up_late_is_waited_for(serve, vlm_processor, caplog):
    """serve-teacher and train started together: connections are refused while the server's engine loads."""
    port = closed_port()
    timer = threading.Timer(2.5, lambda: serve({"/fingerprint": fingerprint_route(vlm_processor),
                                                "/score": score_route(vlm_processor)}, port))
    timer.start()
    start = time.perf_counter()
    with caplog.at_level(logging.INFO, logger="gndpo"):
        teacher = client(f"http://127.0.0.1:{port}", vlm_processor, connect_timeout=30.0, retries=0)
    timer.join()
    assert 2.5 <= time.perf_counter() - start < 10 and teacher.mode == "gndpo"
    waiting = [r.getMessage() for r in caplog.records if "does not accept connections yet" in r.getMessage()]
    assert waiting == [f"teacher server http://127.0.0.1:{port} does not accept connections yet; waiting up to 30 s "
                       f"for it to start (teacher.connect_timeout)"]  # said once, however many tries
    rollouts = make_rollouts()
    assert torch.equal(teacher.score(rollouts).logprobs, expected_scores(rollouts))


def test_the_wait_for_a_starting_server_ends(serve, vlm_processor):
    port = closed_port()
    start = time.perf_counter()
    message = one_line_error(lambda: client(f"http://127.0.0.1:{port}", vlm_processor, connect_timeout=1.5,
                                            retries=3),
                             r"failed GET /fingerprint: connection refused .*; waited 1.5 s for it to start "
                             r"\(teacher.connect_timeout\)")
    assert 1.5 <= time.perf_counter() - start < 5 and f"127.0.0.1:{port}" in message
    # a server that answers, even with an error, is not waited for
    fake = serve({"/fingerprint": lambda body, path: (401, {"error": "API key refused"})})
    start = time.perf_counter()
    one_line_error(lambda: client(fake.url, vlm_processor, connect_timeout=60.0), "requires an API key")
    assert time.perf_counter() - start < 2 and fake.calls["/fingerprint"] == 1


def test_timeout(serve, vlm_processor):
    fake = serve({"/fingerprint": lambda body, path: (time.sleep(1.5), (200, {}))[1]})
    start = time.perf_counter()
    one_line_error(lambda: client(fake.url, vlm_processor, timeout=0.3, retries=1),
                   r"on all 2 attempts: no answer within teacher.timeout=0.3 s")
    assert time.perf_counter() - start < 1.5 and fake.calls["/fingerprint"] == 2


def test_server_error_is_retried_until_it_passes(serve, vlm_processor):
    answers = iter([(500, {"error": "warming up"}), (429, b"slow down"), None])
    good = score_route(vlm_processor)
    fake = serve({"/fingerprint": fingerprint_route(vlm_processor),
                  "/score": lambda body, path: next(answers) or good(body, path)})
    rollouts = make_rollouts()
    scores = client(fake.url, vlm_processor, micro_batch_size=8, retries=3).score(rollouts).logprobs
    assert fake.calls["/score"] == 3 and torch.equal(scores, expected_scores(rollouts))


def test_server_error_forever(serve, vlm_processor):
    fake = serve({"/fingerprint": fingerprint_route(vlm_processor),
                  "/score": lambda body, path: (500, {"error": "the engine failed: CUDA out of memory"})})
    teacher = client(fake.url, vlm_processor, micro_batch_size=8, retries=2)
    one_line_error(lambda: teacher.score(make_rollouts()),
                   r"failed POST /score on all 3 attempts: HTTP 500 \(the engine failed: CUDA out of memory\)")
    assert fake.calls["/score"] == 3


def test_client_errors_are_not_retried_and_no_partial_score_is_returned(serve, vlm_processor):
    good, calls = score_route(vlm_processor), []

    def route(body, path):
        calls.append(1)
        return (400, {"error": "requests[0] holds 999 tokens"}) if len(calls) == 2 else good(body, path)

    fake = serve({"/fingerprint": fingerprint_route(vlm_processor), "/score": route})
    teacher = client(fake.url, vlm_processor, micro_batch_size=1, retries=3)
    one_line_error(lambda: teacher.score(make_rollouts()), r"rejected /score \(HTTP 400: requests\[0\] holds 999")
    assert len(calls) <= 4  # the failed request once, never again


@pytest.mark.parametrize("key", ["wrong", None])
def test_refused_key(serve, vlm_processor, key):
    fake = serve({"/fingerprint": lambda body, path: (401, {"error": "API key refused"})})
    expected = "refused the API key" if key else "requires an API key and none was given"
    message = one_line_error(lambda: client(fake.url, vlm_processor, api_key=key, retries=3), expected)
    assert "GNDPO_TEACHER_API_KEY" in message and fake.calls["/fingerprint"] == 1
    assert key is None or key not in message  # the key itself is never echoed


@pytest.mark.parametrize("rows, match", [
    ([[-1.0, -2.0], [-1.0]], "returned 2 log-prob rows for 4 responses"),
    ([[-1.0, -2.0], [-1.0], [-1.0], [-1.0]], "returned 2 log-probs for a response of 3 tokens"),
])
def test_wrong_lengths(serve, vlm_processor, rows, match):
    fake = serve({"/fingerprint": fingerprint_route(vlm_processor),
                  "/score": lambda body, path: (200, {"logprobs": rows})})
    one_line_error(lambda: client(fake.url, vlm_processor, micro_batch_size=8).score(make_rollouts()), match)


@pytest.mark.parametrize("body, match", [
    (b'{"logprobs": [[NaN, -1.0, -1.0], [-1.0, -1.0], [-1.0, -1.0, -1.0, -1.0], [-1.0]]}', "bare NaN is not JSON"),
    (b'{"logprobs": [["NaN", -1.0, -1.0], [-1.0, -1.0], [-1.0, -1.0, -1.0, -1.0], [-1.0]]}',
     "non-finite or non-numeric log-prob in row 0: 'NaN'"),
    (b'{"logprobs": [[null, -1.0, -1.0], [-1.0, -1.0], [-1.0, -1.0, -1.0, -1.0], [-1.0]]}', "row 0: None"),
    (b'{"logprobs": [[-1.0, -2.0, -3.0], [-1.0, -2', r"invalid JSON .*truncated\?"),
])
def test_junk_answers(serve, vlm_processor, body, match):
    fake = serve({"/fingerprint": fingerprint_route(vlm_processor), "/score": lambda b, path: (200, body)})
    one_line_error(lambda: client(fake.url, vlm_processor, micro_batch_size=8).score(make_rollouts()), match)


def test_fingerprint_mismatch_names_the_difference(serve, vlm_processor):
    other = build_processor()
    other.tokenizer.add_tokens(["<extra>"])
    fake = serve({"/fingerprint": fingerprint_route(other)})
    teacher = client(fake.url, vlm_processor)
    message = one_line_error(lambda: teacher.check_compatible(vlm_processor),
                             r"vocabularies differ \(103 vs 104 tokens; 0 only in the student, 1 only in the teacher")
    assert fake.url in message and fake.paths[-1] == "/fingerprint?vocab=1"  # the table only when it differs

    other = build_processor()
    other.chat_template = other.chat_template.replace("<|im_start|>", "<|im_start|> ")
    fake = serve({"/fingerprint": fingerprint_route(other)})
    one_line_error(lambda: client(fake.url, vlm_processor).check_compatible(vlm_processor),
                   "chat templates render a probe prompt differently")


def test_not_a_scoring_server(serve, vlm_processor):
    fake = serve({})
    one_line_error(lambda: client(fake.url, vlm_processor), "neither a gndpo serve-teacher .* nor an OpenAI")


# ---------------------------------------------------------------- OpenAI mode (stock vLLM server)


def openai_routes(tok, *, tokenize=True, wrong_eos=False):
    def completions(body, path):
        k = body["prompt_logprobs"]
        assert body["max_tokens"] == 1 and body["model"] == "teacher-7b"
        choices = []
        for i, ids in enumerate(body["prompt"]):
            lps = [None]
            for j, t in enumerate(ids[1:]):
                # vLLM's entry: the actual token (its true rank: 9) plus the top k (ranks 1..k), as fake_topk
                entry = {str(t): {"logprob": max(fake_logprob(t, 0), -9999.0), "rank": 9 if k else 1}}
                top_ids, top_lps = fake_topk(0, k)
                entry.update({str(tid): {"logprob": lp, "rank": r + 1} for r, (tid, lp) in enumerate(
                    zip(top_ids, top_lps))})
                lps.append(entry)
            choices.append({"index": i, "text": "x", "prompt_logprobs": lps})
        return 200, {"choices": choices[::-1]}  # any order: matched by index

    def tokenize_route(body, path):
        if "messages" in body:
            text = tok.apply_chat_template(body["messages"], tokenize=False, add_generation_prompt=True)
        else:
            text = body["prompt"]
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if wrong_eos and text == tok.eos_token:
            ids = [ids[0] + 1]
        return 200, {"tokens": ids, "count": len(ids), "max_model_len": 512}

    routes = {"/v1/models": lambda body, path: (200, {"data": [{"id": "teacher-7b"}]}), "/v1/completions": completions}
    if tokenize:
        routes["/tokenize"] = tokenize_route
    return routes


def test_openai_mode_scores_text_and_refuses_images(serve, caplog):
    tok = build_tokenizer()
    fake = serve(openai_routes(tok))
    teacher = client(fake.url, tok, micro_batch_size=3)
    assert teacher.mode == "openai"
    with caplog.at_level(logging.WARNING, logger="gndpo"):
        teacher.check_compatible(tok)
    assert "the full vocabulary is not compared" in caplog.text
    rollouts = make_rollouts(images=False)
    scores = teacher.score(rollouts).logprobs
    expected = torch.zeros(rollouts.response_ids.shape)  # the fake's log-prob ignores the position here
    for b in range(rollouts.size):
        for j in range(int(rollouts.response_mask[b].sum())):
            expected[b, j] = fake_logprob(int(rollouts.response_ids[b, j]), 0)
    assert torch.equal(scores, expected) and scores[0, 1] == -math.inf  # -9999.0 read back as -inf
    assert fake.calls["/v1/completions"] == 2
    one_line_error(lambda: teacher.score(make_rollouts(images=True)), "cannot take images .* gndpo serve-teacher")


def test_openai_mode_compatibility(serve, caplog):
    tok = build_tokenizer()
    fake = serve(openai_routes(tok, wrong_eos=True))
    one_line_error(lambda: client(fake.url, tok).check_compatible(tok),
                   r"tokenize special token '<\|im_end\|>' differently")
    fake = serve(openai_routes(tok, tokenize=False))
    with caplog.at_level(logging.WARNING, logger="gndpo"):
        client(fake.url, tok).check_compatible(tok)
    assert "compatibility is NOT checked" in caplog.text


# ---------------------------------------------------------------- odds and ends


def test_images_png_cannot_hold_are_sent_as_rgb():
    from gndpo.teacher.client import _png_base64

    cmyk = Image.new("CMYK", (8, 8), (10, 20, 30, 40))
    sent = Image.open(io.BytesIO(base64.b64decode(_png_base64(cmyk))))
    assert sent.mode == "RGB" and sent.getpixel((0, 0)) == cmyk.convert("RGB").getpixel((0, 0))


def test_serve_teacher_without_the_server_packages_is_one_line(capsys):
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
        pytest.skip("fastapi and uvicorn are installed here")
    except ImportError:
        pass
    from gndpo.cli import main

    assert main(["serve-teacher", "some/model"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: gndpo serve-teacher needs vLLM's server packages")


def test_teacher_connect_timeout_reaches_the_client(vlm_processor):
    from gndpo.backends import build_teacher
    from gndpo.config import load_config
    from gndpo.errors import ConfigError

    port = closed_port()
    base = ["model.path=m", "data.train=d.jsonl", "teacher.backend=server", f"teacher.url=http://127.0.0.1:{port}"]
    cfg = load_config(None, [*base, "teacher.connect_timeout=1", "teacher.retries=0"])
    one_line_error(lambda: build_teacher(cfg, vlm_processor, suffix=None, records=[], device="cpu", images={}),
                   r"waited 1 s for it to start \(teacher.connect_timeout\)")
    assert load_config(None, base).teacher.connect_timeout == 600.0  # generous by default
    with pytest.raises(ConfigError, match="teacher.connect_timeout must be >= 0"):
        load_config(None, [*base, "teacher.connect_timeout=-1"])


# ---------------------------------------------------------------- top-k and the protocol version


def test_topk_travels_with_the_log_probs(serve, vlm_processor):
    fake = serve({"/fingerprint": fingerprint_route(vlm_processor), "/score": score_route(vlm_processor)})
    rollouts = make_rollouts()
    scores = client(fake.url, vlm_processor, topk=3).score(rollouts)
    assert torch.equal(scores.logprobs, expected_scores(rollouts)) and scores.topk == 3
    for b in range(rollouts.size):
        for j in range(int(rollouts.response_mask[b].sum())):
            ids, lps = fake_topk(j, 3)
            assert scores.topk_ids[b, j].tolist() == ids
            torch.testing.assert_close(scores.topk_logprobs[b, j], torch.tensor(lps))
    assert not bool(scores.topk_ids[~rollouts.response_mask].any())  # 0 outside the mask


def test_other_protocol_versions_and_a_too_small_max_topk_are_one_line(serve, vlm_processor):
    old = serve({"/fingerprint": fingerprint_route(vlm_processor, protocol=None)})
    one_line_error(lambda: client(old.url, vlm_processor), r"speaks gndpo wire protocol 1, this trainer 2; upgrade "
                                                            r"gndpo on the server")
    newer = serve({"/fingerprint": fingerprint_route(vlm_processor, protocol=3)})
    one_line_error(lambda: client(newer.url, vlm_processor), r"protocol 3, this trainer 2; upgrade gndpo on this trainer")
    small = serve({"/fingerprint": fingerprint_route(vlm_processor, max_topk=4)})
    one_line_error(lambda: client(small.url, vlm_processor, topk=8),
                   r"sends at most the top 4 tokens per position \(its --max-topk\); set algorithm.topk <= 4 or "
                   r"restart it with --max-topk 8")
    client(small.url, vlm_processor, topk=4)  # within its limit


def test_the_server_refuses_a_body_of_another_protocol():
    from gndpo.serve import BadRequest, Limits, parse_score_request

    limits = Limits(vocab_size=100, max_model_len=64, max_images=0, max_topk=5)
    body = {"requests": [{"prompt_token_ids": [1, 2], "response_token_ids": [3]}]}
    with pytest.raises(BadRequest, match="speaks gndpo wire protocol 2; the client sent protocol 1: upgrade gndpo on "
                                         "the trainer's side"):
        parse_score_request(body, limits)
    with pytest.raises(BadRequest, match=r"topk=6 must be an integer in \[0, 5\]"):
        parse_score_request({**body, "protocol": 2, "topk": 6}, limits)
    _, responses, topk = parse_score_request({**body, "protocol": 2, "topk": 5}, limits)
    assert responses == [[3]] and topk == 5


def test_openai_mode_reads_the_topk_by_rank(serve):
    tok = build_tokenizer()
    fake = serve(openai_routes(tok))
    rollouts = make_rollouts(images=False)
    scores = client(fake.url, tok, topk=3).score(rollouts)
    mask = rollouts.response_mask
    assert scores.topk_ids[mask].tolist() == [[7, 8, 9]] * int(mask.sum())
    torch.testing.assert_close(scores.topk_logprobs[mask], torch.tensor([[-0.5, -1.5, -2.5]] * int(mask.sum())))
    assert scores.logprobs[0, 1] == -math.inf  # the sampled token's own entry, whatever its rank
