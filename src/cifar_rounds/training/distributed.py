"""torchrun/DDP support: which process this is, and the few collectives training needs.

Under `torchrun --nproc_per_node=K` (one or many nodes) every rank runs the
same train stage; without torchrun the world is one process and every helper
here is the identity.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    node_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def node_name(self) -> str:
        """This rank's machine: its node rank (two launchers on one host stay apart) and host name."""
        return f"node{self.node_rank}-{socket.gethostname()}"

    @property
    def shard(self) -> slice:
        """This rank's part of every global batch: a strided, disjoint slice."""
        return slice(self.rank, None, self.size)


def init_world(use_cuda: bool) -> World:
    """Join the process group that torchrun describes in the environment, if any."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    world = World(
        int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("GROUP_RANK", "0"))
    )
    if use_cuda:
        torch.cuda.set_device(world.local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return world


def close_world(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def gather(values: T, world: World) -> list[T]:
    """Every rank's `values` (any picklable object), in rank order, on every rank."""
    if world.size == 1:
        return [values]
    gathered: list = [None] * world.size
    dist.all_gather_object(gathered, values)  # object collectives work on gloo and nccl alike
    return gathered


def from_main_rank(obj: object, world: World) -> object:
    """Rank 0's value on every rank, so that every decision (early stopping, NaN) is the same everywhere."""
    if world.size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
