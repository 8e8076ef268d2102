"""How the single pass's ranks agree, layer by layer, when calibration runs on several GPUs.

Each rank calibrates on its own shard of the samples; three things must then be one across them:
- SmoothQuant's per-channel ranges: min and max are order-free, so the merged ranges (and the
  scales made from them) are exactly those of one process;
- GPTQ's Hessians: sums (with the sample counts), equal to one process's up to the order of the
  floating-point additions;
- GPTQ's solves: each group of Linears sharing a Hessian is solved by one rank, the biggest solves
  spread first over the least-loaded rank, and the result broadcast from it, so every rank
  propagates through the same quantized weights, bit for bit.

With one rank (``SINGLE``) every merge is a no-op: the one-GPU single pass is this code with
nothing to agree on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> Ranks:
        """The torch.distributed group this process belongs to, or one rank alone."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return SINGLE

    def sum_(self, tensor: Any) -> Any:
        return self._reduce(tensor, "SUM")

    def min_(self, tensor: Any) -> Any:
        return self._reduce(tensor, "MIN")

    def max_(self, tensor: Any) -> Any:
        return self._reduce(tensor, "MAX")

    def _reduce(self, tensor: Any, op: str) -> Any:
        """In place where the dtype allows; 16-bit floats go through fp32 (exact both ways for
        min and max; gloo has no bf16 min/max everywhere)."""
        if self.world == 1:
            return tensor
        import torch
        import torch.distributed as dist

        wide = tensor.float() if tensor.dtype in (torch.bfloat16, torch.float16) else tensor
        dist.all_reduce(wide, op=getattr(dist.ReduceOp, op))
        if wide is not tensor:
            tensor.copy_(wide)
        return tensor

    def total(self, value: float | int) -> float:
        """A number summed over ranks (sample counts, GPTQ's loss)."""
        if self.world == 1:
            return value
        import torch

        return float(self.sum_(torch.tensor([float(value)], dtype=torch.float64,
                                            device=self._device()))[0])

    def agree(self, value: int) -> bool:
        """Whether every rank holds this same number. Collectives must match one for one, so a
        layer whose shape of work differs between ranks is refused, never merged."""
        if self.world == 1:
            return True
        import torch

        both = self.max_(torch.tensor([value, -value], dtype=torch.int64,
                                      device=self._device()))
        return int(both[0]) == -int(both[1]) == value

    def least(self, value: int) -> int:
        """The smallest of this number over the ranks (how many stored layers all of them
        see: the count a resume can start from on every rank)."""
        if self.world == 1:
            return value
        import torch

        return int(self.min_(torch.tensor([value], dtype=torch.int64, device=self._device()))[0])

    def broadcast_(self, tensor: Any, src: int) -> None:
        if self.world == 1:
            return
        import torch.distributed as dist

        dist.broadcast(tensor, src)

    def assign(self, costs: list[float]) -> list[int]:
        """Which rank solves each job: largest first onto the least-loaded rank (ties to the
        lower rank), the same answer on every rank."""
        load = [0.0] * self.world
        owner = [0] * len(costs)
        for job in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
            rank = min(range(self.world), key=lambda r: (load[r], r))
            owner[job] = rank
            load[rank] += costs[job]
        return owner

    def _device(self) -> Any:
        import torch
        import torch.distributed as dist

        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


SINGLE = Ranks()


def solve_cost(rows: int, cols: int) -> float:
    """GPTQ's work for one Hessian group: the Cholesky of a cols² Hessian and the row updates."""
    return float(cols) ** 3 + float(rows) * float(cols) ** 2
