"""verl's trainer_mode 'gndpo' on the driver: its advantage step runs verl's own ``_compute_advantage`` against an
in-memory TransferQueue holding what verl's agent loop, teacher servers and actor put there; plus the shipped
config and how the plugin is loaded."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from verl_batches import random_batch

from gndpo.core import compute_advantages


class FakeTransferQueue:
    """transfer_queue's kv_batch_get / kv_batch_put over a dict: per-sample fields, returned as verl's TensorDicts
    (nested jagged tensors over samples; non-tensors as NonTensorStack)."""

    def __init__(self, samples: dict[str, dict]):
        self.store = samples

    def kv_batch_get(self, keys, partition_id, select_fields=None):
        from tensordict import NonTensorStack, TensorDict

        fields = [f for f in (select_fields or self.store[keys[0]]) if f in self.store[keys[0]]]
        out = {}
        for f in fields:
            values = [self.store[k][f] for k in keys]
            if isinstance(values[0], torch.Tensor):
                out[f] = torch.nested.as_nested_tensor(values, layout=torch.jagged)
            else:
                out[f] = NonTensorStack(*values)
        return TensorDict(out, batch_size=[len(keys)])

    def kv_batch_put(self, keys, partition_id, fields=None, tags=None):
        for f in fields.keys():
            rows = fields[f].unbind(0)
            for k, row in zip(keys, rows):
                self.store[k][f] = row.clone()


def agent_loop_samples(seed, batch, length, pattern, width=1, group=4):
    """What verl stores per response (prompt p, response r): teacher_logprobs / teacher_ids over p + r with entry i
    scoring token i + 1 (the last entry a 0 pad, as verl's teacher extraction appends), the actor's old_log_probs
    over r, the reward function's score on r's last token. Returns (samples, teacher, student, mask) with the
    response-aligned (B, L) tensors gndpo.core takes."""
    teacher, student, mask = random_batch(seed, batch, length, pattern)
    g = torch.Generator().manual_seed(seed)
    samples = {}
    lengths = []
    for i in range(batch):
        n = int(mask[i].nonzero().max()) + 1 if mask[i].any() else 1
        lengths.append(n)
        prompt = torch.randint(3, 90, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g)
        response = torch.randint(3, 90, (n,), generator=g)
        sequence = torch.cat([prompt, response])
        ids = torch.cat([sequence[1:], torch.zeros(1, dtype=torch.long)])  # entry i: token i + 1
        lp = torch.cat([-torch.rand(len(prompt) - 1, generator=g), teacher[i, :n], torch.zeros(1)])
        if width > 1:  # a top-k teacher: k columns
            lp = lp[:, None].repeat(1, width)
            ids = ids[:, None].repeat(1, width)
        else:
            lp, ids = lp[:, None], ids[:, None]
        score = torch.zeros(n)
        score[-1] = float(i % 2)
        samples[f"p{i // group}_{i % group}_0"] = {
            "uid": f"p{i // group}", "prompts": prompt, "responses": response, "response_mask": mask[i, :n].clone(),
            "teacher_logprobs": lp, "teacher_ids": ids.int(), "old_log_probs": student[i, :n].clone(),
            "rm_scores": score,
        }
    return samples, teacher, student, mask


def run_advantage_step(monkeypatch, samples, estimator="gndpo", algorithm=None):
    import transfer_queue
    from omegaconf import OmegaConf
    from transfer_queue import KVBatchMeta

    from gndpo.integrations.verl_trainer import GNDPOTrainer

    fake = FakeTransferQueue(samples)
    monkeypatch.setattr(transfer_queue, "kv_batch_get", fake.kv_batch_get)
    monkeypatch.setattr(transfer_queue, "kv_batch_put", fake.kv_batch_put)
    trainer = GNDPOTrainer.__new__(GNDPOTrainer)  # the advantage step needs only the config
    trainer.config = OmegaConf.create({
        "algorithm": {"adv_estimator": estimator, "gamma": 1.0, "lam": 1.0, "use_kl_in_reward": False,
                      "norm_adv_by_std_in_grpo": True, **(algorithm or {})},
        "actor_rollout_ref": {"rollout": {"n": 4}},
    })
    keys = list(samples)
    metrics = {}
    trainer._compute_advantage(KVBatchMeta(keys=keys, tags=[{}] * len(keys), partition_id="train"), metrics)
    return fake, keys, metrics


def padded(fake, keys, field, length):
    out = torch.zeros(len(keys), length)
    for i, k in enumerate(keys):
        row = fake.store[k][field]
        out[i, : len(row)] = row
    return out


@pytest.mark.parametrize("pattern", ["right", "holes", "empty_row"])
@pytest.mark.parametrize("estimator,core_name", [("gndpo", "gndpo"), ("gndpo_opd", "opd")])
def test_advantage_step_equals_gndpo_core(monkeypatch, estimator, core_name, pattern):
    samples, teacher, student, mask = agent_loop_samples(11, 24, 14, pattern)
    scores = {k: s["rm_scores"].clone() for k, s in samples.items()}
    fake, keys, metrics = run_advantage_step(monkeypatch, samples, estimator)
    got = padded(fake, keys, "advantages", 14)
    want, stats = compute_advantages(core_name, teacher_logprobs=teacher, student_logprobs=student, response_mask=mask)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(padded(fake, keys, "returns", 14), want, atol=1e-6, rtol=0)
    for k in keys:  # the reward function's scores are back for verl's metrics
        assert torch.equal(fake.store[k]["rm_scores"], scores[k])
    for name in ("log_ratio_mean", "reward_mean", "reward_std", "clamp_frac", "num_tokens"):
        assert metrics[f"gndpo/{name}"] == pytest.approx(stats[name], abs=1e-6), name
    assert 0 < metrics["gndpo/clamp_frac"] < 1


def test_options_reach_the_advantage_step(monkeypatch):
    samples, teacher, student, mask = agent_loop_samples(12, 16, 10, "right")
    fake, keys, _ = run_advantage_step(monkeypatch, samples, algorithm={"gndpo": {"clamp": 2.0, "scope": "group"}})
    want, _ = compute_advantages("gndpo", teacher_logprobs=teacher, student_logprobs=student, response_mask=mask,
                                 clamp=2.0, scope="group", group_ids=torch.arange(16) // 4)
    torch.testing.assert_close(padded(fake, keys, "advantages", 10), want, atol=1e-6, rtol=0)


def test_missing_or_unusable_teacher_is_named(monkeypatch):
    samples, *_ = agent_loop_samples(13, 8, 6, "full")
    for s in samples.values():
        del s["teacher_logprobs"], s["teacher_ids"]
    with pytest.raises(ValueError, match=r"needs \['teacher_logprobs', 'teacher_ids'\].*set distillation.enabled=true"):
        run_advantage_step(monkeypatch, samples)
    samples, *_ = agent_loop_samples(13, 8, 6, "full", width=4)
    with pytest.raises(ValueError, match="top-4 log-probs.*loss_mode to a single-sample estimator"):
        run_advantage_step(monkeypatch, samples)
    samples, *_ = agent_loop_samples(13, 8, 6, "full")
    first = next(iter(samples.values()))
    first["teacher_ids"] = first["teacher_ids"] + 1  # a teacher that tokenized differently
    with pytest.raises(ValueError, match="teacher's token ids differ from the sampled response.*one tokenizer"):
        run_advantage_step(monkeypatch, samples)


def test_trainer_refuses_other_estimators_before_loading_anything():
    from omegaconf import OmegaConf

    from gndpo.integrations.verl_trainer import GNDPOTrainer

    with pytest.raises(ValueError, match="trainer_mode 'gndpo' feeds the distillation reward to algorithm.adv_estim"
                                         "ator gndpo or gndpo_opd, got 'grpo'"):
        GNDPOTrainer(OmegaConf.create({"algorithm": {"adv_estimator": "grpo"}}))
    with pytest.raises(ValueError, match=r"algorithm.gndpo has unknown key\(s\) \['clip'\]"):
        GNDPOTrainer(OmegaConf.create({"algorithm": {"adv_estimator": "gndpo", "gndpo": {"clip": 1}}}))


def shipped_config(*overrides):
    from hydra import compose, initialize_config_module

    required = ["actor_rollout_ref.model.path=/student", "actor_rollout_ref.rollout.name=vllm",
                "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2", "distillation.n_gpus_per_node=2",
                "distillation.nnodes=1", "distillation.teacher_models.teacher_model.model_path=/teacher",
                "distillation.teacher_models.teacher_model.num_replicas=1"]
    with initialize_config_module(config_module="gndpo.integrations.verl_configs", version_base=None):
        return compose(config_name="gndpo", overrides=[*required, *overrides])


def test_shipped_config_composes_with_verls_own_and_selects_gndpo():
    from verl.trainer.ppo.core_algos import get_adv_estimator_fn, get_policy_loss_fn
    from verl.trainer.ppo.v1 import get_trainer_cls
    from verl.utils.config import omega_conf_to_dataclass

    from gndpo.integrations import verl as plugin
    from gndpo.integrations.verl_trainer import GNDPOTrainer

    cfg = shipped_config()
    assert get_adv_estimator_fn(cfg.algorithm.adv_estimator) is plugin.compute_gndpo_advantage
    assert get_trainer_cls(cfg.trainer.v1.trainer_mode) is GNDPOTrainer
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)  # verl's own validation of the actor section
    assert get_policy_loss_fn(actor.policy_loss.loss_mode) is plugin.compute_policy_loss_gndpo_gspo_token
    assert (actor.loss_agg_mode, actor.clip_ratio_low, actor.clip_ratio_high) == ("seq-mean-token-mean", 0.2, 0.2)
    assert (actor.ppo_mini_batch_size, actor.ppo_epochs, actor.optim.lr) == (cfg.data.train_batch_size, 1, 1e-6)
    distillation = omega_conf_to_dataclass(cfg.distillation)  # verl's checks of the teacher pool and loss
    assert distillation.enabled and distillation.distillation_loss.loss_settings.use_estimator  # sampled token's lp
    loss = distillation.distillation_loss
    assert loss.use_task_rewards and loss.distillation_loss_coef == 0  # the actor trains on the driver's advantages
    assert cfg.algorithm.gndpo.clamp == 5.0 and not cfg.algorithm.use_kl_in_reward
    opd = shipped_config("algorithm.adv_estimator=gndpo_opd")
    assert get_adv_estimator_fn(opd.algorithm.adv_estimator) is plugin.compute_opd_advantage


def _registered_in_fresh_process(**env):
    code = ("import verl; from verl.trainer.ppo import core_algos as c; "
            "print(sorted(n for n in c.ADV_ESTIMATOR_REGISTRY if n.startswith('gndpo')), "
            "'gndpo_gspo_token' in c.POLICY_LOSS_REGISTRY)")
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("VERL_USE_EXTERNAL")}
    out = subprocess.run([sys.executable, "-c", code], env={**run_env, **env}, capture_output=True, text=True,
                         timeout=300, check=True)
    return out.stdout.strip().splitlines()[-1]


def test_plugin_loads_through_entry_point_or_external_modules():
    # this process: verl found gndpo's entry point when the tests imported it (VERL_USE_EXTERNAL_PLUGINS=auto)
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="verl.plugins") if e.name == "gndpo"]
    assert ep.value == "gndpo.integrations.verl"
    assert _registered_in_fresh_process(VERL_USE_EXTERNAL_PLUGINS="none") == "[] False"
    assert _registered_in_fresh_process(VERL_USE_EXTERNAL_PLUGINS="none",
                                        VERL_USE_EXTERNAL_MODULES="gndpo.integrations.verl") == \
        "['gndpo', 'gndpo_opd'] True"


def test_no_cpu_trainer_step_in_verl_0_9():
    """Why the tier runs verl's advantage step and actor loss but not a trainer step: verl 0.9.1 knows no CPU
    platform (its resource pools ask Ray for GPUs and it falls back to CUDA here) and rolls out only through vLLM,
    SGLang or TensorRT-LLM servers. If this starts failing, a newer verl may run on CPUs: add a trainer step."""
    from verl.plugin.platform.platform_manager import PlatformRegistry
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    assert "cpu" not in {name.lower() for name in PlatformRegistry._platforms}
    assert set(RolloutReplicaRegistry._registry) == {"vllm", "sglang", "trtllm"}
