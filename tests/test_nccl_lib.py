"""The ctypes NCCL binding's pure parts: the config struct NCCL reads, bounds, library lookup.

The struct layout is what NCCL's ``parseCommConfig`` copies (``size`` bytes over its
defaults), so a field at the wrong offset would silently set the wrong knob: the offsets
are pinned here against ``nccl.h``'s declaration order on LP64.
"""

from __future__ import annotations

import ctypes

import pytest

from eplb_service.worker_agent import nccl_lib
from eplb_service.worker_agent.nccl_lib import NcclConfig, loaded_nccl_paths, make_config


def test_config_layout_matches_nccl_h_on_lp64():
    offsets = {name: getattr(NcclConfig, name).offset for name, _ in NcclConfig._fields_}
    assert offsets == {
        "size": 0,
        "magic": 8,
        "version": 12,
        "blocking": 16,
        "cgaClusterSize": 20,
        "minCTAs": 24,
        "maxCTAs": 28,
        "netName": 32,
        "splitShare": 40,
    }
    assert ctypes.sizeof(NcclConfig) == 48


def test_config_carries_the_limits_and_leaves_the_rest_to_nccl():
    cfg = make_config(max_ctas=4)
    assert (cfg.size, cfg.magic, cfg.version) == (48, 0xCAFEBEEF, 21700)
    assert cfg.blocking == 1
    assert cfg.maxCTAs == 4
    undef = -(2**31)
    assert cfg.minCTAs == undef and cfg.cgaClusterSize == undef and cfg.splitShare == undef
    assert cfg.netName is None
    both = make_config(min_ctas=2, max_ctas=8)
    assert (both.minCTAs, both.maxCTAs) == (2, 8)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"max_ctas": 0}, "max_ctas=0: expected 1..64 CTAs"),
        ({"max_ctas": 65}, "max_ctas=65: expected 1..64 CTAs"),
        ({"min_ctas": -1}, "min_ctas=-1: expected 1..64 CTAs"),
        ({"min_ctas": 8, "max_ctas": 4}, "min_ctas=8 > max_ctas=4"),
    ],
)
def test_bad_limits_are_named(kwargs, needle):
    with pytest.raises(ValueError) as exc:
        make_config(**kwargs)
    assert needle in str(exc.value)


def test_loaded_library_found_in_the_process_maps(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text(
        "7f0000000000-7f0000001000 r-xp 00000000 00:00 0 /usr/lib/libc.so.6\n"
        "7f0000002000-7f0000003000 r-xp 00000000 00:00 0 /site/nvidia/nccl/lib/libnccl.so.2\n"
        "7f0000003000-7f0000004000 r--p 00001000 00:00 0 /site/nvidia/nccl/lib/libnccl.so.2\n"
        "7f0000005000-7f0000006000 rw-p 00000000 00:00 0 \n"
        "7f0000006000-7f0000007000 r-xp 00000000 00:00 0 /opt/other/libnccl-net.so\n"
    )
    assert loaded_nccl_paths(str(maps)) == ["/site/nvidia/nccl/lib/libnccl.so.2", "/opt/other/libnccl-net.so"]
    assert loaded_nccl_paths(str(tmp_path / "absent")) == []


def test_missing_library_is_a_named_error(monkeypatch):
    monkeypatch.setattr(nccl_lib, "loaded_nccl_paths", lambda maps_path="": [])
    monkeypatch.setattr(nccl_lib.ctypes.util, "find_library", lambda name: None)
    monkeypatch.setitem(__import__("sys").modules, "nvidia.nccl", None)
    with pytest.raises(nccl_lib.NcclLibraryError, match="libnccl not found; looked in"):
        nccl_lib.find_library()
    with pytest.raises(nccl_lib.NcclLibraryError, match="cannot load NCCL from '/nonexistent/libnccl.so.2'"):
        nccl_lib.NcclLibrary("/nonexistent/libnccl.so.2")


def test_one_hardware_queue_is_refused_and_few_are_warned(caplog):
    from eplb_service.worker_agent.transport import TransportError
    from eplb_service.worker_agent.transport_cupy_nccl import check_hardware_queues

    check_hardware_queues({})  # CUDA's default
    check_hardware_queues({"CUDA_DEVICE_MAX_CONNECTIONS": "32"})
    with pytest.raises(TransportError, match="CUDA_DEVICE_MAX_CONNECTIONS=1: the NCCL side transport needs at least 2"):
        check_hardware_queues({"CUDA_DEVICE_MAX_CONNECTIONS": "1"})
    with pytest.raises(TransportError, match="CUDA_DEVICE_MAX_CONNECTIONS='many': expected an integer"):
        check_hardware_queues({"CUDA_DEVICE_MAX_CONNECTIONS": "many"})
    with caplog.at_level("WARNING"):
        check_hardware_queues({"CUDA_DEVICE_MAX_CONNECTIONS": "4"})
    assert "CUDA_DEVICE_MAX_CONNECTIONS=4: fewer hardware queues" in caplog.text
