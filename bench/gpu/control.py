"""What the harness's processes share: the plan switches rank 0 sets, the coordinator's
idle flag the parent sets, and each rank's step count.

One ``ctypes`` structure in shared memory with named fields (:class:`HarnessControl`) and
one shared array of step counts (:class:`RankProgress`); both are handed to the spawned
rank processes as arguments, and every field has exactly one writer.
"""

from __future__ import annotations

import ctypes
from multiprocessing.context import BaseContext


class HarnessControl(ctypes.Structure):
    """The switches of the current phase, in shared memory (build with :func:`shared_control`).

    Fields:
        plans_enabled: the churn policy proposes plans (written by rank 0 at a phase start).
        experts_per_rank: experts each rank receives per layer in a churn plan (rank 0).
        layers_per_batch: layers per staged batch, 0 = all (rank 0).
        phase: index of the current phase in rank 0's phase list (rank 0; for hang reports).
        coordinator_idle: no plan in flight, none waiting, policy not running (the parent,
            every poll); rank 0 reads it when draining.
    """

    _fields_ = [
        ("plans_enabled", ctypes.c_bool),
        ("experts_per_rank", ctypes.c_int64),
        ("layers_per_batch", ctypes.c_int64),
        ("phase", ctypes.c_int64),
        ("coordinator_idle", ctypes.c_bool),
    ]


def shared_control(ctx: BaseContext) -> HarnessControl:
    """A zeroed :class:`HarnessControl` in shared memory of ``ctx`` (no lock: one writer per field)."""
    return ctx.RawValue(HarnessControl)


class RankProgress:
    """Steps done by each rank, in shared memory: each rank writes its own entry, the parent
    reads all of them to tell a hang from progress."""

    def __init__(self, ctx: BaseContext, world_size: int) -> None:
        if world_size < 1:
            raise ValueError(f"world_size={world_size} must be >= 1")
        self._steps = ctx.RawArray(ctypes.c_int64, world_size)

    def set(self, rank: int, steps: int) -> None:
        self._steps[rank] = steps

    def steps(self) -> list[int]:
        return list(self._steps)

    def total(self) -> int:
        return sum(self._steps)

    def all_started(self) -> bool:
        """Every rank has finished at least one step."""
        return min(self._steps) > 0
