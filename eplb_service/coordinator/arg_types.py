"""Value types for the command lines' flags: each names what it expected and what it got.

``float()`` alone takes ``nan`` and ``inf`` and ``int()`` any sign; no timeout, rate, count or
port here can mean those, and a value the agents refuse later (a negative fence timeout) would
leave a deployment that starts cleanly and never rebalances.
"""

from __future__ import annotations

import argparse
import math

from eplb_service.logutil import LEVELS, level_name


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def log_level(text: str) -> str:
    """A level name in any case, kept as given (``logutil.configure`` reads it): checked at parse
    time, so a bad one is named where it was written, a ``--config`` file's ``log-level`` included."""
    if level_name(text) is None:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(LEVELS)} (any case), got {text!r}")
    return text


def nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def finite_float(text: str, *, allow_zero: bool) -> float:
    """A finite number > 0 (or >= 0): ``float()`` alone takes ``nan`` and ``inf``, which no
    timeout, rate or gain here can mean."""
    expected = "a finite number >= 0" if allow_zero else "a finite number > 0"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_float(text: str) -> float:
    return finite_float(text, allow_zero=False)


def nonneg_float(text: str) -> float:
    return finite_float(text, allow_zero=True)


def balancedness_gain(text: str) -> float:
    """A gain of balancedness (mean/max load, at most 1): finite, >= 0 and below 1. A gain of 1 or
    more never comes, so ``--min-gain 5`` (meant as 5%) started a coordinator that never planned."""
    expected = "a balancedness gain >= 0 and below 1 (0.01 = one percentage point)"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not (0 <= value < 1):  # NaN fails too
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def port(text: str) -> int:
    """An HTTP port, 0-65535 (0: any free port); the OS would wrap or refuse anything else."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port 0-65535, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port 0-65535 (0: any free port), got {value}")
    return value


def connect_endpoint(text: str) -> str:
    """An endpoint a client connects to: ``ipc://PATH`` or ``tcp://HOST:PORT``, port 1-65535.

    ZeroMQ's own refusals name no fix (``Invalid argument``, ``Protocol not supported``), and it
    wraps a port above 65535 (99999 dials 34463), so a typo waited for an answer that could not
    come. ``*`` is the coordinator's bind spelling (any address or port): nothing to dial."""
    from eplb_service.coordinator.config import check_endpoint, split_tcp_endpoint

    try:
        check_endpoint(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if text.startswith("tcp://"):
        if "*" in split_tcp_endpoint(text):
            raise argparse.ArgumentTypeError(
                f"* is what a coordinator binds (any address or port), not an address to connect to: {text!r}; "
                "expected the coordinator's host and port, e.g. tcp://127.0.0.1:5555"
            )
    return text
