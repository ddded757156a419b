"""A real coordinator in a process of its own with any ``CoordinatorConfig``, for scenarios that
stall it (SIGSTOP/SIGCONT, ``os.nice``): the daemon's command line does not expose the test
timings (heartbeat interval, liveness timeout).

    python tests/coordinator_child.py CONFIG_JSON [NICE]

``CONFIG_JSON`` is ``msgspec.json`` of a ``CoordinatorConfig``'s fields; it serves until SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys

import msgspec


def coordinator_child(cfg, log_path: str, nice: int = 0) -> subprocess.Popen:
    """Start ``cfg``'s coordinator in a child process, logging to ``log_path``, at niceness ``nice``."""
    fields = {name: getattr(cfg, name) for name in cfg.__dataclass_fields__}
    return subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), msgspec.json.encode(fields).decode(), str(nice)],
        stdout=open(log_path, "ab"),
        stderr=subprocess.STDOUT,
    )


def main() -> int:
    from eplb_service import logutil, protocol
    from eplb_service.coordinator.config import CoordinatorConfig
    from eplb_service.coordinator.server import Coordinator

    fields = json.loads(sys.argv[1])
    fields["agent"] = msgspec.convert(fields["agent"], protocol.AgentConfig)
    cfg = CoordinatorConfig(**fields)
    if len(sys.argv) > 2 and int(sys.argv[2]):
        os.nice(int(sys.argv[2]))
    logutil.configure("INFO", "text", tag="coordinator")

    async def serve() -> None:
        coordinator = Coordinator(cfg)
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, coordinator.stop)
        await coordinator.serve()

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
