"""One process per device (torchrun), or a single process when not launched by torchrun."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def main_by_environment() -> bool:
    """Whether this process is rank 0 (or alone), as torchrun's environment says: known
    before the process group starts, and after it has gone."""
    return os.environ.get("RANK", "0") == "0"


def init_distributed(device: str) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun describes in the environment (if any) and pick this
    process's device: `cuda:<local_rank>` under torchrun with CUDA, else `device`."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistInfo(), torch.device(device)
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=info.rank, world_size=world)
    return info, dev


def shard(items: Sequence[T], info: DistInfo) -> list[T]:
    """This rank's share of `items` (every world_size-th, starting at rank)."""
    return list(items[info.rank :: info.world_size])


def all_reduce_(tensor: Tensor, info: DistInfo) -> Tensor:
    """Sum `tensor` over ranks in place (a no-op in a single process)."""
    if info.enabled:
        dist.all_reduce(tensor)
    return tensor


def average_gradients(params: Iterable[torch.nn.Parameter], info: DistInfo) -> None:
    """Average gradients over ranks. Every rank runs the same stage, so the same
    parameters have gradients everywhere."""
    if not info.enabled:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= info.world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def on_main(work: Callable[[], T], info: DistInfo) -> Optional[T]:
    """Run `work` on rank 0 alone and return its result there (None elsewhere). An
    exception it raises is raised on every rank, so none waits for a rank that stopped."""
    result, error = None, None
    if info.is_main:
        try:
            result = work()
        except Exception as e:  # noqa: BLE001 - sent to the other ranks, then raised
            error = e
    if info.enabled:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise error
    return result


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
