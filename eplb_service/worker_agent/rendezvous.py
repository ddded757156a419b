"""The rendezvous store of the side communicator, hosted by rank 0's worker.

Every agent builds the side communicator from keys in this store (gloo's rendezvous, the
NCCL unique id) and every plan's commit decision record lives in it (``decision``). It is a
torch TCPStore server: a C++ thread in rank 0's process that needs no GIL, so it answers
while that process serves. Hosting it in a serving process rather than in the coordinator
is what makes the decision record safe: the coordinator may die and restart at any moment,
a record lost with it could be written twice; rank 0's worker lives as long as serving does.

``EPLB_SERVICE_STORE_PORT`` fixes its port (a NetworkPolicy can then name it; default: any
free port) and ``EPLB_SERVICE_STORE_HOST`` the address the other ranks dial (default: the
address this host uses to reach the coordinator, or loopback for an ``ipc://`` coordinator).
"""

from __future__ import annotations

import datetime
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

STORE_PORT_ENV = "EPLB_SERVICE_STORE_PORT"
STORE_HOST_ENV = "EPLB_SERVICE_STORE_HOST"


class RendezvousError(RuntimeError):
    """The store could not be started where it was asked to be."""


def advertised_host(coordinator_endpoint: str, environ: Mapping[str, str] | None = None) -> str:
    """The address other ranks use to reach this host's store.

    A ``tcp://`` coordinator on another host: the local address of the route to it (the
    interface the agents already share with the coordinator); ``ipc://`` or loopback: one host,
    loopback.
    """
    env = os.environ if environ is None else environ
    fixed = store_host_from_env(env)
    if fixed is not None:
        return fixed
    if coordinator_endpoint.startswith("tcp://"):
        host = coordinator_endpoint[len("tcp://") :].rsplit(":", 1)[0].strip("[]")
        if host not in ("127.0.0.1", "localhost", "::1", "*", "0.0.0.0"):
            return _route_address(host) or socket.gethostbyname(socket.gethostname())
    return "127.0.0.1"


def _route_address(host: str) -> str | None:
    """The local address of this host's route to ``host`` (an address or a name, of either family).

    The name is resolved as the agents' ZeroMQ socket resolves it (``getaddrinfo``, any family):
    a coordinator named by an AAAA record alone was looked up as IPv4 only, so rank 0 advertised
    this host's IPv4 name address, which an IPv6-only network cannot reach."""
    try:
        addresses = socket.getaddrinfo(host, 9, type=socket.SOCK_DGRAM)
    except OSError:
        return None
    for family, _, _, _, address in addresses:
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.connect(address)  # UDP: no packet is sent, the kernel only picks the route
                return str(s.getsockname()[0])
        except OSError:
            continue
    return None


def store_host_from_env(environ: Mapping[str, str] | None = None) -> str | None:
    """``EPLB_SERVICE_STORE_HOST`` trimmed, or ``None`` when unset or blank.

    Only its form is checked (the other ranks resolve it, on their hosts): an address or a host
    name, without a port, a scheme or blanks. ``10.0.0.1:29500`` or ``tcp://10.0.0.1`` would
    otherwise be advertised as they are and every other rank's store connection would fail, long
    after start-up, without naming the variable.
    """
    env = os.environ if environ is None else environ
    text = env.get(STORE_HOST_ENV, "").strip()
    if not text:
        return None
    name, colon, port = text.rpartition(":")
    if any(c.isspace() for c in text) or "/" in text or "[" in text or (colon and ":" not in name and port.isdigit()):
        raise RendezvousError(
            f"{STORE_HOST_ENV}={text!r}: expected an address or host name the other ranks dial, without a port "
            f"(that is {STORE_PORT_ENV}), scheme, brackets or blanks"
        )
    return text


def store_port_from_env(environ: Mapping[str, str] | None = None) -> int:
    env = os.environ if environ is None else environ
    text = env.get(STORE_PORT_ENV, "")
    if not text:
        return 0
    try:
        port = int(text)
    except ValueError:
        raise RendezvousError(f"{STORE_PORT_ENV}={text!r}: expected a port number in [1, 65535]") from None
    if not 1 <= port <= 65535:
        raise RendezvousError(f"{STORE_PORT_ENV}={port}: expected a port number in [1, 65535]")
    return port


@dataclass
class RendezvousHost:
    """The store server; kept for the life of the process (a decision must outlive any agent reset)."""

    host: str
    port: int
    _server: object

    @classmethod
    def start(
        cls, coordinator_endpoint: str, world_size: int, environ: Mapping[str, str] | None = None
    ) -> "RendezvousHost":
        import torch.distributed as dist

        port = store_port_from_env(environ)
        host = advertised_host(coordinator_endpoint, environ)
        try:
            server = dist.TCPStore(
                "0.0.0.0", port, world_size, True, timeout=datetime.timedelta(seconds=60), wait_for_workers=False
            )
        except Exception as exc:
            raise RendezvousError(
                f"could not host the rendezvous store on port {port or 'any'} ({STORE_PORT_ENV}): {exc}"
            ) from exc
        return cls(host, server.port, server)

    @property
    def store(self):
        """The server's own client (``torch.distributed.TCPStore``): rank 0's janitor deletes keys through it."""
        return self._server


_HOSTED: RendezvousHost | None = None


def host_once(coordinator_endpoint: str, world_size: int) -> RendezvousHost:
    """This process's store, started on first use and kept until the process exits."""
    global _HOSTED
    if _HOSTED is None:
        _HOSTED = RendezvousHost.start(coordinator_endpoint, world_size)
    return _HOSTED
