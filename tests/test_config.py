"""Config: presets, overrides, validation, generated help."""
import pytest

from gndpo.config import PRESETS, help_text, load_config
from gndpo.data.sampler import PromptSampler
from gndpo.errors import ConfigError

BASE = ["model.path=m", "teacher.path=t", "data.train=d.jsonl"]


def test_defaults_are_table_2():
    cfg = load_config(None, BASE)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.grad_clip) == (1e-6, 0.01, 1.0)
    assert (cfg.trainer.prompts_per_step, cfg.rollout.n, cfg.trainer.total_steps) == (32, 16, 65)
    assert (cfg.rollout.temperature, cfg.rollout.max_new_tokens, cfg.data.max_prompt_length) == (1.0, 16384, 8192)
    assert cfg.algorithm.mini_batches == 1 and cfg.algorithm.epochs == 1
    assert (cfg.algorithm.clip_low, cfg.algorithm.clip_high, cfg.algorithm.reward_clamp) == (0.2, 0.2, 5.0)


@pytest.mark.parametrize("method", sorted(PRESETS))
def test_presets_fill_unset_fields(method):
    cfg = load_config(None, BASE + [f"algorithm.method={method}"])
    for key, value in PRESETS[method].items():
        assert getattr(cfg.algorithm, key) == value


def test_explicit_fields_win_over_the_preset():
    cfg = load_config(None, BASE + ["algorithm.method=gndpo", "algorithm.loss_agg_mode=token-mean",
                                    "algorithm.policy_loss=ppo", "algorithm.scope=group"])
    assert (cfg.algorithm.loss_agg_mode, cfg.algorithm.policy_loss, cfg.algorithm.scope) == ("token-mean", "ppo", "group")
    assert cfg.algorithm.advantage == "gndpo"


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {path: a}\ndata: {train: x.jsonl}\nalgorithm: {method: gspo}\noptim: {lr: 2.0e-6}\n")
    cfg = load_config(path, ["optim.lr=5e-6"])
    assert cfg.model.path == "a" and cfg.optim.lr == 5e-6 and cfg.algorithm.advantage == "grpo"
    assert cfg.teacher.path is None  # gspo needs no teacher


def test_running_norm_stats_apply_to_the_batch_scope_only():
    cfg = load_config(None, BASE)
    assert (cfg.algorithm.norm_stats, cfg.algorithm.norm_decay) == ("batch", 0.9)  # the paper's batch statistics
    for extra in (["algorithm.method=opd", "algorithm.scope=batch"], ["algorithm.norm_decay=0"]):
        assert load_config(None, BASE + ["algorithm.norm_stats=running", *extra]).algorithm.norm_stats == "running"
    for extra, got in ((["algorithm.scope=group"], "advantage=gndpo, scope=group"),
                       (["algorithm.scope=sequence"], "advantage=gndpo, scope=sequence"),
                       (["algorithm.method=opd"], "advantage=opd, scope=none"),
                       (["algorithm.method=gspo"], "advantage=grpo, scope=none")):
        with pytest.raises(ConfigError, match=rf"^algorithm.norm_stats=running applies to scope=batch of gndpo/opd "
                                              rf"only \(got {got}\): .* use algorithm.method=gndpo or "
                                              rf"algorithm.norm_stats=batch$"):
            load_config(None, BASE + ["algorithm.norm_stats=running", *extra])
    with pytest.raises(ConfigError, match=r"algorithm.norm_decay=1.5 must be in \[0, 1\]"):
        load_config(None, BASE + ["algorithm.norm_decay=1.5"])


def test_gspo_needs_two_samples():
    with pytest.raises(ConfigError, match="rollout.n must be >= 2"):
        load_config(None, BASE + ["algorithm.method=gspo", "rollout.n=1", "trainer.micro_batch_size=1"])


def test_unknown_section_lists_valid_keys():
    with pytest.raises(ConfigError, match="unknown config key 'optim.learning_rate'; valid keys under optim: lr"):
        load_config(None, BASE + ["optim.learning_rate=1"])


def test_help_has_every_field_with_default():
    text = help_text()
    assert "  algorithm.reward_clamp=5.0" in text and "  model.path=(required)" in text
    assert "[gndpo|opd|gspo]" in text


def test_prompt_sampler_is_seeded_resumable_and_covers_each_epoch():
    a = PromptSampler(10, 4, seed=3)
    first = [a.next_batch() for _ in range(5)]  # 20 prompts: two full epochs
    assert sorted(sum(first[:2], []) + first[2][:2]) == list(range(10))
    b = PromptSampler(10, 4, seed=3)
    b.next_batch(), b.next_batch()
    c = PromptSampler(10, 4, seed=3)
    c.load_state_dict(b.state_dict())
    assert [c.next_batch() for _ in range(3)] == first[2:]
    assert PromptSampler(10, 4, seed=4).next_batch() != first[0]


def test_a_served_teacher_needs_a_url_not_a_path():
    from gndpo.config import load_config
    from gndpo.errors import ConfigError

    base = ["model.path=m", "data.train=d", "algorithm.method=gndpo"]
    cfg = load_config(None, [*base, "teacher.backend=server", "teacher.url=http://127.0.0.1:8100"])
    assert cfg.teacher.path is None
    with pytest.raises(ConfigError, match="teacher.backend=server needs teacher.url=http://HOST:PORT"):
        load_config(None, [*base, "teacher.backend=server"])
    with pytest.raises(ConfigError, match="teacher.path is required by algorithm.advantage=gndpo"):
        load_config(None, base)
