"""The only module that talks to torch.distributed: the process group, FSDP2 sharding, reductions, sharded
checkpoints.

A single process uses :data:`LOCAL`, whose reductions are the identity. Under ``torchrun`` the trainer gets a
:class:`DistContext` (gloo on CPUs, NCCL on GPUs). Each rank samples, scores and rewards its share of the
step's prompts; the GNDPO statistics, the loss denominators and the metrics are all-reduced, and the
gradients are summed over ranks by FSDP2 (the losses already carry global denominators), so a run ends with
the same weights whatever the number of ranks.

Sharding (:func:`apply_fsdp`) follows torchtitan's order: activation checkpointing is enabled on the model
first, then ``fully_shard`` wraps each decoder layer, each vision-tower block, and last the root, a
:class:`gndpo.forward.ResponseScorer` around the Hugging Face model (gndpo's scoring paths enter there; the
root gathers the embeddings, final norm, LM head and projector).
"""
from __future__ import annotations

import contextlib
import datetime
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from gndpo.errors import GndpoError

_OPS = {"sum": "SUM", "min": "MIN", "max": "MAX"}


class DistError(GndpoError):
    """A distributed run could not start or lost a rank."""


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduced copy of ``tensor`` over all ranks (``op``: sum, min or max)."""
        if self.world_size == 1:
            return tensor
        import torch.distributed as dist

        out = tensor.clone()
        dist.all_reduce(out, op=getattr(dist.ReduceOp, _OPS[op]))
        return out

    def pool(self, sums: dict[str, tuple[float, float]] | None = None, maxima: dict[str, float] | None = None,
             minima: dict[str, float] | None = None) -> dict[str, float]:
        """Metrics over all ranks in three reductions: ``sums`` maps name -> (weighted sum, weight) and gives the
        weighted mean; ``maxima``/``minima`` give the extremes."""
        sums, maxima, minima = sums or {}, maxima or {}, minima or {}
        out: dict[str, float] = {}
        if sums:
            t = self.all_reduce(torch.tensor([x for pair in sums.values() for x in pair], dtype=torch.float64))
            for i, name in enumerate(sums):
                out[name] = float(t[2 * i] / t[2 * i + 1]) if t[2 * i + 1] else float("nan")
        for values, op in ((maxima, "max"), (minima, "min")):
            if values:
                t = self.all_reduce(torch.tensor(list(values.values()), dtype=torch.float64), op)
                out.update(zip(values, t.tolist()))
        return out

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on rank 0 and give every rank its result; a GndpoError it raises is raised on every rank
        (so a user mistake found by rank 0 stops all ranks with the same one line)."""
        if self.world_size == 1:
            return fn()
        import torch.distributed as dist

        box: list[Any] = [None]
        if self.is_main:
            try:
                box[0] = ("ok", fn())
            except GndpoError as exc:
                box[0] = ("error", exc)
        dist.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "error":
            raise value
        return value


LOCAL = DistContext()


def init_from_env(timeout_s: float = 600.0) -> DistContext:
    """The process group of a ``torchrun`` launch (WORLD_SIZE > 1), or :data:`LOCAL`. ``timeout_s``: how long a
    collective may wait for a missing rank before every rank stops with an error instead of hanging."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return LOCAL
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend="nccl" if cuda else "gloo",
                                    timeout=datetime.timedelta(seconds=timeout_s))
        except Exception as exc:  # rendezvous failures carry multi-line context
            first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__).strip()
            where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
            if "wait timeout" in first.lower() or "keys:" in first:  # the store answered, but a rank never came
                raise DistError(f"not every rank joined the process group at {where} within trainer.dist_timeout="
                                f"{timeout_s:g} s ({first[:160]}); check that every node started the same command "
                                "and none is stuck before training") from None
            raise DistError(f"cannot join the process group at {where} ({first[:200]}); check the torchrun "
                            "--rdzv-endpoint / --master-addr and that every node can reach it") from None
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank)


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------- FSDP2


def _decoder_layers(model) -> list:
    """The decoder layers of a Hugging Face causal LM or VLM (``get_decoder().layers``)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise DistError(f"cannot find the decoder layers of {type(model).__name__} to shard; "
                        "gndpo shards models whose decoder has a .layers list")
    return list(layers)


def _vision_layers(model) -> list:
    """The blocks of a VLM's vision tower: the tower's longest list of same-class modules (CLIP's and InternViT's
    encoder layers, Qwen-VL's blocks); [] for a text model."""
    base = getattr(model, "model", model)
    tower = next((t for t in (getattr(base, n, None) or getattr(model, n, None)
                              for n in ("vision_tower", "visual", "vision_model")) if t is not None), None)
    if tower is None:
        return []
    lists = [m for m in tower.modules() if isinstance(m, torch.nn.ModuleList) and len(m)
             and len({type(c) for c in m}) == 1]
    return list(max(lists, key=len)) if lists else []


def apply_fsdp(root: torch.nn.Module, model, *, param_dtype: torch.dtype | None = None,
               reduce_dtype: torch.dtype = torch.float32, cpu_offload: bool = False,
               reshard_after_forward: bool = True) -> None:
    """Shard ``model`` (inside ``root``, a ResponseScorer) over all ranks with FSDP2, in place.

    ``param_dtype``: compute dtype of the gathered weights (None: the stored dtype); gradients are reduced in
    ``reduce_dtype``. Gradients are *summed* over ranks (not averaged): every rank's loss already uses the
    global batch's denominators. ``cpu_offload``: sharded weights, gradients and optimizer state live on the CPU
    between uses.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kwargs: dict[str, Any] = {"mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)}
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    # Layers, never whole sub-models: FSDP2 swaps a wrapped module's class, and transformers finds a sub-model's
    # hidden-state capture by its exact class (LLaVA's vision tower would then return no hidden states).
    units = [*_decoder_layers(model), *_vision_layers(model)]
    for unit in units:
        fully_shard(unit, reshard_after_forward=reshard_after_forward, **kwargs)
    # The root reshards after every forward too. FSDP2's default keeps a root gathered from its forward to its
    # backward, but gndpo runs no-grad forwards (old log-probs, the teacher's, the sync check) between
    # updates, after which a root left gathered summed its gradients wrongly across ranks (measured: a 2-rank
    # run's gradient norm 0.98 against 1.71 in one process, with identical rollouts and advantages).
    fully_shard(root, reshard_after_forward=True, **kwargs)
    for unit in (*units, root):
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)  # gloo has no pre-scaled sum
    # FSDP2 makes the first unit to run its forward the root. The sampler runs the Hugging Face model, whose
    # layers would then each claim to be one: initialize the true root's state now (no public API for it).
    root._get_fsdp_state()._lazy_init()


def fsdp_units(root: torch.nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in root.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered(root: torch.nn.Module) -> Iterator[None]:
    """Every FSDP2 unit under ``root`` holds its full weights inside the block (one all-gather per unit), so a
    decode loop can call the model token after token without gathering per step. Costs the full model's
    weights on each rank for the duration."""
    units = fsdp_units(root)
    if not units:
        yield
        return
    for unit in units:
        unit.set_reshard_after_forward(False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True)


def clip_grad_norm(params, max_norm: float, ctx: DistContext) -> float:
    """Scale the gradients of ``params`` in place so their global L2 norm is at most ``max_norm`` (as
    ``torch.nn.utils.clip_grad_norm_``: coefficient ``max_norm / (norm + 1e-6)``, at most 1) and return the norm
    before clipping. Under FSDP2 each rank holds disjoint shards of every gradient: the global norm is the root of
    the all-reduced sum of the local shards' squares, one float64 all-reduce (what torch's clip_grad_norm_
    computes through DTensor operations, here explicit and in double precision)."""
    grads = [p.grad for p in params if p.grad is not None]
    local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
    squares = sum((g.detach().double().pow(2).sum().cpu() for g in local), torch.zeros((), dtype=torch.float64))
    norm = float(ctx.all_reduce(squares).sqrt())
    if math.isfinite(norm) and math.isfinite(max_norm) and norm > 0:
        coef = max_norm / (norm + 1e-6)
        if coef < 1.0:
            for g in local:  # the local shard is the gradient's storage: scaling it scales the DTensor
                g.mul_(coef)
    return norm


# ---------------------------------------------------------------- sharded checkpoints


def save_sharded(path: str, model, optimizer) -> None:
    """Model and optimizer state, each rank writing its shards (Distributed Checkpoint); collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)


def load_sharded(path: str, model, optimizer) -> None:
    """Load a :func:`save_sharded` checkpoint into ``model`` and ``optimizer``, whatever the number of ranks
    that wrote it (DCP reshards); collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    # The template holds optimizer state for every parameter (DCP initializes it), the checkpoint only for those
    # that ever had a gradient (LLaVA's unused last vision layer norm has none): load what was saved, and leave
    # the others without state, as they were in the run that saved it.
    saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    optim_sd["state"] = {fqn: stats for fqn, stats in optim_sd.get("state", {}).items()
                         if all(f"optim.state.{fqn}.{k}" in saved for k in stats)}
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    # strict=False only lets those parameters stay without optimizer state: dcp.load above was strict
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(strict=False))


def full_state_dict(model) -> dict:
    """The full (unsharded) model state on the CPU, on rank 0 (empty elsewhere); collective under FSDP."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # tied parameters (an LM head sharing the embeddings) appear under each name: keep the first, as
    # save_pretrained does for an unsharded model
    seen, tied = set(), set()
    for name, param in model.named_parameters(remove_duplicate=False):
        (tied if id(param) in seen else seen).add(name if id(param) in seen else id(param))
    return {k: v for k, v in full.items() if k not in tied}


@contextlib.contextmanager
def keeping_default_group() -> Iterator[None]:
    """Inside this block, destroying torch's default process group is a no-op (other groups still go).

    vLLM's ``EngineCore.shutdown`` ends with ``cleanup_dist_env_and_memory``, whose last step destroys the default
    process group. Under torchrun, an engine on vLLM's external_launcher lives in the trainer's group, which the
    trainer (and whatever runs after it in the process) still needs; vLLM's own groups are still torn down, so a
    later engine builds them afresh."""
    import torch.distributed as dist

    real = dist.destroy_process_group

    def destroy(group=None):
        if group is not None:
            real(group)

    dist.destroy_process_group = destroy
    try:
        yield
    finally:
        dist.destroy_process_group = real


def broadcast_object(obj: Any, ctx: DistContext) -> Any:
    if ctx.world_size == 1:
        return obj
    import torch.distributed as dist

    box = [obj if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]

