"""Profiler trace summaries of the GPU harness (bench/gpu/trace_summary.py) on synthetic traces."""

from __future__ import annotations

import json

import pytest

from bench.gpu.trace_summary import compare, kernels_of, load_kernels, short_name, window_summary


def _trace(kernels):
    events = [{"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 5, "args": {}}]
    for name, stream, dur, grid in kernels:
        events.append(
            {
                "ph": "X",
                "cat": "kernel",
                "name": name,
                "ts": 1,
                "dur": dur,
                "args": {"stream": stream, "grid": grid, "block": [128, 1, 1]},
            }
        )
    return {"traceEvents": events}


IDLE = _trace(
    [
        ("sm90_gemm_bf16<128, 64>(Params)", 7, 100.0, [132, 1, 1]),
        ("sm90_gemm_bf16<128, 64>(Params)", 7, 110.0, [132, 1, 1]),
        ("ncclDevKernel_SendRecv(ncclDevKernelArgs)", 20, 50.0, [4, 1, 1]),
    ]
)
STREAMING = _trace(
    [
        ("sm90_gemm_bf16<128, 64>(Params)", 7, 120.0, [132, 1, 1]),
        ("sm90_gemm_bf16<128, 64>(Params)", 7, 130.0, [132, 1, 1]),
        ("ncclDevKernel_SendRecv(ncclDevKernelArgs)", 20, 60.0, [4, 1, 1]),
        ("ncclDevKernel_SendRecv(ncclDevKernelArgs)", 33, 900.0, [2, 1, 1]),
        ("void at::native::spin_kernel(long)", 33, 400.0, [1, 1, 1]),
    ]
)


def test_kernels_only_with_grid_and_stream():
    ks = kernels_of(STREAMING)
    assert len(ks) == 5
    assert ks[3].stream == 33 and ks[3].ctas == 2 and ks[3].dur_us == 900.0


def test_short_name_drops_templates_and_arguments():
    assert (
        short_name("void at::native::vectorized_elementwise_kernel<4, Foo<int>>(int, Bar)")
        == "at::native::vectorized_elementwise_kernel"
    )
    assert short_name("ncclDevKernel_SendRecv(ncclDevKernelArgs)") == "ncclDevKernel_SendRecv"


def test_idle_streams_are_the_serving_ones_and_new_streams_are_side(tmp_path):
    path = tmp_path / "idle.json"
    path.write_text(json.dumps(IDLE))
    idle = window_summary(load_kernels(str(path)), steps=2)
    assert idle["serving_streams"] == [7, 20] and idle["side_streams"] == []
    assert idle["serving_kernel_ms_per_step"] == pytest.approx(0.13)
    streaming = window_summary(kernels_of(STREAMING), steps=2, serving_streams={7, 20})
    assert streaming["side_streams"] == [33]
    assert streaming["side_kernel_ms_per_step"] == pytest.approx(0.65)
    assert streaming["side_kernel_ctas"] == {"ncclDevKernel_SendRecv": [2], "at::native::spin_kernel": [1]}
    cmp = compare(idle, streaming)
    assert cmp["serving_kernel_change"] == pytest.approx(155 / 130 - 1)
    top = cmp["top_changes"][0]
    assert top["kernel"] == "sm90_gemm_bf16"
    assert top["added_ms_per_step"] == pytest.approx(0.02)
    assert top["mean_ratio"] == pytest.approx(125 / 105)


def _host(calls):
    return {
        "traceEvents": [
            {"ph": "X", "cat": "cuda_runtime", "name": name, "tid": tid, "ts": 0, "dur": dur, "args": {}}
            for name, tid, dur in calls
        ]
    }


def test_host_api_time_of_one_thread_and_its_change():
    from bench.gpu.trace_summary import host_api_summary

    idle_trace = _host(
        [("cudaLaunchKernel", 11, 4.0)] * 10 + [("cudaStreamSynchronize", 11, 100.0), ("cudaEventQuery", 99, 50.0)]
    )
    busy_trace = _host(
        [("cudaLaunchKernel", 11, 9.0)] * 10 + [("cudaStreamSynchronize", 11, 100.0), ("cudaEventQuery", 99, 70.0)]
    )
    idle_host = host_api_summary(idle_trace, steps=2, tid=11)
    assert idle_host["threads_seen"] == 2
    assert idle_host["ms_per_step"] == pytest.approx(0.07)
    assert idle_host["calls"]["cudaLaunchKernel"] == {"per_step": 5.0, "mean_us": 4.0, "ms_per_step": 0.02}
    assert "cudaEventQuery" not in idle_host["calls"]
    everyone = host_api_summary(idle_trace, steps=2)
    assert "cudaEventQuery" in everyone["calls"]
    idle = {**window_summary(kernels_of(IDLE), steps=2), "host_api": idle_host}
    streaming = {
        **window_summary(kernels_of(STREAMING), steps=2, serving_streams={7, 20}),
        "host_api": host_api_summary(busy_trace, steps=2, tid=11),
    }
    cmp = compare(idle, streaming)
    assert cmp["host_api_ms_per_step"] == [pytest.approx(0.07), pytest.approx(0.095)]
    assert cmp["host_api_top_changes"][0] == {
        "call": "cudaLaunchKernel",
        "idle_ms_per_step": pytest.approx(0.02),
        "streaming_ms_per_step": pytest.approx(0.045),
    }


def test_host_api_falls_back_to_all_threads_when_the_id_is_unknown():
    from bench.gpu.trace_summary import host_api_summary

    got = host_api_summary(_host([("cudaLaunchKernel", 5, 4.0)]), steps=1, tid=12345)
    assert got["tid"] is None and got["calls"]["cudaLaunchKernel"]["per_step"] == 1.0
