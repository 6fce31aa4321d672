"""Multi-process data parallel under torchrun: the process group, reductions, rank-0 duties.

``torchrun --nproc-per-node N -m fastprompt train ...`` starts N processes with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and a rendezvous in their environment (torch.distributed's own
variables); :func:`setup` joins the group (NCCL on CUDA, gloo on CPU) and gives each process its
device. A single process needs none of it: :class:`DistEnv` then says rank 0 of 1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DistEnv",
    "all_gather_objects",
    "all_reduce_sum",
    "barrier",
    "env_rank",
    "launched_by_torchrun",
    "setup",
    "teardown",
]


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the run.

    Attributes
    ----------
    rank, world, local_rank : int
    device : torch.device
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        """Rank 0: the process that logs and writes checkpoints."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def launched_by_torchrun() -> bool:
    """Whether torch.distributed's launcher set this process's rank and world size."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def env_rank() -> int:
    """This process's rank as torchrun set it (0 outside torchrun), before any group exists."""
    return int(os.environ.get("RANK", "0")) if launched_by_torchrun() else 0


def setup(device: str | None = None) -> DistEnv:
    """Join the process group if torchrun started this process; pick the device.

    Parameters
    ----------
    device : str, optional
        ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; default CUDA when available. Under torchrun a CUDA
        process takes ``cuda:LOCAL_RANK``.
    """
    want = torch.device(device) if device else None
    use_cuda = torch.cuda.is_available() if want is None else want.type == "cuda"
    if not launched_by_torchrun():
        return DistEnv(device=want or torch.device("cuda" if use_cuda else "cpu"))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if use_cuda:
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistEnv(rank=rank, world=world, local_rank=local, device=dev)


def teardown(env: DistEnv) -> None:
    if env.active and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.active:
        dist.barrier()


def all_reduce_sum(env: DistEnv, values: torch.Tensor) -> torch.Tensor:
    """Sum of ``values`` over processes (in place on a copy; float64 keeps sums exact enough)."""
    if not env.active:
        return values
    out = values.clone()
    if env.device.type == "cuda":
        out = out.to(env.device)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(values.device)


def all_gather_objects(env: DistEnv, obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order."""
    if not env.active:
        return [obj]
    out: list[Any] = [None] * env.world
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(env: DistEnv, obj: Any) -> Any:
    """Rank 0's ``obj`` on every process."""
    if not env.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
