"""A ZeroMQ proxy that loses, duplicates and reorders messages between agents and coordinator.

Agents connect to ``front`` (a ROUTER); for each agent identity the proxy opens a DEALER
with the same identity to the coordinator at ``back``. Every frame, either way, is dropped
with ``p_drop``, sent twice with ``p_dup``, or held back for up to ``max_delay_s`` (which
reorders it behind later frames). Seeded, so a failing run can be replayed.
"""

from __future__ import annotations

import heapq
import random
import threading
import time

import zmq


class FaultProxy:
    def __init__(
        self,
        front: str,
        back: str,
        p_drop: float = 0.0,
        p_dup: float = 0.0,
        p_delay: float = 0.0,
        max_delay_s: float = 0.05,
        seed: int = 0,
        hold=None,
    ) -> None:
        """``hold(direction, identity, frame)`` -> seconds to hold that frame back (targeted delays), or 0."""
        self.front, self.back = front, back
        self.p_drop, self.p_dup, self.p_delay, self.max_delay_s = p_drop, p_dup, p_delay, max_delay_s
        self.hold = hold
        self.rng = random.Random(seed)
        self.counts = {"forwarded": 0, "dropped": 0, "duplicated": 0, "delayed": 0, "held": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "FaultProxy":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        ctx = zmq.Context()
        front = ctx.socket(zmq.ROUTER)
        front.bind(self.front)
        backs: dict[bytes, zmq.Socket] = {}
        poller = zmq.Poller()
        poller.register(front, zmq.POLLIN)
        pending: list[tuple[float, int, str, bytes, bytes]] = []  # (due, seq, direction, identity, frame)
        seq = 0
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                while pending and pending[0][0] <= now:
                    _, _, direction, identity, frame = heapq.heappop(pending)
                    self._deliver(front, backs, direction, identity, frame)
                for sock, _ in poller.poll(5):
                    if sock is front:
                        identity, frame = front.recv_multipart()
                        if identity not in backs:
                            back = ctx.socket(zmq.DEALER)
                            back.setsockopt(zmq.IDENTITY, identity)
                            back.setsockopt(zmq.LINGER, 0)
                            back.connect(self.back)
                            backs[identity] = back
                            poller.register(back, zmq.POLLIN)
                        direction = "up"
                    else:
                        identity = sock.getsockopt(zmq.IDENTITY)
                        frame = sock.recv()
                        direction = "down"
                    held_s = self.hold(direction, identity, frame) if self.hold is not None else 0.0
                    if held_s:
                        self.counts["held"] += 1
                        seq += 1
                        heapq.heappush(pending, (now + held_s, seq, direction, identity, frame))
                        continue
                    for _ in range(self._copies()):
                        if self.rng.random() < self.p_delay:
                            self.counts["delayed"] += 1
                            seq += 1
                            heapq.heappush(
                                pending, (now + self.rng.random() * self.max_delay_s, seq, direction, identity, frame)
                            )
                        else:
                            self._deliver(front, backs, direction, identity, frame)
        finally:
            for sock in list(backs.values()) + [front]:
                sock.close(0)
            ctx.term()

    def _copies(self) -> int:
        r = self.rng.random()
        if r < self.p_drop:
            self.counts["dropped"] += 1
            return 0
        if r < self.p_drop + self.p_dup:
            self.counts["duplicated"] += 1
            return 2
        return 1

    def _deliver(self, front, backs, direction, identity, frame) -> None:
        self.counts["forwarded"] += 1
        if direction == "up":
            backs[identity].send(frame)
        else:
            front.send_multipart([identity, frame])
