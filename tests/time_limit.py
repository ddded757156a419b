"""A time limit for a test step that runs the coordinator's ``main()`` in the test's own process.

Such a step expects a refusal (an exit code before anything is served); should the refusal ever
regress, ``main()`` goes on to serve as a daemon and the whole run hangs with no word of which
test. pytest-timeout is not a dependency, so the limit is a ``SIGALRM`` (the tests run on the main
thread, where Python delivers signals). Inside a serving coordinator the alarm's exception is
only logged by the event loop, so there the alarm asks the coordinator to stop (SIGTERM, which it
handles as a daemon's stop) and the step raises once ``main()`` has returned."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator


class StepTimedOut(AssertionError):
    """The step did not return within its limit (raised in the step, so pytest names the test)."""


@contextlib.contextmanager
def time_limit(seconds: int, what: str) -> Iterator[None]:
    """Raise :class:`StepTimedOut` naming ``what`` if the block runs longer than ``seconds``."""

    message = f"{what} did not return within {seconds}s (it should have refused and returned)"
    expired: list[bool] = []

    def expire(signum: int, frame: object) -> None:
        expired.append(True)
        if signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN, None):
            os.kill(os.getpid(), signal.SIGTERM)  # a coordinator serving: its own, orderly stop
        raise StepTimedOut(message)

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    if expired:
        raise StepTimedOut(message)
