"""Resource plan: parameter counts and per-GPU memory of a run, from the model configs alone.

``gndpo train CONFIG --dry-run`` prints it. Each model is built on the meta device from its ``config.json``
(a local directory, or a hub id already in the Hugging Face cache; nothing is downloaded, no weight is read),
so an 8B model is counted in a fraction of a second once transformers is imported.

Parameters are counted once per storage (tied embeddings once), split into the vision tower + projector and
the language model (the module ``get_decoder()`` returns, plus the LM head).

Memory is a worst-case bound per GPU for what gndpo does today (``train.py``, ``forward.py``,
``rollout/decode.py``): every prompt is ``P = data.max_prompt_length`` tokens and every response
``R = rollout.max_new_tokens`` (``T = P + R``), no response ends early. Notation: ``p_s`` bytes per stored
student parameter (``model.dtype``: float32 masters by default), ``p`` bytes of the student's compute dtype
(``model.compute_dtype``: bfloat16 on GPUs), ``p_t`` bytes per teacher parameter, ``L``
layers, ``h`` hidden size, ``I`` MLP width, ``a``/``k`` query/KV heads of width ``d``, ``V`` vocabulary,
``N`` world size (``--shard fsdp`` divides the student's weights, gradients and optimizer state by ``N``;
``--shard-teacher`` the teacher's weights too).

Lines (bytes):

- student weights: ``params * p_s`` (+ LoRA adapters in float32, PEFT's default for bf16/fp16 bases, + a
  second copy of every ``modules_to_save`` module, which PEFT keeps beside the frozen original);
- gradients: ``trainable * p_s`` (adapters: 4), alive from the first backward until ``zero_grad`` after the step;
- optimizer state: ``2 * trainable * p_s``: torch's AdamW keeps ``exp_avg`` and ``exp_avg_sq`` in the
  parameter's dtype, float32 beside float32 masters;
- optimizer step temporaries: the foreach AdamW on GPU builds ``sqrt(exp_avg_sq)`` for every parameter at
  once (one more ``trainable * p_s``); on CPU it walks parameters one at a time (the largest one);
- mixed precision in one process (``p < p_s``, torch.autocast): a ``p``-byte copy of every Linear weight while
  the student runs (autocast's cache for the pass, then what backward keeps), and of the LM head, which gndpo's
  chunked head casts itself; the embeddings are not cast. In the activations the residual stream and the
  norms' outputs stay float32 (the norms scale by float32 weights) beside each Linear's ``p``-byte input;
- mixed precision under FSDP2 (``--shard fsdp``): the units gather in ``p``; in the update the unsharded
  gradients of the root and one layer in ``p``, and the root's cast to ``dist.reduce_dtype`` for its
  reduce-scatter;
- teacher weights: ``teacher params * p_t`` (forward only, no gradients or optimizer state), for each teacher of a
  ``teachers:`` list; self-distillation (``teacher.path=self``) with ``self_weights=initial`` is a frozen copy
  of the student's starting weights in ``p_t``, with ``current`` no weights at all (it scores with the student's,
  in ``p``: under autocast its compute copies cover the teacher's pass too; under FSDP2 the whole student is
  gathered for it, as for the hf sampler);
- activations of the update, per micro-batch of ``trainer.micro_batch_size`` sequences laid out as
  ``forward.response_logprobs`` lays them out (one row per sequence; a packed row per prompt when it fits
  ``forward.PACK_TOKENS``; or the prompt once plus its samples over a KV cache). Per token and layer, what
  autograd keeps in a Qwen/Llama decoder layer, after Korthikanti et al. 2022 (arXiv 2205.05198, Sec. 4)
  adapted to RMSNorm with a float32 upcast, q/k norms, SwiGLU, no dropout and a fused attention kernel
  (SDPA memory-efficient or FlashAttention: no ``T x T`` scores are kept):
  ``2h(4 + 2p)`` (two RMSNorms: float32 input, normalized and scaled outputs) ``+ (a + k) d (4 + p)``
  (q/k norms, when the model has them) ``+ (a + 2k') d p`` (rotated q, k and v kept by the kernel; ``k' = a``
  under SDPA, whose padding mask makes transformers repeat the KV heads) ``+ 2 a d p + 4a`` (attention output,
  its contiguous copy, log-sum-exp) ``+ 4 I p`` (gate, act(gate), up, product). With
  ``model.gradient_checkpointing``: ``L`` layer inputs ``h p`` per token plus one layer recomputed in
  backward, which never coexists with the LM head's backward (so it counts only beyond the log-prob
  buffers). Plus the final norm ``h(4 + 2p)`` per token, the attention mask (SDPA: one byte per query-key
  pair; eager: ``p`` bytes, and every layer also keeps its ``a T^2 (4 + p)`` scores; FlashAttention: none;
  the packed path's additive mask: ``p``), and, over a shared prompt's KV cache, the prompt's repeated keys
  and values each response's attention keeps. LoRA adds, per adapted layer and token, a float32 copy of its
  input (bf16/fp16 bases), ``4r`` for the low-rank activation, and ``5`` bytes per input feature more with
  dropout (mask and dropped copy). Which layers get adapters follows ``gndpo.lora``: a list of names matches
  inside the language model only; ``all-linear`` is every linear layer but the LM head, vision tower and
  projector included; another string is a regular expression over full module names;
- log-prob buffers: ``core/logprobs.hidden_logprobs`` with ``C = min(1024, response tokens)`` rows per chunk:
  two float32 ``C x V`` scratch rows and a ``C x V`` logits chunk in ``p``; in backward also the float32
  ``V x h`` LM-head gradient accumulator and its cast to ``p`` when the head trains in 16 bits (in float32 the
  accumulator becomes the head's gradient, counted there);
- KV cache of the rollout: ``B (P + R) L 2 k d p`` with ``B = (rollout.micro_batch_size // n) * n``
  sequences decoded together (the decode loop's buffers grow by doubling but never past ``P + R``), plus the
  larger of the prefill's working memory and the sampling buffers ``B V (p + 24)`` (float32 copies for
  filtering, softmax and log-probs, float64 CDF);
- top-k buffers (``algorithm.distill=topk``, K = ``algorithm.topk``): per response token of a micro-batch, the
  teacher's top-k ids and log-probs (12 K bytes) while it scores and while the student's old pass scores them;
  in the update the buckets, the divergence's terms and their gradients (~48 (K + 1) bytes). The student's
  full-vocabulary log-softmax is never materialized: the chunked log-prob buffers above cover it;
- KV cache and working memory of the scoring passes (teacher, ``teacher.micro_batch_size`` sequences; the
  student's old log-probs, ``trainer.micro_batch_size``, when that pass runs): as the update's layout, no
  gradients; working memory is one layer at a time, ``tokens * (3hp + 4h + p * max(3I, (3a + 2k')d))``. Several
  teachers score one after another: the largest one's lines count. A privileged context (``teacher.context``)
  lengthens the teacher's prompts beyond ``P`` by its rendered length, which the plan (no records) does not
  count.

Phases run one after another (rollout, old log-probs, teacher scoring, update, optimizer step), so
``peak = weights + optimizer state + teacher weights + max over phases``. Not counted: the vision tower's
activations (they depend on the number of image tiles; small under gradient checkpointing), the CUDA context
and allocator fragmentation (typically 1-3 GiB), NCCL buffers, and MoE routing.

FSDP (``--shard fsdp``, what ``torchrun`` runs: :func:`gndpo.dist.apply_fsdp`): the units are the decoder
layers and the vision tower's blocks; the root (embeddings, LM head, projector) is gathered whenever a scoring
pass runs, plus two layers (the current one and the prefetched next). The hf sampler decodes with the whole
student gathered (one all-gather per rollout instead of one per token): the rest of the layers count in the
rollout phase.

vLLM engines (``rollout.backend=vllm``, ``teacher.backend=vllm``) hold their weights and KV cache in the share
of the GPU their ``gpu_memory_utilization`` reserves, which replaces the hf sampler's (or teacher's) lines; the
plan can only count it against ``--gpu-memory``. A served teacher (``teacher.backend=server``) takes no memory
here.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from gndpo.config import RunConfig
from gndpo.errors import ConfigError, ModelError
from gndpo.models import dtype_name, student_dtypes

GIB = 1024**3
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
PHASES = ("rollout", "old log-probs", "teacher scoring", "update", "optimizer step")


@dataclass(frozen=True)
class ModelShape:
    """Parameter counts and the dimensions the memory formulas need, of one model."""

    path: str
    total: int  # unique parameters (tied embeddings once)
    vision: int  # vision tower + projector
    language: int  # language model: embeddings, decoder layers, LM head
    trainable: int  # with LoRA: adapters + modules_to_save; else all
    adapters: int  # LoRA adapter parameters (0 without LoRA)
    saved_copies: int  # modules_to_save parameters PEFT copies
    adapter_inputs: int  # sum of the adapted layers' in_features, per decoder layer
    adapted_per_layer: int  # adapted linear layers per decoder layer
    largest_param: int
    layer_params: int  # parameters of one decoder layer (an FSDP unit)
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    qk_norm: bool
    head_trains: bool  # the LM head's weight gets a gradient
    tied_head: bool  # the LM head is the input embedding (one storage)
    shares_prefixes: bool  # forward.shares_prefixes: scoring runs each prompt once for its samples
    decode_loop: bool  # rollout.decode.supports_decode_loop: prefill once per prompt (else generate())


@dataclass(frozen=True)
class MemoryLine:
    name: str
    phases: tuple[str, ...]  # () = held through every phase
    bytes: int


@dataclass(frozen=True)
class ResourcePlan:
    student: ModelShape
    teacher: ModelShape | None  # the first teacher's (the student's for a self teacher on the current weights)
    student_dtype: str  # stored: the master weights, their gradients and AdamW's state
    teacher_dtype: str | None
    compute_dtype: str  # the student's forward and backward passes (mixed precision when it differs)
    prompt_tokens: int
    response_tokens: int
    world_size: int
    shard: str
    shard_teacher: bool
    lines: tuple[MemoryLine, ...]
    phase_bytes: dict  # phase -> bytes held during it, persistent lines included
    peak_bytes: int
    peak_phase: str
    gpu_memory_bytes: int | None
    warnings: tuple[str, ...]
    teachers: tuple = ()  # (role, ModelShape, dtype) of every teacher in memory or on an engine here


# ---------------------------------------------------------------- models


def _read_config(path: str, what: str, trust_remote_code: bool):
    from transformers import AutoConfig

    key = "teacher.path" if what == "teacher" else "model.path"
    p = Path(path).expanduser()
    if p.exists() and not (p / "config.json").is_file():
        raise ModelError(f"{what} directory {p} has no config.json; the plan needs the model's config.json")
    try:  # never a download: a dry run must answer in seconds, offline too
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    except Exception as exc:
        if p.exists():
            first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            raise ModelError(f"cannot read {p / 'config.json'}: {first[:200]}") from None
        raise ModelError(f"{what} config {path} is neither a local directory nor in the Hugging Face cache (the plan "
                         f"downloads nothing); run `hf download {path} config.json`, or set {key} to a local "
                         "directory holding its config.json") from None


def _meta_model(config, path: str, what: str, trust_remote_code: bool):
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText

    from gndpo.models import is_vision_language

    autos = [AutoModelForImageTextToText] if is_vision_language(config) else [AutoModelForCausalLM]
    error = None
    for auto in autos + [AutoModel]:  # remote-code models may register only AutoModel
        try:
            with torch.device("meta"):
                return auto.from_config(config, trust_remote_code=trust_remote_code)
        except Exception as exc:
            error = error or exc
    first = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
    raise ModelError(f"cannot build the {what} from its config {path}: {first[:160]}")


def _lora_targets(model, head, lora) -> list:
    """The nn.Linear layers that get adapters, by ``gndpo.lora``'s rules (a list matches inside the language
    model only; 'all-linear' is every linear layer but the LM head, vision tower included; another string is a
    regular expression over full module names)."""
    import torch

    from gndpo.lora import resolve_target_modules

    pattern = resolve_target_modules(model, lora.target_modules)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if pattern.lower() == "all-linear":
        return [(n, m) for n, m in linears if m is not head]
    return [(n, m) for n, m in linears if re.fullmatch(pattern, n)]


@dataclass(frozen=True)
class _Lora:
    adapters: int
    saved: int
    inputs: int
    per_layer: int
    head_trains: bool
    largest: int


def _lora_counts(model, first_layer, head, lora) -> _Lora:
    """Adapter parameters (``r (in + out)`` per adapted linear layer), the ``modules_to_save`` PEFT copies (its
    suffix rule, over the whole model; a tied embedding is one parameter), and the first decoder layer's adapted
    layers (for the activation formula)."""
    targets = _lora_targets(model, head, lora)
    in_layer = {id(m) for m in first_layer.modules()} if first_layer is not None else set()
    kept = {id(p): p for n, m in model.named_modules() if any(n.endswith(t) for t in lora.modules_to_save)
            for p in m.parameters()}
    return _Lora(adapters=sum(lora.rank * (m.in_features + m.out_features) for _, m in targets),
                 saved=sum(p.numel() for p in kept.values()),
                 inputs=sum(m.in_features for _, m in targets if id(m) in in_layer),
                 per_layer=sum(1 for _, m in targets if id(m) in in_layer),
                 head_trains=head is not None and any(id(p) in kept for p in head.parameters()),
                 largest=max([lora.rank * max(m.in_features, m.out_features) for _, m in targets]
                             + [p.numel() for p in kept.values()], default=0))


def model_shape(path: str, *, what: str = "model", trust_remote_code: bool = False, lora=None) -> ModelShape:
    """Count ``path``'s parameters from its config alone; ``lora`` (a LoraConfig with rank > 0) decides what trains."""
    import torch

    from gndpo.forward import shares_prefixes
    from gndpo.rollout.decode import supports_decode_loop

    config = _read_config(path, what, trust_remote_code)
    model = _meta_model(config, path, what, trust_remote_code)
    text = config.get_text_config()
    try:
        L, h, heads, vocab = text.num_hidden_layers, text.hidden_size, text.num_attention_heads, text.vocab_size
    except AttributeError as exc:
        raise ModelError(f"cannot plan for the {what} {path}: its config has no {exc.name} (not a decoder "
                         "language model gndpo knows)") from None
    params = dict(model.named_parameters())  # deduplicated: a tied weight appears once
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    lm_ids = {id(p) for p in decoder.parameters()} | ({id(p) for p in head.parameters()} if head is not None else set())
    total = sum(p.numel() for p in params.values())
    layers = next((m for m in decoder.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == L), None)
    lo = _lora_counts(model, layers[0] if layers else None, head, lora) if lora is not None and lora.rank > 0 else None
    return ModelShape(
        path=path, total=total, vision=total - sum(p.numel() for p in params.values() if id(p) in lm_ids),
        language=sum(p.numel() for p in params.values() if id(p) in lm_ids),
        trainable=lo.adapters + lo.saved if lo else total, adapters=lo.adapters if lo else 0,
        saved_copies=lo.saved if lo else 0, adapter_inputs=lo.inputs if lo else 0,
        adapted_per_layer=lo.per_layer if lo else 0,
        largest_param=lo.largest if lo else max(p.numel() for p in params.values()),
        layer_params=max((sum(p.numel() for p in layer.parameters()) for layer in layers or ()), default=0),
        layers=L, hidden=h, intermediate=getattr(text, "intermediate_size", None) or 4 * h, heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or h // heads, vocab=vocab,
        qk_norm=any(name.endswith("q_norm") for name, _ in decoder.named_modules()),
        head_trains=head is not None and (lo.head_trains if lo else True),
        tied_head=head is not None and hasattr(model, "get_input_embeddings") and
        head.weight is model.get_input_embeddings().weight,
        shares_prefixes=shares_prefixes(model), decode_loop=supports_decode_loop(model))


# ---------------------------------------------------------------- formulas


def dtype_bytes(dtype: str, device: str) -> tuple[str, int]:
    """Resolved dtype name and bytes per element; ``auto`` is bfloat16 on a GPU, float32 on ``trainer.device=cpu``."""
    name = ("float32" if device == "cpu" else "bfloat16") if dtype == "auto" else dtype
    return name, _BYTES[name]


def _mask_byte(attn: str | None, p: int) -> int:
    """Bytes per query-key pair of the attention mask transformers builds for padded batches."""
    return {"eager": p, "sdpa": 1, None: 1}.get(attn, 0)


def _kv_width(s: ModelShape, attn: str | None) -> int:
    # Under a padding mask SDPA cannot use its grouped-query path, so transformers repeats the KV heads.
    return s.heads if attn in (None, "sdpa", "eager") else s.kv_heads


def layer_activation_bytes(s: ModelShape, p: int, attn: str | None, lora=None, *, autocast: bool = False) -> int:
    """Bytes autograd keeps per token in one decoder layer (see the module docstring). ``autocast``: float32
    weights computing in ``p`` bytes under torch.autocast, where the residual stream and the norms' outputs stay
    float32 (norms scale by float32 weights) and each Linear keeps its own ``p``-byte copy of its input."""
    a, k, d = s.heads, s.kv_heads, s.head_dim
    norm_out = 4 + p if autocast else 2 * p  # (normalized, scaled) outputs; autocast: float32 + the Linear's copy
    out = 2 * s.hidden * (4 + norm_out) + (a + 2 * _kv_width(s, attn)) * d * p + 2 * a * d * p + 4 * a \
        + 4 * s.intermediate * p
    if s.qk_norm:  # autocast: float32 norm and rotation outputs, then SDPA's own copies in p
        out += (a + k) * d * (4 + p + (8 if autocast else 0))
    if lora is not None and lora.rank > 0:
        per_input = (4 if p != 4 else 0) + (5 if lora.dropout > 0 else 0)
        out += s.adapted_per_layer * 4 * lora.rank + s.adapter_inputs * per_input
    return out


def inference_bytes(s: ModelShape, p: int, tokens: int, attn: str | None) -> int:
    """Working memory of a no-grad forward over ``tokens`` tokens: one layer's temporaries at a time."""
    widest = max(3 * s.intermediate, (3 * s.heads + 2 * _kv_width(s, attn)) * s.head_dim)
    return tokens * (3 * s.hidden * p + 4 * s.hidden + p * widest)


def kv_bytes(s: ModelShape, p: int, tokens: int) -> int:
    return tokens * s.layers * 2 * s.kv_heads * s.head_dim * p


@dataclass(frozen=True)
class Layout:
    """How ``forward.response_logprobs`` lays out a micro-batch: tokens run through the layers (all forward
    calls together, as autograd keeps them; and the largest single call, for a no-grad pass), tokens held in a
    KV cache, and attention-mask elements (all calls; largest call)."""

    tokens: int
    widest: int
    cached: int
    mask_pairs: int
    widest_mask: int
    float_mask: bool = False  # the packed path's additive mask is in the model dtype


def layout(micro: int, n: int, P: int, R: int, *, shared: bool, attn: str | None) -> Layout:
    from gndpo.forward import PACK_TOKENS

    k = min(micro, n)  # consecutive sequences share a prompt, so a micro-batch holds up to n samples of one
    if not shared or k == 1:
        T = micro * (P + R)
        return Layout(T, T, 0, micro * (P + R) ** 2, micro * (P + R) ** 2)
    U = -(-micro // k)
    if P + k * R <= PACK_TOKENS and attn in (None, "sdpa", "eager"):
        L = P + k * R
        return Layout(U * L, U * L, 0, U * L * L, U * L * L, float_mask=True)
    prompt_mask, response_mask = U * P * P, micro * R * (P + R)
    return Layout(U * P + micro * R, max(U * P, micro * R), micro * (P + R), prompt_mask + response_mask,
                  max(prompt_mask, response_mask))


def _mask_bytes(lay: Layout, attn: str | None, p: int, *, widest: bool = False) -> int:
    return (lay.widest_mask if widest else lay.mask_pairs) * (p if lay.float_mask else _mask_byte(attn, p))


def _logprob_bytes(s: ModelShape, p: int, response_tokens: int, *, backward: bool) -> int:
    C = min(1024, response_tokens)
    cast = p if p != 4 else 0  # a float32 model computes the chunk's logits in the scratch row itself
    out = C * s.vocab * (8 + cast)
    if backward:
        out += response_tokens * s.hidden * p
        if s.head_trains and p != 4:  # in float32 the accumulator is returned as the head's gradient itself
            out += s.vocab * s.hidden * (4 + cast)
    return out


def _scoring_lines(s: ModelShape, p: int, name: str, phase: str, micro: int, n: int, P: int, R: int, *,
                   shared: bool, attn: str | None) -> list[MemoryLine]:
    lay = layout(micro, n, P, R, shared=shared, attn=attn)
    work = inference_bytes(s, p, lay.widest, attn) + _mask_bytes(lay, attn, p, widest=True) + \
        _logprob_bytes(s, p, micro * R, backward=False)
    lines = [MemoryLine(f"{name} working memory", (phase,), work)]
    if lay.cached:
        lines.insert(0, MemoryLine(f"KV cache ({name})", (phase,), kv_bytes(s, p, lay.cached)))
    return lines


def _rollout_lines(s: ModelShape, p: int, cfg: RunConfig, attn: str | None) -> list[MemoryLine]:
    """The decode loop prefills each prompt once, then decodes B sequences over a KV cache; ``generate``
    prefills every sequence."""
    r, P = cfg.rollout, cfg.data.max_prompt_length
    per_call = max(1, r.micro_batch_size // r.n)
    B = per_call * r.n
    rows = per_call if r.engine == "loop" and s.decode_loop else B
    prefill = inference_bytes(s, p, rows * P, attn) + rows * P * P * _mask_byte(attn, p)
    return [MemoryLine("KV cache (rollout)", ("rollout",), kv_bytes(s, p, B * (P + r.max_new_tokens))),
            MemoryLine("rollout working memory", ("rollout",), max(prefill, B * s.vocab * (p + 24)))]


def _update_lines(s: ModelShape, p: int, cfg: RunConfig, attn: str | None, *, shared: bool,
                  trainable_bytes: int, largest_param_bytes: int, autocast: bool = False) -> list[MemoryLine]:
    m, micro, P, R = cfg.model, cfg.trainer.micro_batch_size, cfg.data.max_prompt_length, cfg.rollout.max_new_tokens
    lay = layout(micro, cfg.rollout.n, P, R, shared=shared, attn=attn)
    per_token = layer_activation_bytes(s, p, attn, m.lora, autocast=autocast)
    residual = 4 if autocast else p  # the layer inputs gradient checkpointing keeps: the residual stream
    logprob = _logprob_bytes(s, p, micro * R, backward=True)
    scores = s.heads * lay.mask_pairs * (4 + p) if attn == "eager" else 0  # per layer, kept for backward
    if m.gradient_checkpointing:
        # The LM head's backward runs before any layer is recomputed, so the recomputed layer only counts
        # where it outgrows the log-prob buffers.
        layers = s.layers * lay.tokens * s.hidden * residual + max(0, lay.tokens * per_token + scores - logprob)
    else:
        layers = s.layers * (lay.tokens * per_token + scores)
    # over a shared prompt's KV cache, each response's attention also keeps its (repeated) prompt keys/values
    cached_prompt = micro * P if lay.cached else 0
    act = layers + lay.tokens * s.hidden * (4 + (4 + p if autocast else 2 * p)) + _mask_bytes(lay, attn, p) + \
        kv_bytes(s, p, cached_prompt) * _kv_width(s, attn) // s.kv_heads
    # foreach AdamW (GPU) takes sqrt(exp_avg_sq) of every parameter at once; on CPU it goes one by one
    step = trainable_bytes if cfg.trainer.device != "cpu" else largest_param_bytes
    return [MemoryLine("activations (update)", ("update",), act),
            MemoryLine("log-prob buffers (update)", ("update",), logprob),
            MemoryLine("optimizer step temporaries", ("optimizer step",), step)]


def build_plan(cfg: RunConfig, *, world_size: int = 1, shard: str = "none", shard_teacher: bool = False,
               gpu_memory: int | None = None) -> ResourcePlan:
    """The resource plan of ``cfg`` (see the module docstring for every formula)."""
    from gndpo.train import old_logprobs_redundant

    if world_size < 1:
        raise ConfigError(f"--world-size must be >= 1, got {world_size}")
    if shard not in ("none", "fsdp"):
        raise ConfigError(f"--shard {shard!r} is not one of: none, fsdp")
    if shard_teacher and shard != "fsdp":
        raise ConfigError("--shard-teacher needs --shard fsdp")
    m, r, tr, a = cfg.model, cfg.rollout, cfg.trainer, cfg.algorithm
    lora = m.lora if m.lora.rank > 0 else None
    student = model_shape(m.path, what="model", trust_remote_code=m.trust_remote_code, lora=lora)
    stored, compute = student_dtypes(m.dtype, m.compute_dtype, "cpu" if tr.device == "cpu" else "cuda",
                                     lora=lora is not None)
    s_name, ps, c_name, p = dtype_name(stored), stored.itemsize, dtype_name(compute), compute.itemsize
    # mixed precision: autocast in one process; under FSDP2 the units gather in the compute dtype
    autocast = compute != stored and shard != "fsdp"
    P, R, n, attn = cfg.data.max_prompt_length, r.max_new_tokens, r.n, m.attn_implementation
    teachers = _teacher_shapes(cfg, student, c_name) if a.advantage in ("gndpo", "opd") else []
    teacher, t_name = (teachers[0][2], teachers[0][3]) if teachers else (None, None)
    div = world_size if shard == "fsdp" else 1
    adapter_bytes = student.adapters * 4 + student.saved_copies * ps  # PEFT keeps adapters in float32
    trainable_bytes = adapter_bytes if lora else student.total * ps  # gradients and AdamW moments: the masters'

    lines = [MemoryLine("student weights", (), (student.total * ps + (adapter_bytes if lora else 0)) // div),
             MemoryLine("optimizer state (AdamW)", (), 2 * trainable_bytes // div)]
    for role, te, shape, dtype in teachers:
        if te.backend == "hf" and shape is not student:  # a self teacher on the current weights holds none
            lines.append(MemoryLine(f"{role} weights", (), shape.total * _BYTES[dtype] //
                                    (world_size if shard_teacher else 1)))
    # a sleeping sampler (CUDA sleep mode, no vLLM teacher in the process) frees its share between rollouts
    sleeps = r.vllm.sleep and all(te.backend != "vllm" for _, te, _, _ in teachers)
    for backend, section, name, phases in (
            (r.backend, r.vllm, "vLLM engine (rollout)", ("rollout",) if sleeps else ()),
            *((te.backend, te.vllm, f"vLLM engine ({role})", ()) for role, te, _, _ in teachers)):
        if backend == "vllm":  # the engine reserves its share of the GPU up front
            if gpu_memory is None:  # the config is valid; only this plan cannot be made
                raise ModelError(f"{name} reserves {section.gpu_memory_utilization:g} of the GPU's memory; pass "
                                  "--gpu-memory so the plan can count it")
            lines.append(MemoryLine(name, phases, int(section.gpu_memory_utilization * gpu_memory)))
    root = student.total - student.layers * student.layer_params  # embeddings, head, norms, vision, projector
    if shard == "fsdp":  # gathered in the compute dtype (MixedPrecisionPolicy)
        gathered = (root + 2 * student.layer_params) * p
        for _, te, shape, dtype in teachers:
            if shard_teacher and te.backend == "hf" and shape is not student:
                gathered += (shape.total - (shape.layers - 2) * shape.layer_params) * _BYTES[dtype]
        lines.append(MemoryLine("FSDP all-gathered units", (), gathered))
        if p != ps or ps != _BYTES[cfg.dist.reduce_dtype]:
            # unsharded gradients in the compute dtype: the root's from the head's backward (first) to the end of
            # backward, one layer's at a time; the root's cast to the reduce dtype for its reduce-scatter
            lines.append(MemoryLine("FSDP unsharded gradients", ("update",),
                                    (root + student.layer_params) * p + root * _BYTES[cfg.dist.reduce_dtype]))
    student_passes = ("rollout",) if r.backend == "hf" else ()
    sampler_lp = a.old_logprobs == "sampler" and r.engine == "loop" and student.decode_loop
    old_pass = not sampler_lp and not old_logprobs_redundant(cfg)
    student_passes += ("old log-probs",) * old_pass + ("update",)
    self_current = any(shape is student for _, _, shape, _ in teachers)  # teacher.path=self on the live weights
    student_passes += ("teacher scoring",) * self_current
    if autocast:
        # autocast keeps a compute-dtype copy of every Linear weight for the whole pass (and backward keeps them);
        # the embeddings are not cast, but gndpo's chunked head casts the LM head's weight itself
        untied_embeddings = 0 if student.tied_head else student.vocab * student.hidden
        lines.append(MemoryLine("compute copies (autocast)", student_passes,
                                (student.total - untied_embeddings) * p))
    if r.backend == "hf":
        lines += _rollout_lines(student, p, cfg, attn)
        if shard == "fsdp":  # decoding gathers the layers the persistent line above does not hold
            lines.append(MemoryLine("student gathered for decoding", ("rollout",),
                                    (student.layers - 2) * student.layer_params * p))
    if self_current and shard == "fsdp":  # the self teacher scores with the whole student gathered, as decoding
        lines.append(MemoryLine("student gathered for the self teacher", ("teacher scoring",),
                                (student.layers - 2) * student.layer_params * p))
    # the student's scoring shares prompts over a KV cache unless activations are checkpointed
    shared = not m.gradient_checkpointing and student.shares_prefixes
    if old_pass:
        lines += _scoring_lines(student, p, "old log-probs", "old log-probs", tr.micro_batch_size, n, P, R,
                                shared=shared, attn=attn)
    scoring = []  # teachers score one after another: the largest one's pass counts
    for role, te, shape, dtype in teachers:
        if te.backend == "hf":  # loaded without attn_implementation (SDPA), unless it is the student itself
            own = shape is student
            scoring.append(_scoring_lines(shape, _BYTES[dtype], "teacher scoring" if len(teachers) == 1 else
                                          f"{role} scoring", "teacher scoring", te.micro_batch_size, n, P, R,
                                          shared=shared if own else shape.shares_prefixes, attn=attn if own else None))
    lines += max(scoring, key=lambda group: sum(x.bytes for x in group), default=[])
    if a.distill == "topk" and teachers:
        # the teacher's top-k ids (8 bytes) and log-probs (4) per response token of a scoring micro-batch; the
        # student's log-probs of them in the old pass; in the update also the buckets, the divergence's terms and
        # their gradients (~10 float32 per bucket)
        K, micro_t = a.topk, max(te.micro_batch_size for _, te, _, _ in teachers)
        lines.append(MemoryLine("top-k buffers (teacher scoring)", ("teacher scoring",), micro_t * R * K * 12))
        lines.append(MemoryLine("top-k buffers (old log-probs)", ("old log-probs",), tr.micro_batch_size * R * K * 12))
        lines.append(MemoryLine("top-k buffers (update)", ("update",), tr.micro_batch_size * R * (K + 1) * 48))
    lines.append(MemoryLine("gradients", ("update", "optimizer step"), trainable_bytes // div))
    largest = student.largest_param * (4 if lora else ps)
    lines += _update_lines(student, p, cfg, attn, shared=shared, trainable_bytes=trainable_bytes // div,
                           largest_param_bytes=largest, autocast=autocast)

    persistent = sum(x.bytes for x in lines if not x.phases)
    phase_bytes = {ph: persistent + sum(x.bytes for x in lines if ph in x.phases) for ph in PHASES
                   if any(ph in x.phases for x in lines)}
    peak_phase = max(phase_bytes, key=phase_bytes.get)
    peak = phase_bytes[peak_phase]
    warnings = []
    if gpu_memory is not None and peak > gpu_memory:
        warnings.append(f"estimated peak {peak / GIB:.2f} GiB per GPU ({peak_phase}) exceeds --gpu-memory "
                        f"{gpu_memory / GIB:.2f} GiB; {_advice(peak_phase, shard)}")
    return ResourcePlan(student=student, teacher=teacher, student_dtype=s_name, teacher_dtype=t_name,
                        compute_dtype=c_name, prompt_tokens=P,
                        response_tokens=R, world_size=world_size, shard=shard, shard_teacher=shard_teacher,
                        lines=tuple(lines), phase_bytes=phase_bytes, peak_bytes=peak, peak_phase=peak_phase,
                        gpu_memory_bytes=gpu_memory, warnings=tuple(warnings),
                        teachers=tuple((role, shape, dtype) for role, _, shape, dtype in teachers))


def _teacher_shapes(cfg: RunConfig, student: ModelShape, compute: str) -> list:
    """(role, section, ModelShape, dtype name) of every teacher that takes memory here (a served one takes none).
    A self teacher on the current weights is the student's own shape object, in the compute dtype."""
    from gndpo.config import teacher_sections

    out = []
    sections = teacher_sections(cfg)
    for where, te in sections:
        if te.backend == "server":
            continue
        role = ("self teacher" if te.path == "self" else "teacher") + (f" {te.name}" if len(sections) > 1 else "")
        if te.path == "self" and te.self_weights == "current":
            out.append((role, te, student, compute))
            continue
        path, remote = (cfg.model.path, cfg.model.trust_remote_code) if te.path == "self" else \
            (te.path, te.trust_remote_code)
        shape = model_shape(path, what="teacher", trust_remote_code=remote)
        out.append((role, te, shape, dtype_bytes(te.dtype, cfg.trainer.device)[0]))  # self: the starting weights
    return out


def measured_peak_bytes(prof) -> int:
    """The peak tensor memory of a run recorded by ``torch.profiler.profile(profile_memory=True)`` on the CPU: the
    peak of the running sum of every allocation and free, in time order (weights loaded inside the profile
    included). What :func:`build_plan` estimates, for checking it (tests/test_plan.py, bench_real_shapes.py)."""
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak


def _advice(phase: str, shard: str) -> str:
    knobs = {
        "rollout": "lower rollout.micro_batch_size (sequences decoded together) or rollout.max_new_tokens",
        "old log-probs": "lower trainer.micro_batch_size, or algorithm.old_logprobs=sampler",
        "teacher scoring": "lower teacher.micro_batch_size" + (", or --shard-teacher" if shard == "fsdp" else ""),
        "update": "lower trainer.micro_batch_size, set model.gradient_checkpointing=true or model.lora.rank=16",
        "optimizer step": "set model.lora.rank=16",
    }[phase]
    if shard == "none" and phase in ("update", "optimizer step", "teacher scoring"):
        knobs += ", or shard across GPUs (--shard fsdp --world-size N)"
    return "try: " + knobs


# ---------------------------------------------------------------- text


def default_world_size() -> int:
    """``$WORLD_SIZE`` (set by torchrun) or 1."""
    value = os.environ.get("WORLD_SIZE", "").strip() or "1"
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"WORLD_SIZE={value!r} is not a positive integer; pass --world-size N")
    return int(value)


def parse_memory(text: str) -> int:
    """Bytes in ``80GB``, ``80GiB``, ``80`` (GiB), ``141GB``, ``512MiB``. GB counts as GiB: a GPU sold as
    "80GB" holds 80 GiB (nvidia-smi reports 81920 MiB)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:([kmgt])i?b?)?\s*", str(text), re.IGNORECASE)
    if match is None or float(match.group(1)) <= 0:
        raise ConfigError(f"--gpu-memory {text!r} is not a memory size; use e.g. 80GB, 80GiB or 80 (GiB)")
    unit = {"k": 1, "m": 2, "g": 3, "t": 4}[(match.group(2) or "g").lower()]
    return int(float(match.group(1)) * 1024**unit)


def format_count(n: int) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f}{suffix}" if suffix == "B" else f"{n / scale:.1f}{suffix}"
    return str(n)


def _table(rows: list[tuple], right: set[int]) -> list[str]:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
            .rstrip() for row in rows]


def format_plan(plan: ResourcePlan) -> str:
    """The plan as an aligned text table (GiB with two decimals)."""
    head = (f"resource plan: estimated memory per GPU; world size {plan.world_size}, shard {plan.shard}"
            f"{' (teacher too)' if plan.shard_teacher else ''}; worst case {plan.prompt_tokens:,}-token prompts + "
            f"{plan.response_tokens:,}-token responses")
    models = [("model", "params", "vision", "language", "trainable", "dtype", "path")]
    student_dtype = plan.student_dtype if plan.compute_dtype == plan.student_dtype else \
        f"{plan.student_dtype}, computes in {plan.compute_dtype}"
    roles = (("student", plan.student, student_dtype), *((role, shape, dtype) for role, shape, dtype in plan.teachers
                                                          if shape is not plan.student))
    for role, s, dtype in roles:
        if s is not None:
            models.append((role, format_count(s.total), format_count(s.vision), format_count(s.language),
                           format_count(s.trainable) if role == "student" else "0", dtype, s.path))
    memory = [("memory", "phase", "GiB")]
    for line in plan.lines:
        memory.append((line.name, ", ".join(line.phases) or "all", f"{line.bytes / GIB:.2f}"))
    for phase, total in plan.phase_bytes.items():
        memory.append((f"total during {phase}", "", f"{total / GIB:.2f}"))
    memory.append(("peak", plan.peak_phase, f"{plan.peak_bytes / GIB:.2f}"))
    out = [head, *_table(models, {1, 2, 3, 4}), "", *_table(memory, {2})]
    if plan.gpu_memory_bytes is not None:
        room = plan.gpu_memory_bytes - plan.peak_bytes
        out.append(f"--gpu-memory {plan.gpu_memory_bytes / GIB:.2f} GiB: "
                   + (f"fits, {room / GIB:.2f} GiB to spare" if room >= 0 else f"exceeded by {-room / GIB:.2f} GiB"))
    return "\n".join(out)
