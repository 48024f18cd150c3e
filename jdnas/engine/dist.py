"""Data-parallel training across processes started by torchrun (one process per GPU).

A single process (no `WORLD_SIZE` in the environment, or 1) runs exactly as without this
module. Under torchrun every rank reads the same batches from the iteration sampler and keeps
its own share (`rank::world`), the model is wrapped in DistributedDataParallel (gradients
averaged in buckets, overlapped with the backward pass), and only rank 0 writes files. NCCL on
CUDA, gloo on CPU (which is how the tests exercise this path).
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

from jdnas.engine.device import resolve_device
from jdnas.errors import JdnasError


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job: rank, world size and local rank (GPU index)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def init_distributed(device_name: str) -> tuple[DistContext, torch.device]:
    """Join the process group torchrun describes in the environment; single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(), resolve_device(device_name)
    ctx = DistContext(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device_name.startswith("cuda"):
        if torch.cuda.device_count() <= ctx.local_rank:
            raise JdnasError(f"torchrun started {world} processes but only {torch.cuda.device_count()} GPU(s) visible")
        torch.cuda.set_device(ctx.local_rank)
        device, backend = torch.device("cuda", ctx.local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return ctx, device


def shutdown(ctx: DistContext, wait: bool = True) -> None:
    """Leave the process group (after a barrier unless this rank failed: torchrun stops the others)."""
    if ctx.active and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.active:
        dist.barrier()


@torch.no_grad()
def check_in_sync(weights: Sequence[torch.nn.Parameter], ctx: DistContext) -> None:
    """Raise if the ranks' weights differ (they must: same init, averaged gradients, same steps)."""
    if not ctx.active:
        return
    sums = torch.stack([w.detach().double().sum() for w in weights])
    gathered = [torch.zeros_like(sums) for _ in range(ctx.world)]
    dist.all_gather(gathered, sums)
    for rank, other in enumerate(gathered):
        if not torch.allclose(other, sums, rtol=1e-9, atol=1e-9):
            raise JdnasError(f"DDP: the weights of rank {rank} differ from those of rank {ctx.rank}")


def relaunch_with_torchrun(nproc: int, argv: Sequence[str] | None = None) -> int:
    """Run this command again under torchrun with `nproc` processes on this machine; its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "jdnas.cli", *argv]
    print("launching: " + " ".join(cmd), file=sys.stderr, flush=True)
    return subprocess.call(cmd)
