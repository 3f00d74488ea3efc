"""The nine paper presets (configs/paper/internvl3_5-{1b,2b,4b}-{gspo,opd,gndpo}.yaml) field by field against
the paper's Table 2 (arXiv 2606.09091) and InternVL3.5's own image settings. Every value carries its source."""
from pathlib import Path

import pytest
import yaml

from gndpo.config import load_config, to_dict

PAPER = Path(__file__).resolve().parents[1] / "configs" / "paper"
SIZES = ("1b", "2b", "4b")
METHODS = ("gspo", "opd", "gndpo")

# Shared by every run: value, source.
COMMON = {
    "model.dtype": ("float32", "gndpo choice, as verl's FSDP actor: float32 master weights and AdamW state (at lr "
                               "1e-6 an update rounds away on bf16 weights; tests/test_precision.py)"),
    "model.compute_dtype": ("bfloat16", "gndpo choice, as verl's FSDP mixed precision: bf16 forward/backward"),
    "model.gradient_checkpointing": (True, "gndpo choice: 16k-token responses do not fit otherwise"),
    "data.train": ("hiyouga/geometry3k", "paper Sec. 4.1: trained on Geometry3K (hub copy used by the verl recipes)"),
    "data.format": ("geometry3k", "the adapter for that dataset's schema"),
    "data.split": ("train", "paper Sec. 4.1: the training split"),
    "data.prompt_suffix": ("paper", "paper App. A.2: think inside <think></think>, answer in \\boxed{}"),
    "data.max_prompt_length": (8192, "paper Table 2: max prompt length 8192"),
    "data.max_image_tiles": (12, "InternVL3.5-HF image processor: max_patches 12 (InternVL's max_dynamic_patch 12, "
                                 "plus a thumbnail); the official verl code uses the model's own processor"),
    "rollout.n": (16, "paper Table 2: 16 responses per prompt"),
    "rollout.temperature": (1.0, "paper Table 2: rollout temperature 1.0"),
    "rollout.top_p": (1.0, "paper Table 2: sampling from the full distribution (no nucleus truncation)"),
    "rollout.max_new_tokens": (16384, "paper Table 2: max response length 16384"),
    "rollout.backend": ("vllm", "gndpo choice: vLLM sampling, one engine per rank, asleep between rollouts (the "
                                "official code samples with vLLM too)"),
    "rollout.vllm.gpu_memory_utilization": (0.5, "gndpo choice: the engine's share of a GPU while it samples; with "
                                                 "the other choices here every preset fits 8 x 80 GB by its plan"),
    "algorithm.reward_clamp": (5.0, "official core_algos: clamp(teacher_lp - student_lp, -5, 5)"),
    "algorithm.clip_low": (0.2, "official run scripts: clip_ratio_low 0.2"),
    "algorithm.clip_high": (0.2, "official run scripts: clip_ratio_high 0.2"),
    "algorithm.loss_agg_mode": ("seq-mean-token-mean", "official run scripts: loss_agg_mode seq-mean-token-mean"),
    "algorithm.policy_loss": ("gspo_token", "paper Sec. 3: GSPO-token clipped objective for every method"),
    "algorithm.epochs": (1, "paper Table 2: one optimizer step per rollout batch"),
    "algorithm.mini_batches": (1, "paper Table 2: one optimizer step per rollout batch"),
    "optim.lr": (1e-6, "paper Table 2: AdamW, learning rate 1e-6"),
    "optim.warmup_steps": (0, "paper Table 2: constant learning rate"),
    "optim.weight_decay": (0.01, "paper Table 2: weight decay 0.01"),
    "optim.grad_clip": (1.0, "paper Table 2: gradient clipping 1.0"),
    "trainer.total_steps": (65, "paper Table 2: 65 training steps"),
    "trainer.prompts_per_step": (32, "paper Table 2: 32 prompts per step"),
    "checkpoint.every": (5, "gndpo choice: a checkpoint every 5 of the 65 steps"),
    "model.lora.rank": (0, "paper: full-parameter training, no LoRA"),
}
# Per method: value, source.
BY_METHOD = {
    "gndpo": {"algorithm.advantage": ("gndpo", "paper Eq. 4: z-score of the clamped log-ratio over the batch"),
              "algorithm.scope": ("batch", "paper Sec. 3.2: statistics pooled over every response token of the batch"),
              "teacher.path": ("OpenGVLab/InternVL3_5-8B-HF", "paper Sec. 4.1: InternVL3.5-8B teacher"),
              "teacher.dtype": ("bfloat16", "gndpo choice (forward only, the dtype it was released in)"),
              "teacher.micro_batch_size": (4, "gndpo choice: sequences per teacher forward (plan: teacher scoring)")},
    "opd": {"algorithm.advantage": ("opd", "paper Eq. 2: the clamped log-ratio itself"),
            "algorithm.scope": ("none", "paper Eq. 2: no normalization"),
            "teacher.path": ("OpenGVLab/InternVL3_5-8B-HF", "paper Sec. 4.1: InternVL3.5-8B teacher"),
            "teacher.dtype": ("bfloat16", "gndpo choice (forward only, the dtype it was released in)"),
            "teacher.micro_batch_size": (4, "gndpo choice: sequences per teacher forward (plan: teacher scoring)")},
    "gspo": {"algorithm.advantage": ("grpo", "paper Sec. 4.2: GSPO on 0/1 rewards normalized per prompt group"),
             "algorithm.outcome_reward": ("math", "paper Sec. 4.2: 1 if the \\boxed{} answer verifies, else 0"),
             "teacher.path": (None, "GSPO learns from outcome rewards; no teacher")},
}


def expected(size: str, method: str) -> dict:
    out = {**COMMON, **BY_METHOD[method],
           "model.path": (f"OpenGVLab/InternVL3_5-{size.upper()}-HF", f"paper Sec. 4.1: InternVL3.5-{size.upper()} "
                                                                       "student (the -HF transformers release)"),
           "algorithm.method": (method, "the run's method"),
           "trainer.micro_batch_size": (2 if size == "4b" else 4, "gndpo choice: gradient accumulation (the update "
                                        "equals the full batch's); 2 for 4B keeps its update phase under 80 GB"),
           "trainer.output_dir": (f"runs/paper/internvl3_5-{size}-{method}", "gndpo choice: one directory per run")}
    return {k: v for k, (v, _source) in out.items()}


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_there_are_nine():
    assert sorted(p.name for p in PAPER.glob("*.yaml")) == sorted(
        f"internvl3_5-{s}-{m}.yaml" for s in SIZES for m in METHODS)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("size", SIZES)
def test_preset_matches_the_paper(size, method):
    path = PAPER / f"internvl3_5-{size}-{method}.yaml"
    want = expected(size, method)
    written = flat(yaml.safe_load(path.read_text()))
    # every field the file sets has a cited expected value (nothing in the file goes unchecked)
    assert set(written) <= set(want), sorted(set(written) - set(want))
    resolved = flat(to_dict(load_config(path)))
    for key, value in want.items():
        assert resolved[key] == value, f"{path.name}: {key} = {resolved[key]!r}, expected {value!r}"
