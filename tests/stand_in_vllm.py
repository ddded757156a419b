"""Stands in for `vllm serve` in the sidecar tests: checks the plugin's environment, then serves until signalled.

Failure modes, as the first argument:
    --exit-now CODE   fail at once with CODE, before reaching the coordinator (a vLLM that cannot start)
    --kill-self       report, then die by SIGKILL (a vLLM killed by the OOM killer)
    --ignore-sighup   serve on through SIGHUP (a vLLM run under nohup, or one that handles it)
"""

import json
import os
import signal
import sys
import time

if sys.argv[1:2] == ["--exit-now"]:
    print(f"stand-in failing with {sys.argv[2]}", file=sys.stderr, flush=True)
    sys.exit(int(sys.argv[2]))

from eplb_service.coordinator.status_client import fetch_status  # noqa: E402
from eplb_service.stop_signals import not_ignored  # noqa: E402

stop = False


def on_stop(signum, frame):
    global stop
    stop = True


# Before the report: a test signals as soon as it reads it. One ignored from the start stays
# ignored, as in a server that handles only what it was given (vLLM under nohup serves on).
sighup_ignored = signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
for sig in not_ignored((signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)):
    signal.signal(sig, on_stop)
if sys.argv[1:2] == ["--ignore-sighup"]:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
endpoint = os.environ["EPLB_SERVICE_ENDPOINT"]
status = fetch_status(endpoint, timeout_s=5)
print(
    json.dumps(
        {
            "endpoint": endpoint,
            "world_size": status["world_size"],
            "pid": os.getpid(),
            "argv": sys.argv[1:],
            "deployment": os.environ.get("EPLB_SERVICE_DEPLOYMENT"),
            "sighup_ignored": sighup_ignored,
        }
    ),
    flush=True,
)
if sys.argv[1:2] == ["--kill-self"]:
    os.kill(os.getpid(), signal.SIGKILL)
deadline = time.monotonic() + 120
while not stop and time.monotonic() < deadline:
    time.sleep(0.05)
print("stand-in stopping", flush=True)
sys.exit(7 if stop else 1)
