"""Which processes listen on a unix socket path: for the line that says who took an endpoint over.

A coordinator whose socket file another process replaced can only say "stop one of the two";
naming that process (its pid and command) turns the advice into one an operator can act on.
Linux only, and only what this user may read: ``/proc/net/unix`` lists the listening sockets
bound to the path (with their socket inodes), and ``/proc/<pid>/fd`` shows who holds each.
Anything unreadable (another user's process, another network namespace, no ``/proc``) is
simply not named.
"""

from __future__ import annotations

import os

ACCEPTING = 0x10000
"""``__SO_ACCEPTCON`` in ``/proc/net/unix``'s Flags column: the socket listens."""


def listening_socket_inodes(path: str, net_unix: str = "/proc/net/unix") -> set[int]:
    """Socket inodes (not the file's inode) of every socket listening on ``path``, this process's included."""
    found: set[int] = set()
    try:
        with open(net_unix, encoding="utf-8", errors="replace") as table:
            next(table, None)  # Num RefCount Protocol Flags Type St Inode Path
            for line in table:
                fields = line.split(None, 7)
                if len(fields) == 8 and fields[7].rstrip("\n") == path and int(fields[3], 16) & ACCEPTING:
                    found.add(int(fields[6]))
    except (OSError, ValueError):
        return set()
    return found


def _socket_inodes_of(pid: str) -> set[int]:
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[len("socket:[") : -1]))
    except OSError:  # gone, or another user's
        pass
    return inodes


def other_listeners(path: str) -> list[int]:
    """Pids, other than this process, that hold a socket listening on ``path``; ``[]`` when none can be named."""
    inodes = listening_socket_inodes(path) - _socket_inodes_of("self")
    if not inodes:
        return []
    me = os.getpid()
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit() and int(p) != me]
    except OSError:
        return []
    return sorted(int(p) for p in pids if _socket_inodes_of(p) & inodes)


def describe_pid(pid: int) -> str:
    """``pid 123 (python -m vllm ...)``: the command line, cut to 80 characters; the pid alone when unreadable."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            command = " ".join(f.read().replace(b"\0", b" ").decode(errors="replace").split())  # one line
    except OSError:
        return f"pid {pid}"
    if len(command) > 80:
        command = command[:77] + "..."
    return f"pid {pid} ({command})" if command else f"pid {pid}"
