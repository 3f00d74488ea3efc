"""vLLM engine start failures as one line naming cause and fix, the warm-up that makes a model the engine loads but
cannot run fail at start, and the reload warning silenced; with a fake vLLM (the real engine: tests/vllm_tier)."""
import logging
import math

import pytest
import torch

from gndpo import vllm_engine as engine
from gndpo.errors import ModelError
from gndpo.serve import warm_up

HEAD_DIM = RuntimeError("Unsupported CPU attention configuration: head_dim=16 isa=2 kv_cache_idx=0")
MEMORY = ValueError("No available memory for the cache blocks. Try increasing `gpu_memory_utilization` when "
                    "initializing the engine (this flag also controls CPU memory reservation on the CPU\nbackend).")
ARCH = ValueError("Model architectures ['FooForCausalLM'] are not supported for now. Supported architectures: "
                  "dict_keys(['Qwen3ForCausalLM', ...])")


def test_known_causes_get_their_fix():
    e = engine.engine_start_error("models/qwen3_student", HEAD_DIM)
    assert e.known and str(e).startswith("vLLM cannot run models/qwen3_student: its attention heads have 16 "
                                         "dimensions, and ")
    assert "save_pair(family, DIR, vllm=True)" in str(e) and "rollout.backend=hf" in str(e)
    e = engine.engine_start_error("m", MEMORY)
    assert e.known and "not enough memory (No available memory for the cache blocks." in str(e)
    assert "lower max_model_len" in str(e) and "VLLM_CPU_KVCACHE_SPACE" in str(e) and "\n" not in str(e)
    e = engine.engine_start_error("m", ARCH)
    assert e.known and "vLLM does not implement ['FooForCausalLM']; use the hf backend" in str(e)
    e = engine.engine_start_error("m", OSError("disk on fire\nsecond line"))
    assert not e.known and str(e) == "vLLM cannot start an engine for m: disk on fire"


class FakeLLM:
    """``vllm.LLM`` that starts, then fails (or not) at its first request; counts starts and shutdowns."""

    started, stopped = 0, 0

    def __init__(self, fail=None, **kwargs):
        type(self).started += 1
        self.fail = fail
        self.llm_engine = self
        self.engine_core = self

    def generate(self, requests, params, use_tqdm=False):
        torch.rand(3)  # as an in-process engine's sampler may: the trainer's RNG must not move
        if self.fail is not None:
            raise self.fail
        return []

    def shutdown(self):
        type(self).stopped += 1


class FakeVLLM:
    def __init__(self, fail):
        self.LLM = lambda **kwargs: FakeLLM(fail=fail, **kwargs)

    @staticmethod
    def SamplingParams(**kwargs):
        return kwargs


@pytest.fixture
def fake_vllm(monkeypatch):
    def install(fail):
        FakeLLM.started = FakeLLM.stopped = 0
        monkeypatch.setattr(engine, "import_vllm", lambda: FakeVLLM(fail))
    return install


def test_a_model_the_engine_cannot_run_fails_at_start_in_one_line(fake_vllm):
    fake_vllm(HEAD_DIM)
    with pytest.raises(ModelError) as err:
        engine.start_engine("models/qwen3_student", engine.EngineOptions())
    assert "attention heads have 16 dimensions" in str(err.value)
    # a known cause is not retried with placeholder weights (a second engine start would fail the same way); the
    # engine that started is shut down
    assert (FakeLLM.started, FakeLLM.stopped) == (1, 1)


def test_an_unknown_failure_at_warm_up_is_one_line_too(fake_vllm):
    fake_vllm(RuntimeError("something odd\n  File ...\nmore"))
    with pytest.raises(ModelError, match=r"^vLLM cannot start an engine for m: something odd$"):
        engine.start_engine("m", engine.EngineOptions())


def test_warm_up_leaves_the_rng_as_it_was(fake_vllm):
    fake_vllm(None)
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    llm, loaded = engine.start_engine("m", engine.EngineOptions())
    assert loaded and isinstance(llm, FakeLLM)
    assert torch.equal(torch.rand(4), expected)


def test_rotary_reload_warning_is_silenced_and_others_pass(caplog):
    engine._quiet_reload_warnings()
    engine._quiet_reload_warnings()  # idempotent: one filter
    reload_log = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    assert sum(isinstance(f, engine._RotaryReloadFilter) for f in reload_log.filters) == 1
    with caplog.at_level(logging.WARNING, logger=reload_log.name):
        reload_log.warning("%s: Failed to load weights", "RotaryEmbedding")
        reload_log.warning("%s: Failed to load weights", "MRotaryEmbedding")
        reload_log.warning("%s: Failed to load weights", "QKVParallelLinear")
    assert [r.getMessage() for r in caplog.records] == ["QKVParallelLinear: Failed to load weights"]


class Tok:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 50 for c in text]}


def test_serve_teacher_warm_up_scores_a_short_sequence():
    seen = []

    def score(inputs, responses, topk):  # the server's engine function: (log-probs, top-k ids, top-k log-probs)
        seen.append((inputs, responses, topk))
        return [([-0.5] * len(r), [], []) for r in responses]

    warm_up(score, Tok(), "teacher")
    (inputs, responses, topk), = seen
    assert len(inputs) == 1 and inputs[0]["prompt_token_ids"] and len(responses[0]) == 2 and topk == 0  # " 2"

    with pytest.raises(ModelError, match=r"^the teacher engine for t started but cannot score a short sequence \("
                                         r".*nan.*\); the server was not started$"):
        warm_up(lambda i, r, k: [([math.nan] * len(r[0]), [], [])], Tok(), "t")
    with pytest.raises(ModelError, match="returned \\[1\\] log-probs for one response of 2 tokens"):
        warm_up(lambda i, r, k: [([0.0], [], [])], Tok(), "t")

    def fails(inputs, responses, topk):
        raise HEAD_DIM

    with pytest.raises(ModelError, match="^vLLM cannot run t: its attention heads have 16 dimensions"):
        warm_up(fails, Tok(), "t")
