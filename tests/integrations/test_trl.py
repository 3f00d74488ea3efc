"""GNDPOTrainer (gndpo.integrations.trl) inside TRL 1.16's GRPOTrainer, against gndpo.core on the same batch: the
advantages TRL's generation step hands the loss, and the loss value and gradients TRL's loss computes from them."""
import pytest
import torch

from gndpo.core import compute_advantages, compute_policy_loss

trl = pytest.importorskip("trl", reason="TRL is not installed (pip install gndpo[dev] installs it)")

CORPUS = [f"What is {a} plus {b}? The answer is {a + b}." for a in range(10) for b in range(10)]


def tiny_pair():
    """A BPE tokenizer trained offline and two Qwen2 models over it (student small, teacher larger)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=120, special_tokens=["<pad>", "<eos>"],
                                                        show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    tokenizer.padding_side = "left"

    def qwen2(hidden, layers, seed):
        torch.manual_seed(seed)
        config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                             num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                             max_position_embeddings=64, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
        return Qwen2ForCausalLM(config)

    return tokenizer, qwen2(16, 1, 0), qwen2(32, 2, 1)


def make_trainer(tmp_path, estimator="gndpo", **config):
    from datasets import Dataset
    from trl import GRPOConfig

    from gndpo.integrations.trl import GNDPOTrainer

    tokenizer, student, teacher = tiny_pair()
    args = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_train_batch_size=8,
                      num_generations=4, max_completion_length=6, loss_type="grpo", seed=0, bf16=False,
                      **config)
    dataset = Dataset.from_list([{"prompt": f"What is {i} plus {i % 3}?"} for i in range(8)])
    trainer = GNDPOTrainer(model=student, reward_funcs=[lambda completions, **_: [0.0] * len(completions)],
                           args=args, train_dataset=dataset, processing_class=tokenizer, teacher_model=teacher,
                           estimator=estimator)
    return trainer, teacher


def plain_logprobs(model, out):
    """log p(completion token) from a plain forward and log-softmax, independent of TRL's fused head."""
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    attention = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    width = out["completion_ids"].shape[1]
    logits = model(input_ids=ids, attention_mask=attention).logits[:, -width - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(-1, out["completion_ids"][..., None]).squeeze(-1)


def generation_batch():
    return [{"prompt": f"What is {i} plus {i % 3}?"} for i in (1, 2) for _ in range(4)]


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["gndpo", "opd"])
def test_advantages_and_loss_equal_gndpo_core(tmp_path, estimator):
    trainer, teacher = make_trainer(tmp_path, estimator)
    model = trainer.model
    model.train()
    torch.manual_seed(0)
    out = trainer._generate_and_score_completions(generation_batch())
    mask = out["completion_mask"]
    assert out["advantages"].shape == mask.shape and mask.sum() >= 2
    with torch.no_grad():
        student_lp, teacher_lp = plain_logprobs(model, out), plain_logprobs(teacher, out)
    want, stats = compute_advantages(estimator, teacher_logprobs=teacher_lp, student_logprobs=student_lp,
                                     response_mask=mask)
    torch.testing.assert_close(out["advantages"], want, atol=1e-5, rtol=0)
    assert trainer._metrics["train"]["gndpo/num_tokens"] == [stats["num_tokens"]]

    trainer.current_gradient_accumulation_steps = 1
    model.zero_grad()
    trl_loss = trainer.compute_loss(model, out)
    trl_loss.backward()
    trl_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    lp = plain_logprobs(model, out)
    core_loss, _ = compute_policy_loss("gspo_token", old_logprobs=lp.detach(), logprobs=lp, advantages=want,
                                       response_mask=mask, agg_mode="seq-mean-token-mean")
    core_loss.backward()
    torch.testing.assert_close(trl_loss, core_loss, atol=1e-6, rtol=1e-5)
    for got, expected in zip(trl_grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-4)
    assert any(g.abs().sum() > 0 for g in trl_grads)


@pytest.mark.slow
def test_trainer_refuses_settings_that_change_the_loss(tmp_path):
    with pytest.raises(ValueError, match=r"one optimizer step per generation batch and TRL's plain loss; change: "
                                         r"num_iterations=2 \(needs 1\); beta=0.04 \(needs 0.0\)"):
        make_trainer(tmp_path, num_iterations=2, beta=0.04)
    with pytest.raises(ValueError, match="unknown estimator 'grpo'; valid: gndpo, opd"):
        make_trainer(tmp_path, estimator="grpo")


def test_regime_check_names_each_setting():
    from trl import GRPOConfig

    from gndpo.integrations.trl import regime_violations

    ok = GRPOConfig(output_dir="x", use_cpu=True, report_to="none", loss_type="grpo", per_device_train_batch_size=4,
                    num_generations=4)
    assert regime_violations(ok) == []
    bad = GRPOConfig(output_dir="x", use_cpu=True, report_to="none", loss_type="bnpo", per_device_train_batch_size=4,
                     num_generations=4, steps_per_generation=2, importance_sampling_level="sequence",
                     top_entropy_quantile=0.5, entropy_coef=0.01)
    got = regime_violations(bad)
    assert [w.split("=")[0] for w in got] == ["steps_per_generation", "importance_sampling_level", "loss_type",
                                              "entropy_coef", "top_entropy_quantile"]
    assert "one optimizer step per generation batch" in got[0] and "'grpo' is the paper's" in got[2]
