"""A byte-level TCP link between one agent and a ``tcp://`` coordinator, with network faults.

``fault_proxy.FaultProxy`` works on whole ZeroMQ messages, and its own sockets answer
ZeroMQ's heartbeats, so it cannot show what a *network* does. This link forwards raw bytes
of each TCP connection, as a router on the path would, and can:

- ``pause()``: stop forwarding in both directions, keeping every connection open (a peer
  that vanished without closing: a cable pulled, a host frozen by its hypervisor, a
  firewall that starts dropping packets). Bytes (a close included) wait, as TCP
  retransmits them, and arrive in order on ``resume()``, the partition healing. A
  connection opened while paused reaches the coordinator only on ``resume()``.
- ``latency_s=(low, high)``: each chunk arrives a uniform random delay later, in order
  (a slow, jittery WAN link).
- ``burst_s``: bytes are released only every ``burst_s`` seconds, all at once (a link that
  delivers in bursts).
"""

from __future__ import annotations

import collections
import random
import select
import socket
import threading
import time


class TcpLink:
    """Listens on ``127.0.0.1:port`` (``endpoint``) and forwards to ``upstream`` (host, port)."""

    def __init__(
        self,
        upstream: tuple[str, int],
        latency_s: tuple[float, float] = (0.0, 0.0),
        burst_s: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.upstream = upstream
        self.latency_s, self.burst_s = latency_s, burst_s
        self.rng = random.Random(seed)
        self.paused = threading.Event()
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self.connections = 0
        self.closed_by_upstream = 0
        """Connections whose coordinator end closed (a FIN or RST read from it)."""
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def start(self) -> "TcpLink":
        self._spawn(self._accept)
        return self

    def pause(self) -> None:
        self.paused.set()

    def resume(self) -> None:
        self.paused.clear()

    def stop(self) -> None:
        self._stop.set()
        self._listener.close()
        for t in list(self._threads):
            t.join(5)

    def _spawn(self, target, *args) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        with self._lock:
            self._threads.append(t)
        t.start()

    def _accept(self) -> None:
        self._listener.settimeout(0.05)
        while not self._stop.is_set():
            try:
                agent_side, _ = self._listener.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            self.connections += 1
            self._spawn(self._connection, agent_side)

    def _due(self, now: float) -> float:
        low, high = self.latency_s
        due = now + (self.rng.uniform(low, high) if high > 0 else 0.0)
        if self.burst_s > 0:
            due = (int(due / self.burst_s) + 1) * self.burst_s
        return due

    def _connection(self, agent_side: socket.socket) -> None:
        """Pump both directions of one connection; the upstream side is opened once not paused."""
        coord_side: socket.socket | None = None
        queues: dict[str, collections.deque] = {"up": collections.deque(), "down": collections.deque()}
        last_due = {"up": 0.0, "down": 0.0}
        open_ends = {"up": True, "down": True}
        try:
            while not self._stop.is_set() and (open_ends["up"] or open_ends["down"] or any(queues.values())):
                if coord_side is None and not self.paused.is_set():
                    coord_side = socket.create_connection(self.upstream)
                readable = [s for s, d in ((agent_side, "up"), (coord_side, "down")) if s is not None and open_ends[d]]
                ready, _, _ = select.select(readable, [], [], 0.005)
                now = time.monotonic()
                for sock in ready:
                    direction = "up" if sock is agent_side else "down"
                    try:
                        data = sock.recv(65536)
                    except OSError:
                        data = b""
                    if not data:
                        open_ends[direction] = False
                        self.closed_by_upstream += direction == "down"
                    due = max(last_due[direction], self._due(now))
                    last_due[direction] = due
                    queues[direction].append((due, data))  # b"": the close, delivered in order
                if self.paused.is_set() or coord_side is None:
                    continue
                for direction, dst in (("up", coord_side), ("down", agent_side)):
                    q = queues[direction]
                    while q and q[0][0] <= now:
                        _, data = q.popleft()
                        if data:
                            dst.sendall(data)
                        else:
                            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            agent_side.close()
            if coord_side is not None:
                coord_side.close()
