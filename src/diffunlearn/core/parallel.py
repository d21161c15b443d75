"""Data parallelism under ``accelerate launch`` (or ``torchrun``): which rows of a global batch this
process owns, and sums across processes.

The training loop works on GLOBAL batches: every process draws the same batch indices, noise and
timesteps from the same seeded generator and keeps its own contiguous rows. Each process's
objective is its rows' loss sum divided by the global batch size, so summing gradients across
processes gives exactly the gradient one process would compute on the whole batch. Both the forget
and the remain gradient are summed BEFORE the update rule runs, so RG projects the global
gradients (PAPER.md §2), not per-process ones.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import torch


@dataclasses.dataclass
class Parallel:
    """One process's place in a data-parallel job (``world_size == 1``: a plain single process)."""

    world_size: int = 1
    rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))  # for collectives

    @classmethod
    def from_environment(cls) -> Parallel:
        """Join the process group that ``accelerate launch``/``torchrun`` set up, if any.

        accelerate's ``PartialState`` reads the launcher's environment and initialises
        ``torch.distributed`` with the right backend (NCCL on GPUs, gloo on CPUs).
        """
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        from accelerate import PartialState

        # cpu=True on machines without CUDA: accelerate then joins with gloo instead of looking for GPUs.
        state = PartialState(cpu=not torch.cuda.is_available())
        return cls(world_size=state.num_processes, rank=state.process_index, device=state.device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> slice:
        """This process's contiguous rows of a global batch of ``n`` (sizes differ by at most one)."""
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))

    def owned(self, indices: Sequence[int]) -> list[int]:
        """The items of ``indices`` this process handles when work is split round-robin."""
        return [i for k, i in enumerate(indices) if k % self.world_size == self.rank]

    def sum_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Sum each tensor across processes, in place (per tensor: no flat copy of the gradients)."""
        if self.world_size == 1:
            return
        import torch.distributed as dist

        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)

    def sum_scalar(self, value: float) -> float:
        """Σ ``value`` over processes (float64)."""
        if self.world_size == 1:
            return float(value)
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=self.device)  # NCCL reduces device tensors only
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t.item())

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()
