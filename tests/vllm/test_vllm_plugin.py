"""The vLLM plugin without vLLM: inert mode, configuration errors, adapter checks, step wiring.

vLLM's classes are replaced by stand-ins with the same signatures and tensor layout
(``fake_vllm``); the real thing runs in ``test_vllm_e2e.py``.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from fake_vllm import (
    VARIANTS,
    FakeEngineArgsBase,
    FakeEplbState018,
    FakeEplbStateBase,
    FakeModelConfig,
    fake_moe_model,
    model_state_tensors,
)

from eplb_service import protocol
from eplb_service.integrations.vllm import adapter, plugin
from eplb_service.integrations.vllm import config as C
from eplb_service.integrations.vllm.agent import VllmWorkerAgent
from eplb_service.placement import PlacementError, PlacementShape, initial_phy2log
from eplb_service.worker_agent.expert_model import ExpertModel

SHAPE = PlacementShape(num_layers=2, num_logical=6, num_physical=8, num_ranks=2)
TOPOLOGY = adapter.EpTopology(rank=0, world_size=2, num_nodes=1)


# -- inert mode ----------------------------------------------------------------------------


def test_register_without_endpoint_is_inert_and_cheap():
    env = {k: v for k, v in os.environ.items() if not k.startswith("EPLB_SERVICE_")}
    code = (
        "import json, sys, time\n"
        "t0 = time.perf_counter()\n"
        "from eplb_service.integrations.vllm.plugin import register\n"
        "register()\n"
        "from eplb_service.integrations.vllm import plugin\n"
        "print(json.dumps({'s': time.perf_counter() - t0, 'installed': plugin._installed is not None,\n"
        "  'heavy': sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'vllm', 'zmq', 'numpy'))}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, timeout=60)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["installed"] is False
    assert result["heavy"] == [], "inert register() imported heavy modules"
    assert result["s"] < 0.5


def test_entry_point_is_registered():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("eplb_service") == "eplb_service.integrations.vllm.plugin:register"


def test_empty_endpoint_means_inert():
    assert C.from_env({}) is None
    assert C.from_env({C.ENDPOINT: "  "}) is None


# -- configuration errors ------------------------------------------------------------------------


def test_full_configuration_from_env():
    cfg = C.from_env(
        {
            C.ENDPOINT: "tcp://10.0.0.1:5557",
            C.TRANSPORT: "gloo",
            C.STAGING_BUDGET_BYTES: "1048576",
            C.THROTTLE_BYTES_PER_S: "5e9",
            C.REPORT_INTERVAL_STEPS: "20",
            C.SIDE_MAX_CTAS: "4",
            C.LOG_FORMAT: " JSON ",
        }
    )
    assert cfg.endpoint == "tcp://10.0.0.1:5557" and cfg.transport == "gloo" and cfg.staging_budget_bytes == 1 << 20
    assert cfg.side_max_ctas == 4 and cfg.log_format == "json"
    assert cfg.agent_overrides() == {"throttle_bytes_per_s": 5e9, "report_interval_steps": 20}


@pytest.mark.parametrize(
    "env, needle",
    [
        (
            {C.ENDPOINT: "localhost:5557"},
            "EPLB_SERVICE_ENDPOINT='localhost:5557': expected ipc://PATH or tcp://HOST:PORT",
        ),
        (
            {C.TRANSPORT: "mpi"},
            "EPLB_SERVICE_TRANSPORT='mpi': expected one of auto, gloo, nccl, copy-engine, prefer-copy-engine",
        ),
        ({C.STAGING_BUDGET_BYTES: "1GiB"}, "EPLB_SERVICE_STAGING_BUDGET_BYTES='1GiB': expected an integer"),
        ({C.STAGING_BUDGET_BYTES: "0"}, "EPLB_SERVICE_STAGING_BUDGET_BYTES='0': expected a finite value > 0"),
        ({C.THROTTLE_BYTES_PER_S: "-1"}, "EPLB_SERVICE_THROTTLE_BYTES_PER_S='-1': expected a finite value >= 0"),
        ({C.REPORT_INTERVAL_STEPS: "ten"}, "EPLB_SERVICE_REPORT_INTERVAL_STEPS='ten': expected an integer"),
        ({C.REPORT_INTERVAL_STEPS: "0"}, "EPLB_SERVICE_REPORT_INTERVAL_STEPS='0': expected a finite value > 0"),
        ({C.SIDE_MAX_CTAS: "0"}, "EPLB_SERVICE_SIDE_MAX_CTAS='0': expected a finite value > 0"),
        ({C.SIDE_MAX_CTAS: "65"}, "EPLB_SERVICE_SIDE_MAX_CTAS=65: expected 1..64 CTAs"),
        ({C.LOG_FORMAT: "xml"}, "EPLB_SERVICE_LOG_FORMAT='xml': expected 'text' or 'json'"),
        ({"EPLB_SERVICE_STORE_PORT": "99999"}, "EPLB_SERVICE_STORE_PORT=99999: expected a port number in [1, 65535]"),
        ({"EPLB_SERVICE_STORE_PORT": "x"}, "EPLB_SERVICE_STORE_PORT='x': expected a port number in [1, 65535]"),
        (
            {"EPLB_SERVICE_STORE_HOST": "10.0.0.1:29500"},
            "EPLB_SERVICE_STORE_HOST='10.0.0.1:29500': expected an address",
        ),
    ],
)
def test_bad_variables_are_named(env, needle):
    with pytest.raises(C.ConfigError) as exc:
        C.from_env({C.ENDPOINT: "ipc:///tmp/x.sock", **env})
    assert needle in str(exc.value)


def test_each_variables_smallest_and_largest_usable_values_are_taken():
    """The bounds themselves: a throttle of 0 is "unthrottled" (README), 64 CTAs is NCCL's channel
    maximum, and 1 is the least budget, interval and CTA count. A bound made strict refused them."""
    low = C.from_env(
        {
            C.ENDPOINT: "ipc:///tmp/x.sock",
            C.THROTTLE_BYTES_PER_S: "0",
            C.STAGING_BUDGET_BYTES: "1",
            C.REPORT_INTERVAL_STEPS: "1",
            C.SIDE_MAX_CTAS: "1",
        }
    )
    assert (low.throttle_bytes_per_s, low.staging_budget_bytes, low.report_interval_steps, low.side_max_ctas) == (
        0.0,
        1,
        1,
        1,
    )
    assert low.agent_overrides() == {"throttle_bytes_per_s": 0.0, "report_interval_steps": 1}
    assert C.from_env({C.ENDPOINT: "ipc:///tmp/x.sock", C.SIDE_MAX_CTAS: "64"}).side_max_ctas == 64


def _install(tmp_path, agent_factory=None, variant: type = FakeEplbStateBase, **cfg):
    state_cls = type("EplbState", (variant,), {})
    args_cls = type("EngineArgs", (FakeEngineArgsBase,), {})
    plugin.install(
        C.PluginConfig(endpoint=f"ipc://{tmp_path}/c.sock", **cfg),
        state_cls,
        args_cls,
        agent_factory=agent_factory or unstarted_agent,
    )
    return state_cls, args_cls


def test_configured_without_enable_eplb_fails_naming_the_flag(tmp_path):
    _, args_cls = _install(tmp_path)
    with pytest.raises(C.ConfigError) as exc:
        args_cls(enable_eplb=False).create_engine_config()
    message = str(exc.value)
    assert "--enable-eplb" in message and "EPLB_SERVICE_ENDPOINT" in message
    with pytest.raises(C.ConfigError, match="--enable-expert-parallel"):
        args_cls(enable_expert_parallel=False).create_engine_config()
    with pytest.raises(C.ConfigError, match="elastic EP"):
        args_cls(enable_elastic_ep=True).create_engine_config()
    assert args_cls().create_engine_config().parallel_config.enable_eplb


def test_a_dense_model_without_eplb_is_served_with_one_warning(tmp_path, caplog, monkeypatch):
    _, args_cls = _install(tmp_path)
    monkeypatch.setattr(logging.getLogger("eplb_service"), "propagate", True)  # to caplog's root handler
    with caplog.at_level(logging.WARNING, logger="eplb_service"):
        config = args_cls(is_moe=False, enable_eplb=False, enable_expert_parallel=False).create_engine_config()
    assert not config.parallel_config.enable_eplb
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("eplb_service")]
    assert len(lines) == 1 and "tiny-model has no experts (dense)" in lines[0] and "passive" in lines[0], lines
    # A MoE model without EPLB is still refused, and so is a dense one with EPLB (vLLM would assert).
    with pytest.raises(C.ConfigError, match="--enable-eplb"):
        args_cls(is_moe=True, enable_eplb=False).create_engine_config()
    with pytest.raises(C.ConfigError, match="tiny-model, which has no experts .dense.: vLLM's EPLB needs a MoE"):
        args_cls(is_moe=False).create_engine_config()
    assert args_cls(is_moe=True).create_engine_config().parallel_config.enable_eplb


@pytest.mark.parametrize("is_moe", [False, True])
def test_the_plugins_lines_say_active_only_where_it_takes_eplb_over(monkeypatch, tmp_path, caplog, is_moe):
    """Before: ``register()`` logged "eplb-service plugin active" in every process, and for a dense
    model the engine config's warning then said the plugin stays passive: "active", then "passive"."""
    args_cls = type("EngineArgs", (FakeEngineArgsBase,), {})
    monkeypatch.setattr(plugin, "_setup_logging", lambda level, fmt="text": None)
    monkeypatch.setattr(logging.getLogger("eplb_service"), "propagate", True)  # to caplog's root handler
    monkeypatch.setenv(C.ENDPOINT, f"ipc://{tmp_path}/c.sock")
    monkeypatch.setattr(plugin, "_installed", None)
    monkeypatch.setattr(adapter, "installed_vllm_version", lambda: "0.33.0")
    monkeypatch.setattr(adapter, "eplb_state_class", lambda: type("EplbState", (FakeEplbStateBase,), {}))
    monkeypatch.setattr(adapter, "engine_args_class", lambda: args_cls)
    with caplog.at_level(logging.INFO, logger="eplb_service"):
        plugin.register()  # every vLLM process: the model is not known yet
        loaded = [r.getMessage() for r in caplog.records]
        args_cls(is_moe=is_moe, enable_eplb=is_moe, enable_expert_parallel=is_moe).create_engine_config()
    lines = [r.getMessage() for r in caplog.records]
    assert len(loaded) == 1 and "eplb-service plugin loaded: coordinator ipc://" in loaded[0], loaded
    assert "active" not in loaded[0] and "passive" not in loaded[0], loaded
    later = lines[1:]
    if is_moe:
        assert len(later) == 1 and later[0].startswith("eplb-service plugin active: vLLM's EPLB"), later
    else:
        assert len(later) == 1 and "the plugin stays passive" in later[0], later
        assert not any("active:" in line for line in lines), lines


def test_a_model_config_without_is_moe_counts_as_moe():
    """Where ``ModelConfig.is_moe`` is missing the model is taken as MoE: without --enable-eplb it is
    refused (not served passively, without a word of eplb-service), with it the plugin takes over."""
    from types import SimpleNamespace

    def parallel(enable_eplb: bool) -> SimpleNamespace:
        return SimpleNamespace(
            enable_eplb=enable_eplb, enable_expert_parallel=True, enable_elastic_ep=False, pipeline_parallel_size=1
        )

    no_flag = SimpleNamespace(model="old-moe")
    assert not adapter.is_dense_model(no_flag)
    with pytest.raises(C.ConfigError, match="runs without --enable-eplb"):
        adapter.check_parallel_config(parallel(False), no_flag)
    assert adapter.check_parallel_config(parallel(True), no_flag) is None


def test_pipeline_parallelism_is_refused_before_any_worker_starts(tmp_path):
    """vLLM builds one EP group per pipeline stage, each numbering its ranks from 0, and every stage
    derives the same deployment id (one default store). Before, the plugin took EPLB over anyway: the
    coordinator admits the first Hello for each rank, so rank 0 of one stage and rank 1 of another
    could be one "deployment", and a plan then moved stage 0's rows of layer k into stage 1's layer
    k, another layer of the model: wrong outputs. The sidecar refused PP; the plugin alone did not."""
    _, args_cls = _install(tmp_path)
    with pytest.raises(C.ConfigError, match="pipeline-parallel size 2: vLLM builds one EP group per pipeline stage"):
        args_cls(pipeline_parallel_size=2).create_engine_config()
    assert args_cls(pipeline_parallel_size=1).create_engine_config().parallel_config.enable_eplb
    # A dense model without EPLB is still served as if the plugin were not there, pipelined or not.
    assert (
        not args_cls(is_moe=False, enable_eplb=False, pipeline_parallel_size=2)
        .create_engine_config()
        .parallel_config.enable_eplb
    )


def test_a_parallel_config_without_the_flags_is_an_adapter_error(tmp_path):
    _, args_cls = _install(tmp_path)
    engine_args = args_cls()
    del engine_args.parallel["enable_elastic_ep"]
    with pytest.raises(
        adapter.AdapterError,
        match="has no enable_elastic_ep; expected enable_eplb, enable_expert_parallel, enable_elastic_ep, "
        "pipeline_parallel_size",
    ):
        engine_args.create_engine_config()


# -- version and signature checks in the adapter --------------------------------------------------


@pytest.mark.parametrize("version", ["0.18.0", "0.18.1", "0.26.0", "0.32.0", "0.33.0", "0.33.2+cpu", "0.32.1rc1"])
def test_known_versions_run_quietly(version):
    assert adapter.version_warning(version) is None


@pytest.mark.parametrize("version", ["0.17.1", "0.34.0", "1.0.0", "unknown"])
def test_other_versions_run_with_a_warning_naming_the_known_range(version):
    warning = adapter.version_warning(version)
    assert f"vLLM {version} is outside" in warning and "(0.18-0.33)" in warning


def _register_with(monkeypatch, tmp_path, version, variant=FakeEplbStateBase) -> tuple[type, list[str]]:
    """``register()`` as vLLM calls it, with ``variant`` as vLLM's ``EplbState``; returns it and the warnings."""
    state_cls = type("EplbState", (variant,), {})
    warnings: list[str] = []
    monkeypatch.setattr(plugin, "_setup_logging", lambda level, fmt="text": None)
    monkeypatch.setattr(plugin.log, "warning", lambda msg, *args: warnings.append(msg % args))
    monkeypatch.setenv(C.ENDPOINT, f"ipc://{tmp_path}/c.sock")
    monkeypatch.setattr(plugin, "_installed", None)
    monkeypatch.setattr(adapter, "installed_vllm_version", lambda: version)
    monkeypatch.setattr(adapter, "eplb_state_class", lambda: state_cls)
    monkeypatch.setattr(adapter, "engine_args_class", lambda: None)
    plugin.register()
    return state_cls, warnings


def test_a_misspelt_variable_is_named_with_the_one_it_was_meant_to_be(monkeypatch, tmp_path):
    """Before: ``EPLB_SERVICE_STAGING_BUDGET`` (no ``_BYTES``) was ignored without a word, and the
    budget it was meant to set never applied. The suite's own ``EPLB_SERVICE_TEST_*`` stay quiet."""
    monkeypatch.setenv("EPLB_SERVICE_STAGING_BUDGET", "1073741824")
    monkeypatch.setenv("EPLB_SERVICE_TEST_CACHE", "/tmp/x")
    _, warnings = _register_with(monkeypatch, tmp_path, "0.26.0", FakeEplbState018)
    assert warnings == [
        "EPLB_SERVICE_STAGING_BUDGET is set, but eplb-service reads no such variable (ignored); "
        "did you mean EPLB_SERVICE_STAGING_BUDGET_BYTES?"
    ]
    assert C.unknown_variables({name: "1" for name in C.VARIABLES}) == []


@pytest.mark.parametrize("version, warned", [("0.34.0", True), ("0.26.0", False)])
def test_an_unknown_version_that_passes_every_check_runs_with_a_warning(monkeypatch, tmp_path, version, warned):
    state_cls, warnings = _register_with(monkeypatch, tmp_path, version, FakeEplbState018)
    assert state_cls._eplb_service_patched and plugin._installed is not None
    assert [w for w in warnings if f"vLLM {version} is outside" in w] == ([warnings[0]] if warned else [])


def test_an_unknown_version_that_fails_a_check_stops_naming_what_was_found(monkeypatch, tmp_path):
    class Changed(FakeEplbStateBase):
        def add_model(self, moe_model, config):
            pass

    with pytest.raises(
        adapter.AdapterError,
        match=r"add_model has parameters \['moe_model', 'config'\]; expected \['model', 'model_config'\]",
    ):
        _register_with(monkeypatch, tmp_path, "0.34.0", Changed)
    assert plugin._installed is None


@pytest.mark.parametrize("variant, takes_name", [("0.32", True), ("0.20", False), ("0.18", False)])
def test_each_variants_signatures_are_recognised(variant, takes_name):
    assert adapter.check_eplb_state_class(VARIANTS[variant]).add_model_takes_model_name is takes_name


def test_changed_step_signature_is_refused(tmp_path):
    class Renamed(FakeEplbStateBase):
        def step(self, dummy: bool = False, profile: bool = False, log_stats: bool = False):
            pass

    with pytest.raises(
        adapter.AdapterError,
        match=r"step has parameters \['dummy', 'profile', 'log_stats'\]; "
        r"expected \['is_dummy', 'is_profile', 'log_stats'\]",
    ):
        plugin.install(
            C.PluginConfig(endpoint=f"ipc://{tmp_path}/c.sock"), Renamed, None, agent_factory=unstarted_agent
        )


def test_step_parameters_in_another_order_are_refused(tmp_path):
    """The runners pass ``is_dummy`` and ``is_profile`` by position: a ``step`` that takes them the
    other way round would have the plugin treat the profile run as a dummy step (and the reverse)."""

    class Swapped(FakeEplbStateBase):
        def step(self, is_profile: bool = False, is_dummy: bool = False, log_stats: bool = False):
            pass

    with pytest.raises(
        adapter.AdapterError,
        match=r"step has parameters \['is_profile', 'is_dummy', 'log_stats'\]; "
        r"expected \['is_dummy', 'is_profile', 'log_stats'\] first, in this order",
    ):
        plugin.install(
            C.PluginConfig(endpoint=f"ipc://{tmp_path}/c.sock"), Swapped, None, agent_factory=unstarted_agent
        )


def added_state():
    state = FakeEplbStateBase()
    state.add_model(fake_moe_model(SHAPE, rank=0), FakeModelConfig("m"))
    return state.model_states["hash-m"]


def test_view_of_a_vllm_layout_model_state():
    view = adapter.view_model_state(added_state(), TOPOLOGY)
    assert view.shape == SHAPE
    assert view.log2phy.shape == (2, 6, 1024)
    assert len(view.expert_weights) == 2 and view.expert_weights[0][0].shape == (4, 12)


def _mutations():
    def dtype(s):
        s.physical_to_logical_map = s.physical_to_logical_map.int()

    def narrow_width(s):
        s.logical_to_physical_map = s.logical_to_physical_map[:, :, :1].contiguous()

    def descending_replicas(s):
        s.logical_to_physical_map[0, 0, :2] = s.logical_to_physical_map[0, 0, :2].flip(0).clone()

    def logcnt(s):
        s.logical_replica_count[1, 3] += 1

    def load_shape(s):
        s.expert_load_pass = torch.zeros((2, 6), dtype=torch.int32)

    def rows(s):
        s.model.expert_weights[1][0] = torch.zeros((3, 12))

    def extra_rows(s):
        s.model.expert_weights[1][0] = torch.zeros((5, 12))

    def width_one_short(s):
        s.logical_to_physical_map = s.logical_to_physical_map[:, :, :2].contiguous()

    def padding_not_minus_one(s):
        s.logical_to_physical_map[:, :, 3:] = 0

    def layers(s):
        s.model.expert_weights = s.model.expert_weights[:1]

    def ranks(s):
        s.model.num_local_physical_experts = 2

    def not_a_tensor(s):
        s.logical_replica_count = s.logical_replica_count.tolist()

    def missing(s):
        del s.expert_load_pass

    return [
        (dtype, "physical_to_logical_map has dtype torch.int32, expected torch.int64"),
        (narrow_width, "logical_to_physical_map is 1 wide, expected at least num_redundant_experts + 1 = 3"),
        (
            descending_replicas,
            "logical_to_physical_map is not physical_to_logical_map's slots in ascending order, "
            "-1 padded to width 1024",
        ),
        (logcnt, "logical_replica_count does not count the replicas"),
        (load_shape, "expert_load_pass has shape (2, 6), expected (2, 8)"),
        (rows, "expert_weights[1][0] has shape (3, 12), expected [num_local_physical_experts=4, -1]"),
        (extra_rows, "expert_weights[1][0] has shape (5, 12), expected [num_local_physical_experts=4, -1]"),
        (width_one_short, "logical_to_physical_map is 2 wide, expected at least num_redundant_experts + 1 = 3"),
        (
            padding_not_minus_one,
            "logical_to_physical_map is not physical_to_logical_map's slots in ascending order, -1 padded to width",
        ),
        (layers, "expert_weights has 1 layers, expected num_moe_layers=2"),
        (ranks, "2 local physical experts x 2 EP ranks, expected their product to be num_physical_experts=8"),
        (not_a_tensor, "logical_replica_count is a list, expected a torch.Tensor"),
        (missing, "EplbModelState has no attribute 'expert_load_pass'"),
    ]


@pytest.mark.parametrize("mutate, needle", _mutations(), ids=lambda v: getattr(v, "__name__", ""))
def test_shape_and_layout_mismatches_fail_naming_what_was_expected(mutate, needle):
    state = added_state()
    mutate(state)
    with pytest.raises(adapter.AdapterError) as exc:
        adapter.view_model_state(state, TOPOLOGY)
    assert needle in str(exc.value)


def test_a_map_just_wide_enough_for_every_redundant_slot_is_taken():
    """num_redundant_experts + 1 columns hold every replica one logical expert can have."""
    state = added_state()
    state.logical_to_physical_map = state.logical_to_physical_map[:, :, :3].contiguous()
    assert adapter.view_model_state(state, TOPOLOGY).log2phy.shape == (2, 6, 3)


def test_noncontiguous_rows_of_the_right_shape_are_refused():
    state = added_state()
    state.model.expert_weights[0][1] = torch.zeros((3, 4)).t()
    with pytest.raises(adapter.AdapterError, match="not contiguous"):
        adapter.view_model_state(state, TOPOLOGY)


# -- the plugin's wiring of EplbState ----------------------------------------------------------------


def unstarted_agent(cfg, view, topology):
    """The real agent over the view, not started (no sockets): its hooks are what we test."""
    model = ExpertModel(
        expert_weights=view.expert_weights,
        phy2log=view.phy2log,
        log2phy=view.log2phy,
        logcnt=view.logcnt,
        rank=topology.rank,
        num_ranks=topology.world_size,
    )
    return VllmWorkerAgent(
        model,
        cfg.endpoint,
        transport=plugin.make_transport("gloo", "cpu"),
        overrides=cfg.agent_overrides(),
        staging_budget_bytes=cfg.staging_budget_bytes,
    )


def add_draft_then_main(state) -> None:
    """As vLLM's runners do: the draft model first (``speculative_config.draft_model_config``,
    runner type ``"draft"``; with ``model_name`` where ``add_model`` has it), then the main model."""
    draft_config = FakeModelConfig("draft", runner_type="draft")
    if "model_name" in inspect.signature(state.add_model).parameters:
        state.add_model(fake_moe_model(SHAPE, rank=0, row_len=3), draft_config, model_name="m (draft)")
    else:
        state.add_model(fake_moe_model(SHAPE, rank=0, row_len=3), draft_config)
    state.add_model(fake_moe_model(SHAPE, rank=0), FakeModelConfig("m"))


@pytest.fixture(params=sorted(VARIANTS))
def attached(request, tmp_path, monkeypatch):
    monkeypatch.setattr(adapter, "ep_topology", lambda: TOPOLOGY)
    state_cls, _ = _install(tmp_path, variant=VARIANTS[request.param])
    state = state_cls()
    add_draft_then_main(state)
    state.start_async_loop()
    return state, plugin.binding_of(state)


def test_steps_drive_the_agent_clock_and_never_vllms_rearrangement(attached):
    state, binding = attached
    main, draft = state.model_states["hash-m"], state.model_states["hash-draft"]
    if state.GATED:
        assert bool(state.should_record_tensor), "load recording must stay on"
        assert all(
            layer.eplb_state.should_record_tensor is state.should_record_tensor for layer in main.model.moe_layers
        )
    else:
        assert not hasattr(state, "should_record_tensor")
    assert ("start_async_loop",) not in state.calls, "vLLM's async EPLB thread must not start"
    before = model_state_tensors(main)

    state.step(False, True)  # the profile run: vLLM's path, which reserves the transfer memory
    assert state.calls[-2:] == [("step", False, True), ("rearrange", True)]
    assert binding.hooks.steps_done == 0 and binding.profile_rearranges == 1

    calls = len(state.calls)
    main.expert_load_pass[0, 1] = 5
    draft.expert_load_pass[1, 2] = 7
    state.step()  # a real step: its load counts
    main.expert_load_pass[0, 1] = 100
    state.step(is_dummy=True)  # a dummy step: the clock ticks, its load does not count
    state.step(False, False, log_stats=True)
    assert len(state.calls) == calls, "a non-profile step reached vLLM's EplbState.step"
    assert binding.hooks.steps_done == 3 and (binding.real_steps, binding.dummy_steps) == (2, 1)
    acc = binding.hooks.load_acc
    assert int(acc[0, 1]) == 5 and int(acc.sum()) == 5
    assert int(main.expert_load_pass.abs().sum()) == 0 and int(draft.expert_load_pass.abs().sum()) == 0
    after = model_state_tensors(main)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_the_draft_model_is_told_apart_in_every_variant(attached):
    """Main and draft look alike to ``add_model`` where it takes no ``model_name``: the draft's
    config says ``runner_type="draft"``. The agent manages the main model only."""
    state, binding = attached
    assert binding.view.phy2log is state.model_states["hash-m"].physical_to_logical_map
    assert binding.passive_load_passes == [state.model_states["hash-draft"].expert_load_pass]


def test_a_draft_without_model_name_or_runner_type_cannot_be_told_apart(tmp_path, monkeypatch):
    monkeypatch.setattr(adapter, "ep_topology", lambda: TOPOLOGY)
    state_cls, _ = _install(tmp_path, variant=VARIANTS["0.20"])
    config = FakeModelConfig("m")
    del config.runner_type
    with pytest.raises(
        adapter.AdapterError,
        match="add_model has no model_name parameter and its model_config .* has no runner_type: "
        "cannot tell a draft model from the main one",
    ):
        state_cls().add_model(fake_moe_model(SHAPE, rank=0), config)


@pytest.mark.parametrize("runner_type", ["generate", "pooling"])
def test_only_the_draft_runner_type_marks_a_draft(tmp_path, monkeypatch, runner_type):
    """Where ``add_model`` takes no ``model_name`` (0.18-0.31), ``runner_type == "draft"`` alone marks
    a draft: a MoE main model of another runner (a pooling one) is the model the agent manages."""
    monkeypatch.setattr(adapter, "ep_topology", lambda: TOPOLOGY)
    state_cls, _ = _install(tmp_path, variant=VARIANTS["0.20"])
    state = state_cls()
    state.add_model(fake_moe_model(SHAPE, rank=0), FakeModelConfig("m", runner_type=runner_type))
    binding = plugin.binding_of(state)
    assert binding is not None and binding.view.phy2log is state.model_states["hash-m"].physical_to_logical_map
    assert binding.passive_load_passes == []


@pytest.mark.parametrize("given", ["", "team-a/qwen3-prod"])
def test_the_agent_gets_the_users_deployment_id_over_the_derived_one_and_the_ranks_per_node(monkeypatch, given):
    """``EPLB_SERVICE_DEPLOYMENT`` is for nodes that name their store differently (README): it must win
    over the id derived from vLLM's process group, or the nodes would register as different deployments.
    Ranks per node (EP world / vLLM's node count) let the schedule prefer same-node sources."""
    monkeypatch.setattr(adapter, "deployment_id", lambda topology: "vllm-00112233445566aa")
    monkeypatch.setattr(VllmWorkerAgent, "start", lambda self: self)  # no thread, no socket
    topology = adapter.EpTopology(rank=0, world_size=2, num_nodes=2)
    cfg = C.PluginConfig(endpoint="ipc:///nonexistent/c.sock", transport="gloo", deployment=given)
    agent = plugin.start_agent(cfg, adapter.view_model_state(added_state(), topology), topology)
    assert agent.deployment == (given or "vllm-00112233445566aa")
    assert agent.ranks_per_node == 1 and agent.pipeline.ranks_per_node == 1


def test_load_recording_gated_by_another_tensor_than_eplb_states_is_refused():
    state = FakeEplbStateBase()
    state.add_model(fake_moe_model(SHAPE, rank=0), FakeModelConfig("m"))
    model_state = state.model_states["hash-m"]
    model_state.model.moe_layers[1].eplb_state.should_record_tensor = torch.ones((), dtype=torch.bool)
    with pytest.raises(
        adapter.AdapterError, match=r"layers \[1\] of 2 hold another one than EplbState's \(a different tensor\)"
    ):
        adapter.enable_load_recording(state, model_state)


def test_ungated_load_recording_needs_nothing_turned_on():
    state = FakeEplbState018()
    state.add_model(fake_moe_model(SHAPE, rank=0), FakeModelConfig("m"))
    assert adapter.enable_load_recording(state, state.model_states["hash-m"]) is False


def test_a_non_profile_rearrange_is_refused(attached):
    state, binding = attached
    with pytest.raises(adapter.AdapterError, match="vLLM's own expert rearrangement"):
        state.rearrange(rank_mapping={0: 0, 1: -1})
    assert binding.refused_rearranges == 1 and ("rearrange", False) not in state.calls


def test_step_before_any_main_model_is_an_error(tmp_path):
    state_cls, _ = _install(tmp_path)
    with pytest.raises(adapter.AdapterError, match="no main model attached"):
        state_cls().step()


def test_a_second_main_model_is_an_error(attached):
    state, _ = attached
    with pytest.raises(adapter.AdapterError, match="called twice for a main model"):
        state.add_model(fake_moe_model(SHAPE, rank=0), FakeModelConfig("other"))


def test_commit_through_the_binding_updates_vllms_tensors_in_place(attached):
    """A plan applied by the hooks lands in the very tensors vLLM's layers hold."""
    from eplb_service.worker_agent.decision import Decision
    from eplb_service.worker_agent.schedule import build_schedule
    from eplb_service.worker_agent.serving_hooks import CommitTicket
    from eplb_service.worker_agent.staging import StagingArea, prepare_commit

    state, binding = attached
    main = state.model_states["hash-m"]
    layer_view = main.logical_to_physical_map[1]  # what a MoE layer holds
    ptrs = {
        k: getattr(main, k).data_ptr()
        for k in ("physical_to_logical_map", "logical_to_physical_map", "logical_replica_count")
    }
    model = binding.agent.model
    new = initial_phy2log(SHAPE)[[1]].copy()
    new[0, :4] = [3, 2, 1, 0]  # rank 0 reorders its own slots: a local plan
    work = build_schedule(initial_phy2log(SHAPE)[[1]], new, 2).per_rank[0]
    area = StagingArea(model, work)
    for copy in work.local:
        for k, live in enumerate(model.expert_weights[1]):
            area.rows[k][copy.dst_staging].copy_(live[copy.src_row])
    ticket = CommitTicket(action=prepare_commit(model, 1, [1], new, area))
    ticket.vote_entry_step = 0
    ticket.resolve(Decision.commit_at(2, rank=0))
    binding.hooks.ticket = ticket
    state.step()
    state.step()  # the boundary before step 2: commit
    assert ticket.outcome == "committed"
    assert {k: getattr(main, k).data_ptr() for k in ptrs} == ptrs
    assert main.physical_to_logical_map[1, :4].tolist() == [3, 2, 1, 0]
    assert layer_view[0, :3].tolist() == [3, 6, -1] and layer_view[3, :2].tolist() == [0, -1]
    assert main.model.expert_weights[1][1][:, 0].tolist() == [2006.0, 2004.0, 2002.0, 2000.0]


def test_detach_stops_the_agent(attached):
    _, binding = attached
    stopped = []
    binding.agent.stop = lambda timeout_s: stopped.append(timeout_s)
    binding.detach()
    binding.detach()
    assert stopped == [2.0]


def test_status_reports_what_the_worker_sees(attached):
    state, binding = attached
    state.step()
    status = binding.status()
    assert status["steps"] == 1 and status["epoch"] == 0 and status["refused_rearranges"] == 0
    assert status["phy2log"] == initial_phy2log(SHAPE).tolist()


# -- the agent's local overrides ------------------------------------------------------------------


def test_env_overrides_replace_the_coordinators_agent_config(tmp_path):
    cfg = C.PluginConfig(endpoint=f"ipc://{tmp_path}/c.sock", report_interval_steps=3, throttle_bytes_per_s=1e6)
    view = adapter.view_model_state(added_state(), TOPOLOGY)
    agent = unstarted_agent(cfg, view, TOPOLOGY)
    agent._on_welcome(
        protocol.Welcome(
            protocol_version=protocol.PROTOCOL_VERSION,
            rank=0,
            config=protocol.AgentConfig(report_interval_steps=10, fence_steps=5),
        )
    )
    assert agent.config.report_interval_steps == 3 and agent.hooks.report_interval_steps == 3
    assert agent.config.throttle_bytes_per_s == 1e6 and agent.config.fence_steps == 5


def test_staging_budget_refuses_a_plan_that_needs_more(tmp_path):
    view = adapter.view_model_state(added_state(), TOPOLOGY)
    rows = initial_phy2log(SHAPE)[[0]].copy()
    rows[0] = [4, 5, 2, 3, 0, 1, 0, 1]  # rank 0 receives experts 4 and 5 from rank 1
    plan = protocol.Plan(plan_id=7, base_epoch=0, layers=[0], phy2log=protocol.NDArray.from_numpy(rows))
    ok = unstarted_agent(
        C.PluginConfig(endpoint=f"ipc://{tmp_path}/c.sock", staging_budget_bytes=10**6), view, TOPOLOGY
    )
    need = ok.staging_bytes(plan, rows)
    assert need > 0
    ok._validate_plan(plan)
    tight = unstarted_agent(
        C.PluginConfig(endpoint=f"ipc://{tmp_path}/c.sock", staging_budget_bytes=need - 1), view, TOPOLOGY
    )
    with pytest.raises(
        PlacementError,
        match=f"plan 7 needs {need} bytes of staging on rank 0, more than EPLB_SERVICE_STAGING_BUDGET_BYTES={need - 1}",
    ):
        tight._validate_plan(plan)


def test_transport_choice():
    assert plugin.make_transport("gloo", "cpu").name == "gloo"
    assert plugin.make_transport("auto", "cpu").name == "gloo"
    if torch.cuda.is_available():
        assert plugin.make_transport("auto", "cuda:0").name == "cupy-nccl"  # until measured on two GPUs
        assert plugin.make_transport("prefer-copy-engine", "cuda:0").name == "auto"  # chosen at the rendezvous
        assert plugin.make_transport("nccl", "cuda:0").name == "cupy-nccl"
        assert plugin.make_transport("copy-engine", "cuda:0").name == "copy-engine"
    else:
        with pytest.raises(
            adapter.AdapterError,
            match="EPLB_SERVICE_TRANSPORT=auto: cannot build the CuPy NCCL side transport",
        ):
            plugin.make_transport("auto", "cuda")
        with pytest.raises(
            adapter.AdapterError,
            match="EPLB_SERVICE_TRANSPORT=prefer-copy-engine: cannot build the copy-engine and CuPy NCCL side",
        ):
            plugin.make_transport("prefer-copy-engine", "cuda")
        with pytest.raises(adapter.AdapterError, match="EPLB_SERVICE_TRANSPORT=copy-engine: cannot build"):
            plugin.make_transport("copy-engine", "cuda")
    assert plugin.make_transport("copy-engine", "cpu").name == "copy-engine"  # the CPU stand-in


def test_every_line_of_a_worker_names_its_rank(tmp_path, monkeypatch, capsys):
    """Before: the plugin's own lines in a worker (the draft model's warning, the async loop not
    started, the EP rank line) and those of the untagged loggers (the transports') had no
    ``[rank N]``: with 8 workers writing to one stream, nobody could tell whose they were."""
    import logging

    logger = logging.getLogger("eplb_service")
    monkeypatch.setattr(logger, "handlers", [])
    monkeypatch.setattr(logger, "propagate", True)
    monkeypatch.setattr(logger, "level", logger.level)
    monkeypatch.setattr(plugin, "_process_tag", None, raising=False)
    plugin._setup_logging("INFO")  # the handler register() gives our loggers in a vLLM process
    logging.getLogger("eplb_service.integrations.vllm.plugin").info("before the rank is known")
    monkeypatch.setattr(adapter, "ep_topology", lambda: adapter.EpTopology(rank=1, world_size=2, num_nodes=1))
    state_cls, _ = _install(tmp_path, variant=VARIANTS["0.20"])
    state = state_cls()
    add_draft_then_main(state)
    state.start_async_loop()
    logging.getLogger("eplb_service.worker_agent.transport_gloo").warning("a transport's line")
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert "before the rank is known" in lines[0] and "[rank" not in lines[0]
    rest = lines[1:]
    assert rest and all("] [rank 1] " in line or ": [rank 1] " in line for line in rest), rest
    assert any("EPLB of the draft model" in line for line in rest)
    assert any("async EPLB worker not started" in line for line in rest)
    assert any(line.endswith("transport_gloo: [rank 1] a transport's line") for line in rest)


def test_worker_lines_are_json_with_the_rank_tag_under_log_format_json(tmp_path, monkeypatch, capsys):
    """Before: the plugin's handler was text whatever ``EPLB_SERVICE_LOG_FORMAT`` said, so a
    deployment whose pipeline reads JSON lines got text lines from every worker."""
    import json
    import logging

    logger = logging.getLogger("eplb_service")
    monkeypatch.setattr(logger, "handlers", [])
    monkeypatch.setattr(logger, "propagate", True)
    monkeypatch.setattr(logger, "level", logger.level)
    monkeypatch.setattr(plugin, "_process_tag", None, raising=False)
    plugin._setup_logging("INFO", "json")
    logging.getLogger("eplb_service.integrations.vllm.plugin").info("before the rank is known")
    monkeypatch.setattr(adapter, "ep_topology", lambda: adapter.EpTopology(rank=1, world_size=2, num_nodes=1))
    state_cls, _ = _install(tmp_path, variant=VARIANTS["0.20"])
    add_draft_then_main(state_cls())
    logging.getLogger("eplb_service.worker_agent.transport_gloo").warning("a transport's line")
    docs = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert docs[0]["msg"] == "before the rank is known" and docs[0]["tag"] is None
    assert len(docs) >= 3 and all(doc["tag"] == "rank 1" for doc in docs[1:]), docs
    assert docs[-1]["logger"] == "eplb_service.worker_agent.transport_gloo" and docs[-1]["msg"] == "a transport's line"
