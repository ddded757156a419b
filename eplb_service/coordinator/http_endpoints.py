"""The coordinator's HTTP side: Prometheus metrics, liveness, readiness and status.

Served on the coordinator's own event loop (a few lines of asyncio, no web framework),
so a probe that answers proves the loop itself is responsive:

- ``/metrics``: Prometheus text format, or OpenMetrics when the ``Accept`` header asks for it
  (as Prometheus does by default; prometheus_client's own ``choose_encoder`` decides);
- ``/livez``: 200 while the loop ticks (503 if the periodic tick is more than 5 s late);
- ``/readyz``: 200 once the ROUTER is bound (the rendezvous store, since protocol 2, is rank 0's
  worker's, not the coordinator's: nothing else to wait for); 503 again while another process's
  socket file stands at its ``ipc://`` path (agents connecting reach that process instead);
- ``/status``: the status document as strict JSON (as ``eplb-coordinator status --json``).
"""

from __future__ import annotations

import asyncio
import errno
import socket
import time
from typing import TYPE_CHECKING, cast

from prometheus_client.exposition import choose_encoder

from eplb_service.coordinator.status_doc import status_json

if TYPE_CHECKING:
    from eplb_service.coordinator.server import Coordinator

TICK_LATE_S = 5.0
READ_TIMEOUT_S = 5.0
"""Longest a client may take to send its request's head."""
WRITE_TIMEOUT_S = 5.0
"""Longest a client may take to read its answer; then the connection is dropped, not flushed."""
MAX_CONNECTIONS = 64
"""HTTP connections served at once. Each holds a file descriptor for up to the timeouts above,
and the port is open to the network: without a cap, a flood of idle connections used up the
process's descriptors (1024 under systemd's default limit), and then the ROUTER could accept
neither agents nor status clients. At the cap, a new connection takes the place of the oldest
one still sending its request (see :func:`serve_http`); only when every connection is past its
request is the newcomer answered 503 and closed at once."""
MAX_HEAD_BYTES = 64 * 1024
"""Request line and headers together; past this the answer is 431 (asyncio's stream limit
bounds one line to the same)."""


class HeadTooLarge(Exception):
    """The request's head ran past :data:`MAX_HEAD_BYTES` before its empty line."""


class HeadCutShort(Exception):
    """The client ended its side of the connection inside the request's head (before the empty
    line), e.g. ``printf 'GET /status HTTP/1.1\r\n' | nc``: answered 400 saying so, not dropped
    without a word. A connection closed before its first byte stays unanswered: nobody asked."""


async def read_head(reader: asyncio.StreamReader) -> bytes:
    """The request line and headers, up to and including the empty line that ends them.

    Lines may end in CRLF or a bare LF: RFC 9112 (2.2) lets a server take a bare LF as a line
    end, and hand-written probes (``printf 'GET /status HTTP/1.0\\n\\n' | nc``) send it; waiting
    for a CRLF CRLF that never comes left such a client without an answer. Empty lines before
    the request line are skipped (RFC 9112 2.2), though they count towards :data:`MAX_HEAD_BYTES`."""
    head = b""
    skipped = 0
    while True:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            if head or exc.partial.strip():
                raise HeadCutShort from None
            raise
        empty = line in (b"\r\n", b"\n")
        if empty and not head:  # before the request line: RFC 9112 (2.2) says to ignore it
            skipped += len(line)
        else:
            head += line
        if len(head) + skipped > MAX_HEAD_BYTES:
            raise HeadTooLarge
        if empty and head:
            return head


def _response(status: str, body: bytes, content_type: str = "text/plain; charset=utf-8", extra: str = "") -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n{extra}"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


def head_only(response: bytes) -> bytes:
    """A ``HEAD`` answer: the ``GET`` answer's headers (its Content-Length included), no body (RFC 9110 9.3.2)."""
    return response.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"


def header(head: bytes, name: str) -> str:
    """The value of header ``name`` (any case) in a request head, ``""`` when absent; repeated ones joined by commas."""
    values = []
    for line in head.decode("latin-1").splitlines()[1:]:
        key, colon, value = line.partition(":")
        if colon and key.strip().lower() == name.lower():
            values.append(value.strip())
    return ", ".join(values)


def target_path(target: str) -> str:
    """The path a request target names, without its query: ``/status?x=1`` is ``/status``.

    A target in absolute form (``http://host:port/readyz``), as HTTP proxies send it, is reduced
    to its path (``/`` when it has none): RFC 9112 (3.2.2) says a server MUST accept that form.
    Only a target with an ``http``/``https`` scheme is read as a URL; ``//readyz`` stays a path."""
    scheme, sep, rest = target.partition("://")
    if sep and scheme.lower() in ("http", "https"):
        slash = rest.find("/")
        target = rest[slash:] if slash >= 0 else "/"
    return target.split("?", 1)[0]


def route(coordinator: "Coordinator", path: str, accept: str = "") -> bytes:
    if path == "/metrics":
        # OpenMetrics when asked: there a counter's ``_created`` is part of the counter; the classic text
        # format can only show it as a gauge of its own (``eplb_plans_created``), a series no one means.
        encode, content_type = choose_encoder(accept)
        return _response("200 OK", encode(coordinator.metrics.registry), content_type)
    if path == "/livez":
        late = time.monotonic() - coordinator.last_tick
        if late > TICK_LATE_S:
            return _response("503 Service Unavailable", f"event loop tick {late:.1f}s late\n".encode())
        return _response("200 OK", b"ok\n")
    if path == "/readyz":
        if coordinator.endpoint_unreachable:
            return _response("503 Service Unavailable", f"unreachable: {coordinator.endpoint_unreachable}\n".encode())
        if coordinator.ready.is_set():
            return _response("200 OK", b"ready\n")
        return _response("503 Service Unavailable", b"starting\n")
    if path == "/status":
        return _response("200 OK", status_json(coordinator.status()).encode(), "application/json")
    return _response("404 Not Found", f"unknown path {path!r}; try /metrics /livez /readyz /status\n".encode())


def listen_socket(host: str | None, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: any free one).

    ``host=None`` (the default, no flag sets another) is every interface of both families on
    one port: an IPv6 socket that also takes IPv4 peers, or an IPv4 one where the kernel has no
    IPv6. asyncio's own "all interfaces" binds one socket per family, each on its own port when
    the port is 0, and ``0.0.0.0`` alone leaves a pod of an IPv6-only cluster unreachable to its
    probes and to Prometheus. Raises ``OSError`` (port in use, address not here).
    """
    if host is None:
        try:
            return _bound(socket.AF_INET6, ("::", port), dual_stack=True)
        except OSError as exc:
            if exc.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT):
                raise
        return _bound(socket.AF_INET, ("0.0.0.0", port))
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    return _bound(family, address)


def _bound(family: int, address: tuple, dual_stack: bool = False) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's servers do
        if dual_stack:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        sock.listen(100)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


class HttpService:
    """The running endpoints: the listening server and the connections being answered."""

    def __init__(self, server: asyncio.base_events.Server, connections: set[asyncio.Task]) -> None:
        self.server = server
        self.connections = connections
        """The handler task of every open connection (each removes itself when it ends)."""

    @property
    def port(self) -> int:
        return self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop listening, drop every open connection and wait for their handlers to end.

        ``asyncio.Server.close`` leaves accepted connections open (before Python 3.13): their
        handlers were left pending, and destroyed with the event loop, each a warning."""
        self.server.close()
        for task in list(self.connections):
            task.cancel()
        await asyncio.gather(*self.connections, return_exceptions=True)


async def serve_http(coordinator: "Coordinator", host: str | None, port: int) -> HttpService:
    """Serve the endpoints on ``host:port``: one request per connection, at most
    :data:`MAX_CONNECTIONS` at once, each bounded by :data:`READ_TIMEOUT_S` and :data:`WRITE_TIMEOUT_S`.

    At the cap, the oldest connection still sending its request head is dropped for the new one.
    A well-behaved client sends its request at once and is done in milliseconds; one that keeps
    connections open without finishing a request (slow-loris) only ever holds the oldest places.
    Refusing the newcomer instead let one such client, reopening 64 connections every 5 s, have
    every probe answered 503: a Kubernetes liveness probe on ``/livez`` then restarts a healthy
    coordinator, and Prometheus sees it down."""
    connections: set[asyncio.Task] = set()
    reading: dict[asyncio.Task, asyncio.StreamWriter] = {}
    """Connections still sending their request head, oldest first: the ones a newcomer displaces."""

    async def answer(task: asyncio.Task, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        reading[task] = writer
        try:
            request = await asyncio.wait_for(read_head(reader), timeout=READ_TIMEOUT_S)
        except (asyncio.LimitOverrunError, HeadTooLarge):  # one line past the stream's limit, or all of them
            writer.write(_response("431 Request Header Fields Too Large", b"request headers over 64 KiB\n"))
            return
        except HeadCutShort:
            writer.write(
                _response("400 Bad Request", b"the request ended before the empty line that ends its headers\n")
            )
            return
        finally:
            reading.pop(task, None)
        parts = request.split(b"\n", 1)[0].decode("latin-1").split()
        if len(parts) not in (2, 3):
            writer.write(_response("400 Bad Request", b"not a request line; expected METHOD TARGET [HTTP/1.x]\n"))
        elif parts[0] not in ("GET", "HEAD"):
            writer.write(_response("405 Method Not Allowed", b"GET or HEAD only\n", extra="Allow: GET, HEAD\r\n"))
        else:
            response = route(coordinator, target_path(parts[1]), header(request, "accept"))
            writer.write(head_only(response) if parts[0] == "HEAD" else response)

    def displace_oldest_reader() -> bool:
        """Drop the connection that has spent longest on its request head; False when none is."""
        if not reading:
            return False
        task, writer = next(iter(reading.items()))
        del reading[task]
        writer.transport.abort()
        task.cancel()
        return True

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = cast(asyncio.Task, asyncio.current_task())  # asyncio runs every connection's handler in a task
        if len(connections) >= MAX_CONNECTIONS and not displace_oldest_reader():
            writer.write(_response("503 Service Unavailable", b"too many connections\n", extra="Retry-After: 1\r\n"))
            writer.close()
            return
        connections.add(task)
        try:
            await answer(task, reader, writer)
            await asyncio.wait_for(writer.drain(), timeout=WRITE_TIMEOUT_S)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            writer.transport.abort()  # close() alone would wait, descriptor and all, for a client that does not read
        except asyncio.CancelledError:
            # Displaced by a newer connection, or the coordinator stopping. Nobody awaits a
            # connection's task: raising here made asyncio log one ERROR traceback per open
            # connection at every clean stop (a scrape or probe in progress).
            writer.transport.abort()
        finally:
            connections.discard(task)
            writer.close()

    sock = listen_socket(host, port)
    try:
        return HttpService(await asyncio.start_server(handle, sock=sock), connections)
    except BaseException:
        sock.close()
        raise
