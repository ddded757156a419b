"""``preexec_fn`` values for children a test signals: the dispositions they start with.

A child inherits every signal this process ignores, and the service keeps an inherited ignore
(:mod:`eplb_service.stop_signals`). pytest itself may run with SIGINT ignored (a script's
background job) or SIGHUP ignored (``nohup``): a test that sends one of them gives its child the
terminal's defaults first, and a test of ``nohup`` gives it nohup's."""

from __future__ import annotations

import signal

from eplb_service.sidecar import FORWARDED_SIGNALS as STOP  # every signal the service stops on


def terminal_defaults() -> None:
    """As a command started in a terminal's foreground has them: every stop signal at its default."""
    for sig in STOP:
        signal.signal(sig, signal.SIG_DFL)


def nohup() -> None:
    """As ``nohup`` starts a command: the same, with SIGHUP ignored."""
    terminal_defaults()
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
