"""Strategy choice: Flower's own classes, with a thin recording layer on top.

``fedbn`` is Flower's FedAvg: what makes it FedBN is the state policy (``app/state.py``), under
which BatchNorm layers never leave the clients. The recording layer (a mixin placed before the
Flower class in the MRO) counts successful and failed replies, keeps each client's metrics for
``clients.csv``, and hands the replies to Flower sorted by client, so floating-point sums run in
the same order every run (determinism).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import Message, MetricRecord, RecordDict
from flwr.serverapp import strategy as fl
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from app.config import Config
from app.errors import FedwsError

STRATEGY_CLASSES: dict[str, type[fl.FedAvg]] = {
    "fedavg": fl.FedAvg,
    "fedprox": fl.FedProx,
    "fedavgm": fl.FedAvgM,
    "fedadam": fl.FedAdam,
    "fedyogi": fl.FedYogi,
    "fedadagrad": fl.FedAdagrad,
    "fedbn": fl.FedAvg,
}


class TooFewRepliesError(FedwsError):
    """A round ended with fewer successful client replies than ``federation.min_clients``."""


@dataclass
class RoundReplies:
    """What one round's replies said, per client (keyed by partition id)."""

    ok: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    train: dict[int, dict[str, float]] = field(default_factory=dict)
    evaluate: dict[int, dict[str, float]] = field(default_factory=dict)


def _metrics(msg: Message) -> dict[str, float]:
    record: MetricRecord = next(iter(msg.content.metric_records.values()))
    return {k: float(v) for k, v in record.items()}


def _client(msg: Message) -> int:
    return int(_metrics(msg)["partition-id"])


class RecordingMixin:
    """Records replies into ``self.rounds`` and sorts them by client before Flower aggregates."""

    min_replies: int = 1
    rounds: dict[int, RoundReplies]

    def _split(self, replies: Iterable[Message], record: RoundReplies) -> list[Message]:
        ok, failed = [], []
        for msg in replies:
            (failed if msg.has_error() else ok).append(msg)
        record.failed += len(failed)
        record.errors += [f"node {m.metadata.src_node_id}: {m.error.reason}" for m in failed]
        return sorted(ok, key=_client)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        record = self.rounds.setdefault(server_round, RoundReplies())
        ok = self._split(replies, record)
        record.ok = len(ok)
        record.train = {_client(m): _metrics(m) for m in ok}
        if len(ok) < self.min_replies:
            detail = f"; first error: {record.errors[0]}" if record.errors else ""
            raise TooFewRepliesError(
                f"round {server_round}: {len(ok)} successful client replies, "
                f"federation.min_clients is {self.min_replies}{detail}"
            )
        return super().aggregate_train(server_round, ok)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        record = self.rounds.setdefault(server_round, RoundReplies())
        ok = self._split(replies, RoundReplies())  # evaluation failures do not fail a round
        record.evaluate = {_client(m): _metrics(m) for m in ok}
        return super().aggregate_evaluate(server_round, ok)


def aggregate_client_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Flower's weighted average of reply metrics, minus the client id (not a quantity)."""
    metrics = aggregate_metricrecords(records, weight_key)
    metrics.pop("partition-id", None)
    return metrics


def build_strategy(cfg: Config) -> fl.FedAvg:
    """The configured Flower strategy, with the recording layer; ``.rounds`` holds the records."""
    fed = cfg.federation
    base = STRATEGY_CLASSES[fed.strategy]
    cls = type(f"Recording{base.__name__}", (RecordingMixin, base), {})
    n = cfg.data.partition.num_clients
    evaluate_fraction = fed.fraction_evaluate if cfg.data.val_fraction > 0 else 0.0
    strategy = cls(
        fraction_train=fed.fraction_train,
        fraction_evaluate=evaluate_fraction,
        min_train_nodes=min(fed.min_clients, n),
        min_evaluate_nodes=1 if evaluate_fraction > 0 else 0,
        min_available_nodes=n,
        train_metrics_aggr_fn=aggregate_client_metrics,
        evaluate_metrics_aggr_fn=aggregate_client_metrics,
        **fed.strategy_options(),
    )
    strategy.min_replies = fed.min_clients
    strategy.rounds = {}
    return strategy
