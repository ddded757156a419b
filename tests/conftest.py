"""Shared fixtures: tiny expert models whose weight rows say which expert they hold."""

from __future__ import annotations

import logging
import socket
import sys
import threading
import warnings

import numpy as np
import pytest
import torch

from eplb_service import protocol
from eplb_service.placement import PlacementShape, initial_phy2log
from eplb_service.worker_agent.decision import Decision
from eplb_service.worker_agent.expert_model import ExpertModel, map_tensors


def free_port() -> int:
    """A TCP port of 127.0.0.1 that was free a moment ago (the OS's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MemoryRecord:
    """The commit decision record, in memory: the first proposal for a plan wins, as in the store;
    counts the proposals that reached it."""

    address = "memory"

    def __init__(self) -> None:
        self.decisions: dict[int, Decision] = {}
        self.proposals = 0

    def propose(self, plan_id: int, proposal: Decision) -> Decision:
        self.proposals += 1
        return self.decisions.setdefault(plan_id, proposal)


def expert_row_value(layer: int, expert: int) -> float:
    """The value every weight of logical expert ``expert`` in ``layer`` holds."""
    return float(layer * 1000 + expert)


def make_model(rank: int, shape: PlacementShape, phy2log: np.ndarray | None = None, row_len: int = 6) -> ExpertModel:
    """An ExpertModel whose rows are filled with :func:`expert_row_value` (two tensors per layer)."""
    phy2log = initial_phy2log(shape) if phy2log is None else phy2log
    spr = shape.slots_per_rank
    weights = []
    for layer in range(shape.num_layers):
        experts = phy2log[layer, rank * spr : (rank + 1) * spr]
        values = torch.tensor([expert_row_value(layer, int(e)) for e in experts], dtype=torch.float32)
        weights.append(
            [values[:, None].repeat(1, row_len).contiguous(), (values[:, None] * 2).repeat(1, 3).contiguous()]
        )
    p2l, l2p, cnt = map_tensors(phy2log, shape.num_logical, shape.num_redundant + 1)
    return ExpertModel(
        expert_weights=weights, phy2log=p2l, log2phy=l2p, logcnt=cnt, rank=rank, num_ranks=shape.num_ranks
    )


def rows_match_maps(model: ExpertModel) -> bool:
    """True when every live row holds the expert the live phy2log says it holds."""
    spr = model.phy2log.shape[1] // model.num_ranks
    for layer, (w, b) in enumerate(model.expert_weights):
        for row in range(spr):
            expert = int(model.phy2log[layer, model.rank * spr + row])
            if not (
                torch.all(w[row] == expert_row_value(layer, expert))
                and torch.all(b[row] == 2 * expert_row_value(layer, expert))
            ):
                return False
    return True


def commit_through_serving(model: ExpertModel, plan_id: int, layers: list[int], rows: np.ndarray, area) -> str:
    """Commit a staged plan as a decided vote does: the decision record says commit at step 1,
    and the serving hooks apply it at that boundary. Returns the ticket's outcome."""
    from eplb_service.worker_agent.decision import Decision
    from eplb_service.worker_agent.serving_hooks import CommitTicket, ServingHooks
    from eplb_service.worker_agent.staging import prepare_commit

    hooks = ServingHooks(model, report_interval_steps=4, fence_steps=1, fence_timeout_s=1.0)
    ticket = CommitTicket(action=prepare_commit(model, plan_id, layers, rows, area))
    ticket.vote_entry_step = 0
    ticket.resolve(Decision.commit_at(1, rank=0))
    hooks.ticket = ticket
    for _ in range(2):
        hooks.before_step()
        hooks.after_step(None)
    return ticket.outcome


def hello_message(**changes) -> protocol.Hello:
    """Rank 0's ``Hello`` for the 2-layer, 6-expert, 8-slot, 2-rank test model, with ``changes``."""
    fields = dict(
        protocol_version=protocol.PROTOCOL_VERSION,
        rank=0,
        model=protocol.ModelShape(2, 6, 8, 2, 36),
        phy2log=protocol.NDArray.from_numpy(initial_phy2log(PlacementShape(2, 6, 8, 2))),
        epoch=0,
        step=0,
        transport="gloo",
        store_host="127.0.0.1",
        store_port=1,
    )
    fields.update(changes)
    return protocol.Hello(**fields)


def register_two_ranks(c) -> None:
    """Register both ranks of :func:`hello_message`'s model with coordinator ``c`` (driven message by
    message; rank 0 names the rendezvous store)."""
    for rank in (0, 1):
        store = {"store_host": "127.0.0.1", "store_port": 1} if rank == 0 else {"store_host": "", "store_port": 0}
        c._handle(f"rank-{rank}".encode(), hello_message(rank=rank, pid=100 + rank, node="n", **store))


def send_load_report(c, rank: int, step_end: int, slot_load: np.ndarray) -> None:
    """``rank``'s load report of the 10 steps up to ``step_end`` (``slot_load``: ``[L, P]`` counts), on
    its registered connection and session."""
    record = c.registry.agents[rank]
    c._handle(
        record.identity,
        protocol.LoadReport(
            rank=rank,
            epoch=0,
            step_begin=step_end - 10,
            step_end=step_end,
            slot_load=protocol.NDArray.from_numpy(slot_load),
            session=record.session,
        ),
    )


def register_two_ranks_reporting(c, slot_load: np.ndarray) -> None:
    """Register both ranks (:func:`register_two_ranks`) and feed three load reports of 10 steps
    each: ``slot_load`` (``[L, P]`` counts) from rank 0, zeros from rank 1, so the window's load is
    ``slot_load``'s and plannable."""
    register_two_ranks(c)
    for step in (10, 20, 30):
        for rank in (0, 1):
            send_load_report(c, rank, step, slot_load if rank == 0 else slot_load * 0)


@pytest.fixture
def small_shape() -> PlacementShape:
    return PlacementShape(num_layers=2, num_logical=6, num_physical=8, num_ranks=2)


@pytest.fixture(autouse=True)
def _process_logging_restored():
    """Undo what a command run in-process (``main([...])``) did to the process's logging: its
    handler writes to the stream pytest captured for that test, closed after it, so every later
    line of any thread in the run came out as a '--- Logging error ---' traceback."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, sys.excepthook, threading.excepthook, warnings.showwarning)
    yield
    root.handlers[:], root.level = saved[0], saved[1]
    sys.excepthook, threading.excepthook, warnings.showwarning = saved[2], saved[3], saved[4]
    logging.captureWarnings(False)
