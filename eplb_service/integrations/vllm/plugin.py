"""The ``vllm.general_plugins`` entry point: eplb-service takes over vLLM's EPLB.

vLLM calls :func:`register` in every process it starts (the API server or ``LLM``
driver, the engine core, every worker). Without ``EPLB_SERVICE_ENDPOINT`` it returns at
once and changes nothing. Configured, it wraps four methods of vLLM's ``EplbState``
class (so both model runners, V1 and V2, go through them) and one of ``EngineArgs``:

- ``EngineArgs.create_engine_config``: refuse a configuration without ``--enable-eplb``
  with an error that says so, before any worker starts; a dense model (no experts) without
  it is served as if the plugin were not there, after one warning saying so.
- ``EplbState.add_model`` (main model): check the maps and weights through the adapter
  and attach a :class:`~eplb_service.worker_agent.agent.WorkerAgent` to them.
  A draft model (the adapter tells it apart) keeps vLLM's initial placement; its load is
  discarded.
- ``EplbState.step``: profile steps go to vLLM (its profile rearrangement reserves the
  memory a real one needs); every other step, real or dummy, is one tick of the agent's
  step clock: fold this step's ``expert_load_pass`` into the agent (dummy steps fold
  nothing), zero it, and run the commit hook at the step boundary. vLLM's own counter
  never advances, so its rearrangement never runs.
- ``EplbState.rearrange``: a non-profile call while the agent owns placement is a bug
  (or elastic EP) and raises instead of moving experts behind the agent's back.
- ``EplbState.start_async_loop``: vLLM's async EPLB thread is not started.

Load recording stays on every step (vLLM gates it to the steps before its own
rearrangement). The agent stops (``Goodbye`` to the coordinator) at interpreter exit,
which vLLM's worker processes reach on shutdown.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import threading

from eplb_service.integrations.vllm import config as config_mod
from eplb_service.logutil import DefaultTag, JsonFormatter, TextFormatter, parse_level, rank_logger

log = logging.getLogger(__name__)

BINDING_ATTR = "_eplb_service_binding"
PASSIVE_ATTR = "_eplb_service_passive_load"
_lock = threading.Lock()
_installed: config_mod.PluginConfig | None = None
_process_tag: DefaultTag | None = None
"""The tag of this process's lines that come without one (the transports', the schedule's):
``rank N`` once the worker's main model is attached, so every line of a worker names its rank."""


def register() -> None:
    """The entry point. Inert (and cheap: no torch, no vLLM import) unless configured."""
    cfg = config_mod.from_env()
    if cfg is None:
        return
    global _installed
    with _lock:
        if _installed is not None:
            return
        _setup_logging(cfg.log_level, cfg.log_format)
        from eplb_service.integrations.vllm import adapter

        warning = adapter.version_warning(adapter.installed_vllm_version())
        if warning:
            log.warning("%s", warning)
        for line in config_mod.unknown_variables(os.environ):
            log.warning("%s", line)
        install(cfg, adapter.eplb_state_class(), adapter.engine_args_class())
        _installed = cfg
        # Not "active" yet: whether it takes over is known only from the engine config (a dense model
        # leaves it passive), which this process may never see (a worker receives it built).
        log.info(
            "eplb-service plugin loaded: coordinator %s, transport %s; it takes over vLLM's EPLB for a MoE model",
            cfg.endpoint,
            cfg.transport,
        )


def _setup_logging(level: str, fmt: str = "text") -> None:
    """vLLM configures only its own loggers; give ours a handler so agent lines show up, each
    with the worker's rank once it is known (:func:`_tag_process`), as JSON lines where the
    deployment's log pipeline reads the coordinator's so (``EPLB_SERVICE_LOG_FORMAT=json``)."""
    global _process_tag
    logger = logging.getLogger("eplb_service")
    logger.setLevel(parse_level(level, "EPLB_SERVICE_LOG_LEVEL"))  # checked in from_env: "debug" works too
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(
            JsonFormatter()
            if fmt == "json"
            else TextFormatter("%(levelname)s %(asctime)s [eplb-service pid %(process)d] %(name)s: %(message)s")
        )
        _process_tag = DefaultTag(None)  # the API server and the engine core have no rank
        handler.addFilter(_process_tag)
        logger.addHandler(handler)
        logger.propagate = False


def _tag_process(rank: int) -> None:
    """From now on, this worker's untagged lines carry ``[rank N]`` (one EP rank per worker process)."""
    if _process_tag is not None:
        _process_tag.tag = f"rank {rank}"


# -- patching --------------------------------------------------------------------------------


def install(
    cfg: config_mod.PluginConfig, eplb_state_cls: type, engine_args_cls: type | None, agent_factory=None
) -> None:
    """Wrap the methods listed in the module docstring (idempotent per class).

    ``agent_factory(cfg, view, topology) -> agent`` replaces :func:`start_agent` in tests.
    """
    from eplb_service.integrations.vllm import adapter

    factory = agent_factory or start_agent
    if getattr(eplb_state_cls, "_eplb_service_patched", False):
        return
    features = adapter.check_eplb_state_class(eplb_state_cls)
    log.debug("%s: %s", eplb_state_cls.__name__, features)

    original_add_model = eplb_state_cls.add_model
    original_step = eplb_state_cls.step
    original_rearrange = eplb_state_cls.rearrange
    original_start_async = eplb_state_cls.start_async_loop

    @functools.wraps(original_add_model)
    def add_model(self, *args, **kwargs):
        result = original_add_model(self, *args, **kwargs)
        bound = adapter.bound_arguments(original_add_model, (self, *args), kwargs)
        model_state = adapter.model_state_of(self, bound["model_config"])
        passive = self.__dict__.setdefault(PASSIVE_ATTR, [])
        topology = adapter.ep_topology()  # the worker's EP group, the same for a draft model
        _tag_process(topology.rank)
        if not adapter.is_draft_model(bound):
            if getattr(self, BINDING_ATTR, None) is not None:
                raise adapter.AdapterError(
                    "EplbState.add_model was called twice for a main model; eplb-service manages one"
                )
            view = adapter.view_model_state(model_state, topology)
            adapter.enable_load_recording(self, model_state)
            binding = EplbBinding(view, factory(cfg, view, topology), passive)
            setattr(self, BINDING_ATTR, binding)
            _stop_at_exit(binding)
        else:
            rank_logger(__name__, topology.rank).warning(
                "EPLB of the draft model %s stays at vLLM's initial placement: eplb-service balances "
                "the main model only",
                adapter.draft_model_label(bound),
            )
            passive.append(adapter.load_pass_of(model_state))
        return result

    @functools.wraps(original_step)
    def step(self, is_dummy: bool = False, is_profile: bool = False, log_stats: bool = False):
        # The adapter checked that these are step()'s parameters, in this order.
        if is_profile:
            return original_step(self, is_dummy, is_profile, log_stats)
        binding = getattr(self, BINDING_ATTR, None)
        if binding is None:
            raise adapter.AdapterError(
                "EplbState.step ran with eplb-service configured but no main model attached; "
                "vLLM's own rearrangement would run"
            )
        binding.on_step(is_dummy)
        return None

    @functools.wraps(original_rearrange)
    def rearrange(self, *args, **kwargs):
        binding = getattr(self, BINDING_ATTR, None)
        if binding is not None:
            if not adapter.bound_arguments(original_rearrange, (self, *args), kwargs)["is_profile"]:
                binding.refused_rearranges += 1
                raise adapter.AdapterError(
                    "vLLM's own expert rearrangement (EplbState.rearrange) was called while "
                    "eplb-service manages placement; elastic EP is not supported with the plugin"
                )
            binding.profile_rearranges += 1
        return original_rearrange(self, *args, **kwargs)

    @functools.wraps(original_start_async)
    def start_async_loop(self, *args, **kwargs):
        binding = getattr(self, BINDING_ATTR, None)
        if binding is not None:
            binding.log.info("vLLM's async EPLB worker not started: eplb-service moves the experts")
            return None
        return original_start_async(self, *args, **kwargs)

    eplb_state_cls.add_model = add_model
    eplb_state_cls.step = step
    eplb_state_cls.rearrange = rearrange
    eplb_state_cls.start_async_loop = start_async_loop
    eplb_state_cls._eplb_service_patched = True

    if engine_args_cls is not None:
        _check_engine_config(engine_args_cls, cfg)


def _check_engine_config(engine_args_cls: type, cfg: config_mod.PluginConfig) -> None:
    """Wrap ``create_engine_config`` (idempotent): refuse what the plugin cannot serve before any
    worker starts; a dense model without EPLB passes with one warning (nothing of ours runs), and
    a MoE model with EPLB gets the one line that says the plugin is active."""
    if getattr(engine_args_cls, "_eplb_service_patched", False):
        return
    from eplb_service.integrations.vllm import adapter

    original_create = engine_args_cls.create_engine_config

    @functools.wraps(original_create)
    def create_engine_config(self, *args, **kwargs):
        vllm_config = original_create(self, *args, **kwargs)
        passive = adapter.check_parallel_config(vllm_config.parallel_config, getattr(vllm_config, "model_config", None))
        if passive:  # without EPLB no worker builds an EplbState: nothing of ours runs there
            log.warning("%s", passive)
        else:
            log.info(
                "eplb-service plugin active: vLLM's EPLB rearrangement is replaced (coordinator %s, transport %s)",
                cfg.endpoint,
                cfg.transport,
            )
        return vllm_config

    engine_args_cls.create_engine_config = create_engine_config
    engine_args_cls._eplb_service_patched = True


def _stop_at_exit(binding: "EplbBinding") -> None:
    """Detach when the worker exits: ``atexit`` for plain interpreters, and multiprocessing's
    own exit hook, which forked workers run (they leave through ``os._exit``, skipping atexit)."""
    import multiprocessing.util

    atexit.register(binding.detach)
    multiprocessing.util.Finalize(None, binding.detach, exitpriority=100)


def binding_of(eplb_state) -> "EplbBinding | None":
    """The plugin's state on one worker's ``EplbState`` (for status and tests)."""
    return getattr(eplb_state, BINDING_ATTR, None)


# -- the per-worker binding ---------------------------------------------------------------------


class EplbBinding:
    """One worker's link between vLLM's EPLB tensors and its agent."""

    def __init__(self, view, agent, passive_load_passes: list | None = None) -> None:
        self.view = view
        self.agent = agent
        self.hooks = agent.hooks
        self.passive_load_passes: list = passive_load_passes if passive_load_passes is not None else []
        """``expert_load_pass`` of draft models: zeroed every step, never reported."""
        self.profile_rearranges = 0
        self.refused_rearranges = 0
        self.real_steps = 0
        self.dummy_steps = 0
        self._detached = False
        self.log = rank_logger(__name__, agent.rank)

    def on_step(self, is_dummy: bool) -> None:
        """One non-profile ``EplbState.step``: the boundary after a forward pass."""
        load = self.view.load_pass
        hooks = self.hooks
        if is_dummy:
            self.dummy_steps += 1
            hooks.after_step(None)
        else:
            self.real_steps += 1
            hooks.after_step(load)
        load.zero_()
        for other in self.passive_load_passes:
            other.zero_()
        hooks.before_step()

    def detach(self) -> None:
        if self._detached:
            return
        self._detached = True
        try:
            self.agent.stop(timeout_s=2.0)
        except Exception as exc:  # interpreter shutdown: nothing left to do
            self.log.debug("stopping the agent: %s", exc)

    def status(self) -> dict:
        hooks = self.hooks
        return {
            "rank": self.agent.rank,
            "welcomed": self.agent.welcomed,
            "steps": hooks.steps_done,
            "real_steps": self.real_steps,
            "dummy_steps": self.dummy_steps,
            "epoch": hooks.epoch,
            "commits": list(hooks.commit_log),
            "max_stall_s": hooks.max_stall_s,
            "profile_rearranges": self.profile_rearranges,
            "refused_rearranges": self.refused_rearranges,
            "agent_stats": dict(self.agent.stats),
            "phy2log": self.view.phy2log.tolist(),
        }


# -- the agent ------------------------------------------------------------------------------------


def make_transport(name: str, device, max_ctas: int | None = None):
    """The side transport named by ``EPLB_SERVICE_TRANSPORT``.

    ``auto``: gloo on CPU, CuPy NCCL on GPU. ``copy-engine`` forces peer copies (the CPU
    stand-in on CPU workers), ``nccl`` NCCL; ``prefer-copy-engine``: copy engines (CUDA IPC
    peer copies) when every pair of ranks is on one host with peer access, else CuPy NCCL,
    decided at every rendezvous. ``auto`` is not ``prefer-copy-engine`` yet: the copy-engine
    path has run on one GPU only, never against NCCL on two (issue 15).
    """
    import torch

    from eplb_service.integrations.vllm.adapter import AdapterError

    device = torch.device(device)
    if name == "gloo" or (name == "auto" and device.type == "cpu"):
        from eplb_service.worker_agent.transport_gloo import GlooTransport

        return GlooTransport()
    what = {"copy-engine": "copy-engine", "prefer-copy-engine": "copy-engine and CuPy NCCL"}.get(name, "CuPy NCCL")
    try:
        return _gpu_transport(name, device, max_ctas)  # built on the serving thread: it orders itself after that stream
    except Exception as exc:  # no CuPy / no CUDA: say which variable chose it
        raise AdapterError(
            f"{config_mod.TRANSPORT}={name}: cannot build the {what} side transport on {device} "
            f"({type(exc).__name__}: {exc}); install eplb-service[gpu] (or [gpu-cuda13]) or set "
            f"{config_mod.TRANSPORT}=gloo"
        ) from exc


def _gpu_transport(name: str, device, max_ctas: int | None):
    from eplb_service.worker_agent import transport_copy_engine as ce

    if name == "copy-engine":
        from eplb_service.worker_agent.memory_mover import CudaIpcMover, HostMemoryMover

        mover = HostMemoryMover() if device.type == "cpu" else CudaIpcMover(device)
        return ce.CopyEngineTransport(mover, mode="copy-engine")
    from eplb_service.worker_agent.transport_cupy_nccl import CupyNcclTransport

    nccl = CupyNcclTransport(device, max_ctas=max_ctas)
    if name in ("nccl", "auto"):
        return nccl
    from eplb_service.worker_agent.memory_mover import CudaIpcMover

    return ce.SelectingTransport(ce.CopyEngineTransport(CudaIpcMover(device), mode="auto"), nccl)


def start_agent(cfg: config_mod.PluginConfig, view, topology):
    """Build this rank's :class:`ExpertModel` over vLLM's tensors and start its agent."""
    from eplb_service.integrations.vllm import adapter
    from eplb_service.integrations.vllm.agent import VllmWorkerAgent
    from eplb_service.worker_agent.expert_model import ExpertModel

    model = ExpertModel(
        expert_weights=view.expert_weights,
        phy2log=view.phy2log,
        log2phy=view.log2phy,
        logcnt=view.logcnt,
        rank=topology.rank,
        num_ranks=topology.world_size,
    )
    transport = make_transport(cfg.transport, model.device, cfg.side_max_ctas)
    deployment = cfg.deployment or adapter.deployment_id(topology)
    if not deployment:
        rank_logger(__name__, topology.rank).warning(
            "no deployment id: %s is unset and vLLM's default process group has no store address to derive one "
            "from; the coordinator cannot tell this deployment's ranks from another's (set %s alike on every rank)",
            config_mod.DEPLOYMENT,
            config_mod.DEPLOYMENT,
        )
    agent = VllmWorkerAgent(
        model,
        cfg.endpoint,
        transport,
        ranks_per_node=topology.ranks_per_node,
        overrides=cfg.agent_overrides(),
        staging_budget_bytes=cfg.staging_budget_bytes,
        deployment=deployment,
    )
    rank_logger(__name__, topology.rank).info(
        "EP rank %d/%d of deployment %s (%s): %d MoE layers, %d logical / %d physical experts, %d bytes per "
        "expert, transport %s",
        topology.rank,
        topology.world_size,
        deployment or "(unknown)",
        f"from {config_mod.DEPLOYMENT}" if cfg.deployment else "derived from vLLM's process group",
        view.shape.num_layers,
        view.shape.num_logical,
        view.shape.num_physical,
        model.bytes_per_expert,
        transport.name,
    )
    return agent.start()
