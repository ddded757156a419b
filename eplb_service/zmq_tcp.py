"""IPv6 for every ZeroMQ socket of the service.

ZeroMQ's ``tcp://`` transport is IPv4 only unless a socket sets ``ZMQ_IPV6``: without it an
IPv6 literal (``tcp://[fd00::5]:5555``) or a name with only an AAAA record fails to bind or
connect ("No such device"), so nothing works in an IPv6-only Kubernetes cluster. With it a
socket takes both families: bound to ``*`` it accepts IPv4 and IPv6 peers (libzmq falls back to
IPv4 where the kernel has no IPv6), and it connects to either. ``ipc://`` ignores the option.
Every socket sets it, the coordinator's and the agents' alike, because both ends must accept
the address the other one names.
"""

from __future__ import annotations

import zmq


def allow_ipv6(sock: zmq.Socket) -> zmq.Socket:
    """``sock`` with IPv6 enabled (before its bind or connect); returned for chaining."""
    sock.setsockopt(zmq.IPV6, 1)
    return sock
