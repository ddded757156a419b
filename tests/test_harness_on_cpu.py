"""The GPU harness's own logic, run on CPU (gloo serving group, gloo side transport).

The harness is what every device number comes from; its phases, drains, profile windows
and summary must work before device time is spent on it. Tiny model, phases of a few
dozen steps, real coordinator and agents in real processes.
"""

from __future__ import annotations

from bench.gpu.harness import HarnessOptions, run_harness
from bench.gpu.moe import PRESETS


def test_harness_phases_commit_exactly_and_profile_windows_exist():
    opts = HarnessOptions(
        world_size=2,
        device="cpu",
        model=PRESETS["cpu"],
        warmup_steps=10,
        prime_s=0.0,
        idle_s=0.5,
        throttled_s=1.0,
        unthrottled_s=1.0,
        isolated_s=0.5,
        soak_s=1.0,
        min_phase_steps=10,
        experts_per_rank=2,
        isolated_experts_per_rank=2,
        throttle_bytes_per_s=1e8,
        sync_plans=2,
        hang_timeout_s=60,
        startup_timeout_s=120,
        profile_steps=3,
    )
    summary = run_harness(opts)
    assert summary["complete"] and not summary["errors"], summary["errors"]
    assert summary["hangs"] == 0 and summary["output_mismatches"] == 0
    assert summary["coordinator"]["committed"] >= 3 and summary["coordinator"]["aborted"] == 0
    assert summary["sync_baseline"]["plans"] == 2
    phases = summary["phases"]
    for name in ("idle", "stream_throttled", "stream_unthrottled", "soak", "profile_idle", "profile_stream_throttled"):
        assert phases[name]["steps"] >= 3, name
    assert set(summary["profile"]["windows"]) == {"idle", "stream_throttled", "stream_unthrottled"}
    sections = summary["agent_cpu_ms_per_batch"]["sections"]
    assert {"stage_plan", "stage_exchange", "vote_prepare", "vote_reduce"} <= set(sections)
