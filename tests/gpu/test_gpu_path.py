"""GPU path on real GPUs: the CuPy NCCL side transport and a short harness run.

Skipped without CuPy, CUDA or two GPUs (the CPU CI run collects and skips this module
in well under a second). On the device: ``python -m pytest -q tests/gpu``.
"""

from __future__ import annotations

import pytest

pytest.importorskip("cupy")
torch = pytest.importorskip("torch")
if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
    pytest.skip("needs CUDA and at least two GPUs", allow_module_level=True)

pytestmark = pytest.mark.gpu


def test_side_transport_exchange_fence_vote_abort_rebuild():
    from bench.gpu.p2p import run_p2p

    summary = run_p2p(min(4, torch.cuda.device_count()), quick=True, timeout_s=240)
    assert not summary["errors"], summary["errors"]
    assert summary["exchange_ok"], "bytes received over the side communicator differ from the bytes sent"
    assert summary["fence_ok"], "a side-stream copy did not see the serving stream's earlier write"
    assert summary["vote_ok"]
    abort = summary["ranks"][0]["abort"]
    assert abort["wait_failed"], "a receive nobody matches must end in TransportError, not a hang"
    assert abort["drained"], "ncclCommAbort did not free the side stream"
    assert summary["abort_ok"], abort


def test_cta_limited_side_communicator_keeps_its_limit_and_its_bytes():
    from bench.gpu.p2p import run_p2p

    summary = run_p2p(2, quick=True, timeout_s=240, max_ctas=2)
    assert not summary["errors"], summary["errors"]
    assert summary["exchange_ok"] and summary["vote_ok"] and summary["abort_ok"]
    ctas = summary["side_kernel_ctas"]
    assert ctas, "the profiler saw no NCCL kernel of the side communicator"
    assert max(ctas) <= 2, f"side NCCL kernels launched with {ctas} CTAs under max_ctas=2"


def test_harness_short_run_commits_exactly():
    from bench.gpu.harness import HarnessOptions, run_harness
    from bench.gpu.moe import PRESETS

    opts = HarnessOptions(
        world_size=2,
        device="cuda",
        model=PRESETS["small"],
        warmup_steps=20,
        idle_s=2,
        throttled_s=3,
        unthrottled_s=3,
        isolated_s=2,
        soak_s=4,
        min_phase_steps=20,
        experts_per_rank=4,
        isolated_experts_per_rank=8,
        throttle_bytes_per_s=1e9,
        sync_plans=4,
        hang_timeout_s=60,
        startup_timeout_s=180,
        profile_steps=6,
    )
    summary = run_harness(opts)
    assert summary["complete"] and not summary["errors"], summary["errors"]
    assert summary["hangs"] == 0
    assert summary["output_mismatches"] == 0
    assert summary["coordinator"]["committed"] >= 3
    assert summary["coordinator"]["aborted"] == 0
    assert summary["sync_baseline"]["plans"] >= 4
    windows = summary["profile"]["windows"]
    assert set(windows) == {"idle", "stream_throttled", "stream_unthrottled"}
    assert windows["idle"]["serving_kernel_ms_per_step"] > 0 and windows["idle"]["side_streams"] == []
