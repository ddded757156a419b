"""Stands in for `vllm serve` in the sidecar tests: checks the plugin's environment, then serves until SIGTERM."""

import json
import os
import signal
import sys
import time

from eplb_service.coordinator.status_client import fetch_status

endpoint = os.environ["EPLB_SERVICE_ENDPOINT"]
status = fetch_status(endpoint, timeout_s=5)
print(json.dumps({"endpoint": endpoint, "world_size": status["world_size"], "argv": sys.argv[1:]}), flush=True)
stop = False


def on_term(signum, frame):
    global stop
    stop = True


signal.signal(signal.SIGTERM, on_term)
deadline = time.monotonic() + 120
while not stop and time.monotonic() < deadline:
    time.sleep(0.05)
print("stand-in stopping", flush=True)
sys.exit(7 if stop else 1)
