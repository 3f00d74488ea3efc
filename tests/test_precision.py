"""Precision: float32 master weights with bfloat16 compute train at the paper's lr 1e-6 as float32 does, where
bfloat16 weights (the presets before) barely move; checkpoints keep the masters and export in the model's dtype.

Measured on the lab pair, 3 GNDPO steps at lr 1e-6 (this file's first test prints it): float32 99.9 % of weights
changed, median relative update 4.3e-5; float32 masters + bf16 autocast the same; bfloat16 weights 0.7 % and 0.
"""
import json
import shutil
from importlib.resources import files

import pytest
import torch
from safetensors.torch import load_file

from gndpo.checkpoint import export_checkpoint
from gndpo.config import load_config
from gndpo.core.logprobs import hidden_logprobs
from gndpo.errors import ConfigError, GndpoError
from gndpo.models import student_dtypes
from gndpo.train import train

STUDENT = files("gndpo") / "lab" / "assets" / "student"
TEACHER = files("gndpo") / "lab" / "assets" / "teacher"


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    from gndpo.lab.task import write_task

    root = tmp_path_factory.mktemp("precision")
    write_task(root / "task", seed=0, n_train=16, n_test=4)
    return root / "task" / "train.jsonl"


def lab_cfg(task, out, *extra, steps=3, student=STUDENT):
    return load_config(None, [
        f"model.path={student}", f"teacher.path={TEACHER}", f"data.train={task}", "algorithm.method=gndpo",
        "rollout.n=4", "rollout.max_new_tokens=16", "trainer.prompts_per_step=4", "trainer.micro_batch_size=4",
        f"trainer.total_steps={steps}", "trainer.device=cpu", f"trainer.output_dir={out}", "optim.lr=1e-6",
        "logging.progress=false", "logging.tensorboard=false", "trainer.seed=3", *extra])


def movement(weights: dict, base: dict) -> tuple[float, float]:
    """(fraction of weights that differ from the base rounded to the run's dtype, median relative update)."""
    changed, total, rel = 0, 0, []
    for k, w in weights.items():
        b = base[k].to(w.dtype).float()  # loading in bf16 alone must not count as an update
        d = w.float() - b
        changed += int((d != 0).sum())
        total += w.numel()
        nz = b != 0
        rel.append((d.abs()[nz] / b.abs()[nz]).flatten())
    return changed / total, float(torch.cat(rel).median())


@pytest.mark.slow
def test_fp32_masters_with_bf16_compute_move_as_fp32_at_lr_1e6(task, tmp_path):
    base = load_file(str(STUDENT / "model.safetensors"))
    runs = {"float32": ["model.dtype=float32", "model.compute_dtype=float32"],
            "presets": ["model.dtype=float32", "model.compute_dtype=bfloat16"],  # what configs/paper/* set
            "bf16 weights": ["model.dtype=bfloat16"]}  # the presets before: AdamW on bfloat16 weights
    moved = {}
    for name, extra in runs.items():
        train(lab_cfg(task, tmp_path / name.replace(" ", "_"), *extra))
        weights = load_file(str(tmp_path / name.replace(" ", "_") / "checkpoints" / "step-000003" / "model.safetensors"))
        if name != "bf16 weights":  # the checkpoint holds the float32 masters, not a bf16 copy
            assert all(w.dtype == torch.float32 for w in weights.values())
        moved[name] = movement(weights, base)
    print({k: f"changed {f:.4f}, median relative update {m:.3g}" for k, (f, m) in moved.items()})
    (f32, m32), (fp, mp), (fb, mb) = moved["float32"], moved["presets"], moved["bf16 weights"]
    assert f32 > 0.99
    assert f32 / 2 <= fp <= 2 * f32 and m32 / 2 <= mp <= 2 * m32  # within 2x of float32
    assert fb < f32 / 2 and not (m32 / 2 <= mb <= 2 * m32)  # bf16 weights: most updates round away


@pytest.mark.slow
def test_mixed_precision_computes_in_bf16_and_resumes_exactly(task, tmp_path):
    """The same run twice is bit-equal (autocast is deterministic), differs from the float32 run (so bf16 compute
    really happened), and a resumed run ends bit-equal to an uninterrupted one."""
    mixed = ["model.compute_dtype=bfloat16", "checkpoint.every=1", "checkpoint.keep_last=null"]
    train(lab_cfg(task, tmp_path / "full", *mixed, steps=3))
    train(lab_cfg(task, tmp_path / "split", *mixed, steps=1))
    train(lab_cfg(task, tmp_path / "split", *mixed, "trainer.resume=true", steps=3))
    train(lab_cfg(task, tmp_path / "fp32", "checkpoint.every=1", steps=1))
    full = load_file(str(tmp_path / "full" / "checkpoints" / "step-000003" / "model.safetensors"))
    split = load_file(str(tmp_path / "split" / "checkpoints" / "step-000003" / "model.safetensors"))
    for k in full:
        assert torch.equal(full[k], split[k]), k
    one_mixed = load_file(str(tmp_path / "full" / "checkpoints" / "step-000001" / "model.safetensors"))
    one_fp32 = load_file(str(tmp_path / "fp32" / "checkpoints" / "step-000001" / "model.safetensors"))
    assert any(not torch.equal(one_mixed[k], one_fp32[k]) for k in one_fp32)
    # the loss of the first step is computed from bf16 logits: close to float32's, not equal
    rows = [json.loads(line) for line in open(tmp_path / "full" / "metrics.jsonl")]
    ref = [json.loads(line) for line in open(tmp_path / "fp32" / "metrics.jsonl")]
    assert rows[0]["entropy"] == pytest.approx(ref[0]["entropy"], rel=0.05) and rows[0]["entropy"] != ref[0]["entropy"]


@pytest.mark.slow
def test_export_writes_the_models_own_dtype_from_float32_masters(task, tmp_path):
    # a student whose config.json names bfloat16 (as InternVL3.5's does), trained over float32 masters
    student = tmp_path / "student_bf16"
    shutil.copytree(STUDENT, student)
    config = json.loads((student / "config.json").read_text())
    config["dtype"] = "bfloat16"
    (student / "config.json").write_text(json.dumps(config))
    run = tmp_path / "run"
    train(lab_cfg(task, run, "model.compute_dtype=bfloat16", steps=1, student=student))
    masters = load_file(str(run / "checkpoints" / "step-000001" / "model.safetensors"))
    assert {w.dtype for w in masters.values()} == {torch.float32}

    out, what = export_checkpoint(run)
    assert what.endswith("in bfloat16")
    exported = load_file(str(out / "model.safetensors"))
    for k, w in masters.items():
        assert exported[k].dtype == torch.bfloat16 and torch.equal(exported[k], w.to(torch.bfloat16)), k
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    from transformers import AutoModelForImageTextToText

    assert AutoModelForImageTextToText.from_pretrained(str(out)).dtype == torch.bfloat16

    out32, what32 = export_checkpoint(run, out=tmp_path / "f32", dtype="float32")
    assert what32.endswith("in float32")
    for k, w in load_file(str(out32 / "model.safetensors")).items():
        assert torch.equal(w, masters[k])
    with pytest.raises(GndpoError, match="--dtype 'int8' is not one of"):
        export_checkpoint(run, out=tmp_path / "x", dtype="int8")


def test_the_lm_head_computes_in_the_autocast_dtype():
    torch.manual_seed(0)
    hidden = torch.randn(5, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    ids = torch.randint(0, 50, (5,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp, _ = hidden_logprobs(hidden, weight, ids)
    ref = torch.log_softmax((hidden.bfloat16() @ weight.bfloat16().t()).float(), -1).gather(1, ids[:, None])[:, 0]
    torch.testing.assert_close(lp, ref, rtol=0, atol=1e-6)
    lp.sum().backward()
    assert weight.grad.dtype == torch.float32 and hidden.grad.dtype == torch.float32  # the masters' dtype
    exact = torch.log_softmax(hidden.detach() @ weight.detach().t(), -1).gather(1, ids[:, None])[:, 0]
    assert not torch.equal(lp.detach(), exact)  # without autocast the head stays in float32


def test_dtype_resolution_and_config_errors():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert student_dtypes("auto", "auto", cuda) == (torch.float32, torch.bfloat16)  # masters + bf16 compute
    assert student_dtypes("auto", "auto", cpu) == (torch.float32, torch.float32)
    assert student_dtypes("auto", "auto", cuda, lora=True) == (torch.bfloat16, torch.bfloat16)  # frozen base
    assert student_dtypes("bfloat16", "auto", cuda) == (torch.bfloat16, torch.bfloat16)
    assert student_dtypes("float32", "bfloat16", cpu) == (torch.float32, torch.bfloat16)
    base = ["model.path=m", "teacher.path=t", "data.train=d"]
    with pytest.raises(ConfigError, match="dist.param_dtype' was replaced by model.compute_dtype"):
        load_config(None, [*base, "dist.param_dtype=bfloat16"])
    with pytest.raises(ConfigError, match="model.compute_dtype=float32 over model.dtype=bfloat16"):
        load_config(None, [*base, "model.dtype=bfloat16", "model.compute_dtype=float32"])
    with pytest.raises(ConfigError, match="model.compute_dtype='float16' is not one of"):
        load_config(None, [*base, "model.compute_dtype=float16"])
