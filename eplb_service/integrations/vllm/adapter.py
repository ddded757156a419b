"""Every vLLM-specific name and attribute path eplb-service uses, and their checks.

The adapter decides by what it finds, not by the version: method signatures (through
``inspect``), attributes, and the shapes, dtypes and layout of the tensors it will touch.
Each check that fails raises :class:`AdapterError` naming what was found and what was
expected. The version only decides whether a run is quiet (``KNOWN_VLLM``, the range whose
source these checks were read against, see ``docs/VLLM_VERSIONS.md``) or logs a warning
first (any other version, which then runs if every check passes).

What this module relies on (the names are the constants below, which
``tests/vllm/test_vllm_sources.py`` checks against each release's source):

- ``vllm.distributed.eplb.eplb_state.EplbState``: ``add_model(model, model_config[,
  model_name])``, ``step(is_dummy, is_profile, log_stats)`` (called by the model runners
  after every forward pass; ``is_profile`` only from the profile run), ``rearrange(is_profile,
  ...)``, ``start_async_loop()``, ``model_states[model_config.compute_hash()]``.
- Draft models: ``add_model``'s ``model_name`` is set for draft models only where it exists
  (0.32 on); every version registers a draft with ``speculative_config.draft_model_config``,
  a ``ModelConfig`` whose ``runner_type`` is ``"draft"``.
- Load recording: where the MoE layers' ``EplbLayerState`` has ``should_record_tensor``
  (0.20 on), the router records only while that shared bool scalar (``EplbState``'s) is
  true; without it (0.18, 0.19) the router records every step.
- ``EplbModelState``: ``physical_to_logical_map [L, P]``, ``logical_to_physical_map
  [L, N, W]`` (-1 padded, replicas in ascending slot order), ``logical_replica_count [L, N]``
  (all int64; the MoE layers hold views of these exact tensors, so updates must be in place),
  ``expert_load_pass [L, P]`` int32 (written by the router; from 0.30 a view of a wider
  buffer), ``model`` (``MixtureOfExperts``: ``expert_weights[layer]`` = list of
  ``[num_local_physical_experts, -1]`` views of the layer's parameters, ``num_*``,
  ``moe_layers``).
- ``vllm.distributed.parallel_state``: ``get_ep_group()`` (``rank_in_group``,
  ``world_size``) and ``get_node_count()``.
- The deployment id (:func:`deployment_id`): ``init_distributed_environment`` puts every rank
  of one deployment into one torch default (WORLD) process group, which the EP group is part of:
  all DP engines' workers rendezvous at the DP master's store (``data_parallel_master_ip`` or
  ``master_addr``, nnodes > 1; under 0.32's ``vllm serve`` a store DP rank 0's worker binds on a
  free port and publishes, one address for both engines in ``tests/vllm/test_vllm_dp.py``), the
  TP workers of one engine at the executor's ``distributed_init_method``, an external launcher
  at ``MASTER_ADDR:MASTER_PORT``. So the default store's address (torch's
  ``distributed_c10d._get_default_store()``, a ``TCPStore`` with ``host`` and ``port`` or a
  ``FileStore`` with ``path``, under ``PrefixStore`` wrappers with ``underlying_store``) is one
  value on every rank of a deployment and another in any other deployment alive at the same
  time (two live stores cannot listen on one address).
  ``ParallelConfig`` alone does not give that: with DP=1 its ``data_parallel_master_ip`` /
  ``_port`` are the defaults (127.0.0.1:29500) in every deployment, and with DP over several
  nodes ``data_parallel_master_port`` is drawn from free ports on each node, so one
  deployment's ranks would disagree.
- ``vllm.engine.arg_utils.EngineArgs.create_engine_config()`` returning a ``VllmConfig``
  whose ``parallel_config`` has ``enable_eplb``, ``enable_expert_parallel``,
  ``enable_elastic_ep``, ``pipeline_parallel_size``, and whose ``model_config.is_moe`` is false
  for a dense model.

Physical slot ``p`` lives on EP rank ``p // num_local_physical_experts``, row
``p % num_local_physical_experts`` — the same convention as ``eplb_service.placement``.
"""

from __future__ import annotations

import hashlib
import inspect
import socket
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

KNOWN_VLLM = ((0, 18), (0, 33))
"""The ``(major, minor)`` range, inclusive, whose source the checks here were read against."""

EPLB_STATE_METHODS = ("add_model", "step", "rearrange", "start_async_loop")
STEP_PARAMETERS = ("is_dummy", "is_profile", "log_stats")
"""``step``'s first parameters after ``self``, in this order (the runners pass the first two by position)."""
ADD_MODEL_PARAMETERS = ("model", "model_config")
DRAFT_NAME_PARAMETER = "model_name"
"""``add_model``'s draft-only parameter, where it exists."""
REARRANGE_PARAMETERS = ("is_profile",)
DRAFT_RUNNER_TYPE = "draft"
"""``ModelConfig.runner_type`` of a draft model's config."""
MODEL_STATE_TENSORS = (
    "physical_to_logical_map",
    "logical_to_physical_map",
    "logical_replica_count",
    "expert_load_pass",
)
MOE_MODEL_COUNTS = (
    "num_moe_layers",
    "num_logical_experts",
    "num_physical_experts",
    "num_local_physical_experts",
    "num_redundant_experts",
)
RECORD_FLAG = "should_record_tensor"
"""The shared bool scalar that gates the router's load recording, where it exists."""
PARALLEL_CONFIG_FLAGS = ("enable_eplb", "enable_expert_parallel", "enable_elastic_ep", "pipeline_parallel_size")
MOE_FLAG = "is_moe"
"""``ModelConfig``'s property that is false for a dense model (0.18-0.33)."""


class AdapterError(RuntimeError):
    """vLLM is not what this adapter was written for; the message says what it found and expected."""


# -- versions ----------------------------------------------------------------------------


def installed_vllm_version() -> str:
    try:
        import vllm
    except ImportError as exc:
        raise AdapterError(f"eplb-service's vLLM plugin is configured but vllm cannot be imported: {exc}") from exc
    return str(getattr(vllm, "__version__", "unknown"))


def known_range() -> str:
    (lo_major, lo_minor), (hi_major, hi_minor) = KNOWN_VLLM
    return f"{lo_major}.{lo_minor}-{hi_major}.{hi_minor}"


def version_warning(version: str) -> str | None:
    """``None`` for a version in :data:`KNOWN_VLLM`; otherwise the warning to log before running on it."""
    try:
        major, minor = (int(part) for part in version.split("+")[0].split(".")[:2])
    except ValueError:
        major_minor = None
    else:
        major_minor = (major, minor)
    if major_minor is not None and KNOWN_VLLM[0] <= major_minor <= KNOWN_VLLM[1]:
        return None
    return (
        f"vLLM {version} is outside the versions whose source eplb-service's adapter was checked against "
        f"({known_range()}); it runs because the adapter decides by what it finds, and stops with an "
        "AdapterError at the first signature, attribute or tensor layout it does not recognise"
    )


# -- the classes the plugin wraps ----------------------------------------------------------


def eplb_state_class() -> type:
    from vllm.distributed.eplb.eplb_state import EplbState

    return EplbState


@dataclass(frozen=True)
class EplbStateFeatures:
    """What :func:`check_eplb_state_class` found on ``EplbState``."""

    add_model_takes_model_name: bool
    """``add_model`` has ``model_name`` (set for draft models only); without it a draft is
    told apart by its ``model_config.runner_type``."""


def check_eplb_state_class(cls: type) -> EplbStateFeatures:
    """Raise :class:`AdapterError` unless ``cls`` has the methods the plugin wraps, as expected."""
    for name in EPLB_STATE_METHODS:
        if not callable(getattr(cls, name, None)):
            raise AdapterError(f"vllm's {cls.__name__} has no {name}(); expected {', '.join(EPLB_STATE_METHODS)}")
    _require_parameters(cls.step, STEP_PARAMETERS, f"{cls.__name__}.step", leading=True)
    found = _require_parameters(cls.add_model, ADD_MODEL_PARAMETERS, f"{cls.__name__}.add_model")
    _require_parameters(cls.rearrange, REARRANGE_PARAMETERS, f"{cls.__name__}.rearrange")
    return EplbStateFeatures(add_model_takes_model_name=DRAFT_NAME_PARAMETER in found)


def engine_args_class() -> type:
    from vllm.engine.arg_utils import EngineArgs

    if not callable(getattr(EngineArgs, "create_engine_config", None)):
        raise AdapterError("vllm's EngineArgs has no create_engine_config(); expected it to build the VllmConfig")
    return EngineArgs


def _require_parameters(function, names: tuple[str, ...], what: str, leading: bool = False) -> list[str]:
    """``names`` must be parameters of ``function``; with ``leading``, its first ones after self, in order.

    Returns all its parameter names after ``self``.
    """
    found = [n for n in inspect.signature(function).parameters if n != "self"]
    ok = found[: len(names)] == list(names) if leading else all(n in found for n in names)
    if not ok:
        raise AdapterError(
            f"{what} has parameters {found}; expected {list(names)}{' first, in this order' if leading else ''}"
        )
    return found


def bound_arguments(function, args: tuple, kwargs: dict) -> dict:
    """The arguments of a call ``function(*args, **kwargs)`` by name, defaults included."""
    bound = inspect.signature(function).bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def is_draft_model(add_model_arguments: dict) -> bool:
    """Whether ``add_model(**add_model_arguments)`` registers a draft model.

    A ``model_name`` is passed for draft models only (where ``add_model`` has it); every
    version registers a draft with ``speculative_config.draft_model_config``, whose
    ``runner_type`` is ``"draft"`` (the main model's is ``"generate"``).
    """
    if add_model_arguments.get(DRAFT_NAME_PARAMETER) is not None:
        return True
    model_config = add_model_arguments["model_config"]
    runner_type = getattr(model_config, "runner_type", None)
    if runner_type is None and DRAFT_NAME_PARAMETER not in add_model_arguments:
        raise AdapterError(
            f"EplbState.add_model has no {DRAFT_NAME_PARAMETER} parameter and its model_config "
            f"({type(model_config).__name__}) has no runner_type: cannot tell a draft model from the main "
            f"one; expected either (runner_type {DRAFT_RUNNER_TYPE!r} marks a draft)"
        )
    return runner_type == DRAFT_RUNNER_TYPE


def draft_model_label(add_model_arguments: dict) -> str:
    """A name for a draft model in log lines."""
    name = add_model_arguments.get(DRAFT_NAME_PARAMETER)
    return str(name if name is not None else getattr(add_model_arguments["model_config"], "model", "?"))


# -- configuration -----------------------------------------------------------------------------


def is_dense_model(model_config) -> bool:
    """Whether vLLM's ``ModelConfig`` says the model has no experts (``is_moe`` is false).

    Every vLLM 0.18-0.33 has ``ModelConfig.is_moe``; where it is missing (or no model config
    is given) the model counts as MoE, so a configuration without EPLB is still refused.
    """
    return model_config is not None and getattr(model_config, MOE_FLAG, True) is False


def check_parallel_config(parallel_config, model_config=None) -> str | None:
    """Raise :class:`ConfigError` when vLLM runs in a way the plugin cannot serve
    (:class:`AdapterError` when ``parallel_config`` lacks a flag this reads).

    Returns why the plugin stays passive, or ``None`` when it takes over EPLB: a dense model
    (``model_config.is_moe`` false) served without EPLB has no experts to balance, so an
    ``EPLB_SERVICE_ENDPOINT`` set for every vLLM of a host (or ``eplb-sidecar`` around a
    dense model) must not stop it. A dense model *with* ``--enable-eplb`` is refused: vLLM's
    model runner would assert at its first EPLB step (no MoE model), with no message.
    """
    missing = [name for name in PARALLEL_CONFIG_FLAGS if not hasattr(parallel_config, name)]
    if missing:
        raise AdapterError(
            f"vLLM's {type(parallel_config).__name__} has no {', '.join(missing)}; expected "
            f"{', '.join(PARALLEL_CONFIG_FLAGS)}"
        )
    dense = is_dense_model(model_config)
    if dense:
        name = getattr(model_config, "model", "?")
        if not parallel_config.enable_eplb:
            return (
                f"model {name} has no experts (dense): nothing for eplb-service to balance; the plugin "
                "stays passive in this vLLM (EPLB_SERVICE_ENDPOINT is ignored)"
            )
        raise ConfigError(
            f"--enable-eplb with model {name}, which has no experts (dense): vLLM's EPLB needs a MoE model; "
            "drop --enable-eplb (and --eplb-config)"
        )
    if not parallel_config.enable_eplb:
        raise ConfigError(
            "EPLB_SERVICE_ENDPOINT is set (the eplb-service plugin is configured) but vLLM runs without "
            "--enable-eplb (ParallelConfig.enable_eplb=False): add --enable-eplb --enable-expert-parallel, "
            "or unset EPLB_SERVICE_ENDPOINT to serve without eplb-service"
        )
    if not parallel_config.enable_expert_parallel:
        raise ConfigError("eplb-service needs --enable-expert-parallel together with --enable-eplb")
    pp = parallel_config.pipeline_parallel_size
    if pp > 1:
        # Every stage's EP group numbers its ranks from 0 and derives the same deployment id (one
        # default store), so the coordinator would take the first Hello for each rank from any stage:
        # a plan would then move one stage's rows of layer k into another stage's layer k.
        raise ConfigError(
            f"pipeline-parallel size {pp}: vLLM builds one EP group per pipeline stage, each numbering its "
            "ranks from 0, and eplb-service balances one EP group (ranks of different stages would be taken "
            "as one deployment and exchange rows of different layers); run with --pipeline-parallel-size 1, "
            "or unset EPLB_SERVICE_ENDPOINT to serve without eplb-service"
        )
    if parallel_config.enable_elastic_ep:
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


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "0.0.0.0", "")
"""Store hosts that name no machine: the node name is added, as two hosts may each have a store on one port."""


def store_address(store) -> str | None:
    """Where ``store`` (a torch ``Store``, possibly wrapped in ``PrefixStore``s) is reached, or None for
    a kind of store that names no address."""
    for _ in range(16):  # PrefixStore over PrefixStore over the real one; never a cycle, but bounded
        inner = getattr(store, "underlying_store", None)
        if inner is None:
            break
        store = inner
    host, port, path = getattr(store, "host", None), getattr(store, "port", None), getattr(store, "path", None)
    if isinstance(host, str) and isinstance(port, int) and port > 0:
        return f"tcp://{host}:{port}" + (f"@{socket.gethostname()}" if host in LOOPBACK_HOSTS else "")
    if isinstance(path, str) and path:
        return f"file://{socket.gethostname()}{path}"
    return None


def deployment_id_from(store, world_size: int) -> str:
    """The deployment id of the ranks whose default process group rendezvoused at ``store``: its
    address and the EP world size, hashed (``""``: the store names no address)."""
    address = store_address(store)
    if address is None:
        return ""
    digest = hashlib.sha256(f"{address}/ep{world_size}".encode()).hexdigest()[:16]
    return f"vllm-{digest}"


def deployment_id(topology: EpTopology) -> str:
    """This rank's deployment id from vLLM's default process group (see the module docstring), or
    ``""`` when torch.distributed is not initialized or its store names no address: then only
    ``EPLB_SERVICE_DEPLOYMENT`` tells this deployment from another."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return ""
    get_store = getattr(dist.distributed_c10d, "_get_default_store", None)
    if get_store is None:
        return ""
    try:
        store = get_store()
    except (RuntimeError, ValueError):
        return ""
    return deployment_id_from(store, topology.world_size)


def model_state_of(eplb_state, model_config):
    """The ``EplbModelState`` that ``add_model(model, model_config)`` just created."""
    key = model_config.compute_hash()
    states = getattr(eplb_state, "model_states", None)
    if not isinstance(states, dict) or key not in states:
        raise AdapterError(
            f"EplbState.model_states has no entry for model_config.compute_hash()={key!r} after add_model"
        )
    return states[key]


def _need(obj, name: str, where: str):
    if not hasattr(obj, name):
        raise AdapterError(f"{where} has no attribute {name!r}; expected it, as every vLLM {known_range()} has")
    return getattr(obj, name)


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

    model = _need(model_state, "model", "EplbModelState")
    counts = {n: _need(model, n, "the MoE model") for n in MOE_MODEL_COUNTS}
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
        t = _need(model_state, name, "EplbModelState")
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

    weights = _need(model, "expert_weights", "the MoE model")
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


def load_pass_of(model_state):
    """``expert_load_pass`` ``[L, P]`` of a model the agent does not manage (a draft model)."""
    return _need(model_state, "expert_load_pass", "EplbModelState")


def enable_load_recording(eplb_state, model_state) -> bool:
    """Make the router count every step (where vLLM gates it to the steps before its own rearrangement).

    Returns whether recording was gated. Where the MoE layers' ``eplb_state`` has a
    ``should_record_tensor``, every layer must hold the very scalar ``EplbState`` has, so that
    one ``fill_`` turns recording on everywhere; where they have none, the router records
    every step and there is nothing to turn on.
    """
    layers = list(getattr(_need(model_state, "model", "EplbModelState"), "moe_layers", None) or [])
    layer_states = [layer.eplb_state for layer in layers if getattr(layer, "eplb_state", None) is not None]
    gated = [ls for ls in layer_states if hasattr(ls, RECORD_FLAG)]
    flag = getattr(eplb_state, RECORD_FLAG, None)
    if gated:
        apart = [i for i, ls in enumerate(gated) if flag is None or getattr(ls, RECORD_FLAG) is not flag]
        if apart:
            raise AdapterError(
                f"the MoE layers gate load recording with {RECORD_FLAG}; layers {apart} of {len(gated)} hold "
                f"another one than EplbState's ({'None' if flag is None else 'a different tensor'}); expected "
                "every layer to hold EplbState's shared scalar"
            )
    elif layer_states or flag is None:
        return False
    flag.fill_(True)
    return True
