"""The command line: dry runs of the paper presets, help, and one-line errors for every bad input."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from gndpo.cli import main

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "configs" / "paper").glob("*.yaml"))


def run_cli(args, capsys):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, err, *needles):
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("gndpo:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_nine_paper_presets_exist_and_validate_offline(capsys):
    names = {p.name for p in PRESETS}
    expected = {f"internvl3_5-{s}-{m}.yaml" for s in ("1b", "2b", "4b") for m in ("gspo", "opd", "gndpo")}
    assert names == expected
    for path in PRESETS:
        rc, out, err = run_cli(["train", path, "--dry-run"], capsys)
        assert rc == 0, err
        method = path.stem.rsplit("-", 1)[1]
        assert f"method: {method}" in out
        assert "lr: 1.0e-06" in out and "prompts_per_step: 32" in out and "'n': 16" in out
        assert "loss_agg_mode: seq-mean-token-mean" in out and "policy_loss: gspo_token" in out
        assert ("advantage: grpo" if method == "gspo" else f"advantage: {method}") in out


def test_dry_run_applies_overrides(capsys):
    rc, out, _ = run_cli(["train", PRESETS[0], "--dry-run", "optim.lr=3e-6", "algorithm.policy_loss=ppo"], capsys)
    assert rc == 0
    assert "lr: 3.0e-06" in out and "policy_loss: ppo" in out


def test_help_lists_every_config_key():
    proc = subprocess.run([sys.executable, "-m", "gndpo.cli", "train", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for key in ("algorithm.method", "algorithm.reward_clamp", "rollout.n", "optim.lr", "trainer.micro_batch_size",
                "checkpoint.every", "data.max_prompt_length"):
        assert key in proc.stdout


def test_subprocess_error_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "gndpo.cli", "train", "--dry-run", "algorithm.method=ppo"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: algorithm.method='ppo' is not one of: gndpo, opd, gspo"]


@pytest.mark.parametrize("overrides, needles", [
    (["trainer.bogus=1"], ["unknown config key 'trainer.bogus'", "total_steps"]),
    (["algorithm.method=dpo"], ["algorithm.method='dpo'", "gndpo, opd, gspo"]),
    (["algorithm.advantage=magic"], ["algorithm.advantage='magic'"]),
    (["rollout.temperature=0"], ["rollout.temperature must be > 0"]),
    (["rollout.top_p=1.5"], ["rollout.top_p"]),
    (["rollout.min_new_tokens=999999"], ["rollout.min_new_tokens must be in [0, rollout.max_new_tokens]"]),
    (["rollout.engine=vllm"], ["rollout.engine='vllm' is not one of: loop, generate"]),
    (["algorithm.old_logprobs=sampler", "rollout.backend=hf", "rollout.engine=generate"],
     ["algorithm.old_logprobs=sampler needs rollout.engine=loop"]),
    (["optim.lr=-1"], ["optim.lr must be > 0"]),
    (["trainer.total_steps=abc"], ["trainer.total_steps"]),
    (["trainer.micro_batch_size=5"], ["not divisible by trainer.micro_batch_size=5"]),
    (["algorithm.mini_batches=3"], ["not divisible by algorithm.mini_batches=3"]),
    (["teacher.path=null"], ["teacher.path is required"]),
    (["nonsense"], ["key=value"]),
])
def test_config_errors(capsys, overrides, needles):
    rc, _, err = run_cli(["train", PRESETS[0], "--dry-run", *overrides], capsys)
    if "teacher.path" in needles[0]:  # the gspo preset needs no teacher; use a distillation preset
        rc, _, err = run_cli(["train", [p for p in PRESETS if p.stem.endswith("-gndpo")][0], "--dry-run", *overrides],
                             capsys)
    assert_one_line_error(rc, err, *needles)


def test_missing_config_file(capsys):
    rc, _, err = run_cli(["train", "nope.yaml", "--dry-run"], capsys)
    assert_one_line_error(rc, err, "config file not found: nope.yaml")


# ---------------------------------------------------------------- errors that need models and data


def base_args(tiny_dir, out, **kw):
    args = {
        "model.path": tiny_dir / "text_student", "teacher.path": tiny_dir / "text_teacher",
        "data.train": tiny_dir / "text.jsonl", "data.image_key": "null", "data.prompt_suffix": "none",
        "rollout.n": 2, "rollout.max_new_tokens": 4, "trainer.prompts_per_step": 2, "trainer.micro_batch_size": 4,
        "trainer.total_steps": 1, "trainer.device": "cpu", "trainer.output_dir": out, "logging.progress": "false",
        "logging.tensorboard": "false",
    }
    args.update(kw)
    return ["train"] + [f"{k}={v}" for k, v in args.items()]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow
def test_data_and_model_errors(tiny_dir, tmp_path, capsys):
    cases = [
        ({"data.train": tmp_path / "missing.jsonl"}, ["missing.jsonl"]),
        ({"data.train": write_jsonl(tmp_path / "noans.jsonl", [{"problem": "1+1?"}])}, ["answer"]),
        ({"data.train": write_jsonl(tmp_path / "noq.jsonl", [{"question": "1+1?", "answer": "2"}])}, ["problem"]),
        ({"data.train": write_jsonl(tmp_path / "img.jsonl", [{"problem": "x", "answer": "1", "images": ["nope.png"]}]),
          "data.image_key": "images", "model.path": tiny_dir / "vlm_student", "teacher.path": tiny_dir / "vlm_teacher"},
         ["nope.png"]),
        ({"model.path": tmp_path / "no_model"}, ["model path not found"]),
        ({"teacher.path": tmp_path / "no_teacher"}, ["teacher path not found"]),
        ({"teacher.path": tiny_dir / "text_other_tok"}, ["vocabularies differ"]),
        ({"data.max_prompt_length": 3}, ["longer than data.max_prompt_length=3"]),
    ]
    (tmp_path / "garbage.png").write_bytes(b"not a png")
    cases.append(({"data.train": write_jsonl(tmp_path / "bad.jsonl", [{"problem": "x", "answer": "1",
                                                                        "images": ["garbage.png"]}]),
                   "data.image_key": "images", "model.path": tiny_dir / "vlm_student",
                   "teacher.path": tiny_dir / "vlm_teacher"}, ["garbage.png"]))
    for i, (kw, needles) in enumerate(cases):
        rc, _, err = run_cli(base_args(tiny_dir, tmp_path / f"run{i}", **kw), capsys)
        assert_one_line_error(rc, err, *needles)
        assert not (tmp_path / f"run{i}" / "checkpoints").exists()


@pytest.mark.slow
def test_output_dir_holding_another_run(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    rc, _, err = run_cli(base_args(tiny_dir, out), capsys)
    assert rc == 0, err
    ckpts = sorted((out / "checkpoints").iterdir())
    before = (ckpts[-1] / "model.safetensors").read_bytes()
    rc, _, err = run_cli(base_args(tiny_dir, out, **{"optim.lr": 1e-3}), capsys)
    assert_one_line_error(rc, err, "already holds a run", "resume")
    assert (ckpts[-1] / "model.safetensors").read_bytes() == before


@pytest.mark.slow
def test_plot_overlays_runs(tiny_dir, tmp_path, capsys):
    from PIL import Image

    for name in ("a", "b"):
        rc, _, err = run_cli(base_args(tiny_dir, tmp_path / name, **{"trainer.total_steps": 2}), capsys)
        assert rc == 0, err
    rc, out, err = run_cli(["plot", tmp_path / "a", tmp_path / "b", "--out", tmp_path / "dyn.png"], capsys)
    assert rc == 0, err
    assert Image.open(tmp_path / "dyn.png").size[0] > 600
    rc, _, err = run_cli(["plot", tmp_path / "nothing"], capsys)
    assert_one_line_error(rc, err, "nothing")


@pytest.mark.slow
def test_resume_shorthand_continues_the_run(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    rc, _, err = run_cli(base_args(tiny_dir, out, **{"trainer.total_steps": 1}), capsys)
    assert rc == 0, err
    rc, _, err = run_cli(base_args(tiny_dir, out, **{"trainer.total_steps": 2}) + ["resume=true"], capsys)
    assert rc == 0, err
    steps = [json.loads(line)["step"] for line in open(out / "metrics.jsonl")]
    assert steps == [1, 2]
    rc, _, err = run_cli(base_args(tiny_dir, out, **{"trainer.total_steps": 3, "optim.lr": 0.5}) + ["--resume"], capsys)
    assert_one_line_error(rc, err, "optim.lr")


@pytest.mark.slow
def test_eval_command(tiny_dir, tmp_path, capsys):
    rc, out, err = run_cli(["eval", tiny_dir / "vlm_student", tiny_dir / "vlm" / "test.jsonl", "--split", "test",
                            "--max-new-tokens", "4", "--suffix", "none", "--out", tmp_path / "items.jsonl"], capsys)
    assert rc == 0, err
    assert "accuracy" in out and "on 8 items" in out
    assert len((tmp_path / "items.jsonl").read_text().splitlines()) == 8
    rc, _, err = run_cli(["eval", tiny_dir / "vlm_student", tmp_path / "nope.jsonl"], capsys)
    assert_one_line_error(rc, err, "nope.jsonl")


def test_eval_help_names_the_default_engine(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "hf (default): gndpo's decode loop" in out and "auto: vllm where installed, else hf" in out


def test_a_run_directory_is_not_a_config(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    rc, _, err = run_cli(["train", tmp_path / "run"], capsys)
    assert_one_line_error(rc, err, "is a directory", f"gndpo train --resume {tmp_path / 'run'}")
    rc, _, err = run_cli(["train", "--resume", tmp_path / "run"], capsys)
    assert_one_line_error(rc, err, "holds no run_config.yaml", "not a gndpo run directory")


def test_resume_from_the_run_directory_resolves_its_stored_config(tmp_path, capsys):
    # --dry-run shows what --resume RUN_DIR means without loading anything: the stored config, the run directory
    # as output_dir wherever it is given from, and the overrides a resume may change
    run = tmp_path / "run"
    rc, out, err = run_cli(["train", PRESETS[0], "--dry-run", "optim.lr=3e-6", "trainer.output_dir=elsewhere"], capsys)
    assert rc == 0, err
    run.mkdir()
    (run / "run_config.yaml").write_text(out)
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    for args in (["--resume", run], [run / "run_config.yaml", "--resume"], ["--resume", f"trainer.output_dir={run}"]):
        rc, out, err = run_cli(["train", *args, "trainer.total_steps=99", "--dry-run"], capsys)
        assert rc == 0, err
        assert "lr: 3.0e-06" in out and "total_steps: 99" in out
        assert f"output_dir: {run}" in out and "resume: true" in out
    rc, _, err = run_cli(["train", "--resume", run, "rollout.n=4", "--dry-run"], capsys)
    assert_one_line_error(rc, err, f"cannot resume {run} with rollout.n=4", "rollout.n was 16", "drop that override")
    rc, _, err = run_cli(["train", "--resume", run, f"trainer.output_dir={tmp_path / 'other'}"], capsys)
    assert_one_line_error(rc, err, "is not the run directory", "drop that override")
    (run / "metrics.jsonl").write_text("")  # its first step never ended: any override goes (a fresh start)
    rc, out, err = run_cli(["train", "--resume", run, "rollout.n=4", "--dry-run"], capsys)
    assert rc == 0 and "'n': 4" in out, err


@pytest.mark.slow
def test_resume_without_a_checkpoint_restarts_its_metrics(tiny_dir, tmp_path, capsys):
    # a run that logged steps but saved no checkpoint resumes from scratch: its metrics restart too, never twice
    out = tmp_path / "run"
    args = base_args(tiny_dir, out, **{"trainer.total_steps": 2, "checkpoint.save_final": "false"})
    rc, _, err = run_cli(args, capsys)
    assert rc == 0, err
    assert not (out / "checkpoints").exists()
    rc, _, err = run_cli(["train", "--resume", out], capsys)
    assert rc == 0, err
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1, 2]
