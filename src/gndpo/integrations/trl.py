"""GNDPO and the paper's OPD (arXiv 2606.09091) for TRL 1.16 users: ``GNDPOTrainer``, a ``GRPOTrainer`` whose
advantages are gndpo.core's, from a teacher model scoring every sampled token.

Built on the extension points TRL offers for custom advantages: subclassing ``GRPOTrainer`` and overriding
``_generate_and_score_completions`` (the maintainers' answer to requests for custom advantages, trl #4525), whose
output may carry (B, T) advantages, which ``GRPOTrainer``'s loss accepts "to support subclasses". The loss itself
is TRL's, unchanged; both models are scored by GRPOTrainer's own ``_get_per_token_logps_and_entropies`` (as its
loss and reference model are), the teacher through TRL's public ``add_fused_lm_head``.

Exactness. TRL 1.16 has no GSPO-token loss (no ``trl.experimental.gspo_token``; trl #7331). It needs none in
the paper's regime, one optimizer step per generation batch: every optimizer step then sees fresh samples, TRL's
old log-probs are the current ones detached, so TRL's token ratio and GSPO-token's ratio are both exactly 1, nothing
clips, and both losses have the value -A and the gradient -A * d log p per token. With ``loss_type`` "grpo" (the
paper's seq-mean-token-mean; also "dapo" = token-mean, "luspo" = seq-mean-token-sum, "dr_grpo" =
seq-mean-token-sum-norm) the loss equals ``gndpo.core``'s ``gspo_token`` loss. ``GNDPOTrainer`` refuses every
setting that leaves that regime or changes the loss (several steps per generation, KL, entropy terms, masks, vLLM
importance weights), each named in the error.

Statistics: GNDPO's mean and variance run over every completion token of the generation batch, all processes
together (three numbers all-reduced), as in gndpo's own trainer. The student's log-probs are recomputed by a forward
pass of the policy (at TRL's ``temperature``, as TRL's loss sees them); the teacher scores at temperature 1 and must
share the student's tokenizer. Multimodal inputs reach the teacher as they reach the student.
"""

from __future__ import annotations

import torch
from trl import GRPOTrainer
from trl.trainer import add_fused_lm_head

from gndpo.core import compute_advantages

ESTIMATORS = ("gndpo", "opd")
# TRL loss_type -> gndpo.core aggregation; bnpo normalizes each micro-batch by its own tokens, never the batch's.
AGGREGATION = {"grpo": "seq-mean-token-mean", "dapo": "token-mean", "luspo": "seq-mean-token-sum",
               "dr_grpo": "seq-mean-token-sum-norm"}


_FORWARD_KEYS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles",
                 "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


def regime_violations(args) -> list[str]:
    """The GRPOConfig settings that would make TRL's loss differ from gndpo.core's GSPO-token loss."""
    wrong = []
    if args.num_iterations != 1:
        wrong.append(f"num_iterations={args.num_iterations} (needs 1)")
    if args.steps_per_generation != args.gradient_accumulation_steps:
        wrong.append(f"steps_per_generation={args.steps_per_generation} (needs gradient_accumulation_steps="
                     f"{args.gradient_accumulation_steps}: one optimizer step per generation batch)")
    if args.importance_sampling_level != "token":
        wrong.append(f"importance_sampling_level={args.importance_sampling_level!r} (needs 'token')")
    if args.loss_type not in AGGREGATION:
        wrong.append(f"loss_type={args.loss_type!r} (needs one of {', '.join(AGGREGATION)}; 'grpo' is the paper's)")
    for name, needed in (("beta", 0.0), ("entropy_coef", 0.0), ("use_adaptive_entropy", False),
                         ("top_entropy_quantile", 1.0), ("off_policy_mask_threshold", None), ("delta", None)):
        if getattr(args, name) != needed:
            wrong.append(f"{name}={getattr(args, name)!r} (needs {needed!r})")
    if args.use_vllm and args.vllm_importance_sampling_correction:
        wrong.append("vllm_importance_sampling_correction=True with use_vllm (needs False)")
    return wrong


def _check_regime(args) -> None:
    wrong = regime_violations(args)
    if wrong:
        raise ValueError("GNDPOTrainer reproduces gndpo's loss only with one optimizer step per generation batch and "
                         "TRL's plain loss; change: " + "; ".join(wrong))


class GNDPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` with GNDPO (or OPD) advantages from ``teacher_model``; every other argument is GRPOTrainer's.

    ``estimator``: "gndpo" (the clamped log-ratio z-scored over every completion token of the generation batch) or
    "opd" (the clamped log-ratio itself). ``clamp``: the reward bound (5.0 in the paper; None disables).
    ``reward_funcs`` are still required by TRL; their scores are logged, not trained on.
    """

    def __init__(self, *args, teacher_model: torch.nn.Module, estimator: str = "gndpo", clamp: float | None = 5.0,
                 **kwargs):
        if estimator not in ESTIMATORS:
            raise ValueError(f"unknown estimator {estimator!r}; valid: {', '.join(ESTIMATORS)}")
        config = kwargs.get("args", args[2] if len(args) > 2 else None)
        if config is not None:
            _check_regime(config)  # before GRPOTrainer loads anything (e.g. a reference model for beta > 0)
        super().__init__(*args, **kwargs)
        _check_regime(self.args)  # TRL's defaults when args was None
        self.estimator, self.clamp = estimator, clamp
        self.teacher_model = teacher_model.to(self.accelerator.device).eval().requires_grad_(False)
        add_fused_lm_head(self.teacher_model, temperature=1.0, cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32)

    def _reduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        """gndpo.core's all-reduce over the training processes (sum, min or max of a float64 tensor)."""
        if self.accelerator.num_processes == 1:
            return tensor
        gathered = self.accelerator.gather(tensor[None])  # (P, ...)
        return {"sum": gathered.sum(0), "min": gathered.amin(0), "max": gathered.amax(0)}[op]

    def _completion_logprobs(self, model, inputs: dict) -> torch.Tensor:
        """log p(completion token) under ``model``; (B, C). TRL's own scoring, as its loss and reference model use:
        fused LM head at the temperature it was patched with, images split per sample."""
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)  # (B, P + C)
        attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)  # (B, P + C)
        extra = {k: inputs.get(k) for k in _FORWARD_KEYS}
        logps, _, _ = self._get_per_token_logps_and_entropies(
            model, ids, attention, inputs["completion_ids"].size(1), self.args.per_device_train_batch_size, **extra)
        return logps

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        with torch.no_grad():
            student = output.get("old_per_token_logps")  # (B, C): TRL computed it already when it uses vLLM
            if student is None:
                student = self._completion_logprobs(self.model, output)  # (B, C), at TRL's temperature
            teacher = self._completion_logprobs(self.teacher_model, output)  # (B, C), at temperature 1
        mask = output["completion_mask"]  # (B, C)
        if "tool_mask" in output:
            mask = mask * output["tool_mask"]
        advantages, metrics = compute_advantages(self.estimator, teacher_logprobs=teacher, student_logprobs=student,
                                                 response_mask=mask, clamp=self.clamp, reduce=self._reduce)
        output["advantages"] = advantages  # (B, C): GRPOTrainer's loss takes per-token advantages
        mode = "train" if self.model.training else "eval"
        for name, value in metrics.items():
            self._metrics[mode][f"gndpo/{name}"].append(value)
        return output
