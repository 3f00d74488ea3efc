"""Model loading and the student/teacher compatibility check."""
import pytest

from gndpo.errors import ModelError
from gndpo.models import check_compatible, load_model, special_placeholder_ids


def test_loads_text_and_vlm_with_left_padding(tiny_dir):
    text = load_model(str(tiny_dir / "text_student"))
    vlm = load_model(str(tiny_dir / "vlm_student"))
    assert not text.is_vlm and vlm.is_vlm
    assert text.tokenizer.padding_side == "left" and vlm.tokenizer.padding_side == "left"
    # The sampler must never emit the image placeholder or padding.
    ids = special_placeholder_ids(vlm.processor)
    assert vlm.processor.image_token_id in ids and vlm.tokenizer.pad_token_id in ids


def test_identical_tokenizers_pass(tiny_dir):
    a, b = load_model(str(tiny_dir / "text_student")), load_model(str(tiny_dir / "text_teacher"))
    check_compatible(a.processor, b.processor)


def test_chat_template_difference_is_named(tiny_dir):
    a, b = load_model(str(tiny_dir / "text_student")), load_model(str(tiny_dir / "text_teacher"))
    b.tokenizer.chat_template = b.tokenizer.chat_template.replace("<|im_start|>", "<|im_start|> ")
    with pytest.raises(ModelError, match="chat templates render a probe prompt differently"):
        check_compatible(a.processor, b.processor)


def test_eos_difference_is_named(tiny_dir):
    a, b = load_model(str(tiny_dir / "text_student")), load_model(str(tiny_dir / "text_teacher"))
    b.tokenizer.eos_token = "<|endoftext|>"
    with pytest.raises(ModelError, match="EOS tokens differ"):
        check_compatible(a.processor, b.processor)


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelError, match="has no config.json"):
        load_model(str(tmp_path))


def test_misspelt_local_path_fails_at_once_naming_the_directory_meant(tmp_path, monkeypatch):
    import time

    from gndpo.models import load_config

    (tmp_path / "models" / "qwen3_student").mkdir(parents=True)
    (tmp_path / "models" / "qwen3_teacher").mkdir()
    monkeypatch.chdir(tmp_path)
    load_config  # imported: the timing below is the check alone
    start = time.perf_counter()
    with pytest.raises(ModelError) as err:
        load_config("models/qwen3_studnet")
    assert time.perf_counter() - start < 2.0
    assert str(err.value) == ("model path not found: models/qwen3_studnet (did you mean models/qwen3_student or "
                              "models/qwen3_teacher?); give an existing directory or a Hugging Face id like org/name")
    with pytest.raises(ModelError, match=r"models/other \(models holds qwen3_student, qwen3_teacher\)"):
        load_config("models/other", what="teacher")


def test_a_run_directory_given_as_a_model_names_its_checkpoint(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step-000004").mkdir(parents=True)
    (run / "checkpoints" / "step-000004" / "COMPLETE").write_text("step 4\n")
    (run / "run_config.yaml").write_text("{}\n")
    with pytest.raises(ModelError) as err:
        load_model(str(run))
    assert f"its newest checkpoint is {run / 'checkpoints' / 'step-000004'}" in str(err.value)
    assert f"gndpo export {run}" in str(err.value)


def test_tokenizer_mismatch_names_the_tokens(tiny_dir):
    a, b = load_model(str(tiny_dir / "text_student")), load_model(str(tiny_dir / "text_other_tok"))
    with pytest.raises(ModelError) as err:
        check_compatible(a.processor, b.processor)
    student, teacher = a.tokenizer.get_vocab(), b.tokenizer.get_vocab()
    first = min(set(student) - set(teacher), key=student.get)  # the lowest id only the student has
    assert f"only in the student (e.g. {first!r} id {student[first]}, " in str(err.value)
    assert "only in the teacher (e.g. " in str(err.value)


HUB_CHECK = """
import json, sys, time
from gndpo.errors import ModelError
from gndpo.models import load_config, load_model
start = time.perf_counter()
try:
    load_config(sys.argv[1])
    print(json.dumps({"ok": True, "seconds": time.perf_counter() - start}))
    load_model(sys.argv[1])  # weights and tokenizer from the cache too, without asking the hub per file
except ModelError as exc:
    print(json.dumps({"error": str(exc), "seconds": time.perf_counter() - start}))
"""


def _hub_check(path, env_extra, cwd):
    """``load_config(path)`` in a fresh process (huggingface_hub reads its settings at import) whose hub is a closed
    port on this machine: unreachable, as offline clusters are."""
    import json
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: connections are refused
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{port}", OMP_NUM_THREADS="1", **env_extra)
    proc = subprocess.run([sys.executable, "-c", HUB_CHECK, path], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[0]), proc.stderr


def test_hub_id_fails_at_once_when_the_hub_does_not_answer(tmp_path):
    result, stderr = _hub_check("nobody/no-such-model", {"HF_HUB_CACHE": str(tmp_path / "cache")}, tmp_path)
    # "at once": a 1.5 s probe of the hub, not huggingface_hub's retries (27 s before); the bound leaves room for a
    # loaded CI machine (4 s measured here with four other jobs on two cores)
    assert "error" in result and result["seconds"] < 10.0, result
    assert result["error"].startswith("model path not found: nobody/no-such-model is not a local directory, not in "
                                      "the Hugging Face cache, and the hub is unreachable (")
    assert "Retrying" not in stderr and "thrown while requesting" not in stderr


def test_cached_hub_id_loads_without_the_hub(tiny_dir, tmp_path):
    # a hub id already in the cache: config, weights and tokenizer read from it while the hub does not answer
    import shutil

    repo = tmp_path / "cache" / "models--someorg--tiny"
    commit = "0" * 40
    shutil.copytree(tiny_dir / "text_student", repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    result, stderr = _hub_check("someorg/tiny", {"HF_HUB_CACHE": str(tmp_path / "cache")}, tmp_path)
    assert result.get("ok"), result
    assert "Retrying" not in stderr and "thrown while requesting" not in stderr
