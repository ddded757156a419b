"""Endpoint security: local by default, CURVE (ZeroMQ's Curve25519) for anything else.

- ``ipc://`` endpoints live in a 0700 directory (see ``coordinator.socket_dir``).
- ``tcp://`` on a loopback address needs nothing more.
- ``tcp://`` on any other address needs CURVE keys, unless ``--insecure`` is given, which
  the coordinator logs loudly.

Key layout (``eplb-coordinator keygen DIR``)::

    DIR/server.key             server public certificate   (give to every agent)
    DIR/server.key_secret      server secret certificate   (coordinator only)
    DIR/clients/agent.key      agent public certificate    (coordinator: who may connect)
    DIR/agent.key_secret       agent secret certificate    (give to every agent)

Agents read ``EPLB_SERVICE_CURVE_SERVER_CERT`` (path of ``server.key``) and
``EPLB_SERVICE_CURVE_CLIENT_CERT`` (path of ``agent.key_secret``).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass

import zmq
import zmq.auth

SERVER_CERT_ENV = "EPLB_SERVICE_CURVE_SERVER_CERT"
CLIENT_CERT_ENV = "EPLB_SERVICE_CURVE_CLIENT_CERT"


class SecurityError(ValueError):
    """An endpoint or key setup that would expose the coordinator; the message says how to fix it."""


def is_local_endpoint(endpoint: str) -> bool:
    """``ipc://`` or ``tcp://`` on a loopback address."""
    if endpoint.startswith("ipc://"):
        return True
    if not endpoint.startswith("tcp://"):
        return False
    host = endpoint[len("tcp://") :].rsplit(":", 1)[0].strip("[]")
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
        except OSError:
            return False


def check_endpoint_security(endpoint: str, curve_dir: str | None, insecure: bool) -> None:
    if is_local_endpoint(endpoint) or curve_dir or insecure:
        return
    raise SecurityError(
        f"endpoint {endpoint!r} is reachable from other hosts: give --curve-dir DIR (create it with "
        "`eplb-coordinator keygen DIR`) or pass --insecure to accept unauthenticated, unencrypted traffic"
    )


def generate_keys(directory: str) -> dict[str, str]:
    """Create the server and agent key pairs (see the module docstring); returns their paths."""
    clients = os.path.join(directory, "clients")
    os.makedirs(clients, mode=0o700, exist_ok=True)
    os.chmod(directory, 0o700)
    server_public, server_secret = zmq.auth.create_certificates(directory, "server")
    agent_public, agent_secret = zmq.auth.create_certificates(directory, "agent")
    os.replace(agent_public, os.path.join(clients, "agent.key"))
    return {
        "server_public": server_public,
        "server_secret": server_secret,
        "agent_public": os.path.join(clients, "agent.key"),
        "agent_secret": agent_secret,
    }


@dataclass(frozen=True)
class ClientCurve:
    server_public: bytes
    client_public: bytes
    client_secret: bytes

    @classmethod
    def from_files(cls, server_cert: str, client_cert: str) -> "ClientCurve":
        try:
            server_public, _ = zmq.auth.load_certificate(server_cert)
            client_public, client_secret = zmq.auth.load_certificate(client_cert)
        except (OSError, ValueError) as exc:
            raise SecurityError(f"cannot load CURVE certificates {server_cert!r} / {client_cert!r}: {exc}") from None
        if client_secret is None:
            raise SecurityError(f"{client_cert!r} holds no secret key: give the agent's .key_secret file")
        return cls(server_public, client_public, client_secret)

    @classmethod
    def from_env(cls) -> "ClientCurve | None":
        server, client = os.environ.get(SERVER_CERT_ENV), os.environ.get(CLIENT_CERT_ENV)
        if not server and not client:
            return None
        if not (server and client):
            raise SecurityError(f"set both {SERVER_CERT_ENV} and {CLIENT_CERT_ENV}, or neither")
        return cls.from_files(server, client)

    def apply(self, sock: zmq.Socket) -> None:
        sock.curve_serverkey = self.server_public
        sock.curve_publickey = self.client_public
        sock.curve_secretkey = self.client_secret


def apply_server_curve(sock: zmq.Socket, curve_dir: str) -> None:
    """Make ``sock`` a CURVE server with the keys in ``curve_dir`` (before bind)."""
    try:
        public, secret = zmq.auth.load_certificate(os.path.join(curve_dir, "server.key_secret"))
    except (OSError, ValueError) as exc:
        raise SecurityError(
            f"cannot load {curve_dir}/server.key_secret (create it with `eplb-coordinator keygen {curve_dir}`): {exc}"
        ) from None
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True
