"""What the agent needs of a model, independent of vLLM.

The vLLM adapter (``integrations/vllm``) and the simulated serving loop (``sim``) both
build an :class:`ExpertModel`; the agent never sees anything else of the host process.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from eplb_service.placement import PlacementShape, logical_replica_count, logical_to_physical


@dataclass
class ExpertModel:
    """Live tensors of one EP rank. The agent updates them in place, never reassigns them.

    Attributes:
        expert_weights: ``[layer][k]`` tensors ``[slots_per_rank, ...]``; row ``i`` of
            every ``k`` together is local physical slot ``i`` (``rank * slots_per_rank + i``).
        phy2log: ``[L, P]`` int64, physical slot -> logical expert.
        log2phy: ``[L, N_log, R]`` int64, logical expert -> physical slots, ``-1`` padded.
        logcnt: ``[L, N_log]`` int64, replicas per logical expert.
        rank: this EP rank; num_ranks: EP world size.
    """

    expert_weights: list[list[torch.Tensor]]
    phy2log: torch.Tensor
    log2phy: torch.Tensor
    logcnt: torch.Tensor
    rank: int
    num_ranks: int

    def __post_init__(self) -> None:
        num_layers, num_physical = self.phy2log.shape
        if len(self.expert_weights) != num_layers:
            raise ValueError(f"expert_weights has {len(self.expert_weights)} layers, phy2log has {num_layers}")
        if num_physical % self.num_ranks:
            raise ValueError(f"num_ranks={self.num_ranks} must divide num_physical={num_physical}")
        spr = num_physical // self.num_ranks
        for layer, tensors in enumerate(self.expert_weights):
            for k, tensor in enumerate(tensors):
                if tensor.shape[0] != spr:
                    raise ValueError(
                        f"expert_weights[{layer}][{k}] has {tensor.shape[0]} rows, expected slots_per_rank={spr}"
                    )
                if not tensor.is_contiguous():
                    raise ValueError(f"expert_weights[{layer}][{k}] must be contiguous")
        if tuple(self.logcnt.shape) != (num_layers, self.log2phy.shape[1]):
            raise ValueError(
                f"logcnt shape {tuple(self.logcnt.shape)} does not match log2phy {tuple(self.log2phy.shape)}"
            )

    @property
    def shape(self) -> PlacementShape:
        num_layers, num_physical = self.phy2log.shape
        return PlacementShape(num_layers, int(self.log2phy.shape[1]), num_physical, self.num_ranks)

    @property
    def device(self) -> torch.device:
        return self.phy2log.device

    @property
    def bytes_per_expert(self) -> int:
        """Bytes of one physical expert over all its weight tensors (layer 0's)."""
        return sum(t[0].numel() * t.element_size() for t in self.expert_weights[0])


def map_tensors(
    phy2log: np.ndarray, num_logical: int, width: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(phy2log, log2phy, logcnt)`` int64 tensors for a placement, in vLLM's layout."""
    arr = np.asarray(phy2log, dtype=np.int64)
    return (
        torch.from_numpy(arr.copy()).to(device),
        torch.from_numpy(logical_to_physical(arr, num_logical, width)).to(device),
        torch.from_numpy(logical_replica_count(arr, num_logical)).to(device),
    )
