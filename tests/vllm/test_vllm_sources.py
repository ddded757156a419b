"""The adapter against the source of every minor vLLM release it knows, read with ``ast``, not run.

For each release in ``vllm_sources.RELEASES`` (0.18 to 0.33): ``EplbState``'s signatures
pass the adapter's own checks (stand-in methods with the parsed signatures), and every
name the adapter reads (its constants) is where it expects it. The runners' calls are
checked too: drafts are registered in a way the adapter tells apart, ``step`` gets
``is_dummy`` then ``is_profile``. ``docs/VLLM_VERSIONS.md`` says what differs and where.

Skipped only when a release cannot be downloaded.
"""

from __future__ import annotations

import ast

import pytest
from packaging.version import Version
from vllm_sources import (
    RELEASES,
    Source,
    argument,
    calls,
    fields,
    method,
    self_assigned,
    source_dir,
    stub_class,
)
from vllm_venv import InstallImpossible

from eplb_service.integrations.vllm import adapter, plugin
from eplb_service.integrations.vllm import config as C

EPLB = "vllm/distributed/eplb/eplb_state.py"
RUNNERS = ("vllm/v1/worker/gpu_model_runner.py", "vllm/v1/worker/gpu/eplb_utils.py")


@pytest.fixture(scope="module", params=sorted(RELEASES, key=Version))
def source(request) -> Source:
    try:
        return Source(request.param, source_dir(request.param))
    except InstallImpossible as exc:
        pytest.skip(f"vLLM {request.param} cannot be downloaded here: {exc}")


def test_the_releases_read_span_the_known_range():
    minors = sorted({Version(v).release[:2] for v in RELEASES})
    assert (minors[0], minors[-1]) == adapter.KNOWN_VLLM
    assert len(minors) == minors[-1][1] - minors[0][1] + 1, "one release of every minor version"
    assert all(adapter.version_warning(v) is None for v in RELEASES)


def test_eplb_state_signatures_pass_the_adapters_checks(source, tmp_path):
    cls = source.cls(EPLB, "EplbState")
    stub = stub_class("EplbState", cls, adapter.EPLB_STATE_METHODS)
    features = adapter.check_eplb_state_class(stub)
    assert features.add_model_takes_model_name == (Version(source.version) >= Version("0.32")), features
    plugin.install(C.PluginConfig(endpoint=f"ipc://{tmp_path}/c.sock"), stub, None)
    assert stub._eplb_service_patched


def test_the_model_state_holds_what_the_adapter_reads(source):
    have = set(fields(source.cls(EPLB, "EplbModelState")))
    assert {*adapter.MODEL_STATE_TENSORS, "model"} <= have, have
    state = source.cls(EPLB, "EplbState")
    assert "model_states" in self_assigned(state)
    add_model = method(state, "add_model")
    keys = [
        ast.unparse(t.slice)
        for n in ast.walk(add_model)
        if isinstance(n, ast.Assign)
        for t in n.targets
        if isinstance(t, ast.Subscript) and ast.unparse(t.value) == "self.model_states"
    ]
    assert keys == ["model_config.compute_hash()"], f"{source.where(EPLB, add_model)}: model_states[{keys}]"


def test_the_moe_model_topology_and_config_have_what_the_adapter_reads(source):
    moe = set(fields(source.cls("vllm/model_executor/models/interfaces.py", "MixtureOfExperts")))
    assert {*adapter.MOE_MODEL_COUNTS, "expert_weights", "moe_layers"} <= moe, moe
    tree = source.tree("vllm/distributed/parallel_state.py")
    functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert {"get_ep_group", "get_node_count"} <= functions
    parallel = set(fields(source.cls("vllm/config/parallel.py", "ParallelConfig")))
    assert set(adapter.PARALLEL_CONFIG_FLAGS) <= parallel
    assert method(source.cls("vllm/config/model.py", "ModelConfig"), adapter.MOE_FLAG) is not None
    assert method(source.cls("vllm/engine/arg_utils.py", "EngineArgs"), "create_engine_config") is not None


def test_load_recording_is_gated_by_the_scalar_eplb_state_shares(source):
    """From 0.20 the layers' ``EplbLayerState`` has the gate and ``EplbState`` owns it; before, none."""
    gated = adapter.RECORD_FLAG in fields(source.cls(EPLB, "EplbLayerState"))
    assert gated == (Version(source.version) >= Version("0.20"))
    assert (adapter.RECORD_FLAG in self_assigned(source.cls(EPLB, "EplbState"))) == gated


def test_drafts_are_registered_the_way_the_adapter_tells_them_apart(source):
    """A draft comes with ``speculative_config.draft_model_config`` (a ``ModelConfig`` built with
    ``runner="draft"``), plus ``model_name`` where ``add_model`` has it; the main model with neither."""
    registrations = []
    for path in RUNNERS:
        for call in calls(source.tree(path), "add_model"):
            config = ast.unparse(argument(call, 1, "model_config"))
            named = argument(call, 2, adapter.DRAFT_NAME_PARAMETER) is not None
            registrations.append((source.where(path, call), "draft_model_config" in config, named))
    drafts = [r for r in registrations if r[1]]
    mains = [r for r in registrations if not r[1]]
    assert drafts and mains, registrations
    assert not any(named for _, _, named in mains), mains
    takes_name = Version(source.version) >= Version("0.32")
    assert all(named == takes_name for _, _, named in drafts), drafts

    built = [
        c
        for c in ast.walk(source.tree("vllm/config/speculative.py"))
        if isinstance(c, ast.Call)
        and ast.unparse(c.func).endswith("ModelConfig")
        and any(k.arg == "runner" and ast.unparse(k.value) == repr(adapter.DRAFT_RUNNER_TYPE) for k in c.keywords)
    ]
    assert built, "SpeculativeConfig builds no ModelConfig(runner='draft')"
    assert "runner_type" in self_assigned(source.cls("vllm/config/model.py", "ModelConfig"))


def test_the_runners_step_with_is_dummy_then_is_profile(source):
    steps = [
        (source.where(path, c), c)
        for path in RUNNERS
        for c in calls(source.tree(path), "step")
        if ast.unparse(c.func.value) in ("self.eplb_state", "self.state")
    ]
    assert steps
    for where, call in steps:
        passed = [ast.unparse(argument(call, i, name)) for i, name in enumerate(adapter.STEP_PARAMETERS[:2])]
        assert passed == ["is_dummy", "is_profile"], f"{where}: step({ast.unparse(call)})"
