"""Stand-ins with vLLM's EPLB signatures and tensor layout, for the plugin's unit tests.

Written from reading vLLM's ``EplbState`` (not copied): same method signatures, maps in
the same layout (``logical_to_physical_map`` 1024 wide, ``-1`` padded, ascending slots),
``expert_load_pass`` int32, ``expert_weights[layer]`` as ``[n_local, -1]`` views. One
class per variant the adapter tells apart (``docs/VLLM_VERSIONS.md``):

- ``FakeEplbStateBase`` (0.32, 0.33): ``add_model(..., model_name)``, load recording gated
  by a ``should_record_tensor`` every MoE layer shares;
- ``FakeEplbState020`` (0.20-0.31): no ``model_name`` (a draft's ``model_config.runner_type``
  is ``"draft"``), recording gated;
- ``FakeEplbState018`` (0.18, 0.19): no ``model_name``, the router records every step.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from eplb_service.placement import PlacementShape, initial_phy2log, logical_replica_count, logical_to_physical

MAP_WIDTH = 1024


class FakeModelConfig:
    def __init__(self, name: str, runner_type: str = "generate") -> None:
        self.name = name
        self.model = name
        self.runner_type = runner_type

    def compute_hash(self) -> str:
        return f"hash-{self.name}"


def fake_moe_model(shape: PlacementShape, rank: int, row_len: int = 6) -> SimpleNamespace:
    """A MixtureOfExperts stand-in whose expert rows hold ``layer * 1000 + logical expert``."""
    spr = shape.slots_per_rank
    phy2log = initial_phy2log(shape)
    layers = []
    for layer in range(shape.num_layers):
        values = torch.tensor([layer * 1000.0 + e for e in phy2log[layer, rank * spr : (rank + 1) * spr]])
        w13 = values[:, None, None].repeat(1, 2, row_len).contiguous()  # [n_local, 2, row_len] like a 3-D parameter
        w2 = (values[:, None] * 2).repeat(1, 3).contiguous()
        layers.append([w13.view(spr, -1), w2.view(spr, -1)])
    return SimpleNamespace(
        num_moe_layers=shape.num_layers,
        num_logical_experts=shape.num_logical,
        num_physical_experts=shape.num_physical,
        num_local_physical_experts=spr,
        num_redundant_experts=shape.num_physical - shape.num_logical,
        expert_weights=layers,
        moe_layers=[SimpleNamespace(eplb_state=SimpleNamespace()) for _ in range(shape.num_layers)],
    )


class FakeEplbStateBase:
    """``EplbState`` as the plugin sees it. Subclass per test: the plugin patches the class."""

    GATED = True
    """The router records load only while ``should_record_tensor`` is true (0.20 on)."""

    def __init__(self) -> None:
        self.model_states: dict[str, SimpleNamespace] = {}
        if self.GATED:
            self.should_record_tensor = None
        self.calls: list[tuple] = []

    def add_model(self, model, model_config, model_name: str | None = None):
        self._add_model(model, model_config, model_name)

    def _add_model(self, model, model_config, model_name: str | None):
        if self.GATED:
            if self.should_record_tensor is None:
                self.should_record_tensor = torch.zeros((), dtype=torch.bool)
            for layer in model.moe_layers:
                layer.eplb_state.should_record_tensor = self.should_record_tensor
        num_layers, num_logical = model.num_moe_layers, model.num_logical_experts
        shape = PlacementShape(num_layers, num_logical, model.num_physical_experts, 2)
        phy2log = initial_phy2log(shape)
        self.model_states[model_config.compute_hash()] = SimpleNamespace(
            physical_to_logical_map=torch.from_numpy(phy2log.copy()),
            logical_to_physical_map=torch.from_numpy(logical_to_physical(phy2log, num_logical, MAP_WIDTH)),
            logical_replica_count=torch.from_numpy(logical_replica_count(phy2log, num_logical)),
            expert_load_pass=torch.zeros((num_layers, model.num_physical_experts), dtype=torch.int32),
            model=model,
            model_name=model_name or model_config.name,
        )
        self.calls.append(("add_model", model_name))

    def step(self, is_dummy: bool = False, is_profile: bool = False, log_stats: bool = False) -> None:
        self.calls.append(("step", is_dummy, is_profile))
        if is_profile:
            self.rearrange(is_profile=True)

    def rearrange(self, is_profile: bool = False, rank_mapping=None, use_last_expert_load: bool = False):
        self.calls.append(("rearrange", is_profile))

    def start_async_loop(self, rank_mapping=None, is_profile: bool = False):
        self.calls.append(("start_async_loop",))


class FakeEplbState020(FakeEplbStateBase):
    def add_model(self, model, model_config):
        self._add_model(model, model_config, None)

    def rearrange(self, is_profile: bool = False, rank_mapping=None):
        self.calls.append(("rearrange", is_profile))


class FakeEplbState018(FakeEplbState020):
    GATED = False


VARIANTS = {"0.32": FakeEplbStateBase, "0.20": FakeEplbState020, "0.18": FakeEplbState018}


class FakeEngineArgsBase:
    def __init__(self, is_moe: bool | None = None, **parallel) -> None:
        self.parallel = {
            "enable_eplb": True,
            "enable_expert_parallel": True,
            "enable_elastic_ep": False,
            "pipeline_parallel_size": 1,
            **parallel,
        }
        self.is_moe = is_moe
        """``ModelConfig.is_moe`` of the config built; ``None``: a config without a model config."""

    def create_engine_config(self, usage_context=None):
        config = SimpleNamespace(parallel_config=SimpleNamespace(**self.parallel))
        if self.is_moe is not None:
            config.model_config = SimpleNamespace(model="tiny-model", is_moe=self.is_moe)
        return config


def model_state_tensors(state) -> dict[str, np.ndarray]:
    return {
        k: getattr(state, k).numpy().copy()
        for k in ("physical_to_logical_map", "logical_to_physical_map", "logical_replica_count")
    }
