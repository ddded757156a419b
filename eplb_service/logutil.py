"""Logging helpers: every agent line names its rank, every coordinator line its role.

``configure(fmt="json")`` writes one JSON object per line (time, level, logger, pid,
tag, message) for log pipelines; the default is plain text.
"""

from __future__ import annotations

import json
import logging
import os
import time


class RankAdapter(logging.LoggerAdapter):
    """Prefixes each message with ``[rank N]`` (or another role tag) and records the tag."""

    def process(self, msg, kwargs):
        kwargs.setdefault("extra", {})["eplb_tag"] = self.extra["tag"]
        return f"[{self.extra['tag']}] {msg}", kwargs


def rank_logger(name: str, rank: int | str) -> RankAdapter:
    tag = f"rank {rank}" if isinstance(rank, int) else str(rank)
    return RankAdapter(logging.getLogger(name), {"tag": tag})


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "tag": getattr(record, "eplb_tag", None),
            "msg": record.getMessage(),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def configure(level: str | int | None = None, fmt: str = "text") -> None:
    """stderr logging; ``EPLB_SERVICE_LOG_LEVEL`` / ``EPLB_SERVICE_LOG_FORMAT`` override defaults."""
    level = level or os.environ.get("EPLB_SERVICE_LOG_LEVEL", "INFO")
    fmt = os.environ.get("EPLB_SERVICE_LOG_FORMAT", fmt)
    if fmt not in ("text", "json"):
        raise ValueError(f"log format {fmt!r} must be 'text' or 'json'")
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonFormatter()
        if fmt == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
