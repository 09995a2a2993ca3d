"""Which clients take part in a round: partition ids drawn from (seed, round, phase), sent to the
nodes that hold them.

Flower's strategies sample *node ids* with ``random.sample``; in the simulation runtime node ids
are random per process, so the same config and seed would pick different clients each run and a
resumed run could not replay the choice. A client's stable name is its ``partition-id`` (node
config): fedws draws partition ids from a generator seeded by (seed, round, phase) alone and
asks each node once, with a ``query.partition`` message, which partition it holds. Two
processes, a resumed run and a deployment with the same partitions choose the same clients.

A deployment loses nodes (a machine reboots, a SuperNode is killed): a drawn partition whose node
is not connected is sent to a *stand-in* node id (negative: Flower's node ids are unsigned) that
``AnsweringGrid`` answers at once with an error, and a node that never replies gets an error
reply too. So the strategy counts every lost client in ``clients_failed`` with its reason, the
round goes on with the others (``federation.min_clients`` still applies), and a node that comes
back (under a new node id) says its partition when asked and takes part again.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import INFO, WARNING

import numpy as np
from flwr.app import ConfigRecord, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.serverapp import Grid

from app.errors import FedwsError
from app.learn.runtime import PARTITION_KEY, PARTITION_QUERY

TRAIN, EVALUATE = 0, 1  # the phase, so training and evaluation draw independently
QUERY_TIMEOUT_S = 120.0  # how long the partition query waits for the nodes' answers
NODE_WAIT_S = 300.0  # how long a round waits for the nodes it needs (see PartitionMap.nodes)
WAIT_LOG_S = 30.0  # how often the wait says what it waits for


def sample_partitions(
    seed: int, server_round: int, num_clients: int, fraction: float, at_least: int, phase: int
) -> list[int]:
    """The partition ids taking part in ``phase`` of ``server_round``, sorted: ``max(floor(
    num_clients * fraction), at_least)`` of them (Flower's sample size rule), all when that is
    every client, else a uniform draw without replacement seeded by (seed, round, phase)."""
    k = min(num_clients, max(int(num_clients * fraction), at_least))
    if k >= num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng([seed, server_round, phase])
    return sorted(int(i) for i in rng.choice(num_clients, size=k, replace=False))


def stand_in(partition: int) -> int:
    """The node id a message for ``partition`` goes to while no connected node holds it."""
    return -1 - partition


def _stood_in(node: int) -> int | None:
    """The partition ``node`` stands in for, or None for a real node."""
    return -1 - node if node < 0 else None


class PartitionMap:
    """Partition id -> node id, learned from the nodes themselves and refreshed each round (a
    restarted SuperNode can come back under a new node id; one with a registered key keeps its
    id).

    Waiting: the first round waits up to ``wait_s`` for a node of every partition (they connect
    as they start); a later round waits up to ``wait_s`` only while fewer than ``min_nodes`` of
    its partitions have a connected node. Then the round goes on: a partition without a node
    gets its ``stand_in`` id, and the strategy counts that client as failed."""

    def __init__(
        self, num_clients: int, poll_s: float = 1.0, wait_s: float | None = None, min_nodes: int = 1
    ) -> None:
        self.num_clients = num_clients
        self.poll_s = poll_s
        self.wait_s = NODE_WAIT_S if wait_s is None else wait_s
        self.min_nodes = min_nodes
        self.started = False
        self.partition_of: dict[int, int] = {}  # node id -> partition id
        self.last_node: dict[int, int] = {}  # partition id -> the node that held it last

    def _ask(self, grid: Grid, nodes: list[int]) -> None:
        """Learn the partition of each of ``nodes``; one that does not answer (gone, or a
        stale id of a restarted node) is left out."""
        content = RecordDict({"config": ConfigRecord()})
        messages = [Message(content, dst_node_id=n, message_type=PARTITION_QUERY) for n in nodes]
        for reply in grid.send_and_receive(messages, timeout=QUERY_TIMEOUT_S):
            node = reply.metadata.src_node_id
            if reply.has_error():
                log(
                    WARNING,
                    "node %s did not say which partition it holds: %s",
                    node,
                    reply.error.reason,
                )
                continue
            metrics = next(iter(reply.content.metric_records.values()))
            self.partition_of[node] = int(metrics[PARTITION_KEY])

    def _holders(self) -> dict[int, list[int]]:
        holders: dict[int, list[int]] = {}
        for node, partition in sorted(self.partition_of.items()):
            holders.setdefault(partition, []).append(node)
        return holders

    def holders(self, grid: Grid) -> dict[int, int]:
        """Partition -> the connected node holding it, asking the nodes not asked yet."""
        connected = set(grid.get_node_ids())
        self.partition_of = {n: p for n, p in self.partition_of.items() if n in connected}
        unknown = sorted(n for n in connected if n not in self.partition_of)
        if unknown:
            self._ask(grid, unknown)
        doubtful = [n for ns in self._holders().values() if len(ns) > 1 for n in ns]
        if doubtful:  # a restarted node can still be listed under its old id: ask again
            for node in doubtful:
                del self.partition_of[node]
            self._ask(grid, doubtful)
        twice = {p: ns for p, ns in self._holders().items() if len(ns) > 1}
        if twice:
            p, ns = min(twice.items())
            raise FedwsError(
                f"partition {p} is held by {len(ns)} nodes ({ns}): each node needs its own "
                "partition-id"
            )
        outside = {p: ns for p, ns in self._holders().items() if not 0 <= p < self.num_clients}
        if outside:
            p, ns = min(outside.items())
            raise FedwsError(
                f"node {ns[0]} holds partition {p}, but the config has {self.num_clients} "
                f"clients: give the SuperNodes partition-id 0..{self.num_clients - 1}"
            )
        held = {p: ns[0] for p, ns in self._holders().items()}
        self.last_node.update(held)
        return held

    def _wait(self, grid: Grid, needed: int, partitions: list[int]) -> dict[int, int]:
        """``holders``, polled until ``needed`` of ``partitions`` have a node or ``wait_s``
        has passed."""
        start = time.monotonic()
        said = -WAIT_LOG_S
        while True:
            held = self.holders(grid)
            have = sum(p in held for p in partitions)
            waited = time.monotonic() - start
            if have >= needed or waited >= self.wait_s:
                return held
            if waited - said >= WAIT_LOG_S:
                log(
                    INFO,
                    "Waiting for nodes: %d of %d partitions held by a connected node "
                    "(the round goes on without the others after %.0f s)",
                    have,
                    len(partitions),
                    self.wait_s,
                )
                said = waited
            time.sleep(self.poll_s)

    def nodes(self, grid: Grid, partitions: list[int]) -> list[int]:
        """The node ids holding ``partitions`` (in that order); ``stand_in(p)`` for a
        partition that no connected node holds after the wait (see the class)."""
        if self.started:
            held = self._wait(grid, min(self.min_nodes, len(partitions)), partitions)
        else:
            held = self._wait(grid, self.num_clients, list(range(self.num_clients)))
            self.started = True
        missing = [p for p in partitions if p not in held]
        if missing:
            log(
                WARNING,
                "no connected node holds partition(s) %s: the round goes on without them",
                missing,
            )
        return [held.get(p, stand_in(p)) for p in partitions]

    def why_absent(self, partition: int) -> str:
        """Why a message for ``partition`` went to its stand-in."""
        last = self.last_node.get(partition)
        if last is None:
            return (
                f"no SuperNode with partition-id {partition} has connected (waited up to "
                f"{self.wait_s:.0f} s)"
            )
        return (
            f"node {last}, which held partition {partition}, is no longer connected to the "
            "SuperLink (a node that reconnects takes part again)"
        )


class AnsweringGrid(Grid):
    """The runtime's Grid, with an answer to every message: one sent to a ``stand_in`` node is
    answered at once with an error saying why (the partition has no connected node), and one
    that got no reply within the timeout (a node lost mid-round, whose reply is just absent
    from what Flower returns) gets an error reply too. Every error reply of a train or evaluate
    message is logged with its client and reason (the run's ``run.log``), and the strategy
    counts it in ``clients_failed`` (``eval_failed``) like a client that raised."""

    def __init__(self, grid: Grid, partitions: PartitionMap) -> None:
        self.grid = grid
        self.partitions = partitions

    def set_run(self, run) -> None:
        self.grid.set_run(run)

    @property
    def run(self):
        return self.grid.run

    def create_message(self, *args, **kwargs) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self):
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        real = [m for m in messages if _stood_in(m.metadata.dst_node_id) is None]
        received = list(self.grid.send_and_receive(real, timeout=timeout)) if real else []
        replies, answered = [], set()
        for reply in received:
            sent = _replied_to(reply, real)
            if sent is not None:
                answered.add(id(sent))
                if reply.has_error() and reply.metadata.src_node_id != sent.metadata.dst_node_id:
                    # Flower's own "Node Unavailable" comes from the SuperLink (node id 1):
                    # the same error, from the node that was lost
                    reply = Message(reply.error, reply_to=sent)
            replies.append(reply)
        for msg in messages:
            partition = _stood_in(msg.metadata.dst_node_id)
            if partition is not None:
                reason = self.partitions.why_absent(partition)
            elif id(msg) not in answered:
                waited = "" if timeout is None else f" within {timeout:g} s"
                reason = f"no reply{waited}: the node was lost mid-round"
            else:
                continue
            replies.append(Message(Error(ErrorCode.NODE_UNAVAILABLE, reason), reply_to=msg))
        for reply in replies:
            if reply.has_error() and reply.metadata.message_type != PARTITION_QUERY:
                node = reply.metadata.src_node_id
                client = _stood_in(node)
                client = self.partitions.partition_of.get(node, "?") if client is None else client
                log(
                    WARNING,
                    "%s: client %s (node %s) failed: %s",
                    reply.metadata.message_type,
                    client,
                    node,
                    reply.error.reason,
                )
        return replies


def _replied_to(reply: Message, sent: list[Message]) -> Message | None:
    """The message of ``sent`` that ``reply`` answers: by message id (the runtimes set it when
    they push a message), else by node (one message per node and call)."""
    wanted = reply.metadata.reply_to_message_id
    if wanted:
        for msg in sent:
            if msg.metadata.message_id == wanted:
                return msg
    return next((m for m in sent if m.metadata.dst_node_id == reply.metadata.src_node_id), None)
