"""The run configuration: nested dataclasses, YAML files and dotted ``key=value`` overrides (OmegaConf).

Defaults are the paper's Table 2 (arXiv 2606.09091). ``algorithm.method`` is a preset: it fills the
advantage estimator, policy loss, aggregation mode and reward the way the paper does, and any of those
fields set explicitly wins over the preset. Everything is validated by :func:`validate` before a model
is loaded, so a typo costs a second, not a model download.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from gndpo.errors import ConfigError


def _f(default: Any, help: str, *, choices: tuple | None = None, factory=None):
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


DTYPES = ("auto", "float32", "bfloat16", "float16")
# float16 compute would need loss scaling, which gndpo does not do: bfloat16 has float32's exponent range
COMPUTE_DTYPES = ("auto", "float32", "bfloat16")


# The language model's attention and MLP projections in every family gndpo tests (Qwen2/3, Llama, InternVL's
# and Qwen-VL's text models); the vision tower and projector stay frozen under this default.
LORA_DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraConfig:
    rank: int = _f(0, "LoRA rank r; 0 = off (full fine-tuning). Only the adapters (and modules_to_save) train.")
    alpha: float = _f(32.0, "LoRA alpha: the adapter's update is scaled by alpha / rank.")
    dropout: float = _f(0.0, "Dropout on the adapters' input in the update's forward passes (sampling and the old "
                        "log-probs run without it).")
    target_modules: Any = _f(None, "Modules that get adapters: a list of names or dotted name suffixes, matched "
                             "inside the language model only (a VLM's vision tower and projector never match a "
                             "list), or one string: 'all-linear' (every linear layer but the LM head, vision tower "
                             "and projector included) or a regular expression matched against full module names "
                             "(PEFT's rules). Default: the language model's attention and MLP projections.",
                             factory=lambda: list(LORA_DEFAULT_TARGETS))
    modules_to_save: list = _f(None, "Modules trained in full and saved beside the adapters, matched by name "
                               "suffix over the whole model (e.g. [lm_head] or [multi_modal_projector]); a tied "
                               "embedding stays tied to its trained copy.", factory=list)


@dataclass
class VLLMConfig:
    gpu_memory_utilization: float = _f(0.5, "Fraction of the GPU's memory the engine may take (weights, KV cache); "
                                       "the trainer colocated on the same GPU uses the rest.")
    max_model_len: Optional[int] = _f(None, "Longest sequence the engine accepts; default data.max_prompt_length + "
                                      "rollout.max_new_tokens (+1 for scoring).")
    enforce_eager: bool = _f(False, "Disable CUDA graphs (less memory, slower decoding). Always on for CPUs.")
    tensor_parallel_size: int = _f(1, "GPUs one engine spans (tensor parallelism).")
    sleep: bool = _f(True, "rollout.vllm, CUDA: free the engine's memory (weights and KV cache) while the trainer "
                     "scores and updates, and wake it with the new weights for the next rollout. Off beside an "
                     "in-process vLLM teacher (one sleep allocator per process); no effect on CPUs or teachers.")


@dataclass
class ModelConfig:
    path: str = _f("", "Student: Hugging Face id or local directory (causal LM or image-text-to-text model).")
    dtype: str = _f("auto", "Dtype of the student's stored weights: the master copy the optimizer updates, its "
                    "gradients and AdamW's state. auto = float32 (a LoRA run's frozen base: bfloat16 on GPU). "
                    "bfloat16 here keeps no float32 master: at lr 1e-6 most AdamW steps round away (warned).",
                    choices=DTYPES)
    compute_dtype: str = _f("auto", "Dtype of the student's forward and backward passes (sampling with the hf "
                            "backend, scoring, the update). bfloat16 over float32 weights is mixed precision: "
                            "autocast in one process, FSDP2's MixedPrecisionPolicy under torchrun; weights, "
                            "gradients and optimizer state stay float32. auto = bfloat16 on GPU, model.dtype on CPU. "
                            "Also the dtype of a rollout.backend=vllm engine.", choices=COMPUTE_DTYPES)
    trust_remote_code: bool = _f(False, "Allow custom modelling code from the model repository.")
    allow_pickle: bool = _f(False, "Load pickled .bin/.pt weights (they can run code); default: safetensors only.")
    attn_implementation: Optional[str] = _f(None, "Attention kernel passed to from_pretrained (sdpa, eager, flash_attention_2).")
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward to save memory.")
    lora: LoraConfig = _f(None, "LoRA adapters (PEFT); off unless model.lora.rank > 0.", factory=LoraConfig)


@dataclass
class TeacherConfig:
    path: Optional[str] = _f(None, "Teacher: Hugging Face id or local directory; required by opd and gndpo. 'self': "
                             "self-distillation, the student's own weights (teacher.self_weights) given a privileged "
                             "context (teacher.context) the student does not see.")
    backend: str = _f("hf", "Where the teacher runs: hf = in-process Hugging Face model; vllm = in-process vLLM "
                      "engine (prompt log-probs); server = a scoring server at teacher.url (gndpo serve-teacher, or "
                      "vLLM's OpenAI server for text-only teachers).", choices=("hf", "vllm", "server"))
    dtype: str = _f("auto", "Teacher weights dtype.", choices=DTYPES)
    trust_remote_code: bool = _f(False, "Allow custom modelling code from the teacher repository.")
    allow_pickle: bool = _f(False, "Load pickled .bin/.pt teacher weights (they can run code); default: safetensors "
                            "only.")
    micro_batch_size: int = _f(8, "Sequences per teacher forward pass (hf), per engine call (vllm) or per request "
                               "(server).")
    vllm: VLLMConfig = _f(None, "teacher.backend=vllm: the engine.", factory=VLLMConfig)
    url: Optional[str] = _f(None, "teacher.backend=server: the server's base URL, e.g. http://10.0.0.5:8100.")
    api_key_env: str = _f("GNDPO_TEACHER_API_KEY", "teacher.backend=server: environment variable holding the "
                          "server's API key (the key itself is never written to the config or the run directory).")
    timeout: float = _f(600.0, "teacher.backend=server: seconds one request may take.")
    retries: int = _f(3, "teacher.backend=server: retries of a failed request (with backoff) before the run stops.")
    connect_timeout: float = _f(600.0, "teacher.backend=server: seconds to wait for a server that does not accept "
                                "connections yet (one started beside the run, its engine still loading); 0 = fail "
                                "at once.")
    check_compatibility: bool = _f(True, "Refuse to train unless student and teacher tokenize identically.")
    context: Optional[str] = _f(None, "Privileged context the teacher sees and the student does not: a template over "
                                "the record's fields, e.g. 'Reference answer: {answer}' (any text or number field of "
                                "the dataset, by its name there; {{ and }} for literal braces). Required by "
                                "teacher.path=self; any other teacher may take one too.")
    context_at: str = _f("prompt", "Where teacher.context goes: prompt = on its own line before the problem, in the "
                         "user turn (after the images); system = appended to the system prompt.",
                         choices=("prompt", "system"))
    self_weights: str = _f("current", "teacher.path=self: current = the student's weights at each step, scored "
                           "without gradient (no second copy); initial = a frozen copy of the starting weights "
                           "(model.path) in teacher.dtype, one more model in memory.", choices=("current", "initial"))


@dataclass
class TeacherEntry(TeacherConfig):
    """One of several teachers (the ``teachers:`` list): a name plus every key of the ``teacher:`` section."""

    name: str = _f("", "The teacher's name, which the records' data.teacher_key field gives.")


@dataclass
class DataConfig:
    train: str = _f("", "Training prompts: jsonl/json/parquet file, save_to_disk directory, or hub dataset id.")
    format: str = _f("auto", "Dataset adapter.", choices=("auto", "jsonl", "parquet", "datasets", "geometry3k"))
    split: str = _f("train", "Split to read.")
    prompt_key: str = _f("problem", "Record field holding the problem text.")
    answer_key: str = _f("answer", "Record field holding the reference answer.")
    image_key: Optional[str] = _f("images", "Record field holding images (list or single); null = text only.")
    id_key: Optional[str] = _f(None, "Record field holding a stable id; default split-index.")
    prompt_suffix: str = _f("paper", "Text appended to each problem: 'paper' (App. A.2 think/boxed instruction), 'none', or literal text.")
    system_prompt: Optional[str] = _f(None, "Optional system message.")
    max_prompt_length: int = _f(8192, "Prompts longer than this many tokens (images included) are skipped and counted.")
    shuffle: bool = _f(True, "Reshuffle the prompts every epoch (seeded).")
    limit: Optional[int] = _f(None, "Use only the first N records.")
    teacher_key: Optional[str] = _f(None, "With a teachers: list, the record field naming each example's teacher; a "
                                    "record without it (or null there) goes to data.default_teacher.")
    default_teacher: Optional[str] = _f(None, "With a teachers: list, the teacher of records whose data.teacher_key "
                                        "field is missing or null; null = the list's first.")
    max_image_tiles: Optional[int] = _f(None, "Tiling processors (InternVL): most tiles an image is cut into, "
                                        "plus a thumbnail when it needs more than one (the image processor's "
                                        "max_patches); null = the processor's own setting (12 for InternVL3.5).")
    min_pixels: Optional[int] = _f(None, "Dynamic-resolution processors (Qwen-VL): images smaller than this many "
                                   "pixels are upscaled; null = the processor's own setting.")
    max_pixels: Optional[int] = _f(None, "Dynamic-resolution processors (Qwen-VL): images larger than this many "
                                   "pixels are downscaled (fewer image tokens); null = the processor's own setting.")


@dataclass
class RolloutConfig:
    backend: str = _f("hf", "Sampler: hf = the in-process Hugging Face student; vllm = an in-process vLLM engine "
                      "holding a copy of the student, updated in place after every optimizer step.",
                      choices=("hf", "vllm"))
    engine: str = _f("loop", "hf backend: loop = gndpo's KV-cache decode loop (each prompt prefilled once for "
                     "its n samples, finished rows leave the batch; Qwen-VL's multimodal RoPE included; encoder-decoders "
                     "use generate); generate = transformers generate. Same distribution.",
                     choices=("loop", "generate"))
    n: int = _f(16, "Responses sampled per prompt (G).")
    temperature: float = _f(1.0, "Sampling temperature.")
    top_p: float = _f(1.0, "Nucleus sampling threshold.")
    top_k: int = _f(0, "Top-k sampling; 0 = off.")
    max_new_tokens: int = _f(16384, "Maximum response length in tokens.")
    min_new_tokens: int = _f(0, "Suppress EOS before this many tokens (throughput benchmarks: fixed-length work "
                             "with random weights). Off-policy by the suppressed EOS mass; 0 = off.")
    micro_batch_size: int = _f(64, "hf backend: sequences decoded together (prompts per call = this // n).")
    sync_check_every: int = _f(10, "vllm backend: compare the engine's weights (a fingerprint, exact, where the "
                               "engine computes with its parameters: CUDA) and log-probs with the trainer's at the "
                               "first step and every N steps; the run stops when they differ (stale or wrong "
                               "weights).")
    sync_check_responses: int = _f(4, "vllm backend: responses the sync check scores on both sides.")
    sync_tolerance: Optional[float] = _f(None, "vllm backend: largest mean |log-prob difference| the sync check "
                                         "accepts; default by dtype: 1e-4 for float32, 2e-2 for bfloat16/float16.")
    vllm: VLLMConfig = _f(None, "rollout.backend=vllm: the engine.", factory=VLLMConfig)


@dataclass
class AlgorithmConfig:
    method: str = _f("gndpo", "Preset: gndpo, opd (raw on-policy distillation) or gspo (0/1 outcome reward).",
                     choices=("gndpo", "opd", "gspo"))
    advantage: Optional[str] = _f(None, "Advantage estimator (gndpo, opd, grpo); default from the method.")
    scope: Optional[str] = _f(None, "Normalization scope of the distillation reward (batch, group, sequence, none); default from the method.",
                              choices=(None, "batch", "group", "sequence", "none"))
    norm_stats: str = _f("batch", "Statistics that z-score the reward under scope=batch: batch = this batch's mean and "
                         "variance (the paper); running = this batch's joined with earlier steps', exponentially "
                         "decayed by algorithm.norm_decay (steadier at small batches; docs/LAB.md measures it).",
                         choices=("batch", "running"))
    norm_decay: float = _f(0.9, "norm_stats=running: weight of the earlier steps' statistics, in [0, 1]; 0 = the "
                           "batch's alone, 0.9 = about the last 10 steps.")
    reward_clamp: Optional[float] = _f(5.0, "Clamp |log p_teacher - log p_student| at this bound; null = no clamp.")
    policy_loss: Optional[str] = _f(None, "Policy loss (gspo_token, ppo, reinforce); default from the method.")
    loss_agg_mode: Optional[str] = _f(None, "Loss aggregation; the paper uses seq-mean-token-mean.",
                                      choices=(None, "token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"))
    clip_low: float = _f(0.2, "Lower clip epsilon of the ratio.")
    clip_high: float = _f(0.2, "Upper clip epsilon of the ratio.")
    outcome_reward: str = _f("math", "Outcome reward for gspo and for accuracy metrics.", choices=("math", "math_format"))
    norm_by_std: bool = _f(True, "grpo: divide group-centred rewards by the group std.")
    reuse_logprobs: bool = _f(True, "Skip the separate old log-prob pass where it is redundant: outcome-reward "
                              "advantages with one update per batch, whose ratio is exactly 1 (the update's own "
                              "log-probs, detached, are the old ones).")
    old_logprobs: str = _f("recompute", "Student log-probs before the update (the ratio's denominator and the "
                           "distillation reward's student term): recompute = a separate forward pass, as the "
                           "official code does; sampler = the rollout's own log-probs of its tokens (rollout.engine="
                           "loop reports them; equal to the recomputation up to float rounding, at most ~5e-5 in fp32), "
                           "saving one student forward per step. Falls back to recompute when the sampler has none.",
                           choices=("recompute", "sampler"))
    epochs: int = _f(1, "Passes over each rollout batch.")
    mini_batches: int = _f(1, "Optimizer steps per rollout batch and epoch (paper: 1).")
    distill: str = _f("sampled", "What the teacher's signal is made of (distillation methods): sampled = the "
                      "log-ratio of the sampled token (the paper); topk = a divergence between the teacher's and "
                      "the student's distributions over the teacher's top-k tokens plus a tail bucket at every "
                      "position.", choices=("sampled", "topk"))
    topk: int = _f(20, "algorithm.distill=topk: K, the teacher's most likely tokens compared at each position.")
    divergence: str = _f("reverse_kl", "algorithm.distill=topk: forward_kl = KL(teacher || student), reverse_kl = "
                         "KL(student || teacher), jsd = generalized Jensen-Shannon (algorithm.jsd_beta).",
                         choices=("forward_kl", "reverse_kl", "jsd"))
    jsd_beta: float = _f(0.5, "algorithm.divergence=jsd: the mixture weight of the teacher, 0 < beta < 1.")
    dense_mode: str = _f("loss", "algorithm.distill=topk: loss = minimize the divergence directly (a supervised "
                         "per-token loss on the student's logits, aggregated by loss_agg_mode); reward = a policy "
                         "gradient over every candidate (top-k and tail): each gets the reward -dD/dp_student(c) "
                         "under the pre-update student, clamped, normalized as the method's (gndpo: over the batch, "
                         "moments expected under the old student, scope honoured), in a clipped surrogate summed "
                         "over the candidates (docs/DENSE.md; algorithm.policy_loss does not apply).",
                         choices=("loss", "reward"))
    teacher_norm: str = _f("batch", "With a teachers: list and algorithm.advantage=gndpo: batch = z-score the rewards "
                           "over every token of the batch, whatever teacher scored it (the paper's statistics); "
                           "per_teacher = over each teacher's tokens separately (all ranks), so a teacher whose "
                           "log-ratios run larger does not dominate the others'.", choices=("batch", "per_teacher"))


@dataclass
class OptimConfig:
    lr: float = _f(1e-6, "AdamW learning rate (constant after warm-up).")
    weight_decay: float = _f(0.01, "AdamW weight decay.")
    beta1: float = _f(0.9, "AdamW beta1.")
    beta2: float = _f(0.999, "AdamW beta2.")
    eps: float = _f(1e-8, "AdamW epsilon.")
    grad_clip: float = _f(1.0, "Clip the global gradient norm at this value; 0 = off.")
    warmup_steps: int = _f(0, "Linear warm-up optimizer steps.")


@dataclass
class TrainerConfig:
    total_steps: int = _f(65, "Rollout/update steps to run.")
    prompts_per_step: int = _f(32, "Prompts per rollout batch.")
    micro_batch_size: int = _f(4, "Sequences per forward/backward pass (gradient accumulation).")
    seed: int = _f(42, "Seed for data order, sampling and initialisation.")
    device: str = _f("auto", "cpu, cuda, cuda:N or auto.")
    threads: Optional[int] = _f(None, "torch CPU threads; default: torch's choice.")
    output_dir: str = _f("runs/gndpo", "Run directory: metrics, checkpoints, config.")
    resume: bool = _f(False, "Continue the run in output_dir from its newest complete checkpoint.")
    dist_timeout: float = _f(1800.0, "torchrun: seconds a collective waits for a missing rank before every rank "
                             "stops with an error (a rank that died, a hung node) instead of hanging.")
    max_bad_steps: int = _f(3, "Stop after this many consecutive steps with non-finite log-probs, advantages, loss "
                            "or gradients (such steps never update the weights); 0 = never stop.")


@dataclass
class DistConfig:
    reduce_dtype: str = _f("float32", "torchrun: dtype in which gradients are summed over ranks.",
                           choices=("float32", "bfloat16", "float16"))
    cpu_offload: bool = _f(False, "torchrun: keep the sharded student weights, gradients and optimizer state on the "
                           "CPU between uses (less GPU memory, slower steps).")
    shard_teacher: bool = _f(False, "torchrun: shard the hf teacher's weights over the ranks too (else each rank "
                             "holds a full copy; forward only either way).")


@dataclass
class LoggingConfig:
    tensorboard: str = _f("auto", "TensorBoard: auto (when installed), true, false.", choices=("auto", "true", "false"))
    wandb: bool = _f(False, "Log to Weights & Biases.")
    wandb_project: str = _f("gndpo", "W&B project.")
    run_name: Optional[str] = _f(None, "Run name for W&B / plots; default: output_dir's name.")
    progress: bool = _f(True, "Show a progress bar.")
    rollouts_every: int = _f(10, "Save rollout samples (tokens, log-probs, r_t, A_t) for `gndpo inspect` into "
                             "RUN/rollouts/ at the first step, every N steps and the last step; 0 = never.")
    outlier_grad_share: bool = _f(False, "Log outlier/top1pct_grad_share: the gradient norm from the 1 % of tokens "
                                  "with the largest |A_t| over the whole update's (two extra backward passes).")
    rollouts_per_step: int = _f(8, "Responses saved per such step, those holding the step's most extreme tokens "
                                "first.")


@dataclass
class CheckpointConfig:
    every: int = _f(0, "Save every N steps (0 = only at the end).")
    keep_last: Optional[int] = _f(2, "Keep this many newest checkpoints; null = all.")
    save_final: bool = _f(True, "Save a checkpoint after the last step.")
    on_signal: str = _f("save", "SIGTERM/SIGINT (pre-emption, Ctrl-C): finish the current step, then 'save' a "
                        "checkpoint and stop, or just 'exit' (the step is lost; resume from the last checkpoint).",
                        choices=("save", "exit"))


@dataclass
class RunConfig:
    model: ModelConfig = _f(None, "Student model.", factory=ModelConfig)
    teacher: TeacherConfig = _f(None, "Teacher model.", factory=TeacherConfig)
    teachers: list[TeacherEntry] = _f(None, "Several teachers, each example scored by the one its data.teacher_key "
                                      "field names: a list of {name, path or url, backend, dtype, vllm, ...} (every "
                                      "teacher.* key). Leave teacher.path/url unset when using it.", factory=list)
    data: DataConfig = _f(None, "Training prompts.", factory=DataConfig)
    rollout: RolloutConfig = _f(None, "Sampling.", factory=RolloutConfig)
    algorithm: AlgorithmConfig = _f(None, "Advantages and policy loss.", factory=AlgorithmConfig)
    optim: OptimConfig = _f(None, "Optimizer.", factory=OptimConfig)
    trainer: TrainerConfig = _f(None, "Loop, batch sizes, output.", factory=TrainerConfig)
    dist: DistConfig = _f(None, "Several processes (torchrun): sharding and precision.", factory=DistConfig)
    logging: LoggingConfig = _f(None, "Metric loggers.", factory=LoggingConfig)
    checkpoint: CheckpointConfig = _f(None, "Checkpointing.", factory=CheckpointConfig)


# What each method means in the paper (and its official code).
PRESETS: dict[str, dict[str, Any]] = {
    "gndpo": {"advantage": "gndpo", "scope": "batch", "policy_loss": "gspo_token", "loss_agg_mode": "seq-mean-token-mean"},
    "opd": {"advantage": "opd", "scope": "none", "policy_loss": "gspo_token", "loss_agg_mode": "seq-mean-token-mean"},
    "gspo": {"advantage": "grpo", "scope": "none", "policy_loss": "gspo_token", "loss_agg_mode": "seq-mean-token-mean"},
}
DISTILLATION_ESTIMATORS = ("gndpo", "opd")


# ---------------------------------------------------------------- loading


def _omegaconf():
    from omegaconf import OmegaConf

    return OmegaConf


def _one_line(exc: Exception) -> str:
    msg = str(exc).strip().splitlines()
    return msg[0] if msg else type(exc).__name__


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """YAML file (optional) + dotted overrides -> validated :class:`RunConfig` with the preset applied."""
    from omegaconf.errors import OmegaConfBaseException

    OmegaConf = _omegaconf()
    base = OmegaConf.structured(RunConfig)
    layers = []
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            layers.append(OmegaConf.load(p))
        except Exception as exc:  # yaml errors carry multi-line context
            raise ConfigError(f"cannot parse {p}: {_one_line(exc)}") from None
        if not OmegaConf.is_dict(layers[-1]):
            raise ConfigError(f"{p} holds a YAML {type(OmegaConf.to_container(layers[-1])).__name__}, not a mapping "
                              f"of sections (model:, trainer:, ...); see configs/ for examples")
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError(f"override {bad[0]!r} is not of the form key=value (e.g. optim.lr=1e-5)")
    if overrides:
        try:
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        except Exception as exc:
            raise ConfigError(f"cannot parse overrides: {_one_line(exc)}") from None
    try:
        merged = OmegaConf.merge(base, *layers)
        cfg: RunConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise ConfigError(_describe_omegaconf_error(exc)) from None
    return validate(cfg)


# Keys of earlier versions: a stored run config or a user's YAML naming one gets told where it went.
RENAMED = {"dist.param_dtype": "model.compute_dtype (bfloat16 over float32 weights is mixed precision, in one "
                               "process and under torchrun alike)"}


def _describe_omegaconf_error(exc) -> str:
    key = getattr(exc, "full_key", None) or ""
    name = type(exc).__name__
    if name in ("ConfigKeyError", "ConfigAttributeError"):
        if key in RENAMED:
            return f"config key '{key}' was replaced by {RENAMED[key]}"
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        if getattr(exc, "object_type", None) is TeacherEntry and not key.startswith("teachers"):
            key = key.rsplit(".", 1)[-1]  # OmegaConf names a list entry's key without its place
            return f"unknown config key '{key}' in a teachers: entry; valid keys: {', '.join(_field_names('teachers[0]'))}"
        valid = _field_names(parent)
        hint = f"; valid keys{' under ' + parent if parent else ''}: {', '.join(valid)}" if valid else ""
        return f"unknown config key '{key}'{hint}"
    if name == "MissingMandatoryValue":
        return f"missing required config value '{key}'; set it in the YAML or as {key}=..."
    msg = _one_line(exc)
    if "Cannot convert 'DictConfig' to string" in msg:  # `key=a: {b}` on the command line reads as a YAML mapping
        return f"invalid value for '{key}': it reads as a YAML mapping; quote the text: {key}='\"...\"'"
    # OmegaConf puts "full_key: ..." context on separate lines; keep the first line plus the key.
    return f"invalid value for '{key}': {msg}" if key else msg


def _field_names(dotted: str) -> list[str]:
    cls: Any = RunConfig
    if re.match(r"teachers\[\d+\]", dotted):  # an entry of the teachers: list
        cls, dotted = TeacherEntry, dotted.split("]", 1)[1]
    for part in [p for p in dotted.split(".") if p]:
        match = {f.name: f for f in dataclasses.fields(cls)}.get(part)
        if match is None or not dataclasses.is_dataclass(match.default_factory if match.default_factory is not dataclasses.MISSING else None):
            return []
        cls = match.default_factory
    return [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []


# ---------------------------------------------------------------- validation


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def validate(cfg: RunConfig) -> RunConfig:
    """Apply the method preset, then check types' ranges and cross-field rules. Returns ``cfg``."""
    from gndpo.core.advantages import advantage_names
    from gndpo.core.losses import AGG_MODES, policy_loss_names

    # choices declared in field metadata
    sections = [(f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.name != "teachers"]
    for where, sub in sections + [(f"teachers[{i}]", e) for i, e in enumerate(cfg.teachers)]:
        for f in dataclasses.fields(sub):
            choices = f.metadata.get("choices")
            value = getattr(sub, f.name)
            if value in ("True", "False") and "true" in (choices or ()):  # YAML booleans read into str fields
                value = value.lower()
                setattr(sub, f.name, value)
            if choices is not None and value not in choices:
                shown = ", ".join("null" if c is None else str(c) for c in choices)
                raise ConfigError(f"{where}.{f.name}={value!r} is not one of: {shown}")

    a = cfg.algorithm
    preset = PRESETS[a.method]
    chosen = {key for key in preset if getattr(a, key) is not None}  # set by the user, not by the method
    for key, value in preset.items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    _check(a.advantage in advantage_names(),
           f"algorithm.advantage={a.advantage!r} is not one of: {', '.join(advantage_names())}")
    _check(a.policy_loss in policy_loss_names(),
           f"algorithm.policy_loss={a.policy_loss!r} is not one of: {', '.join(policy_loss_names())}")
    _check(a.loss_agg_mode in AGG_MODES, f"algorithm.loss_agg_mode={a.loss_agg_mode!r} is not one of: {', '.join(AGG_MODES)}")
    _check(a.reward_clamp is None or a.reward_clamp > 0, "algorithm.reward_clamp must be > 0 or null")
    _check(0 <= a.clip_low < 1, "algorithm.clip_low must be in [0, 1)")
    _check(a.clip_high >= 0, "algorithm.clip_high must be >= 0")
    _check(a.epochs >= 1, "algorithm.epochs must be >= 1")
    _check(a.mini_batches >= 1, "algorithm.mini_batches must be >= 1")
    if a.scope == "group" and a.advantage not in DISTILLATION_ESTIMATORS:
        raise ConfigError("algorithm.scope applies to distillation estimators (gndpo, opd) only")
    if a.distill == "topk":
        _check(a.advantage in DISTILLATION_ESTIMATORS,
               f"algorithm.distill=topk compares the student with a teacher, which algorithm.method={a.method} "
               f"(advantage {a.advantage}) has none; use algorithm.method=gndpo or opd")
        _check(a.topk >= 1, f"algorithm.topk={a.topk} must be >= 1 with algorithm.distill=topk")
        _check(a.divergence != "jsd" or 0 < a.jsd_beta < 1,
               f"algorithm.jsd_beta={a.jsd_beta} must be in (0, 1); its limits are forward_kl (teacher side) and "
               "reverse_kl")
        _check("policy_loss" not in chosen or a.policy_loss == preset["policy_loss"],
               f"algorithm.policy_loss={a.policy_loss} does not apply with algorithm.distill=topk: dense_mode=loss "
               "minimizes the divergence itself and dense_mode=reward has its own clipped surrogate over the "
               "candidates (docs/DENSE.md); drop algorithm.policy_loss")
        _check(a.dense_mode == "loss" or a.old_logprobs == "recompute",
               "algorithm.dense_mode=reward scores the teacher's top-k under the student before the update, the "
               "pass algorithm.old_logprobs=sampler saves; use algorithm.old_logprobs=recompute")
    _check(0 <= a.norm_decay <= 1, f"algorithm.norm_decay={a.norm_decay} must be in [0, 1]")
    # per-group or per-sequence running statistics would have nothing to carry over: each step's are new prompts
    _check(a.norm_stats == "batch" or (a.advantage in DISTILLATION_ESTIMATORS and a.scope == "batch"),
           f"algorithm.norm_stats=running applies to scope=batch of gndpo/opd only (got advantage={a.advantage}, "
           f"scope={a.scope}): none normalizes nothing, and group or sequence statistics do not carry over between "
           f"steps, whose prompts are new; use algorithm.method=gndpo or algorithm.norm_stats=batch")

    lora = cfg.model.lora
    _check(lora.rank >= 0, "model.lora.rank must be >= 0 (0 = LoRA off)")
    _check(lora.alpha > 0, "model.lora.alpha must be > 0")
    _check(0 <= lora.dropout < 1, "model.lora.dropout must be in [0, 1)")
    targets = lora.target_modules
    _check((isinstance(targets, str) and bool(targets.strip())) or
           (isinstance(targets, (list, tuple)) and len(targets) > 0 and all(isinstance(t, str) and t for t in targets)),
           "model.lora.target_modules must be a non-empty list of module names, 'all-linear' or a regular expression")
    if isinstance(targets, str) and targets.lower() != "all-linear":
        try:
            re.compile(targets)
        except re.error as exc:
            raise ConfigError(f"model.lora.target_modules={targets!r} is not a valid regular expression "
                              f"({exc})") from None
    _check(isinstance(lora.modules_to_save, (list, tuple)) and all(isinstance(t, str) and t for t in lora.modules_to_save),
           "model.lora.modules_to_save must be a list of module names (e.g. [lm_head])")
    # before any model loads: a missing optional dependency should cost a second, not a model download
    _check(lora.rank == 0 or importlib.util.find_spec("peft") is not None,
           f"model.lora.rank={lora.rank} needs PEFT, which is not installed: pip install 'gndpo[lora]'")

    m = cfg.model
    _check(m.dtype in ("auto", "float32") or m.compute_dtype in ("auto", m.dtype),
           f"model.compute_dtype={m.compute_dtype} over model.dtype={m.dtype} weights: mixed precision computes in a "
           f"narrower dtype than the stored one; store float32 (model.dtype=float32) or compute in {m.dtype}")
    _check(cfg.model.path not in ("", "???"), "model.path is required: a Hugging Face id or a local model directory")
    _check(cfg.data.train not in ("", "???"), "data.train is required: a dataset file, directory or hub id")
    _check_teachers(cfg)
    for section, v in (("rollout.vllm", cfg.rollout.vllm), *((f"{w}.vllm", te.vllm) for w, te in teacher_sections(cfg))):
        _check(0 < v.gpu_memory_utilization <= 1, f"{section}.gpu_memory_utilization must be in (0, 1]")
        _check(v.max_model_len is None or v.max_model_len >= 2, f"{section}.max_model_len must be >= 2 or null")
        _check(v.tensor_parallel_size >= 1, f"{section}.tensor_parallel_size must be >= 1")

    r = cfg.rollout
    _check(r.n >= 1, "rollout.n must be >= 1")
    _check(r.temperature > 0, "rollout.temperature must be > 0")
    _check(0 < r.top_p <= 1, "rollout.top_p must be in (0, 1]")
    _check(r.top_k >= 0, "rollout.top_k must be >= 0")
    _check(r.max_new_tokens >= 1, "rollout.max_new_tokens must be >= 1")
    _check(cfg.algorithm.old_logprobs != "sampler" or r.engine == "loop" or r.backend == "vllm",
           "algorithm.old_logprobs=sampler needs rollout.engine=loop or rollout.backend=vllm (generate does not "
           "report log-probs)")
    _check(r.sync_check_every >= 1, "rollout.sync_check_every must be >= 1")
    _check(r.sync_check_responses >= 1, "rollout.sync_check_responses must be >= 1")
    _check(r.sync_tolerance is None or r.sync_tolerance > 0, "rollout.sync_tolerance must be > 0 or null")
    _check(0 <= r.min_new_tokens <= r.max_new_tokens, "rollout.min_new_tokens must be in [0, rollout.max_new_tokens]")
    _check(r.micro_batch_size >= 1, "rollout.micro_batch_size must be >= 1")
    if a.advantage == "grpo":
        _check(r.n >= 2, "rollout.n must be >= 2 for group-normalized outcome rewards (grpo)")

    o = cfg.optim
    _check(o.lr > 0, "optim.lr must be > 0")
    _check(o.weight_decay >= 0, "optim.weight_decay must be >= 0")
    _check(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, "optim.beta1 and optim.beta2 must be in [0, 1)")
    _check(o.grad_clip >= 0, "optim.grad_clip must be >= 0 (0 = off)")
    _check(o.warmup_steps >= 0, "optim.warmup_steps must be >= 0")

    t = cfg.trainer
    _check(t.total_steps >= 1, "trainer.total_steps must be >= 1")
    _check(t.prompts_per_step >= 1, "trainer.prompts_per_step must be >= 1")
    _check(t.micro_batch_size >= 1, "trainer.micro_batch_size must be >= 1")
    _check(t.threads is None or t.threads >= 1, "trainer.threads must be >= 1 or null")
    _check(t.dist_timeout > 0, "trainer.dist_timeout must be > 0 seconds")
    _check(t.max_bad_steps >= 0, f"trainer.max_bad_steps={t.max_bad_steps} must be >= 0 (0 = never stop)")
    _check(cfg.logging.rollouts_every >= 0 and cfg.logging.rollouts_per_step >= 1,
           "logging.rollouts_every must be >= 0 (0 = never) and logging.rollouts_per_step >= 1")
    _check(cfg.data.max_prompt_length >= 1, "data.max_prompt_length must be >= 1")
    _check(cfg.data.limit is None or cfg.data.limit >= 1, "data.limit must be >= 1 or null")
    for key in ("max_image_tiles", "min_pixels", "max_pixels"):
        value = getattr(cfg.data, key)
        _check(value is None or value >= 1, f"data.{key} must be >= 1 or null")
    if cfg.data.min_pixels is not None and cfg.data.max_pixels is not None:
        _check(cfg.data.min_pixels <= cfg.data.max_pixels,
               f"data.min_pixels={cfg.data.min_pixels} exceeds data.max_pixels={cfg.data.max_pixels}")
    # Mini-batches hold whole prompt groups, and micro-batches tile mini-batches exactly, so the
    # accumulated gradient is the full mini-batch gradient.
    _check(t.prompts_per_step % a.mini_batches == 0,
           f"trainer.prompts_per_step={t.prompts_per_step} is not divisible by algorithm.mini_batches={a.mini_batches}")
    mini = t.prompts_per_step * r.n // a.mini_batches
    _check(mini % t.micro_batch_size == 0,
           f"mini-batch of {mini} sequences (prompts_per_step*rollout.n/mini_batches) is not divisible by "
           f"trainer.micro_batch_size={t.micro_batch_size}")
    _check(cfg.checkpoint.every >= 0, "checkpoint.every must be >= 0")
    _check(cfg.checkpoint.keep_last is None or cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last must be >= 1 or null")
    return cfg


def teacher_sections(cfg: RunConfig) -> list[tuple[str, TeacherConfig]]:
    """(where, section) of every teacher the run configures: the ``teachers:`` list's entries, else ``teacher``."""
    if cfg.teachers:
        return [(f"teachers[{i}]", e) for i, e in enumerate(cfg.teachers)]
    return [("teacher", cfg.teacher)]


def _check_teacher(te: TeacherConfig, where: str, advantage: str) -> None:
    from gndpo.teacher.context import template_fields

    _check(te.micro_batch_size >= 1, f"{where}.micro_batch_size must be >= 1")
    _check(te.timeout > 0, f"{where}.timeout must be > 0 seconds")
    _check(te.retries >= 0, f"{where}.retries must be >= 0")
    _check(te.connect_timeout >= 0, f"{where}.connect_timeout must be >= 0 seconds (0 = do not wait)")
    if te.context is not None:
        template_fields(te.context, where=f"{where}.context")
    if advantage not in DISTILLATION_ESTIMATORS:
        return
    if te.path == "self":
        _check(te.context is not None, f"{where}.path=self needs {where}.context, the privileged context only the "
                                       f"teacher sees, e.g. {where}.context='Reference answer: {{answer}}'")
        _check(te.backend != "server", f"{where}.path=self scores with the student's weights in this process; for a "
                                       f"served copy of the student, serve model.path and set {where}.url and "
                                       f"{where}.context")
        _check(te.backend == "hf" or te.self_weights == "initial",
               f"{where}.self_weights=current scores with the trainer's own weights: use {where}.backend=hf (or "
               f"self_weights=initial for a vLLM engine holding the starting weights)")
    elif te.backend == "server":
        _check(bool(te.url) and str(te.url).startswith(("http://", "https://")),
               f"{where}.backend=server needs {where}.url=http://HOST:PORT (a gndpo serve-teacher or vLLM server)")
    elif where == "teacher":
        _check(bool(te.path), f"teacher.path is required by algorithm.advantage={advantage} (or teacher.backend=server "
                              "with teacher.url)")
    else:
        _check(bool(te.path), f"{where} ({te.name!r}) has neither path nor url: set {where}.path to a model, or "
                              f"{where}.backend=server and {where}.url")


def _check_teachers(cfg: RunConfig) -> None:
    """Each teacher's keys, and the rules of several teachers (routing, per-teacher statistics)."""
    a, d = cfg.algorithm, cfg.data
    for where, te in teacher_sections(cfg):
        _check_teacher(te, where, a.advantage)
    if not cfg.teachers:
        for key in ("teacher_key", "default_teacher"):
            _check(getattr(d, key) is None, f"data.{key} routes examples to the teachers of a teachers: list, which "
                                            f"is empty; list the teachers or drop data.{key}")
        _check(a.teacher_norm == "batch", "algorithm.teacher_norm=per_teacher pools the statistics per teacher of a "
                                          "teachers: list, which is empty; list the teachers or drop it")
        return
    _check(not cfg.teacher.path and not cfg.teacher.url,
           "set teacher.path/url or a teachers: list, not both (each entry takes every teacher.* key)")
    names = [e.name for e in cfg.teachers]
    for i, name in enumerate(names):
        _check(bool(name) and name == name.strip(), f"teachers[{i}] needs a name (what data.teacher_key names)")
        _check(names.index(name) == i, f"teachers[{i}] and teachers[{names.index(name)}] are both named {name!r}; "
                                       "names must be unique")
    _check(d.teacher_key is not None or len(names) == 1,
           f"data.teacher_key is required with {len(names)} teachers: the record field naming each example's teacher")
    _check(d.default_teacher is None or d.default_teacher in names,
           f"data.default_teacher={d.default_teacher!r} is not in the teachers: list ({', '.join(names)})")
    _check(not cfg.dist.shard_teacher, "dist.shard_teacher is not supported with a teachers: list (each rank scores "
                                       "its own share of each teacher); drop dist.shard_teacher")
    _check(a.teacher_norm == "batch" or a.scope == "batch",
           f"algorithm.teacher_norm=per_teacher replaces the batch statistics of algorithm.scope=batch, and "
           f"algorithm.scope={a.scope} has none; use algorithm.method=gndpo (or algorithm.scope=batch)")
    _check(a.teacher_norm == "batch" or a.norm_stats == "batch",
           "algorithm.teacher_norm=per_teacher and algorithm.norm_stats=running both replace the batch statistics; "
           "choose one (drop algorithm.norm_stats=running, or algorithm.teacher_norm)")


def to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: RunConfig) -> str:
    OmegaConf = _omegaconf()
    return OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg)))


@dataclass(frozen=True)
class ConfigField:
    """One config key as ``gndpo train --help`` and the docs' config reference show it."""

    key: str  # dotted, e.g. "model.lora.rank"
    default: str  # as shown: null, (required), [a,b], or the value
    choices: tuple[str, ...] | None
    help: str


def config_sections() -> list[tuple[str, str, list[ConfigField]]]:
    """(section, its help, its keys in declaration order) for every top-level section, from the dataclasses."""

    def fields_of(cls, prefix: str) -> list[ConfigField]:
        out = []
        for f in dataclasses.fields(cls):
            factory = f.default_factory if f.default_factory is not dataclasses.MISSING else None
            if dataclasses.is_dataclass(factory):
                out += fields_of(factory, f"{prefix}.{f.name}")
                continue
            default = f.default if f.default is not dataclasses.MISSING else (factory() if factory else "?")
            shown = "null" if default is None else ("(required)" if default == "" else default)
            if isinstance(shown, (list, tuple)):
                shown = "[" + ",".join(map(str, shown)) + "]"
            choices = f.metadata.get("choices")
            shown_choices = tuple("null" if c is None else str(c) for c in choices) if choices else None
            out.append(ConfigField(f"{prefix}.{f.name}", str(shown), shown_choices, f.metadata.get("help", "")))
        return out

    return [(s.name, s.metadata.get("help", ""),
             fields_of(TeacherEntry, "teachers[i]") if s.name == "teachers"  # a list: each entry's keys
             else fields_of(s.default_factory, s.name))
            for s in dataclasses.fields(RunConfig)]


def help_text() -> str:
    """Every config key with its default and help, generated from the dataclasses."""
    lines = []
    for section, section_help, keys in config_sections():
        lines.append(f"{section}:  {section_help}")
        for k in keys:
            extra = f" [{'|'.join(k.choices)}]" if k.choices else ""
            lines.append(f"  {k.key}={k.default}{extra}  {k.help}")
    return "\n".join(lines)
