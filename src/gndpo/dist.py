"""The only module that talks to torch.distributed.

Single-process runs use :data:`LOCAL`, whose reductions are the identity. A data-parallel run (torchrun)
gets a :class:`DistContext` whose ``all_reduce`` sums/mins/maxes across ranks, so the GNDPO batch
statistics and the loss denominators cover the whole global batch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

_OPS = {"sum": "SUM", "min": "MIN", "max": "MAX"}


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduced copy of ``tensor`` over all ranks (``op``: sum, min or max)."""
        if self.world_size == 1:
            return tensor
        import torch.distributed as dist

        out = tensor.clone()
        dist.all_reduce(out, op=getattr(dist.ReduceOp, _OPS[op]))
        return out


LOCAL = DistContext()


def init_from_env() -> DistContext:
    """Initialise the default process group when launched by torchrun; otherwise the local context."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return LOCAL
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size())
