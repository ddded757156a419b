"""Logging helpers: every agent line names its rank, every coordinator line its role."""

from __future__ import annotations

import logging
import os


class RankAdapter(logging.LoggerAdapter):
    """Prefixes each message with ``[rank N]`` (or another role tag)."""

    def process(self, msg, kwargs):
        return f"[{self.extra['tag']}] {msg}", kwargs


def rank_logger(name: str, rank: int | str) -> RankAdapter:
    tag = f"rank {rank}" if isinstance(rank, int) else str(rank)
    return RankAdapter(logging.getLogger(name), {"tag": tag})


def configure(level: str | int | None = None) -> None:
    """Plain stderr logging with times and pids; ``EPLB_SERVICE_LOG_LEVEL`` overrides."""
    level = level or os.environ.get("EPLB_SERVICE_LOG_LEVEL", "INFO")
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s",
    )
