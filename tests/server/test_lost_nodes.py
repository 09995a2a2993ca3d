"""A deployment that loses a SuperNode: the rounds go on with the nodes still connected (at
least federation.min_clients), the lost client is counted in clients_failed with its reason in
run.log, and a node that comes back (under a new node id, as a restarted SuperNode does)
takes part again. Driven in-process by Grid doubles whose nodes disappear and return."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from helpers import InProcessGrid, set_task_identity, small_config

from app.rundir import read_csv
from clients.client_app import app as client_app
from server import sampling
from server.server_app import run_federation
from server.strategy import TooFewRepliesError


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    set_task_identity(monkeypatch)


def counts(out: Path) -> list[tuple[int, ...]]:
    """(round, clients_ok, clients_failed, eval_ok, eval_failed) of each trained round."""
    keys = ("round", "clients_ok", "clients_failed", "eval_ok", "eval_failed")
    return [tuple(int(r[k]) for k in keys) for r in read_csv(out / "metrics.csv")[1:]]


def _round(msg) -> int | None:
    config = msg.content.config_records.get("config")
    return int(config["server-round"]) if config and "server-round" in config else None


class LosingGrid(InProcessGrid):
    """Node 101 (partition 1) dies while training in round ``lose``: its reply never comes
    (Flower's result just lacks it) and it is no longer listed. After the evaluation of round
    ``back - 1`` it connects again as node 201 with a fresh process state."""

    def __init__(self, num_nodes: int, lose: int, back: int | None = None) -> None:
        super().__init__(client_app, num_nodes)
        self.lose, self.back = lose, back
        self.away: Context | None = None

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        dying = [
            m
            for m in messages
            if m.metadata.dst_node_id == 101
            and m.metadata.message_type == "train"
            and _round(m) == self.lose
        ]
        replies = super().send_and_receive([m for m in messages if m not in dying], timeout)
        if dying:
            self.away = self.contexts.pop(101)
        rounds = {_round(m) for m in messages if m.metadata.message_type == "evaluate"}
        if self.away is not None and self.back is not None and self.back - 1 in rounds:
            self.contexts[201] = Context(
                run_id=1,
                node_id=201,
                node_config=dict(self.away.node_config),
                state=RecordDict(),
                run_config={},
            )
            self.away = None
        return replies


def test_a_lost_node_is_counted_failed_the_rounds_go_on_and_it_rejoins(tmp_path):
    cfg = small_config(
        "federation.rounds=4", "data.partition.num_clients=3", "federation.min_clients=2"
    )
    summary = run_federation(LosingGrid(3, lose=2, back=4), cfg, tmp_path)

    assert summary["status"] == "completed" and summary["rounds"] == 4
    assert counts(tmp_path) == [
        (1, 3, 0, 3, 0),
        (2, 2, 1, 2, 1),  # lost mid-round: no reply; gone before the evaluation
        (3, 2, 1, 2, 1),  # not connected: the round goes on without it
        (4, 3, 0, 3, 0),  # back under a new node id: asked its partition, takes part again
    ]
    clients = read_csv(tmp_path / "clients.csv")
    assert sorted(int(r["client"]) for r in clients if r["round"] == "4") == [0, 1, 2]
    log = (tmp_path / "run.log").read_text()
    assert "train: client 1 (node 101) failed: no reply within 3600 s" in log
    assert "which held partition 1, is no longer connected to the SuperLink" in log


class FlowerStyleLoss(InProcessGrid):
    """As Flower's SuperLink reports a node that stopped sending heartbeats: the node is still
    listed for a while, and the reply to its message is an error "from" the SuperLink (node
    id 1, linked to the message by its id only)."""

    def __init__(self, num_nodes: int, lose: int) -> None:
        super().__init__(client_app, num_nodes)
        self.lose, self.pushed = lose, 0

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        for msg in messages:  # what a runtime's push does: each message gets its id
            self.pushed += 1
            msg.metadata.__dict__["_message_id"] = f"message-{self.pushed}"
        gone = [m for m in messages if m.metadata.dst_node_id == 101 and _round(m) == self.lose]
        replies = super().send_and_receive([m for m in messages if m not in gone], timeout)
        for msg in gone:
            reply = Message(
                Error(ErrorCode.NODE_UNAVAILABLE, "Error: Node Unavailable"), reply_to=msg
            )
            reply.metadata.__dict__["_src_node_id"] = 1  # SUPERLINK_NODE_ID
            replies.append(reply)
        return replies


def test_flowers_node_unavailable_reply_counts_once_under_the_lost_nodes_name(tmp_path):
    cfg = small_config(
        "federation.rounds=2", "data.partition.num_clients=3", "federation.min_clients=2"
    )
    run_federation(FlowerStyleLoss(3, lose=2), cfg, tmp_path)
    assert counts(tmp_path) == [(1, 3, 0, 3, 0), (2, 2, 1, 2, 1)]  # once each, not twice
    log = (tmp_path / "run.log").read_text()
    assert "train: client 1 (node 101) failed: Error: Node Unavailable" in log
    assert "node 1)" not in log and "no reply within" not in log


def test_too_few_nodes_stop_the_run_with_one_line_after_the_stated_wait(tmp_path, monkeypatch):
    monkeypatch.setattr(sampling, "NODE_WAIT_S", 0.6)
    monkeypatch.setattr(sampling, "WAIT_LOG_S", 0.2)
    cfg = small_config(
        "federation.rounds=3", "data.partition.num_clients=3", "federation.min_clients=3"
    )
    grid = LosingGrid(3, lose=1)  # lost in round 1 (counted there: the round fails at once)
    with pytest.raises(TooFewRepliesError) as info:
        run_federation(grid, cfg, tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("round 1: 2 usable client replies, federation.min_clients is 3")
    assert "no reply within 3600 s: the node was lost mid-round" in message
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "failed"

    # a node lost between rounds: the next round waits NODE_WAIT_S for it, then fails
    grid = LosingGrid(3, lose=99)
    del grid.contexts[101]
    pm = sampling.PartitionMap(3, poll_s=0.05, min_nodes=3)
    pm.started = True
    pm.last_node[1] = 101
    start = time.monotonic()
    nodes = pm.nodes(grid, [0, 1, 2])
    assert time.monotonic() - start >= 0.6
    assert nodes == [100, sampling.stand_in(1), 102]


class LateGrid(InProcessGrid):
    """Node 102 connects only after ``late_s``; with ``late_s=None``, never."""

    def __init__(self, num_nodes: int, late_s: float | None) -> None:
        super().__init__(client_app, num_nodes)
        self.start, self.late_s = time.monotonic(), late_s

    def get_node_ids(self):
        late = self.late_s is None or time.monotonic() - self.start < self.late_s
        return [n for n in self.contexts if not (n == 102 and late)]


def test_the_first_round_waits_for_every_node_then_goes_on_without_the_missing(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(sampling, "NODE_WAIT_S", 1.5)
    cfg = small_config(
        "federation.rounds=1", "data.partition.num_clients=3", "federation.min_clients=2"
    )
    run_federation(LateGrid(3, late_s=0.5), cfg, tmp_path / "late")
    assert counts(tmp_path / "late") == [(1, 3, 0, 3, 0)]  # waited for the late node

    summary = run_federation(LateGrid(3, late_s=None), cfg, tmp_path / "never")
    assert summary["status"] == "completed"
    assert counts(tmp_path / "never") == [(1, 2, 1, 2, 1)]
    log = (tmp_path / "never" / "run.log").read_text()
    assert "no SuperNode with partition-id 2 has connected (waited up to 2 s)" in log


def test_answering_grid_passes_replies_through_and_answers_every_message(monkeypatch):
    set_task_identity(monkeypatch)
    from flwr.app import ConfigRecord, Message

    from app.learn.runtime import PARTITION_QUERY

    grid = InProcessGrid(client_app, 2)
    pm = sampling.PartitionMap(2)
    answering = sampling.AnsweringGrid(grid, pm)
    content = RecordDict({"config": ConfigRecord()})
    messages = [
        Message(content, dst_node_id=n, message_type=PARTITION_QUERY)
        for n in (100, 101, sampling.stand_in(5))
    ]
    replies = list(answering.send_and_receive(messages, timeout=5))
    assert [r.metadata.src_node_id for r in replies] == [100, 101, sampling.stand_in(5)]
    assert [r.has_error() for r in replies] == [False, False, True]
    assert "no SuperNode with partition-id 5 has connected" in replies[2].error.reason
