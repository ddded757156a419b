"""The admission checks on a ``Hello`` (``coordinator.admission``), as the pure functions they are.

The socket-level tests (``test_bad_input``, ``test_missed_welcome``, ``test_security``) show a
refusal reaching the agent; these pin the rule at each boundary, where a one-character change
(a prefix one dash short, ``<=`` for ``<``, a truthiness test for ``is not None``) admits what
the protocol refuses and no end-to-end test happens to send.
"""

from __future__ import annotations

import numpy as np
from conftest import hello_message

from eplb_service.coordinator.admission import Claim, claim, hello_problem
from eplb_service.coordinator.registry import AgentRecord

MODEL = hello_message().model


def problem(identity: bytes, deployment: str | None = None, **hello_fields):
    """What ``hello_problem`` says of a Hello (``hello_message`` with ``hello_fields``) on a 2-rank
    coordinator that knows the model."""
    return hello_problem(identity, hello_message(**hello_fields), 2, MODEL, deployment)


def test_an_identity_is_its_rank_s_alone_not_a_prefix_of_another_rank_s():
    """``rank-1-...`` is rank 1's; ``rank-10-...`` or ``rank-1x`` is not, though it starts with ``rank-1``."""
    assert problem(b"rank-1", rank=1) is None
    assert problem(b"rank-1-3f9a", rank=1) is None
    for identity in (b"rank-10-3f9a", b"rank-1x", b"rank-12", b"rank-0-3f9a"):
        refused = problem(identity, rank=1)
        assert refused is not None and refused.code == "refused", identity
        assert repr(identity) in refused.reason and "expected b'rank-1-...'" in refused.reason


def test_a_rank_equal_to_the_world_size_is_out_of_range():
    assert problem(b"rank-1-a", rank=1) is None
    refused = problem(b"rank-2-a", rank=2)
    assert refused is not None and refused.reason == "rank 2 outside [0, 2) (coordinator world size 2)"


def test_rank_0_must_name_both_the_host_and_the_port_of_its_store():
    assert problem(b"rank-0-a") is None
    for store in ({"store_port": 0}, {"store_host": ""}, {"store_host": "", "store_port": 0}):
        refused = problem(b"rank-0-a", **store)
        assert refused is not None and refused.key == (0, "store"), store
        assert "rank 0 must host the rendezvous store" in refused.reason


def test_an_unknown_deployment_id_and_a_known_one_are_different_deployments_both_ways():
    """While ranks of an unknown id (``""``) are alive, a rank of a known id is another deployment,
    and the reverse (``proto/PROTOCOL.md``: "unknown and known ids count as different"); with no
    rank alive (None) any id starts the next one."""
    for live, sent in (("", "vllm-b"), ("vllm-a", ""), ("vllm-a", "vllm-b")):
        refused = hello_problem(b"rank-1-a", hello_message(rank=1, deployment=sent), 2, MODEL, live)
        assert refused is not None and refused.code == "rank_taken", (live, sent)
        assert refused.key == ("deployment", sent, live)
    for live, sent in (("", ""), ("vllm-a", "vllm-a"), (None, "vllm-b"), (None, "")):
        assert hello_problem(b"rank-1-a", hello_message(rank=1, deployment=sent), 2, MODEL, live) is None


def holder(pid: int, node: str = "host-a") -> AgentRecord:
    """Rank 1's live record, registered twice by one process: session 22 now, 11 before (carried over)."""
    return AgentRecord(
        rank=1,
        identity=b"rank-1-b",
        node=node,
        pid=pid,
        epoch=0,
        step=0,
        phy2log=np.zeros((2, 8), dtype=np.int64),
        session=22,
        earlier_sessions=(11,),
    )


def test_a_hello_without_a_pid_is_not_the_own_process_of_a_holder_that_named_one():
    """An agent that sends no pid is its own process only by one of its earlier sessions, and only
    for a holder that sent none either: a holder that named its pid is another process from a
    Hello with pid 0, whatever session that names (``proto/PROTOCOL.md``, Sessions)."""
    hello = hello_message(rank=1, node="host-a", pid=0, resume_session=11, store_host="", store_port=0)
    assert claim(holder(pid=0), b"rank-1-c", hello) is Claim.REOPENED
    assert claim(holder(pid=4321), b"rank-1-c", hello) is Claim.TAKEN
