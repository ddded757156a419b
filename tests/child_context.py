"""The start method of the multi-process tests' children: a fork server that imported torch once.

With ``spawn`` every child imports torch and the agent afresh: seconds of CPU each, for two to
four children per test, on a 2-core CI machine. The fork server imports them once, before it
has started any thread, and forks each child from there: still a fresh process with its own
interpreter state, sockets and gloo groups (vLLM forks its workers by default, too), started
in a fraction of the time. The server's ``sys.path`` is the test session's, so children find
the helpers in ``tests/`` as they did under ``spawn``.

One difference to keep in mind: a child's environment is the fork server's, fixed when the
server started (the first child of the session), not the test's at ``Process.start``. A test
that sets a variable for its children (``monkeypatch.setenv``) must pass it explicitly (an
argument of the child's spec) or use ``spawn``.
"""

from __future__ import annotations

import multiprocessing as mp

from eplb_service.sim.deployment import RANK_PRELOAD

CTX = mp.get_context("forkserver")
CTX.set_forkserver_preload(list(RANK_PRELOAD))  # the simulated deployment's own (the agent comes with the serving loop)
