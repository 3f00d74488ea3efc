"""The catalogue of bad inputs: each case builds its input under ``root`` (a fresh directory; ``tiny`` holds the
test suite's tiny models and data) and returns the ``gndpo`` command line; running it must print exactly one
line on stderr, containing ``expect``, and exit with ``code``. docs/RELIABILITY.md lists the same cases with the
message each produces (``GNDPO_CATALOGUE=FILE pytest tests/reliability/test_bad_inputs.py`` writes them)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass
class Case:
    id: str
    area: str
    build: Callable[[Path, Path], list[str]]
    expect: str
    code: int = 2


def base(tiny: Path, root: Path, *extra: str, data: str | None = None, steps: int = 1) -> list[str]:
    return ["train", f"model.path={tiny / 'text_student'}", f"teacher.path={tiny / 'text_teacher'}",
            f"data.train={data or tiny / 'text.jsonl'}", "data.image_key=null", "rollout.n=2",
            "rollout.max_new_tokens=4", "trainer.prompts_per_step=2", f"trainer.total_steps={steps}",
            "trainer.device=cpu", f"trainer.output_dir={root / 'run'}", "logging.progress=false",
            "logging.tensorboard=false", *extra]


def jsonl(root: Path, rows: list, name="data.jsonl") -> str:
    path = root / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def vlm_row(root: Path, image_bytes: bytes | None = None, name="img.png", image=None) -> str:
    path = root / name
    if image is not None:
        image.save(path)
    else:
        path.write_bytes(image_bytes)
    return jsonl(root, [{"id": "a", "problem": "What is shown?", "answer": "1", "images": [name]}])


def vlm(tiny: Path, root: Path, data: str) -> list[str]:
    return ["train", f"model.path={tiny / 'vlm_student'}", f"teacher.path={tiny / 'vlm_teacher'}",
            f"data.train={data}", "rollout.n=2", "rollout.max_new_tokens=4", "trainer.prompts_per_step=1",
            "trainer.micro_batch_size=2",
            "trainer.total_steps=1", "trainer.device=cpu", f"trainer.output_dir={root / 'run'}",
            "logging.progress=false", "logging.tensorboard=false"]


def copy_model(src: Path, dst: Path, drop=(), edit=None) -> Path:
    import shutil

    shutil.copytree(src, dst)
    for name in drop:
        (dst / name).unlink()
    if edit:
        cfg = json.loads((dst / "config.json").read_text())
        edit(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def pickled(tiny: Path, root: Path) -> list[str]:
    import torch
    from safetensors.torch import load_file

    dst = copy_model(tiny / "text_student", root / "pickled", drop=["model.safetensors"])
    torch.save(load_file(str(tiny / "text_student" / "model.safetensors")), dst / "pytorch_model.bin")
    return base(tiny, root, f"model.path={dst}")


def no_template(tiny: Path, root: Path) -> list[str]:
    dst = copy_model(tiny / "text_student", root / "notemplate")
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    for f in dst.glob("chat_template.*"):
        f.unlink()
    return base(tiny, root, f"model.path={dst}")


def image(mode, size):
    from PIL import Image

    return Image.new(mode, size)


CASES = [
    # ------------------------------------------------------------------ configs and overrides
    Case("unknown-key", "config", lambda t, r: base(t, r, "trainer.totl_steps=3"), "trainer.totl_steps"),
    Case("wrong-type", "config", lambda t, r: base(t, r, "trainer.total_steps=abc"), "trainer.total_steps"),
    Case("bad-choice", "config", lambda t, r: base(t, r, "algorithm.method=ppo"), "algorithm.method"),
    Case("negative-steps", "config", lambda t, r: base(t, r, "trainer.total_steps=-1"), "trainer.total_steps"),
    Case("zero-prompts", "config", lambda t, r: base(t, r, "trainer.prompts_per_step=0"), "prompts_per_step"),
    Case("zero-micro-batch", "config", lambda t, r: base(t, r, "trainer.micro_batch_size=0"), "micro_batch_size"),
    Case("zero-samples", "config", lambda t, r: base(t, r, "rollout.n=0"), "rollout.n"),
    Case("negative-temperature", "config", lambda t, r: base(t, r, "rollout.temperature=-1"), "temperature"),
    Case("top-p-above-1", "config", lambda t, r: base(t, r, "rollout.top_p=1.5"), "top_p"),
    Case("negative-lr", "config", lambda t, r: base(t, r, "optim.lr=-1"), "optim.lr"),
    Case("keep-last-0", "config", lambda t, r: base(t, r, "checkpoint.keep_last=0"), "keep_last"),
    Case("bad-on-signal", "config", lambda t, r: base(t, r, "checkpoint.on_signal=maybe"), "on_signal"),
    Case("negative-bad-steps", "config", lambda t, r: base(t, r, "trainer.max_bad_steps=-1"), "max_bad_steps"),
    Case("override-without-value", "config", lambda t, r: base(t, r, "trainer.total_steps"), "key=value"),
    Case("config-file-missing", "config", lambda t, r: ["train", str(r / "nope.yaml")], "config file not found"),
    Case("config-not-yaml", "config", lambda t, r: ["train", str(_write(r / "c.yaml", "a: [1, 2\n"))],
         "cannot parse"),
    Case("config-a-list", "config", lambda t, r: ["train", str(_write(r / "c.yaml", "- 1\n- 2\n"))], "c.yaml"),
    Case("run-dir-in-use", "config", lambda t, r: (_write(r / "run" / "metrics.jsonl", "{}\n"), base(t, r))[1],
         "already holds a run"),
    Case("resume-changed-config", "config",
         lambda t, r: (_write(r / "run" / "run_config.yaml", "algorithm:\n  method: opd\n"),
                       _write(r / "run" / "metrics.jsonl", '{"step": 1}\n'),  # a run: it logged a step
                       base(t, r, "trainer.resume=true"))[2], "cannot resume"),
    Case("resume-run-dir-missing", "config", lambda t, r: ["train", "--resume", str(r / "runs" / "nope")],
         "run directory"),
    Case("resume-run-dir-override", "config",
         lambda t, r: (_started_run(t, r), ["train", "--resume", str(r / "run"), "optim.lr=0.1"])[1],
         "drop that override"),
    Case("resume-nothing", "config", lambda t, r: ["train", "--resume", f"trainer.output_dir={r / 'empty'}"],
         "nothing to resume"),
    # ------------------------------------------------------------------ datasets
    Case("data-missing", "data", lambda t, r: base(t, r, data=str(r / "missing.jsonl")), "missing.jsonl"),
    Case("data-empty", "data", lambda t, r: base(t, r, data=jsonl(r, [])), "data.jsonl"),
    Case("invalid-json-line", "data", lambda t, r: base(t, r, data=jsonl(r, ['{"id": "a", "problem": '])),
         "data.jsonl"),
    Case("missing-prompt-field", "data", lambda t, r: base(t, r, data=jsonl(r, [{"id": "a", "answer": "1"}])),
         "problem"),
    Case("prompt-not-text", "data",
         lambda t, r: base(t, r, data=jsonl(r, [{"id": "a", "problem": [1, 2], "answer": "1"}])), "problem"),
    Case("answer-missing", "data", lambda t, r: base(t, r, data=jsonl(r, [{"id": "a", "problem": "q"}])), "answer"),
    Case("non-utf8-text", "data",
         lambda t, r: base(t, r, data=str(_write_bytes(r / "latin.jsonl", '{"problem": "caf\xe9", "answer": "1"}\n'
                                                                         .encode("latin-1")))), "latin.jsonl"),
    Case("image-file-missing", "data",
         lambda t, r: vlm(t, r, jsonl(r, [{"id": "a", "problem": "q", "answer": "1", "images": ["nope.png"]}])),
         "nope.png"),
    Case("image-zero-bytes", "data", lambda t, r: vlm(t, r, vlm_row(r, b"")), "img.png"),
    Case("image-not-an-image", "data", lambda t, r: vlm(t, r, vlm_row(r, b"this is text, not a PNG")), "img.png"),
    Case("image-decompression-bomb", "data", lambda t, r: vlm(t, r, vlm_row(r, image=image("1", (20000, 20000)))),
         "img.png"),
    Case("image-list-not-a-list", "data",
         lambda t, r: vlm(t, r, jsonl(r, [{"id": "a", "problem": "q", "answer": "1", "images": 5}])),
         "unsupported image value"),
    # ------------------------------------------------------------------ models
    Case("model-path-missing", "models", lambda t, r: base(t, r, f"model.path={r / 'nomodel'}"), "nomodel"),
    Case("model-path-misspelt", "models",
         lambda t, r: (copy_model(t / "text_student", r / "models" / "student"),
                       base(t, r, f"model.path={r / 'models' / 'studnet'}"))[1], "did you mean"),
    Case("model-is-a-run-dir", "models",
         lambda t, r: (_write(r / "old" / "run_config.yaml", "{}\n"), (r / "old" / "checkpoints").mkdir(),
                       base(t, r, f"model.path={r / 'old'}"))[2], "training run directory"),
    Case("hub-id-not-cached-offline", "models", lambda t, r: base(t, r, "model.path=nobody/no-such-model"),
         "not in the Hugging Face cache"),
    Case("model-without-config", "models",
         lambda t, r: base(t, r, f"model.path={copy_model(t / 'text_student', r / 'm', drop=['config.json'])}"),
         "config"),
    Case("unknown-architecture", "models",
         lambda t, r: base(t, r, f"model.path={copy_model(t / 'text_student', r / 'm', edit=_bogus_arch)}"),
         "no-such-arch"),
    Case("pickled-weights", "models", pickled, "pickled weights"),
    Case("no-chat-template", "models", no_template, "chat template"),
    Case("teacher-other-tokenizer", "models", lambda t, r: base(t, r, f"teacher.path={t / 'text_other_tok'}"),
         "tokeniz"),
    Case("teacher-path-missing", "models", lambda t, r: base(t, r, f"teacher.path={r / 'noteacher'}"), "noteacher"),
    # ------------------------------------------------------------------ the command line
    Case("unknown-command", "cli", lambda t, r: ["fly"], "invalid choice"),
    Case("unknown-flag", "cli", lambda t, r: ["train", "--fast"], "--fast"),
    Case("eval-without-model", "cli", lambda t, r: ["eval"], "gndpo eval takes MODEL DATA"),
    Case("export-missing-run", "cli", lambda t, r: ["export", str(r / "norun")], "norun"),
    Case("plot-missing-run", "cli", lambda t, r: ["plot", str(r / "norun")], "norun"),
    Case("dry-run-bad-memory", "cli", lambda t, r: base(t, r, "--dry-run", "--gpu-memory", "lots"), "lots"),
    Case("serve-open-without-key", "cli", lambda t, r: ["serve-teacher", str(t / "text_teacher"), "--host",
                                                         "0.0.0.0"], "key"),
    Case("lab-zero-jobs", "cli", lambda t, r: ["lab", "--jobs", "0", "--out", str(r / "lab")], "--jobs"),
]


def _started_run(tiny: Path, root: Path) -> Path:
    """``root/run`` as a run leaves it after its first step: the full config it stored and one metrics line."""
    import yaml

    from gndpo.config import load_config, to_dict

    cfg = load_config(None, base(tiny, root)[1:])
    _write(root / "run" / "run_config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return _write(root / "run" / "metrics.jsonl", '{"step": 1}\n')


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _bogus_arch(cfg: dict) -> None:
    cfg["model_type"] = "no-such-arch"
    cfg["architectures"] = ["NoSuchArchForCausalLM"]
