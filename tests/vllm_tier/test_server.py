"""``gndpo serve-teacher`` for real: subprocess servers on 127.0.0.1 (the lab's LLaVA teacher and a tiny text
teacher, fp32 on CPU) scored through :class:`gndpo.teacher.client.ServerTeacher` against the in-process HF teacher,
a training run with ``teacher.backend=server``, the security defaults; then the app and its engine worker with a
fake engine (fast)."""
import base64
import io
import json
import logging
import math
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from importlib.resources import files

import pytest

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (the served teacher runs on vLLM's engine)")
if getattr(vllm, "__file__", None) is None:  # this tests/vllm folder, importable as a namespace package
    pytest.skip("vLLM is not installed (the served teacher runs on vLLM's engine)", allow_module_level=True)
pytest.importorskip("fastapi", reason="vLLM's server packages (fastapi, uvicorn) are not installed")

import torch  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

from gndpo.data.loaders import load_records  # noqa: E402
from gndpo.data.records import PromptRecord  # noqa: E402
from gndpo.errors import ModelError  # noqa: E402
from gndpo.rollout.base import Rollouts  # noqa: E402
from gndpo.serve import Limits, Scorer, build_app  # noqa: E402
from gndpo.teacher.client import ServerTeacher  # noqa: E402

pytestmark = pytest.mark.vllm

ASSETS = files("gndpo") / "lab" / "assets"
KEY = "s3cret-teacher-key"
SUFFIX = "Answer in \\boxed{}."


# ---------------------------------------------------------------- servers as subprocesses


class Served:
    """A server subprocess (``python -m ARGS``) on 127.0.0.1, its output in files, stopped by PID."""

    def __init__(self, args, logs, *, key=None, env=()):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               **dict(env)}
        env.pop("GNDPO_TEACHER_API_KEY", None)
        if key:
            env["GNDPO_TEACHER_API_KEY"] = key
        self.out, self.err = logs.with_suffix(".out"), logs.with_suffix(".err")
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", *map(str, args)], stdout=out, stderr=err, env=env)
        self.url = None

    def ready_url(self):
        raise NotImplementedError

    def wait_ready(self, timeout=300):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.url = self.ready_url()
            if self.url:
                return self
            if self.proc.poll() is not None:
                pytest.fail(f"{self.proc.args} exited with {self.proc.returncode}: {self.err.read_text()[-2000:]}")
            time.sleep(0.25)
        self.proc.kill()
        pytest.fail(f"{self.proc.args} not ready after {timeout} s: {self.err.read_text()[-2000:]}")

    def wait(self):
        """The exit status after ``proc.terminate()`` (SIGTERM by PID); 0 is a clean exit."""
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


class GndpoServer(Served):
    """``gndpo serve-teacher MODEL --port 0 ...``; the URL comes from its ready line."""

    def __init__(self, model, logs, *args, key=None):
        super().__init__(["gndpo.cli", "serve-teacher", model, "--port", "0", *args], logs, key=key)

    def ready_url(self):
        found = re.search(r"serving teacher .* at (http://\S+) ", self.out.read_text())
        if found:
            with urllib.request.urlopen(found.group(1) + "/health", timeout=10) as r:
                assert json.load(r) == {"status": "ok"}
            return found.group(1)
        return None


class StockVLLMServer(Served):
    """vLLM's own OpenAI-compatible server (``vllm serve``), as a text user would start it on the teacher host."""

    def __init__(self, model, logs):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        super().__init__(["vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1", "--port",
                          self.port, "--dtype", "float32", "--max-model-len", "512", "--enforce-eager"], logs,
                         env={"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"})

    def ready_url(self):
        url = f"http://127.0.0.1:{self.port}"
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=5):
                return url
        except OSError:
            return None


@pytest.fixture(scope="module")
def text_teacher(tmp_path_factory):
    from gndpo.lab.tiny import build_tiny_causal_lm

    root = tmp_path_factory.mktemp("text_teacher")
    model, tokenizer = build_tiny_causal_lm(seed=1, hidden=64, layers=2)  # head_dim 32: vLLM's CPU minimum
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def servers(tmp_path_factory, text_teacher):
    """The lab's VLM teacher (API key required) and the text teacher (no key), started together."""
    logs = tmp_path_factory.mktemp("server_logs")
    started = {"vlm": GndpoServer(ASSETS / "teacher", logs / "vlm", "--max-model-len", "512", "--max-images", "2",
                                  key=KEY),
               "text": GndpoServer(text_teacher, logs / "text", "--max-model-len", "512")}
    try:
        for s in started.values():
            s.wait_ready()
        yield started
    finally:
        for s in started.values():  # both at once: each takes seconds to free its engine
            s.proc.terminate()
        codes = {name: s.wait() for name, s in started.items()}
    assert codes == {"vlm": 0, "text": 0}, codes
    for s in started.values():
        out = s.out.read_text()
        assert "stopped serving" in out
        assert KEY not in out + s.err.read_text()  # the key is never printed or logged


@pytest.fixture
def stock_server(tmp_path, text_teacher):
    server = StockVLLMServer(text_teacher, tmp_path / "openai")
    try:
        yield server.wait_ready()
    finally:
        server.proc.terminate()
        server.wait()


@pytest.fixture(scope="module")
def lab_task(tmp_path_factory):
    from gndpo.lab.task import write_task

    root = tmp_path_factory.mktemp("lab_task")
    write_task(root, seed=0, n_train=8, n_test=2)
    return root


def random_rollouts(records, *, lengths=(5, 3, 7, 1), seed=0):
    """Responses of random ordinary tokens (ids 4-99 of the lab vocabulary: no specials, no image placeholder)."""
    B, R = len(lengths), max(lengths)
    ids = torch.randint(4, 100, (B, R), generator=torch.Generator().manual_seed(seed))
    mask = torch.arange(R)[None, :] < torch.tensor(lengths)[:, None]
    ids[~mask] = 0
    index = torch.tensor([b * len(records) // B for b in range(B)])
    return Rollouts(tuple(records), index, ids, mask, ("",) * B, torch.zeros(B, dtype=torch.bool),
                    torch.zeros(B, dtype=torch.long))


def hf_scores(path, rollouts):
    from gndpo.models import load_model
    from gndpo.teacher.hf import HFTeacher

    loaded = load_model(str(path), dtype="float32")
    return HFTeacher(loaded.model, loaded.processor, suffix=SUFFIX).score(rollouts).logprobs


def student_processor(path=ASSETS / "student"):
    from gndpo.models import load_processor

    return load_processor(str(path))


# ---------------------------------------------------------------- scores equal the HF teacher's


def test_vlm_server_matches_hf_teacher_and_sees_the_images(servers, lab_task):
    records = load_records(str(lab_task / "train.jsonl"))[:2]
    rollouts = random_rollouts(records)
    processor = student_processor()
    teacher = ServerTeacher(servers["vlm"].url, api_key=KEY, processor=processor, suffix=SUFFIX, micro_batch_size=3,
                            timeout=60, retries=0)
    teacher.check_compatible(processor)  # the lab student and teacher share one tokenizer
    served = teacher.score(rollouts).logprobs
    reference = hf_scores(ASSETS / "teacher", rollouts)
    mask = rollouts.response_mask
    assert (served[~mask] == 0).all()
    assert (served - reference).abs().max() <= 1e-4

    # Another picture, same text and tokens: the teacher's log-probs move, and still match HF's.
    changed = [PromptRecord(r.id, r.prompt, r.answer, images=(ImageOps.invert(r.images[0].convert("RGB")),))
               for r in records]
    other = Rollouts(tuple(changed), *(getattr(rollouts, f) for f in (
        "prompt_index", "response_ids", "response_mask", "texts", "truncated", "prompt_lengths")))
    served_other = teacher.score(other).logprobs
    assert (served_other - served)[mask].abs().max() > 1e-3
    assert (served_other - hf_scores(ASSETS / "teacher", other)).abs().max() <= 1e-4


def test_text_server_matches_hf_teacher(servers, text_teacher):
    records = [PromptRecord(f"t{k}", f"What is {k} plus {k + 1}?", str(2 * k + 1)) for k in range(3)]
    rollouts = random_rollouts(records, lengths=(6, 2, 4, 8, 1, 3))
    processor = student_processor(text_teacher)
    teacher = ServerTeacher(servers["text"].url, api_key=None, processor=processor, suffix=SUFFIX,
                            micro_batch_size=2, timeout=60, retries=0)
    teacher.check_compatible(processor)
    assert (teacher.score(rollouts).logprobs - hf_scores(text_teacher, rollouts)).abs().max() <= 1e-4


def assert_same_topk(got, ref, mask, *, tol=1e-4):
    """Top-k log-probs equal within ``tol``; ids equal at every rank whose log-prob is not tied (within tol) with a
    neighbour's (a tie may come out in either order)."""
    torch.testing.assert_close(got.topk_logprobs[mask], ref.topk_logprobs[mask], atol=tol, rtol=0)
    lps = ref.topk_logprobs[mask]  # (N, K)
    gaps = (lps[:, :-1] - lps[:, 1:]).abs() > tol  # (N, K-1): rank i separated from i + 1
    clear = torch.ones_like(lps, dtype=torch.bool)
    clear[:, :-1] &= gaps
    clear[:, 1:] &= gaps
    assert torch.equal(got.topk_ids[mask][clear], ref.topk_ids[mask][clear])
    assert float(clear.float().mean()) > 0.5  # the comparison is not vacuous


@pytest.mark.parametrize("kind", ["vlm", "text"])
def test_three_teacher_backends_agree_on_the_topk(servers, lab_task, text_teacher, kind):
    """The hf teacher (chunked, in-process), the vLLM teacher (prompt_logprobs=K) and the served teacher (wire
    protocol 2) return the same sampled-token log-probs and the same top-5 at every position (float32)."""
    from gndpo.models import load_model
    from gndpo.teacher.hf import HFTeacher
    from gndpo.teacher.vllm import VLLMTeacher
    from gndpo.vllm_engine import EngineOptions

    if kind == "vlm":
        path, url, key = ASSETS / "teacher", servers["vlm"].url, KEY
        rollouts = random_rollouts(load_records(str(lab_task / "train.jsonl"))[:2])
    else:
        path, url, key = text_teacher, servers["text"].url, None
        records = [PromptRecord(f"t{k}", f"What is {k} plus {k + 1}?", str(2 * k + 1)) for k in range(2)]
        rollouts = random_rollouts(records)
    mask = rollouts.response_mask
    loaded = load_model(str(path), dtype="float32")
    ref = HFTeacher(loaded.model, loaded.processor, suffix=SUFFIX, topk=5).score(rollouts)
    served = ServerTeacher(url, api_key=key, processor=loaded.processor, suffix=SUFFIX, micro_batch_size=3,
                           timeout=60, retries=0, topk=5).score(rollouts)
    engine = VLLMTeacher(str(path), loaded.processor, suffix=SUFFIX, topk=5, micro_batch_size=8,
                         options=EngineOptions(max_model_len=512, max_images=1 if kind == "vlm" else 0))
    try:
        in_process = engine.score(rollouts)
    finally:
        engine.close()
    for got in (served, in_process):
        assert got.topk == 5 and (got.topk_ids[~mask] == 0).all()
        torch.testing.assert_close(got.logprobs[mask], ref.logprobs[mask], atol=1e-4, rtol=0)
        assert_same_topk(got, ref, mask)


@pytest.mark.skipif(os.environ.get("GNDPO_TEST_STOCK_VLLM") != "1", reason="starts vLLM's own OpenAI server "
                    "(about a minute on a CPU); set GNDPO_TEST_STOCK_VLLM=1 to run it")
def test_stock_vllm_server_scores_text_and_refuses_images(stock_server, text_teacher, lab_task, caplog):
    records = [PromptRecord(f"t{k}", f"What is {k} plus {k + 1}?", str(2 * k + 1)) for k in range(3)]
    rollouts = random_rollouts(records, lengths=(6, 2, 4, 8, 1, 3))
    processor = student_processor(text_teacher)
    teacher = ServerTeacher(stock_server.url, api_key=None, processor=processor, suffix=SUFFIX,
                            micro_batch_size=4, timeout=60, retries=0)
    assert teacher.mode == "openai"
    with caplog.at_level(logging.WARNING, logger="gndpo"):
        teacher.check_compatible(processor)  # through vLLM's /tokenize: probe text, chat template, special tokens
    assert "the full vocabulary is not compared" in caplog.text
    assert (teacher.score(rollouts).logprobs - hf_scores(text_teacher, rollouts)).abs().max() <= 1e-4
    with pytest.raises(ModelError, match="cannot take images .* gndpo serve-teacher"):
        teacher.score(random_rollouts(load_records(str(lab_task / "train.jsonl"))[:2]))
    # the top-k through vLLM's prompt_logprobs=K (its default --max-logprobs is 20)
    from gndpo.models import load_model
    from gndpo.teacher.hf import HFTeacher

    topk = ServerTeacher(stock_server.url, api_key=None, processor=processor, suffix=SUFFIX, micro_batch_size=4,
                         timeout=60, retries=0, topk=5).score(rollouts)
    loaded = load_model(str(text_teacher), dtype="float32")
    assert_same_topk(topk, HFTeacher(loaded.model, loaded.processor, suffix=SUFFIX, topk=5).score(rollouts),
                     rollouts.response_mask)


# ---------------------------------------------------------------- training against a served teacher


def test_train_two_steps_with_served_teacher(servers, lab_task, tmp_path, monkeypatch):
    from gndpo.config import load_config
    from gndpo.train import train

    monkeypatch.setenv("GNDPO_TEACHER_API_KEY", KEY)  # the trainer reads the key from teacher.api_key_env
    cfg = load_config(None, [
        f"model.path={ASSETS / 'student'}", f"teacher.path={ASSETS / 'teacher'}", "teacher.backend=server",
        f"teacher.url={servers['vlm'].url}", "teacher.micro_batch_size=3", f"data.train={lab_task / 'train.jsonl'}",
        f"data.prompt_suffix={SUFFIX}", "algorithm.method=gndpo", "rollout.n=4", "rollout.max_new_tokens=8",
        "rollout.micro_batch_size=16", "trainer.prompts_per_step=2", "trainer.micro_batch_size=4",
        "trainer.total_steps=2", "trainer.device=cpu", f"trainer.output_dir={tmp_path / 'run'}", "optim.lr=1e-3",
        "logging.progress=false", "logging.tensorboard=false", "checkpoint.every=0", "trainer.seed=7"])
    steps = []
    train(cfg, callbacks=[steps.append])
    assert [s.step for s in steps] == [1, 2]
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
    for s in steps:  # the rewards were computed from the served teacher's exact log-probs
        assert (s.teacher_logprobs - hf_scores(ASSETS / "teacher", s.rollouts)).abs().max() <= 1e-4


# ---------------------------------------------------------------- security and input errors


def post(url, payload, key=None):
    payload = {"protocol": 2, **payload}
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url + "/score", data=json.dumps(payload).encode(), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def test_api_key_is_enforced(servers):
    url = servers["vlm"].url
    good = {"requests": [{"prompt_token_ids": [1, 5, 6], "response_token_ids": [7, 8]}]}
    assert post(url, good)[0] == 401
    assert post(url, good, key="wrong") == (401, {"error": "API key refused"})
    status, body = post(url, good, key=KEY)
    assert status == 200 and len(body["logprobs"][0]) == 2
    with pytest.raises(ModelError, match="refused the API key") as info:
        ServerTeacher(url, api_key="wrong", processor=student_processor(), suffix=None, retries=0)
    assert "wrong" not in str(info.value)


@pytest.mark.parametrize("request_, match", [
    ({"prompt_token_ids": [1, 5], "response_token_ids": [7, 10 ** 6]}, r"token id 1000000, outside .* \[0, 103\)"),
    ({"prompt_token_ids": [1, 3], "images": ["not base64!"], "response_token_ids": [7]}, r"images\[0\] is not a decod"),
    ({"prompt_token_ids": [3, 3, 3], "images": ["AA=="] * 3, "response_token_ids": [7]}, "at most 2 per prompt"),
    ({"prompt_token_ids": [5] * 600, "response_token_ids": [7]}, "over the server's --max-model-len 512"),
    ({"prompt": 0, "response_token_ids": [7]}, 'names no entry of "prompts"'),
])
def test_bad_requests_get_one_line_400(servers, request_, match):
    status, body = post(servers["vlm"].url, {"requests": [request_]}, key=KEY)
    assert status == 400 and re.search(match, body["error"]) and "\n" not in body["error"]


def png_base64(color=(0, 0, 0)):
    image = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(image, format="PNG")
    return base64.b64encode(image.getvalue()).decode()


def test_text_server_refuses_images(servers):
    request_ = {"prompt_token_ids": [1, 3], "images": [png_base64()], "response_token_ids": [7]}
    status, body = post(servers["text"].url, {"requests": [request_]})
    assert status == 400 and "served text-only" in body["error"]


def test_engine_rejection_is_a_400_and_the_server_carries_on(servers):
    # 500 ids pass the server's own length check; the 2 images expand to 16 tokens each inside vLLM
    long = {"prompt_token_ids": [3, 3] + [5] * 498, "images": [png_base64(), png_base64((9, 9, 9))],
            "response_token_ids": [7, 8]}
    status, body = post(servers["vlm"].url, {"requests": [long]}, key=KEY)
    assert status == 400 and "\n" not in body["error"], body
    status, body = post(servers["vlm"].url, {"requests": [{"prompt_token_ids": [1, 5], "response_token_ids": [7]}]},
                        key=KEY)
    assert status == 200 and len(body["logprobs"][0]) == 1


def run_cli(*args, env_key=None, timeout=120):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("GNDPO_TEACHER_API_KEY", None)
    if env_key:
        env["GNDPO_TEACHER_API_KEY"] = env_key
    return subprocess.run([sys.executable, "-m", "gndpo.cli", "serve-teacher", str(ASSETS / "teacher"), *args],
                          capture_output=True, text=True, env=env, timeout=timeout)


def test_non_loopback_bind_needs_a_key():
    done = run_cli("--host", "0.0.0.0", "--port", "0")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: --host 0.0.0.0 accepts connections from other "
                                                           "machines, which needs an API key")


def test_command_line_key_warns_and_is_never_printed():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        done = run_cli("--port", str(busy.getsockname()[1]), "--api-key", KEY)  # fails at bind, before the engine
    assert done.returncode == 2
    assert "warning: --api-key is visible to other users" in done.stderr
    assert "error: cannot listen on 127.0.0.1:" in done.stderr
    assert KEY not in done.stdout + done.stderr


# ---------------------------------------------------------------- the app and its engine worker, engine faked


def fake_app(score_fn, *, key=None):
    from fastapi.testclient import TestClient

    app = build_app(Scorer(score_fn), Limits(vocab_size=100, max_model_len=64, max_images=1),
                    lambda vocab: {"tokenizer": {"vocab": {}} if vocab else {}}, api_key=key)
    return TestClient(app)


def test_app_encodes_neg_inf_and_refuses_nan():
    def engine(inputs, responses, topk):
        return [([-math.inf if t == 13 else (math.nan if t == 66 else -0.5) for t in r],
                 [list(range(topk))] * len(r), [[-0.25] * topk] * len(r)) for r in responses]

    app = fake_app(engine)
    answer = app.post("/score", json={"protocol": 2, "requests": [{"prompt_token_ids": [1],
                                                                   "response_token_ids": [13, 7]}]})
    assert answer.status_code == 200 and answer.text == '{"logprobs": [["-Infinity", -0.5]]}'
    answer = app.post("/score", json={"protocol": 2, "topk": 2, "requests": [{"prompt_token_ids": [1],
                                                                              "response_token_ids": [7]}]})
    assert answer.json() == {"logprobs": [[-0.5]], "topk_ids": [[[0, 1]]], "topk_logprobs": [[[-0.25, -0.25]]]}
    answer = app.post("/score", json={"requests": [{"prompt_token_ids": [1], "response_token_ids": [7]}]})
    assert answer.status_code == 400 and "the client sent protocol 1" in answer.json()["error"]
    answer = app.post("/score", json={"protocol": 2, "requests": [{"prompt_token_ids": [1],
                                                                   "response_token_ids": [66]}]})
    assert answer.status_code == 500 and "nan" in answer.json()["error"]
    answer = app.post("/score", content=b'{"requests": [NaN]}', headers={"Content-Type": "application/json"})
    assert answer.status_code == 400 and "bare NaN" in answer.json()["error"]
    assert app.get("/fingerprint?vocab=1").json() == {"tokenizer": {"vocab": {}}}


def test_worker_merges_waiting_requests_and_isolates_a_bad_one():
    gate, calls = threading.Event(), []

    def engine(inputs, responses, topk):
        gate.wait(10)
        calls.append(len(responses))
        if any(13 in r for r in responses):
            raise ValueError("token 13 cannot run")
        return [[-float(t) for t in r] for r in responses]

    scorer = Scorer(engine)
    try:
        first = scorer.submit([{}], [[1]])
        time.sleep(0.2)  # the worker is now inside the engine with `first`
        waiting = [scorer.submit([{}, {}], [[2], [3, 4]]), scorer.submit([{}], [[13]]), scorer.submit([{}], [[5]])]
        gate.set()
        assert first.result(10) == [[-1.0]]
        assert waiting[0].result(10) == [[-2.0], [-3.0, -4.0]] and waiting[2].result(10) == [[-5.0]]
        with pytest.raises(ValueError, match="token 13"):
            waiting[1].result(10)
    finally:
        scorer.close()
    assert calls[:2] == [1, 4]  # the three waiting requests went in as one engine call, which failed
    assert sorted(calls[2:]) == [1, 1, 2]  # then each alone: only the bad one failed
