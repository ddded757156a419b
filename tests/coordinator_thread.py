"""Run a real Coordinator on its own event loop in a thread, for tests."""

from __future__ import annotations

import asyncio
import threading

from eplb_service.coordinator.config import CoordinatorConfig
from eplb_service.coordinator.server import Coordinator


class CoordinatorThread:
    def __init__(self, cfg: CoordinatorConfig, cls: type[Coordinator] = Coordinator) -> None:
        self.cfg = cfg
        self.cls = cls
        self.coordinator: Coordinator | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # start() raises it: a refused config must not read as a slow start
            self.error = exc
            self._ready.set()

    def _serve(self) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.coordinator = self.cls(self.cfg)

        async def serve():
            task = asyncio.create_task(self.coordinator.serve())
            ready = asyncio.create_task(self.coordinator.ready.wait())
            await asyncio.wait([task, ready], return_when=asyncio.FIRST_COMPLETED)
            ready.cancel()
            if task.done():  # refused before it listened (task.result() raises why)
                task.result()
            self._ready.set()
            await task

        self.loop.run_until_complete(serve())
        self.loop.close()

    def start(self) -> "CoordinatorThread":
        self.thread.start()
        if not self._ready.wait(20):
            raise TimeoutError("coordinator did not start within 20 s")
        if self.error is not None:
            raise RuntimeError(f"coordinator failed to start: {self.error}") from self.error
        return self

    def stop(self) -> None:
        if self.loop is not None and self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.coordinator.stop)
        self.thread.join(10)
