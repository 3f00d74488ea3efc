"""verl's trainer_mode ``gndpo``: verl's synchronous V1 trainer with the distillation reward on the driver.

Stock verl (0.9.x) hands an advantage estimator only ``token_level_rewards`` (its reward function's scores), and
its own on-policy distillation computes the teacher-student log-ratio per micro-batch inside the actor, where no
batch-wide statistic exists. This trainer changes one step of ``PPOTrainerSync``: before verl's own advantage
computation (``_compute_advantage``, on the driver, whole batch) it reads from TransferQueue

- ``teacher_logprobs``: the teacher's log-prob of each token, from verl's teacher servers
  (``distillation.enabled=true`` with a single-sample loss mode such as ``k1``, which asks the server for the
  sampled token's log-prob rather than a top-k list), over the whole sequence, entry i scoring token i+1;
- ``old_log_probs``: the student's log-probs of the sampled tokens, recomputed by verl's actor (the paper's
  student log-probs: the trainer's forward, not the sampler's),

writes ``teacher_lp - old_lp`` at each response token as the reward verl's advantage step reads (``rm_scores``),
runs verl's step unchanged (which calls the ``gndpo`` / ``gndpo_opd`` estimator), and puts the task scores back,
so verl's score metrics still report the reward function (e.g. answer accuracy). It adds ``gndpo/*`` metrics:
the log-ratio and reward statistics, the clamped fraction and the advantages' spread.
"""

from __future__ import annotations

import torch
import transfer_queue as tq
from tensordict import TensorDict
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.workers.utils.padding import response_from_nested, response_to_nested

from gndpo.core import compute_advantages
from gndpo.integrations.verl import ESTIMATORS, estimator_options

TRAINER = "gndpo"
FIELDS = ["responses", "response_mask", "old_log_probs", "teacher_logprobs", "teacher_ids", "rm_scores"]


def _first_column(nested: torch.Tensor) -> torch.Tensor:
    """(B, j, K) nested -> (B, j) nested, column 0; a (B, j) nested tensor is returned as is."""
    values = nested.values()
    if values.dim() == 1:
        return nested
    return torch.nested.nested_tensor_from_jagged(values[:, 0].contiguous(), offsets=nested.offsets())


def distillation_log_ratio(data: TensorDict) -> torch.Tensor:
    """teacher_lp - old_lp at each response token, nested (B, R_i) like verl's ``response_mask``.

    ``data`` holds verl's TransferQueue fields (nested over samples): ``teacher_logprobs`` / ``teacher_ids`` over
    prompt + response (entry i scores token i+1, as verl's actor log-probs), ``responses``, ``response_mask``,
    ``old_log_probs`` over the response. Checks that the teacher scored exactly the sampled tokens.
    """
    missing = [k for k in ("teacher_logprobs", "teacher_ids", "old_log_probs") if k not in data.keys()]
    if missing:
        raise ValueError(f"trainer_mode {TRAINER!r} needs {missing} in the batch: set distillation.enabled=true with "
                         "a teacher under distillation.teacher_models (verl's teacher servers score each sample)")
    width = data["teacher_logprobs"].values().shape[1:]
    if len(width) == 1 and width[0] != 1:
        raise ValueError(f"the teacher returned top-{width[0]} log-probs, which need not include the sampled token; "
                         "set distillation.distillation_loss.loss_mode to a single-sample estimator (k1, k3)")
    mask = data["response_mask"]
    teacher_lp = response_from_nested(_first_column(data["teacher_logprobs"]), mask).to_padded_tensor(0.0)  # (B, R)
    teacher_ids = response_from_nested(_first_column(data["teacher_ids"]), mask).to_padded_tensor(-1)  # (B, R)
    responses = data["responses"].to_padded_tensor(-1)  # (B, R)
    valid = mask.to_padded_tensor(0).bool()  # (B, R)
    wrong = int(((teacher_ids != responses) & valid).sum())
    if wrong:
        raise ValueError(f"the teacher's token ids differ from the sampled response at {wrong} of {int(valid.sum())} "
                         "response tokens: teacher and student must share one tokenizer")
    old_lp = data["old_log_probs"].to_padded_tensor(0.0)  # (B, R)
    log_ratio = torch.where(valid, teacher_lp.float() - old_lp.float(), 0.0)  # (B, R)
    return response_to_nested(log_ratio, mask)


@register_trainer(TRAINER)
class GNDPOTrainer(PPOTrainerSync):
    """PPOTrainerSync whose reward, for the gndpo estimators, is the teacher-student log-ratio per token."""

    def __init__(self, config):
        name = config.algorithm.adv_estimator
        if name not in ESTIMATORS:
            raise ValueError(f"trainer_mode {TRAINER!r} feeds the distillation reward to algorithm.adv_estimator "
                             f"{' or '.join(sorted(ESTIMATORS))}, got {name!r}; set one of them, or another "
                             "trainer_mode")
        estimator_options(config.algorithm)  # a bad algorithm.gndpo fails here, before any model loads
        super().__init__(config)

    def _compute_advantage(self, batch, metrics: dict):
        name = self.config.algorithm.adv_estimator
        keys, partition = batch.keys, batch.partition_id
        data = tq.kv_batch_get(keys=keys, partition_id=partition, select_fields=FIELDS)
        log_ratio = distillation_log_ratio(data)  # nested (B, R_i)
        task_scores = data["rm_scores"] if "rm_scores" in data.keys() else None
        tq.kv_batch_put(keys=keys, partition_id=partition, fields=TensorDict({"rm_scores": log_ratio},
                                                                               batch_size=len(keys)))
        try:
            batch = super()._compute_advantage(batch, metrics)
        finally:
            if task_scores is not None:
                tq.kv_batch_put(keys=keys, partition_id=partition, fields=TensorDict({"rm_scores": task_scores},
                                                                                       batch_size=len(keys)))
        mask = data["response_mask"].to_padded_tensor(0)  # (B, R)
        ratio = log_ratio.to_padded_tensor(0.0)  # (B, R)
        options = {k: v for k, v in estimator_options(self.config.algorithm).items() if k != "scope"}
        _, stats = compute_advantages(ESTIMATORS[name], teacher_logprobs=ratio,
                                      student_logprobs=torch.zeros_like(ratio), response_mask=mask, scope="none",
                                      **options)
        metrics.update({f"gndpo/{k}": v for k, v in stats.items() if not k.startswith("adv_")})
        return batch
