"""The gndpo_gspo_token policy loss through verl's actor loss (``verl.workers.utils.losses.ppo_loss``), against
gndpo.core: verl's nested micro-batches, its registry lookup by ``policy_loss.loss_mode``, its global-batch
normalization across data-parallel ranks and micro-batches."""
import pytest
import torch
from verl_batches import random_batch

from gndpo.core import compute_policy_loss

AGG_MODES = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


def actor_config(loss_mode="gndpo_gspo_token", agg="seq-mean-token-mean", clip_low=0.2, clip_high=0.2, **extra):
    from verl.workers.config import FSDPActorConfig, PolicyLossConfig

    return FSDPActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, loss_agg_mode=agg,
                           clip_ratio_low=clip_low, clip_ratio_high=clip_high,
                           policy_loss=PolicyLossConfig(loss_mode=loss_mode), **extra)


def nested(rows):
    return torch.nested.as_nested_tensor(rows, layout=torch.jagged)


def micro_batch(lp, old, adv, mask, rows, *, dp_size, global_tokens, global_seqs, seed=0):
    """verl's actor micro-batch for ``rows``: nested TensorDict fields plus the model output, whose log-probs cover
    prompt + response (entry i scores token i+1, as verl's engines return them); junk outside the response."""
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu

    g = torch.Generator().manual_seed(seed)
    lengths = [int(mask[i].nonzero().max()) + 1 if mask[i].any() else 1 for i in rows]  # response length R_i
    prompts = [torch.randint(0, 50, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g) for _ in rows]
    full = []
    for i, n, p in zip(rows, lengths, prompts):
        before, after = torch.full((len(p) - 1,), -123.0), torch.full((1,), 77.0)
        full.append(torch.cat([before, lp[i, :n], after]))  # keeps the graph to lp
    data = TensorDict({
        "prompts": nested(prompts),
        "responses": nested([torch.randint(0, 50, (n,), generator=g) for n in lengths]),
        "response_mask": nested([mask[i, :n] for i, n in zip(rows, lengths)]),
        "old_log_probs": nested([old[i, :n] for i, n in zip(rows, lengths)]),
        "advantages": nested([adv[i, :n] for i, n in zip(rows, lengths)]),
    }, batch_size=len(rows))
    tu.assign_non_tensor(data, dp_size=dp_size, batch_num_tokens=global_tokens, global_batch_size=global_seqs)
    values = torch.cat(full)
    offsets = torch.tensor([0, *torch.tensor([len(f) for f in full]).cumsum(0).tolist()])
    return {"log_probs": torch.nested.nested_tensor_from_jagged(values, offsets=offsets)}, data


def loss_batch(seed, batch, length, pattern):
    """(lp, old, adv, mask): lp a leaf near old (off-policy enough that clipping acts), mask right-padded."""
    teacher, student, mask = random_batch(seed, batch, length, pattern)
    valid = mask.bool()
    old = torch.where(valid, student, 0.0)
    g = torch.Generator().manual_seed(seed + 1)
    lp = (old + 0.3 * torch.randn(batch, length, generator=g)).requires_grad_()
    adv = torch.where(valid, torch.randn(batch, length, generator=g), 0.0)
    return lp, old, adv, mask


def verl_loss(config, lp, old, adv, mask, world, micro):
    """What verl's actors optimize: each of ``world`` ranks runs its micro-batches of ``micro`` responses through
    ppo_loss; FSDP averages the ranks' gradients, so the step follows mean over ranks of the summed losses."""
    from verl.workers.utils.losses import ppo_loss

    batch = len(mask)
    tokens, seqs = int(mask.sum()), batch
    ranks = [list(range(batch))[r::world] for r in range(world)]
    total, metrics = 0.0, []
    for r, rows in enumerate(ranks):
        for start in range(0, len(rows), micro):
            out, data = micro_batch(lp, old, adv, mask, rows[start:start + micro], dp_size=world,
                                    global_tokens=tokens, global_seqs=seqs, seed=r * 100 + start)
            loss, m = ppo_loss(config, out, data)
            total = total + loss
            metrics.append(m)
    return total / world, metrics


def core_loss(lp, old, adv, mask, agg, clip_low=0.2, clip_high=0.2):
    """gndpo.core on the whole batch, normalized by the counts verl's trainer passes (every response counts as a
    sequence, as in verl's global_batch_size, even one whose tokens are all masked)."""
    totals = {"total_tokens": float(mask.sum())} if agg == "token-mean" else {"total_seqs": float(len(mask))}
    loss, _ = compute_policy_loss("gspo_token", old_logprobs=old, logprobs=lp, advantages=adv, response_mask=mask,
                                  clip_low=clip_low, clip_high=clip_high, agg_mode=agg, **totals)
    return loss


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("world,micro", [(1, 16), (1, 3), (2, 2), (4, 1)])
@pytest.mark.parametrize("pattern", ["right", "holes", "empty_row"])
def test_verl_actor_loss_equals_gndpo_core_for_any_split(agg, world, micro, pattern):
    lp, old, adv, mask = loss_batch(world * 10 + micro, 16, 12, pattern)
    if agg == "seq-mean-token-sum-norm":  # verl divides by the micro-batch's padded width unless told a constant
        config = actor_config(agg=agg, loss_scale_factor=12)
    else:
        config = actor_config(agg=agg)
    got, metrics = verl_loss(config, lp, old, adv, mask, world, micro)
    (g_got,) = torch.autograd.grad(got, lp)
    want = core_loss(lp, old, adv, mask, agg)
    (g_want,) = torch.autograd.grad(want, lp)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(g_got, g_want, atol=1e-6, rtol=1e-6)
    assert all("actor/pg_clipfrac" in m and "actor/ppo_kl" in m for m in metrics)


@pytest.mark.parametrize("agg", AGG_MODES)
def test_equals_verls_own_gspo_loss(agg):
    """Same semantics as verl 0.9's built-in 'gspo' (which now honours loss_agg_mode) on clean inputs."""
    lp, old, adv, mask = loss_batch(5, 12, 10, "right")
    extra = {"loss_scale_factor": 10} if agg == "seq-mean-token-sum-norm" else {}
    ours, _ = verl_loss(actor_config(agg=agg, **extra), lp, old, adv, mask, 2, 3)
    theirs, _ = verl_loss(actor_config("gspo", agg=agg, **extra), lp, old, adv, mask, 2, 3)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)
    grads = [torch.autograd.grad(x, lp)[0] for x in (ours, theirs)]
    torch.testing.assert_close(*grads, atol=1e-6, rtol=1e-6)


def test_hand_computed_on_policy_step():
    # On policy (lp == old) the GSPO-token ratio is exactly 1 and nothing clips: seq-mean-token-mean of -A is
    # mean(-(1 + 3) / 2, -(-2) / 1) = mean(-2, 2) = 0, and d loss / d lp = -A / (n_i * B): [-1/4, -3/4 | 1].
    old = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]])
    lp = old.clone().requires_grad_()
    adv = torch.tensor([[1.0, 3.0], [-2.0, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, metrics = verl_loss(actor_config(), lp, old, adv, mask, 1, 2)
    assert abs(loss.item()) < 1e-7
    (grad,) = torch.autograd.grad(loss, lp)
    torch.testing.assert_close(grad, torch.tensor([[-0.25, -0.75], [1.0, 0.0]]))
    assert metrics[0]["actor/ppo_kl"].values == [0.0] and metrics[0]["actor/pg_clipfrac"].values == [0.0]


def test_clip_ratios_reach_the_loss():
    lp, old, adv, mask = loss_batch(9, 8, 6, "full")
    base, _ = verl_loss(actor_config(), lp, old, adv, mask, 1, 8)
    for low, high in [(0.1, 0.2), (0.2, 0.05)]:
        got, _ = verl_loss(actor_config(clip_low=low, clip_high=high), lp, old, adv, mask, 1, 8)
        torch.testing.assert_close(got, core_loss(lp, old, adv, mask, "seq-mean-token-mean", low, high))
        assert not torch.allclose(got, base)


def test_refusals_name_the_cause():
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    fn = get_policy_loss_fn("gndpo_gspo_token")
    lp, old, adv, mask = loss_batch(1, 4, 5, "full")
    args = dict(old_log_prob=old, log_prob=lp, advantages=adv, response_mask=mask, config=actor_config())
    with pytest.raises(ValueError, match="does not apply rollout-correction weights; set algorithm.rollout_correction"):
        fn(**args, rollout_is_weights=torch.ones_like(lp))
    with pytest.raises(ValueError, match="does not offer verl's loss_agg_mode 'token-sum'"):
        fn(**args, loss_agg_mode="token-sum")
    with pytest.raises(ValueError, match="Unsupported loss mode: gndpo_gspo"):
        get_policy_loss_fn("gndpo_gspo")
