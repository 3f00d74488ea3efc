"""The teacher features on vLLM (float32, CPU): a vLLM teacher scores after its privileged prompt exactly as a plain
forward over that prompt + response alone, with an engine sized for the longer prompts; several teachers, one of
them the student itself, train with the vLLM sampler."""
import math

import pytest
import torch

from gndpo.data.loaders import load_records
from gndpo.models import load_model
from gndpo.rollout.base import SamplingParams
from gndpo.teacher.context import ContextTeacher, privileged
from gndpo.teacher.vllm import VLLMTeacher
from gndpo.train import train
from gndpo.vllm_engine import EngineOptions

from scoring_reference import alone

pytestmark = pytest.mark.vllm
CONTEXT = "Reference answer: {answer}"


@pytest.mark.parametrize("at", ["prompt", "system"])
def test_vllm_teacher_scores_after_its_privileged_prompt_as_alone(lab_pair, vllm_dir, at):
    from gndpo import vllm_engine as engine  # noqa: F401  (engine env before HF loads)
    from gndpo.rollout.hf import HFRollout

    student, teacher = load_model(lab_pair[0]), load_model(lab_pair[1])
    records = load_records(str(vllm_dir / "vlm" / "train.jsonl"), id_key="id")[:3]
    torch.manual_seed(2)
    ro = HFRollout(student.model, student.processor, suffix=None).generate(records, SamplingParams(n=2,
                                                                                                   max_new_tokens=12))
    vllm_teacher = ContextTeacher(VLLMTeacher(lab_pair[1], teacher.processor, options=EngineOptions(
        max_model_len=512, max_images=1), suffix=None, micro_batch_size=4), CONTEXT, at)
    try:
        got = vllm_teacher.score(ro).logprobs
    finally:
        vllm_teacher.close()
    rich = [privileged(r, CONTEXT, at) for r in ro.records]
    expected = torch.zeros(ro.response_ids.shape)
    for b in range(ro.size):
        n = int(ro.response_mask[b].sum())
        expected[b, :n] = alone(teacher.model, teacher.processor, rich[int(ro.prompt_index[b])], ro.response_ids[b], n)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_the_engine_of_a_teacher_with_context_takes_the_longer_prompts(lab_pair, vllm_dir):
    from gndpo.backends import context_tokens
    from gndpo.config import TeacherConfig
    from gndpo.vllm_engine import prompt_ids

    processor = load_model(lab_pair[1]).processor
    records = load_records(str(vllm_dir / "vlm" / "train.jsonl"), id_key="id")
    te = TeacherConfig(context=CONTEXT)
    extra = context_tokens(te, processor, records, suffix=None, system_prompt=None)
    longest = max(len(p) - len(q) for p, q in zip(
        prompt_ids(processor, [privileged(r, CONTEXT, "prompt") for r in records], suffix=None, system_prompt=None),
        prompt_ids(processor, records, suffix=None, system_prompt=None)))
    # char-level tokenizer: "Reference answer: " + the answer + a newline, one token per character
    assert extra == longest == len("Reference answer: \n") + max(len(r.answer) for r in records)
    assert context_tokens(TeacherConfig(), processor, records, suffix=None, system_prompt=None) == 0


def test_several_teachers_with_the_vllm_sampler(lab_pair, vllm_dir, tmp_path, run_cfg, read_metrics):
    """The lab teacher for odd records, the student itself (current weights, reference answer) for the rest."""
    import json

    rows = [json.loads(line) for line in open(vllm_dir / "vlm" / "train.jsonl")]
    routed = tmp_path / "routed.jsonl"
    routed.write_text("".join(json.dumps({**r, "images": [str(vllm_dir / "vlm" / r["images"][0])],
                                          "teacher": "self" if i % 2 else "lab"}) + "\n" for i, r in enumerate(rows)))
    out = tmp_path / "run"
    cfg = run_cfg(lab_pair, routed, out, extra=[
        "rollout.backend=vllm", "rollout.sync_check_every=1", "teacher.path=null", "data.teacher_key=teacher",
        f'teachers=[{{name: lab, path: "{lab_pair[1]}"}}, {{name: self, path: self, context: "{CONTEXT}"}}]',
        "algorithm.teacher_norm=per_teacher"])
    train(cfg)
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert math.isfinite(r["loss"]) and r["rollout/sync_gap"] < 1e-5
        shares = r["teacher/lab/token_share"] + r["teacher/self/token_share"]
        assert shares == pytest.approx(1.0)
