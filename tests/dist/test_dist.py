"""torchrun + FSDP2 + DCP on this CPU (gloo, 2 processes): the same global batch on 2 ranks trains as 1 process
does, checkpoints resume across world sizes, and a failing rank brings the run down with its one line."""
import json
import math
import os
import socket
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gndpo.config import load_config
from gndpo.train import train

pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve().parent
METHODS = ("gndpo", "opd", "gspo")
# dense (top-k) distillation, one setting of each mode, and running reward statistics (algorithm.norm_stats=running,
# whose batch moments are pooled over the ranks before they join the running state): (name, overrides)
DENSE = {"dense-loss": ["algorithm.distill=topk", "algorithm.topk=5", "algorithm.divergence=forward_kl"],
         "dense-reward": ["algorithm.distill=topk", "algorithm.topk=5", "algorithm.dense_mode=reward"]}
VARIANTS = {**DENSE, "gndpo-running": ["algorithm.norm_stats=running", "algorithm.norm_decay=0.5"]}
RUNS = [(kind, method) for kind in ("text", "vlm") for method in METHODS] + [("text", name) for name in VARIANTS]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(spec: dict, tmp_path: Path, *, timeout: float = 900) -> subprocess.CompletedProcess:
    path = tmp_path / f"spec-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), str(HERE / "worker.py"), str(path)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def overrides(kind, family_dir, lab_pair, out, *, method, steps=3, extra=()):
    if kind == "text":
        paths = (family_dir / "qwen2_student", family_dir / "qwen2_teacher")
        data = [f"data.train={family_dir / 'text.jsonl'}", "data.image_key=null"]
    else:
        paths = lab_pair
        data = [f"data.train={family_dir / 'lab' / 'train.jsonl'}"]
    if method in VARIANTS:
        method, extra = "gndpo", [*VARIANTS[method], *extra]
    return [f"model.path={paths[0]}", f"teacher.path={paths[1]}", *data, f"algorithm.method={method}",
            "rollout.n=4", "rollout.max_new_tokens=10", "trainer.prompts_per_step=4", "trainer.micro_batch_size=4",
            f"trainer.total_steps={steps}", "trainer.device=cpu", f"trainer.output_dir={out}", "optim.lr=1e-4",
            "logging.progress=false", "logging.tensorboard=false", "trainer.seed=3", "trainer.threads=1", *extra]


@pytest.fixture(scope="module")
def lab_pair():
    from importlib.resources import files

    return files("gndpo") / "lab" / "assets" / "student", files("gndpo") / "lab" / "assets" / "teacher"


@pytest.fixture(scope="module")
def lab_task(family_dir):
    """The lab task's files beside the family models (``overrides`` of kind vlm read them)."""
    from gndpo.lab.task import write_task

    if not (family_dir / "lab").exists():
        write_task(family_dir / "lab", seed=0, n_train=16, n_test=4)
    return family_dir / "lab"


@pytest.fixture(scope="module")
def two_ranks(family_dir, lab_pair, lab_task, tmp_path_factory):
    """One torchrun running every (kind, method) on 2 ranks, and the same runs in this process."""
    root = tmp_path_factory.mktemp("dist")
    runs, refs = [], {}
    for kind, method in RUNS:
        adv = root / f"adv-{kind}-{method}"
        adv.mkdir()
        runs.append({"overrides": overrides(kind, family_dir, lab_pair, root / f"2-{kind}-{method}",
                                            method=method), "advantages": str(adv)})
    result = torchrun({"runs": runs, "hash_reward": True}, root)
    assert result.returncode == 0, result.stderr[-3000:]
    import gndpo.train

    real = gndpo.train.get_reward
    gndpo.train.get_reward = lambda name: (
            lambda texts, answers: [float(zlib.crc32(t.encode()) % 2) for t in texts])
    try:
        for kind, method in RUNS:
            seen = []
            train(load_config(None, overrides(kind, family_dir, lab_pair, root / f"1-{kind}-{method}",
                                              method=method)), callbacks=[seen.append])
            refs[kind, method] = seen
    finally:
        gndpo.train.get_reward = real
    return root, refs


@pytest.mark.parametrize("kind, method", RUNS)
def test_two_ranks_train_as_one_process(two_ranks, family_dir, lab_pair, kind, method):
    root, refs = two_ranks
    one = [json.loads(line) for line in open(root / f"1-{kind}-{method}" / "metrics.jsonl")]
    two = [json.loads(line) for line in open(root / f"2-{kind}-{method}" / "metrics.jsonl")]
    assert [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(one, two):  # pooled metrics: the global batch's, whatever the split
        keys = ["loss", "grad_norm", "entropy", "reward_mean", "reward_std", "accuracy", "response_length"]
        if method in DENSE:
            keys += ["distill/divergence", "distill/teacher_tail", "distill/student_tail"]
        if method == "gndpo-running":
            keys += ["norm/batch_std", "norm/running_mean", "norm/running_std", "norm/running_count"]
        for key in keys:
            assert math.isclose(a[key], b[key], rel_tol=1e-4, abs_tol=1e-6), (key, a[key], b[key])
        assert a["grad_norm"] > 0
    if method == "gndpo-running":  # the running state holds every rank's tokens: both halves of the batch
        assert two[1]["norm/running_count"] == 0.5 * two[0]["num_tokens"] + two[1]["num_tokens"]
    # advantages: rank r holds the responses of its half of the prompts; each equals the single process's
    for step, rec in enumerate(refs[kind, method], start=1):
        ids = [rec.rollouts.records[int(i)].id for i in rec.rollouts.prompt_index]
        for rank in (0, 1):
            part = torch.load(root / f"adv-{kind}-{method}" / f"rank{rank}-step{step}.pt")
            # response k of a rank is sample k % 4 of its prompt (prompt-major); find the same in the reference
            rows = [ids.index(pid) + (k % 4) for k, pid in enumerate(part["ids"])]
            R = part["advantages"].shape[1]
            ref = rec.advantages[rows][:, :R]
            torch.testing.assert_close(part["advantages"], ref, rtol=0, atol=1e-5)
    a = load_file(str(root / f"1-{kind}-{method}" / "checkpoints" / "step-000003" / "model.safetensors"))
    b = load_file(str(root / f"2-{kind}-{method}" / "checkpoints" / "step-000003" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)
    initial = load_file(str((family_dir / "qwen2_student" if kind == "text" else lab_pair[0]) / "model.safetensors"))
    assert any(not torch.equal(initial[k], b[k]) for k in initial if k in b), "the 2-rank run did not train"


def test_resume_across_world_sizes(two_ranks, family_dir, lab_pair, tmp_path):
    """A 2-rank checkpoint resumes in 1 process and a 1-process one on 2 ranks; both end equal to an
    uninterrupted run, and the HF export loads in transformers."""
    import shutil

    from transformers import AutoModelForCausalLM

    root, _ = two_ranks
    full = tmp_path / "full"
    train(load_config(None, overrides("text", family_dir, lab_pair, full, method="gndpo", steps=5)))
    two_to_one = tmp_path / "2to1"
    shutil.copytree(root / "2-text-gndpo", two_to_one)
    train(load_config(None, overrides("text", family_dir, lab_pair, two_to_one, method="gndpo", steps=5,
                                      extra=["trainer.resume=true"])))
    one_to_two = tmp_path / "1to2"
    shutil.copytree(root / "1-text-gndpo", one_to_two)
    result = torchrun({"runs": [{"overrides": overrides("text", family_dir, lab_pair, one_to_two, method="gndpo",
                                                        steps=5, extra=["trainer.resume=true"])}]}, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = load_file(str(full / "checkpoints" / "step-000005" / "model.safetensors"))
    for run in (two_to_one, one_to_two):
        got = load_file(str(run / "checkpoints" / "step-000005" / "model.safetensors"))
        assert got.keys() == expected.keys()
        for k in expected:
            torch.testing.assert_close(got[k], expected[k], rtol=0, atol=1e-5)
        assert [json.loads(line)["step"] for line in open(run / "metrics.jsonl")] == [1, 2, 3, 4, 5]
        assert (run / "checkpoints" / "step-000005" / "sharded").is_dir()
    AutoModelForCausalLM.from_pretrained(str(one_to_two / "checkpoints" / "step-000005"))


def test_a_failing_rank_stops_every_rank_with_its_line(family_dir, lab_pair, tmp_path):
    start = time.monotonic()
    result = torchrun({"runs": [{"overrides": overrides("text", family_dir, lab_pair, tmp_path / "run",
                                                        method="gndpo", steps=4,
                                                        extra=["trainer.dist_timeout=30"])}],
                       "fail": {"rank": 1, "step": 2}, "cli": True}, tmp_path, timeout=300)
    assert result.returncode != 0
    assert time.monotonic() - start < 120
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert lines == ["error: injected fault on rank 1 at step 2"], result.stderr[-2000:]


def test_unreachable_rendezvous_is_one_line(tmp_path):
    env = dict(os.environ, WORLD_SIZE="2", RANK="1", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()))
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "gndpo.cli", "train", "model.path=m", "teacher.path=t",
                             "data.train=d", "trainer.dist_timeout=3"], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 2 and time.monotonic() - start < 60
    err = result.stderr.strip().splitlines()
    assert err[-1].startswith("error: cannot join the process group at 127.0.0.1:") and "Traceback" not in result.stderr


def test_fsdp2_mixed_precision_keeps_float32_masters_at_lr_1e6(family_dir, lab_pair, lab_task, tmp_path):
    """Under torchrun, model.compute_dtype=bfloat16 over float32 weights is FSDP2's MixedPrecisionPolicy: the
    shards (and the checkpoint) stay float32, and at the paper's lr 1e-6 the weights move as a float32 run's do."""
    import sys as _sys

    _sys.path.insert(0, str(HERE.parent))
    from test_precision import movement

    lr = ["optim.lr=1e-6"]
    ref = tmp_path / "fp32"
    train(load_config(None, overrides("vlm", family_dir, lab_pair, ref, method="gndpo", extra=lr)))
    run = tmp_path / "mixed"
    result = torchrun({"runs": [{"overrides": overrides("vlm", family_dir, lab_pair, run, method="gndpo",
                                                        extra=[*lr, "model.compute_dtype=bfloat16"])}]}, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    base = load_file(str(lab_pair[0] / "model.safetensors"))
    masters = load_file(str(run / "checkpoints" / "step-000003" / "model.safetensors"))
    assert {w.dtype for w in masters.values()} == {torch.float32}
    f_mixed, m_mixed = movement(masters, base)
    f_ref, m_ref = movement(load_file(str(ref / "checkpoints" / "step-000003" / "model.safetensors")), base)
    assert f_ref > 0.99 and f_ref / 2 <= f_mixed <= 2 * f_ref and m_ref / 2 <= m_mixed <= 2 * m_ref


def two_nodes(commands: list[list[str]], tmp_path: Path, *, timeout: float = 600) -> list[subprocess.CompletedProcess]:
    """``commands[r]`` (what torchrun runs) on node r of 2, each its own torchrun launcher with one process,
    meeting through the c10d rendezvous on 127.0.0.1: what docs/SCALING.md shows for two machines."""
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(r),
                               "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                               f"127.0.0.1:{port}", "--rdzv-id", f"gndpo-test-{port}", *command],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for r, command in enumerate(commands)]
    out = []
    for proc in procs:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        out.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return out


def test_two_nodes_train_as_one_process_and_resume_on_one(two_ranks, family_dir, lab_pair, tmp_path):
    """Two torchrun launchers (--nnodes 2, one process each, c10d rendezvous) train as one process does, write a
    DCP checkpoint, and one node resumes it to the weights of an uninterrupted run."""
    import shutil

    root, _ = two_ranks
    run = tmp_path / "nodes"
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"runs": [{"overrides": overrides("text", family_dir, lab_pair, run, method="gndpo")}]}))
    results = two_nodes([[str(HERE / "worker.py"), str(spec)]] * 2, tmp_path)
    assert all(r.returncode == 0 for r in results), results[0].stderr[-3000:] + results[1].stderr[-3000:]
    one = load_file(str(root / "1-text-gndpo" / "checkpoints" / "step-000003" / "model.safetensors"))
    got = load_file(str(run / "checkpoints" / "step-000003" / "model.safetensors"))
    for k in one:
        torch.testing.assert_close(got[k], one[k], rtol=0, atol=1e-5)
    assert (run / "checkpoints" / "step-000003" / "sharded").is_dir()
    full = tmp_path / "full"
    train(load_config(None, overrides("text", family_dir, lab_pair, full, method="gndpo", steps=5)))
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    train(load_config(None, overrides("text", family_dir, lab_pair, resumed, method="gndpo", steps=5,
                                      extra=["trainer.resume=true"])))
    expected = load_file(str(full / "checkpoints" / "step-000005" / "model.safetensors"))
    got = load_file(str(resumed / "checkpoints" / "step-000005" / "model.safetensors"))
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=1e-5)


def test_a_node_that_never_joins_fails_within_dist_timeout(family_dir, lab_pair, tmp_path):
    """Both launchers meet, but node 1's process never joins the process group (stuck before training): node 0
    stops after trainer.dist_timeout with one line. (A node whose launcher never starts at all is torchrun's
    rendezvous to time out: --rdzv-conf join_timeout, docs/SCALING.md.)"""
    stuck = tmp_path / "stuck.py"
    stuck.write_text("import time\ntime.sleep(300)\n")
    train_cmd = ["-m", "gndpo.cli", "train",
                 *overrides("text", family_dir, lab_pair, tmp_path / "run", method="gndpo",
                            extra=["trainer.dist_timeout=10"])]
    start = time.monotonic()
    node0, _ = two_nodes([train_cmd, [str(stuck)]], tmp_path, timeout=60)
    elapsed = time.monotonic() - start
    assert node0.returncode != 0 and elapsed < 60, (elapsed, node0.stderr[-2000:])
    lines = [line for line in node0.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and lines[0].startswith("error: not every rank joined the process group at ") and \
        "within trainer.dist_timeout=10 s" in lines[0], node0.stderr[-2000:]
    assert "Traceback" not in node0.stderr.split("error: ")[0][-500:]
