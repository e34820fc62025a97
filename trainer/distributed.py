"""Data-parallel training under torchrun: who this process is, and what ranks share.

``torchrun --nproc_per_node=N -m trainer …`` starts N copies of casam-train with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address in their environment. Each copy
joins one process group (gloo on CPU, nccl on CUDA), and then:

- encodes its share of the images into the shared embedding cache, and reads them all;
- trains the alignment layer under DistributedDataParallel on its share of every global
  batch (``World.share``), so the global batch, and hence the result, is one process's;
- leaves the bundle to rank 0, which alone resets the staging folder, writes resume
  checkpoints, calibrates, evaluates and commits. The others wait at a final barrier.

Without torchrun, or with one process, ``join`` returns ``SINGLE`` and every method here is
a no-op, so a plain ``casam-train`` runs exactly the code it always ran.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Mapping, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from casam_core.errors import CasamError, InputError

T = TypeVar("T")

# Rank 0 calibrates and evaluates alone after the last collective while the other ranks
# wait at the final barrier; that can take far longer than NCCL's 10-minute default.
# A rank that dies is noticed by torchrun's agent, which stops the others at once, so
# the timeout only bounds a rank that hangs.
COLLECTIVE_TIMEOUT = timedelta(hours=2)


def world_size_from_env() -> int:
    """How many processes torchrun started (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass(frozen=True)
class World:
    """This process's rank among ``size`` data-parallel processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")  # where collectives put their tensors

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.size > 1

    @property
    def backend(self) -> str:
        return "nccl" if self.device.type == "cuda" else "gloo"

    def share(self, count: int) -> np.ndarray:
        """The positions of a ``count``-long global batch or list that this rank computes.

        Round-robin, with no padding: torch's ``DistributedSampler`` would pad the epoch
        by repeating images and needs the batch to divide evenly, which changes the
        global batch. A rank whose share of a short last batch is empty still takes part
        in the step with an empty batch, so every all-reduce has every rank.
        """
        return np.arange(self.rank, count, self.size)

    def barrier(self) -> None:
        if self.parallel:
            dist.barrier(device_ids=[self.local_rank] if self.device.type == "cuda" else None)

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` under DistributedDataParallel (averages gradients over ranks)."""
        if not self.parallel:
            return module
        ids = [self.local_rank] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)

    def sum(self, values: Mapping[str, float]) -> dict[str, float]:
        """Each value summed over ranks (float64, so a count or loss total stays exact)."""
        if not self.parallel:
            return dict(values)
        keys = list(values)
        total = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return dict(zip(keys, total.cpu().tolist()))

    def main_first(self, make: Callable[[], T], follow: Callable[[], T]) -> T:
        """``make()`` on rank 0 once every rank has got here, then ``follow()`` on the others.

        For writes only rank 0 may do (creating the bundle, resetting the staging folder):
        the leading barrier means no rank reads the bundle while rank 0 changes it, and a
        CasamError raised by rank 0 is raised on every rank, so all of them exit with the
        same one-line error instead of waiting for a rank that has gone.
        """
        if not self.parallel:
            return make()
        self.barrier()
        result, error = None, None
        if self.is_main:
            try:
                result = make()
            except CasamError as exc:
                error = exc
        box = [error]
        dist.broadcast_object_list(box, src=0, device=self.device)
        if box[0] is not None:
            raise box[0]
        return result if self.is_main else follow()

    def finish(self) -> None:
        """Wait for every rank (the others wait for rank 0's commit), then leave the group."""
        if self.parallel and dist.is_initialized():
            self.barrier()
            dist.destroy_process_group()


SINGLE = World()


def join(device: torch.device) -> World:
    """Join torchrun's process group (gloo on CPU, nccl on CUDA), or ``SINGLE`` without one.

    On CUDA each rank takes the GPU of its ``LOCAL_RANK``, so ``torch.device("cuda")``
    means that GPU from here on.
    """
    size = world_size_from_env()
    if size <= 1:
        return SINGLE
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    collective_device = torch.device("cpu")
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise InputError(f"rank {rank} has LOCAL_RANK {local_rank}, but torch sees {torch.cuda.device_count()} "
                             f"CUDA device(s); give torchrun --nproc_per_node at most that many")
        torch.cuda.set_device(local_rank)
        collective_device = torch.device("cuda", local_rank)
    world = World(rank, size, local_rank, collective_device)
    if not dist.is_initialized():
        dist.init_process_group(world.backend, timeout=COLLECTIVE_TIMEOUT)
    return world
