"""Strategy choice: Flower's own classes, with a thin layer on top.

``fedbn`` is Flower's FedAvg: what makes it FedBN is the state policy (``app/learn/state.py``),
under which BatchNorm layers never leave the clients. ``fedavgm``, ``fedadam``, ``fedyogi`` and
``fedadagrad`` are Flower's FedAvg too (sampling, messaging, the sample-weighted mean), followed
by the global model's own server optimizer (``app.learn.server_optim``), which steps the
trainable parameters only: BatchNorm statistics take the plain mean.

The layer (a mixin placed before the Flower class in the MRO) chooses each round's clients by
partition id from (seed, round) (``server.sampling``), counts successful and failed replies,
keeps each client's metrics for ``clients.csv``, and hands the replies to Flower sorted by
client, so floating-point sums run in the same order every run (determinism).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from logging import WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import strategy as fl
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from app.config import Config
from app.errors import FedwsError
from app.learn import diagnostics
from app.learn.server_optim import SERVER_OPTIMIZERS, ServerOptimizer
from server.sampling import EVALUATE, TRAIN, PartitionMap, sample_partitions

STRATEGY_CLASSES: dict[str, type[fl.FedAvg]] = {
    "fedavg": fl.FedAvg,
    "fedprox": fl.FedProx,
    "fedavgm": fl.FedAvg,  # + the server optimizer
    "fedadam": fl.FedAvg,
    "fedyogi": fl.FedAvg,
    "fedadagrad": fl.FedAvg,
    "fedbn": fl.FedAvg,  # + the FedBN state policy
}


NON_FINITE = "non-finite update"  # a reply's error: NaN or Inf in one of its arrays


class TooFewRepliesError(FedwsError):
    """A round ended with fewer successful client replies than ``federation.min_clients``."""


class RunDiverged(FedwsError):
    """The training stopped being finite: the global model's weights or test loss, or every
    client update short of ``federation.min_clients``. A result, not a crash."""

    def __init__(self, server_round: int, what: str) -> None:
        super().__init__(f"diverged at round {server_round}: {what}")
        self.server_round = server_round


class LocalStateLostError(FedwsError):
    """A client that trained before came back without its local state."""


@dataclass
class RoundReplies:
    """What one round's replies said, per client (keyed by partition id)."""

    ok: int = 0
    failed: int = 0
    rejected: int = 0  # replies with NaN/Inf in an array, left out of the aggregate
    eval_failed: int = 0  # evaluation replies that were errors (they never fail a round)
    errors: list[str] = field(default_factory=list)
    train: dict[int, dict[str, float]] = field(default_factory=dict)
    evaluate: dict[int, dict[str, float]] = field(default_factory=dict)
    diagnostics: list[dict[str, Any]] = field(default_factory=list)  # app.learn.diagnostics rows


def _metrics(msg: Message) -> dict[str, float]:
    record: MetricRecord = next(iter(msg.content.metric_records.values()))
    return {k: float(v) for k, v in record.items()}


def _client(msg: Message) -> int:
    return int(_metrics(msg)["partition-id"])


class _NumpyView(Mapping):
    """A reply's (or the sent) ``ArrayRecord`` read as numpy arrays one key at a time, so
    diagnostics hold one layer of every client at once, never every client's whole model."""

    def __init__(self, record: ArrayRecord | Message) -> None:
        if isinstance(record, Message):
            record = next(iter(record.content.array_records.values()))
        self.record = record

    def __getitem__(self, key: str) -> np.ndarray:
        return self.record[key].numpy()

    def __contains__(self, key: object) -> bool:
        return key in self.record  # without deserializing

    def __iter__(self):
        return iter(self.record)

    def __len__(self) -> int:
        return len(self.record)


def _finite(msg: Message) -> bool:
    """Every array of the reply is free of NaN and Inf."""
    return all(
        np.isfinite(array.numpy()).all()
        for record in msg.content.array_records.values()
        for array in record.values()
    )


class RecordingMixin:
    """Chooses the clients, records replies into ``self.rounds``, sorts them by client before
    Flower aggregates and applies the server optimizer to the mean.

    ``round_offset`` lets a resumed run continue at round k + 1: Flower's ``start`` counts
    from 1, the clients and the records see the true round. With ``groups`` set (a
    ``layer_groups`` map), each round's record also gets the drift, update-agreement and
    BN-statistics diagnostics of ``app.learn.diagnostics``.
    """

    _sent: ArrayRecord  # the arrays sent this round
    _dtypes: dict[str, str]  # ... and their dtypes

    def __init__(
        self,
        *,
        clients: ClientSampler,
        min_replies: int = 1,
        server_optimizer: ServerOptimizer | None = None,
        groups: dict[str, str] | None = None,
        bn_layers: tuple[str, ...] = (),
        **flower: Any,
    ) -> None:
        """``clients`` chooses each round's clients; ``min_replies`` usable replies a round
        needs; ``server_optimizer`` steps the mean (FedAvgM, FedAdam, ...); ``groups`` (a
        trainable parameter key -> layer group map) and ``bn_layers`` turn the diagnostics on;
        ``flower``: the Flower strategy's own arguments."""
        super().__init__(**flower)
        self.clients, self.min_replies = clients, min_replies
        self.server_optimizer, self.groups, self.bn_layers = server_optimizer, groups, bn_layers
        self.rounds: dict[int, RoundReplies] = {}
        self.round_offset = 0
        self.trained: set[int] = set()  # clients that trained before (their state: their node)

    def resume(self, done: int, trained: set[int]) -> None:
        """Continue an interrupted run after round ``done`` (``restore`` brings the server
        optimizer's state back): rounds count on from there; ``trained``: the clients that
        trained in the rounds kept (their state is on their nodes)."""
        self.round_offset, self.trained = done, set(trained)

    def _messages(self, phase: int, server_round: int, arrays, config, grid) -> list[Message]:
        server_round += self.round_offset
        nodes = self.clients.nodes(grid, server_round, phase)
        config["server-round"] = server_round
        if isinstance(self, fl.FedProx):  # what Flower's FedProx adds to the config
            config["proximal-mu"] = self.proximal_mu
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        kind = MessageType.TRAIN if phase == TRAIN else MessageType.EVALUATE
        return list(self._construct_messages(record, nodes, kind))

    def configure_train(self, server_round: int, arrays, config, grid):
        self._sent = arrays
        self._dtypes = {k: a.dtype for k, a in arrays.items()}
        return self._messages(TRAIN, server_round, arrays, config, grid)

    def configure_evaluate(self, server_round: int, arrays, config, grid):
        if self.fraction_evaluate == 0.0:
            return []
        return self._messages(EVALUATE, server_round, arrays, config, grid)

    # --- what a resumed run needs of the strategy ------------------------------------------

    def state(self) -> dict[str, Any]:
        """The server optimizer's state (``torch.load(weights_only=True)`` safe)."""
        if self.server_optimizer is None:
            return {}
        return {"server_optimizer": self.server_optimizer.state_dict()}

    def restore(self, state: dict[str, Any]) -> None:
        """Undo ``state()``."""
        if self.server_optimizer is not None and "server_optimizer" in state:
            self.server_optimizer.load_state_dict(state["server_optimizer"])

    def _split(self, replies: Iterable[Message], record: RoundReplies) -> list[Message]:
        ok, failed = [], []
        for msg in replies:
            (failed if msg.has_error() else ok).append(msg)
        record.failed += len(failed)
        record.errors += [f"node {m.metadata.src_node_id}: {m.error.reason}" for m in failed]
        return sorted(ok, key=_client)

    def _check_local_state(self, replies: list[Message]) -> None:
        """A client that trained before must find its local state (FedBN layers) on its node:
        starting again from fresh layers would be a silent error in every later number."""
        for msg in replies:
            metrics = _metrics(msg)
            client = int(metrics["partition-id"])
            if metrics.get("local-state-round", -1) == 0 and client in self.trained:
                raise LocalStateLostError(
                    f"client {client} trained in an earlier round, but its node holds no local "
                    "state for this run: was its state folder deleted, or did FEDWS_CACHE, "
                    "HOME or the node's state-dir change since? (see README, client state)"
                )

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        """Record the round's replies, keep the usable ones, take Flower's weighted mean and
        step it with the server optimizer, if any; the diagnostics go into the record."""
        server_round += self.round_offset
        record = self.rounds.setdefault(server_round, RoundReplies())
        ok = self._usable(self._split(replies, record), record)
        self._record_trained(server_round, ok, record)
        arrays, metrics = super().aggregate_train(server_round, ok)
        if arrays is not None:
            aggregate = self._server_step(arrays)
            arrays = ArrayRecord({k: Array(v) for k, v in aggregate.items()})
            if self.groups is not None:
                record.diagnostics = self._diagnose([_NumpyView(m) for m in ok], aggregate)
        return arrays, metrics

    def _usable(self, ok: list[Message], record: RoundReplies) -> list[Message]:
        """The replies whose every array is finite; the others counted as rejected."""
        self._check_local_state(ok)
        usable = [_finite(m) for m in ok]
        record.rejected = usable.count(False)
        record.errors += [
            f"client {_client(m)}: {NON_FINITE}" for m, u in zip(ok, usable, strict=True) if not u
        ]
        return [m for m, u in zip(ok, usable, strict=True) if u]

    def _record_trained(self, server_round: int, ok: list[Message], record: RoundReplies):
        """Who trained this round; too few usable replies stop the run (one line)."""
        record.ok = len(ok)
        record.train = {_client(m): _metrics(m) for m in ok}
        self.trained |= set(record.train)
        if len(ok) >= self.min_replies:
            return
        # short because updates were non-finite, not because replies failed: had the updates
        # been finite the round would have had enough, had the failed replies come it would not
        if len(ok) + record.failed < self.min_replies <= len(ok) + record.rejected:
            first = next(e for e in record.errors if e.endswith(NON_FINITE))
            raise RunDiverged(
                server_round,
                f"{record.rejected} non-finite client updates left {len(ok)} usable, "
                f"federation.min_clients is {self.min_replies}; first: {first}",
            )
        detail = f"; first error: {record.errors[0]}" if record.errors else ""
        raise TooFewRepliesError(
            f"round {server_round}: {len(ok)} usable client replies, "
            f"federation.min_clients is {self.min_replies}{detail}"
        )

    def _server_step(self, arrays: ArrayRecord) -> dict[str, np.ndarray]:
        """Flower's weighted mean in the model's dtypes, stepped by the server optimizer
        (trainable parameters only) when the strategy has one."""
        aggregate = {k: np.asarray(a.numpy(), dtype=self._dtypes[k]) for k, a in arrays.items()}
        if self.server_optimizer is None:
            return aggregate
        previous = {k: torch.from_numpy(a.numpy()) for k, a in self._sent.items()}
        mean = {k: torch.from_numpy(v) for k, v in aggregate.items()}
        stepped = self.server_optimizer.step(previous, mean)
        return {k: v.numpy().astype(self._dtypes[k]) for k, v in stepped.items()}

    def _diagnose(self, clients: list[Mapping], aggregate: dict[str, np.ndarray]):
        rows = diagnostics.update_rows(_NumpyView(self._sent), clients, self.groups)
        divergence = diagnostics.bn_divergence(clients, aggregate, list(self.bn_layers))
        return rows + diagnostics.with_layer_mean(divergence, "bn_divergence")

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        server_round += self.round_offset
        record = self.rounds.setdefault(server_round, RoundReplies())
        counted = RoundReplies()
        ok = self._split(replies, counted)  # evaluation failures do not fail a round
        self._check_local_state(ok)
        record.eval_failed = counted.failed
        if counted.failed:
            log(
                WARNING,
                "round %d: %d evaluation replies failed: %s",
                server_round,
                counted.failed,
                "; ".join(counted.errors[:3]),
            )
        record.evaluate = {_client(m): _metrics(m) for m in ok}
        return super().aggregate_evaluate(server_round, ok)


def aggregate_client_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Flower's weighted average of reply metrics, minus the client id (not a quantity)."""
    metrics = aggregate_metricrecords(records, weight_key)
    metrics.pop("partition-id", None)
    return metrics


def build_strategy(cfg: Config, model: torch.nn.Module | None = None) -> fl.FedAvg:
    """The configured Flower strategy, with the recording layer; ``.rounds`` holds the records.
    Under a server-optimizer strategy, ``model`` (the global model) is what it steps."""
    fed = cfg.federation
    base = STRATEGY_CLASSES[fed.strategy]
    cls = type(f"Recording{base.__name__}", (RecordingMixin, base), {})
    n = cfg.data.partition.num_clients
    evaluate_fraction = fed.fraction_evaluate if cfg.data.val_fraction > 0 else 0.0
    server_optimizer = None
    if fed.strategy in SERVER_OPTIMIZERS:
        if model is None:
            raise ValueError(f"{fed.strategy} needs the global model for its server optimizer")
        server_optimizer = ServerOptimizer(model, fed)
    diagnosed = cfg.server.diagnostics and model is not None
    return cls(
        clients=ClientSampler(cfg, evaluate_fraction),
        min_replies=fed.min_clients,
        server_optimizer=server_optimizer,
        groups=diagnostics.layer_groups(model) if diagnosed else None,
        bn_layers=tuple(diagnostics.bn_layers(model)) if diagnosed else (),
        fraction_train=fed.fraction_train,
        fraction_evaluate=evaluate_fraction,
        min_train_nodes=min(fed.min_clients, n),
        min_evaluate_nodes=1 if evaluate_fraction > 0 else 0,
        min_available_nodes=n,
        train_metrics_aggr_fn=aggregate_client_metrics,
        evaluate_metrics_aggr_fn=aggregate_client_metrics,
        **fed.strategy_options(),
    )


class ClientSampler:
    """Each round's clients by partition id (``server.sampling``), as the nodes holding them."""

    def __init__(self, cfg: Config, evaluate_fraction: float) -> None:
        fed, n = cfg.federation, cfg.data.partition.num_clients
        self.seed, self.num_clients = cfg.seed, n
        self.fraction = {TRAIN: fed.fraction_train, EVALUATE: evaluate_fraction}
        self.at_least = {TRAIN: min(fed.min_clients, n), EVALUATE: 1}
        # a round waits for (then goes on without) lost nodes while min_clients of them are there
        self.map = PartitionMap(n, min_nodes=min(fed.min_clients, n))

    def partitions(self, server_round: int, phase: int) -> list[int]:
        return sample_partitions(
            self.seed,
            server_round,
            self.num_clients,
            self.fraction[phase],
            self.at_least[phase],
            phase,
        )

    def nodes(self, grid, server_round: int, phase: int) -> list[int]:
        return self.map.nodes(grid, self.partitions(server_round, phase))
