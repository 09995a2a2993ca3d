"""Which clients take part in a round: partition ids drawn from (seed, round, phase), sent to the
nodes that hold them.

Flower's strategies sample *node ids* with ``random.sample``; in the simulation runtime node ids
are random per process, so the same config and seed would pick different clients each run and a
resumed run could not replay the choice. A client's stable name is its ``partition-id`` (node
config): fedws draws partition ids from a generator seeded by (seed, round, phase) alone and
asks each node once, with a ``query.partition`` message, which partition it holds. Two
processes, a resumed run and a deployment with the same partitions choose the same clients.
"""

from __future__ import annotations

import time
from logging import INFO, WARNING

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from app.errors import FedwsError
from app.learn.runtime import PARTITION_KEY, PARTITION_QUERY

TRAIN, EVALUATE = 0, 1  # the phase, so training and evaluation draw independently
QUERY_TIMEOUT_S = 120.0  # how long the partition query waits for the nodes' answers


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


class PartitionMap:
    """Partition id -> node id, learned from the nodes themselves and refreshed when the set of
    connected nodes changes (a node that restarts in a deployment gets a new node id)."""

    def __init__(self, num_clients: int, poll_s: float = 1.0) -> None:
        self.num_clients = num_clients
        self.poll_s = poll_s
        self.partition_of: dict[int, int] = {}  # node id -> partition id

    def _connected(self, grid: Grid) -> list[int]:
        polls = 0
        while len(nodes := list(grid.get_node_ids())) < self.num_clients:
            if polls % 30 == 0:
                log(INFO, "Waiting for nodes: %d of %d connected", len(nodes), self.num_clients)
            time.sleep(self.poll_s)
            polls += 1
        return nodes

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

    def nodes(self, grid: Grid, partitions: list[int]) -> list[int]:
        """The node ids holding ``partitions`` (in that order)."""
        connected = self._connected(grid)
        self.partition_of = {n: p for n, p in self.partition_of.items() if n in connected}
        unknown = [n for n in connected if n not in self.partition_of]
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
        holders = self._holders()
        missing = [p for p in partitions if p not in holders]
        if missing:
            raise FedwsError(
                f"no connected node holds partition(s) {missing} of {self.num_clients}: "
                "start one SuperNode per partition (partition-id 0..num_clients-1)"
            )
        return [holders[p][0] for p in partitions]
