"""Spotting a rank that missed a commit the other ranks made.

Every rank commits a decided plan at the same step ``S``, and an agent reports its step
before its epoch (the serving thread bumps the epoch at the boundary before the step count
passes ``S``), so a report ``(epoch E, step > S)`` where epoch ``E + 1`` was committed at
``S`` means that rank went past ``S`` with the old maps: the placements differ. The
in-flight plan's state machine catches this while it tracks the plan; this watch also
catches it when the coordinator lost track (it had declared the agents dead, or it
restarted) and learns the commit step only from a ``Committed`` that arrives late. The commit
steps come from ``Committed``, and from the decision a rank's ``Voted`` or heartbeat names for
the plan in flight: a commit whose every ``Committed`` was lost is still watched.

Such a late ``Committed`` names a plan this coordinator has no record of, so its one
report is all the verdict rests on: the halt names the rank that reported the commit as
well as the rank that lagged it, and an operator can tell which of the two to look at.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EpochLagWatch:
    """The commit step of every epoch seen, and the check against the ranks' reports."""

    commit_steps: dict[int, tuple[int, int]] = field(default_factory=dict)
    """Epoch ``E`` -> (the step at which some rank committed into ``E``, that rank)."""

    keep: int = 256
    """Epochs remembered (the newest); a rank further behind than that is long diverged anyway."""

    def committed(self, epoch: int, step: int, rank: int) -> None:
        """``rank`` reported committing into ``epoch`` at ``step``; the first report of an epoch stands."""
        self.commit_steps.setdefault(epoch, (step, rank))
        if len(self.commit_steps) > self.keep:
            for old in sorted(self.commit_steps)[: -self.keep]:
                del self.commit_steps[old]

    def observe(self, epochs_and_steps: dict[int, tuple[int, int]]) -> str | None:
        """``{rank: (epoch, step)}`` of the live ranks; returns why they diverged, or ``None``."""
        commits = self.commit_steps
        lagging = [
            rank
            for rank, (epoch, step) in epochs_and_steps.items()
            if (commit := commits.get(epoch + 1)) is not None and step > commit[0]
        ]
        if lagging:  # the lowest such rank, as a scan in rank order finds it
            rank = min(lagging)
            epoch, step = epochs_and_steps[rank]
            commit_step, reporter = commits[epoch + 1]
            return (
                f"rank {rank} is at step {step} with epoch {epoch}, but epoch {epoch + 1} was committed at "
                f"step {commit_step} (reported by rank {reporter}): it went past the commit with the old "
                f"maps, the placements differ"
            )
        return None
