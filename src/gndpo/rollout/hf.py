"""Sampler on the in-process Hugging Face student: gndpo's decode loop, or ``transformers.generate``."""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch

from gndpo.data.records import PromptRecord
from gndpo.forward import collate_prompts, encode_prompts
from gndpo.models import eos_token_ids, special_placeholder_ids, tokenizer_of
from gndpo.rollout.base import Rollouts, SamplingParams, request_seed
from gndpo.rollout.decode import decode, supports_decode_loop

ENGINES = ("loop", "generate")


def response_mask_from_ids(ids: torch.Tensor, eos_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask ``(B, R)`` of tokens up to and including the first EOS, and ``(B,)`` truncation flags."""
    is_eos = torch.isin(ids, torch.as_tensor(list(eos_ids), device=ids.device))  # (B, R)
    seen_before = (is_eos.long().cumsum(-1) - is_eos.long()) > 0  # an EOS strictly earlier
    mask = ~seen_before
    truncated = ~is_eos.any(-1)
    return mask, truncated


class HFRollout:
    """Samples ``n`` responses per prompt from the student; never emits image placeholders or padding.

    ``engine="loop"`` (default) runs :func:`gndpo.rollout.decode.decode`, which prefills each prompt once
    for its samples (Qwen-VL included: positions come from its multimodal RoPE index); models it cannot
    drive (encoder-decoders, inputs it would have to extend at every step) fall back to
    ``transformers.generate``, which ``engine="generate"`` always uses. Both sample the same distribution.
    """

    def __init__(self, model, processor, *, suffix: str | None, system_prompt: str | None = None,
                 micro_batch_size: int = 64, engine: str = "loop", context=None):
        """``context``: a zero-argument factory of the context decoding runs in: the full weights gathered once
        (FSDP2: :func:`gndpo.dist.gathered`), or autocast to the compute dtype (mixed precision in one process)."""
        if engine not in ENGINES:
            raise ValueError(f"unknown rollout engine {engine!r}; choose one of {', '.join(ENGINES)}")
        self.model = model
        self.context = context or contextlib.nullcontext
        self.engine = engine
        self.processor = processor
        self.suffix = suffix
        self.system_prompt = system_prompt
        self.micro_batch_size = micro_batch_size
        self.eos_ids = eos_token_ids(model, processor)
        self.suppress = special_placeholder_ids(processor)
        tok = tokenizer_of(processor)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else self.eos_ids[0]

    def weights_changed(self) -> None:
        """Nothing to do: this sampler runs the trainer's model itself."""

    def close(self) -> None:
        """Nothing to free: the model belongs to the trainer."""

    def _generation_config(self, sampling: SamplingParams, n: int):
        from transformers import GenerationConfig

        # A fresh config: the model's own generation defaults (repetition penalties, top-k...) would make
        # the sampling distribution differ from the policy the trainer scores.
        kw = dict(max_new_tokens=sampling.max_new_tokens, min_new_tokens=sampling.min_new_tokens or None,
                  num_return_sequences=n, eos_token_id=self.eos_ids,
                  pad_token_id=self.pad_id, suppress_tokens=self.suppress or None)
        if sampling.greedy:
            return GenerationConfig(do_sample=False, **kw)
        # top_k=0 (not None): None lets transformers fill in its default top-k of 50, which would sample from
        # a truncated distribution while the trainer scores the full one.
        return GenerationConfig(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p,
                                top_k=sampling.top_k, **kw)

    @torch.no_grad()
    def generate(self, records: Sequence[PromptRecord], sampling: SamplingParams, *,
                 encoded: Sequence[dict] | None = None) -> Rollouts:
        """``encoded``: :func:`gndpo.forward.encode_each` of ``records`` with this processor, if the caller
        has it (saves encoding the prompts twice)."""
        n = sampling.n
        per_call = max(1, self.micro_batch_size // n)
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        chunks, plens, lps = [], [], []
        try:
            with self.context():  # FSDP2: the full weights once for the whole rollout; or autocast
                for i in range(0, len(records), per_call):
                    batch = records[i:i + per_call]
                    if encoded is not None:
                        inputs = collate_prompts(encoded[i:i + per_call], pad_id=self.pad_id, device=device)
                    else:
                        inputs = encode_prompts(self.processor, batch, suffix=self.suffix,
                                                system_prompt=self.system_prompt, device=device)
                    if self.engine == "loop" and supports_decode_loop(self.model, inputs):
                        keys = None if sampling.seed is None else torch.tensor(
                            [request_seed(sampling.seed, r.id, s) for r in batch for s in range(n)],
                            dtype=torch.long)
                        ids, lp = decode(self.model, inputs, sampling, eos_ids=self.eos_ids, pad_id=self.pad_id,
                                         suppress=self.suppress, keys=keys)
                        chunks.append(ids)  # (b*n, R_i)
                        lps.append(lp)
                    else:
                        P = inputs["input_ids"].shape[1]
                        k = 1 if sampling.greedy else n  # generate() refuses greedy with n > 1: the n are equal
                        out = self.model.generate(**inputs, generation_config=self._generation_config(sampling, k))
                        chunks.append(out[:, P:].repeat_interleave(n // k, 0).cpu())  # (b*n, R_i)
                    plens.append(inputs["attention_mask"].sum(-1).repeat_interleave(n).cpu())
        finally:
            self.model.train(was_training)
        R = max(max(c.shape[1] for c in chunks), 1)
        ids = torch.cat([torch.nn.functional.pad(c, (0, R - c.shape[1]), value=self.pad_id) for c in chunks])  # (B, R)
        mask, truncated = response_mask_from_ids(ids, self.eos_ids)
        mask &= torch.arange(R)[None, :] < torch.tensor([c.shape[1] for c in chunks]).repeat_interleave(
            torch.tensor([c.shape[0] for c in chunks]))[:, None]
        ids = torch.where(mask, ids, torch.full_like(ids, self.pad_id))
        lengths = mask.sum(-1)
        truncated &= lengths >= sampling.max_new_tokens
        tok = tokenizer_of(self.processor)
        texts = tuple(tok.batch_decode([row[:int(k)] for row, k in zip(ids, lengths)], skip_special_tokens=True))
        prompt_index = torch.arange(len(records)).repeat_interleave(n)
        sampler_lp = None
        if len(lps) == len(chunks):  # every chunk came from the decode loop
            sampler_lp = torch.cat([torch.nn.functional.pad(x, (0, R - x.shape[1])) for x in lps])
            sampler_lp = torch.where(mask, sampler_lp, torch.zeros_like(sampler_lp))
        return Rollouts(tuple(records), prompt_index, ids, mask, texts, truncated, torch.cat(plens), sampler_lp)
