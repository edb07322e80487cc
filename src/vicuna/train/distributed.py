"""The torchrun process group as the trainer sees it: who am I, and the few collectives it needs.

Every helper is a no-op in a single process, so the loop and the checkpoint code
read the same with and without torchrun.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: Any = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def on(self) -> bool:
        return self.world > 1


def init_distributed() -> Dist:
    """Join the torchrun process group if there is one (nccl on CUDA, gloo on CPU)."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local, device)


def all_reduce(x, d: Dist, op: str = "sum"):
    import torch.distributed as dist

    if d.on:
        dist.all_reduce(x, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return x


def barrier(d: Dist) -> None:
    import torch.distributed as dist

    if d.on:
        dist.barrier()


def gather_objects(obj: Any, d: Dist) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    import torch.distributed as dist

    if not d.on:
        return [obj]
    out: list = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, d: Dist) -> Any:
    """Rank 0's ``obj`` on every rank."""
    import torch.distributed as dist

    if not d.on:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
