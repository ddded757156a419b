"""The deployment id a vLLM worker sends: from ``EPLB_SERVICE_DEPLOYMENT``, else derived by the adapter.

The derivation reads the address of the store vLLM's default process group rendezvoused at
(see ``adapter.deployment_id``). Stand-in store objects check the unwrapping and the cases; real
torch process groups in real processes check that the ranks of one group agree and another
group differs, as DP engine processes (one world across them) and one engine's TP workers do.
"""

from __future__ import annotations

import datetime

import pytest
import torch.distributed as dist
from child_context import CTX
from sim_cluster import free_port

from eplb_service.deployment_id import deployment_id_problem
from eplb_service.integrations.vllm import adapter
from eplb_service.integrations.vllm import config as plugin_config
from eplb_service.integrations.vllm.adapter import EpTopology, deployment_id_from, store_address


class TcpStore:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port


class FileStore:
    def __init__(self, path: str) -> None:
        self.path = path


class PrefixStore:
    def __init__(self, inner) -> None:
        self.underlying_store = inner


def test_the_store_address_is_found_under_prefix_stores():
    assert store_address(PrefixStore(PrefixStore(TcpStore("10.0.0.5", 29500)))) == "tcp://10.0.0.5:29500"
    assert store_address(object()) is None
    assert deployment_id_from(object(), 4) == ""


def test_one_store_address_is_one_id_and_anything_else_is_another(monkeypatch):
    monkeypatch.setattr(adapter.socket, "gethostname", lambda: "node-a")
    one = deployment_id_from(PrefixStore(TcpStore("10.0.0.5", 29500)), 16)
    assert one == deployment_id_from(TcpStore("10.0.0.5", 29500), 16)  # every rank of one deployment
    assert one.startswith("vllm-") and deployment_id_problem(one) is None
    others = {
        deployment_id_from(TcpStore("10.0.0.5", 29501), 16),  # another deployment's store on that host
        deployment_id_from(TcpStore("10.0.0.6", 29500), 16),
        deployment_id_from(TcpStore("10.0.0.5", 29500), 8),
        deployment_id_from(FileStore("/tmp/a"), 16),
        one,
    }
    assert len(others) == 5
    # A loopback store names no machine: two hosts may each have one on the same port.
    local_a = deployment_id_from(TcpStore("127.0.0.1", 40000), 2)
    monkeypatch.setattr(adapter.socket, "gethostname", lambda: "node-b")
    assert deployment_id_from(TcpStore("127.0.0.1", 40000), 2) != local_a
    assert deployment_id_from(TcpStore("10.0.0.5", 29500), 16) == one  # a real address needs no node name


def _rank_of_group(port: int, rank: int, world: int, out) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=30),
    )
    out.put((port, rank, adapter.deployment_id(EpTopology(rank=rank, world_size=world, num_nodes=1))))
    dist.barrier()
    dist.destroy_process_group()


def test_ranks_of_one_process_group_agree_and_another_group_differs():
    """Two worlds of two processes each, as two deployments on one host: one id per world."""
    out = CTX.Queue()
    ports = [free_port(), free_port()]
    procs = [CTX.Process(target=_rank_of_group, args=(port, r, 2, out)) for port in ports for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        ids = [out.get(timeout=60) for _ in procs]
    finally:
        for p in procs:
            p.join(20)
            if p.is_alive():
                p.kill()
    by_group = {port: {d for q, _, d in ids if q == port} for port in ports}
    assert all(len(found) == 1 for found in by_group.values()), by_group
    first, second = (found.pop() for found in by_group.values())
    assert first and second and first != second


def test_without_a_process_group_there_is_no_derived_id():
    assert not dist.is_initialized()
    assert adapter.deployment_id(EpTopology(rank=0, world_size=2, num_nodes=1)) == ""


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("a b", "deployment id 'a b' has characters other than printable ASCII"),
        ("x" * 129, "has 129 characters; expected at most 128"),
        ("tab\there", "deployment id 'tab\\there' has characters other than printable ASCII"),
        ("naïve", "deployment id 'naïve' has characters other than printable ASCII"),
    ],
)
def test_a_bad_deployment_variable_is_refused_naming_it(value, needle):
    env = {plugin_config.ENDPOINT: "ipc:///tmp/c.sock", plugin_config.DEPLOYMENT: value}
    with pytest.raises(plugin_config.ConfigError) as caught:
        plugin_config.from_env(env)
    assert str(caught.value).startswith(f"EPLB_SERVICE_DEPLOYMENT={value!r}: ") and needle in str(caught.value)


def test_the_deployment_variable_is_read():
    env = {plugin_config.ENDPOINT: "ipc:///tmp/c.sock", plugin_config.DEPLOYMENT: " team-a/prod-1 "}
    assert plugin_config.from_env(env).deployment == "team-a/prod-1"
    assert plugin_config.from_env({plugin_config.ENDPOINT: "ipc:///tmp/c.sock"}).deployment == ""
