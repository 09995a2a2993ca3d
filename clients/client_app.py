"""The Flower ClientApp: local Lightning fit and evaluation on this node's shard.

Thin by design (Flower's quickstart-pytorch-lightning habit): the model, data and state policy
live in ``app/``. The node's shard is chosen by ``partition-id`` in its node config; its local
state is kept on the node (``clients.local_state``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from app.config import Config
from app.data.partitions import ClientShard
from app.errors import ConfigError
from app.learn.classifier import FedwsClassifier
from app.learn.runtime import (
    CONFIG_KEY,
    PARTITION_KEY,
    RUN_KEY,
    config_from_text,
    dataset,
    domain_test,
    domains,
    new_module,
    round_seed,
    shard_on,
)
from app.learn.state import StatePolicy, load_partial, select, state_policy
from app.learn.trainer import make_trainer, quiet_lightning, tensor_loader
from clients.local_state import LocalStateStore, state_root

# Lightning's fork check can hang inside Ray actors (see Lightning issue 18640 and Flower docs)
os.environ.setdefault("PL_DISABLE_FORK", "1")
LOCAL_STATE_KEY = "fedws.local"  # Context.state entry: tensors that never leave this node
LOCAL_ROUND_KEY = "fedws.local-round"  # ... and the round they come from

app = ClientApp()


@dataclass
class Local:
    """What one message works with on this node."""

    cfg: Config
    shard: ClientShard
    module: FedwsClassifier
    policy: StatePolicy
    store: LocalStateStore
    server_round: int
    state_round: int  # the round of the local state loaded (0: none, fresh layers)


def _prepare(msg: Message, context: Context, before_round: int) -> Local:
    """Config from the message, this node's shard, and the model holding the global arrays
    plus this client's newest local state (FedBN layers, BN counters) from a round before
    ``before_round``: kept in ``Context.state`` while this process lives, on this node's disk
    for the next process (a resumed run, a restarted node)."""
    quiet_lightning()
    config = msg.content["config"]
    cfg = _node_config(config_from_text(str(config[CONFIG_KEY])), context)
    client = _partition(context)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the GPU Ray gave us
    local_shard = shard_on(cfg.data, client, device)
    module = new_module(cfg, dataset(cfg.data))
    policy = state_policy(module.model, cfg.federation.strategy)
    load_partial(module.model, msg.content["arrays"].to_torch_state_dict(), policy.travel)
    store = LocalStateStore(state_root(context.node_config), str(config[RUN_KEY]), client)
    state_round, local = _newest_state(context, store, before_round)
    if local is not None:
        load_partial(module.model, local, policy.local)
    server_round = int(config["server-round"])
    return Local(cfg, local_shard, module, policy, store, server_round, state_round)


def _node_config(cfg: Config, context: Context) -> Config:
    """The run's config as this node sees it: its own copy of the data (``data-path``), and a
    node count that must match the config's client count (a one-line ConfigError if not)."""
    if context.node_config.get("data-path"):  # a deployed node's own copy of the data
        data = dataclasses.replace(cfg.data, root=str(context.node_config["data-path"]))
        cfg = dataclasses.replace(cfg, data=data)
    num_partitions = int(context.node_config["num-partitions"])
    if num_partitions != cfg.data.partition.num_clients:
        raise ConfigError(
            "data.partition.num_clients",
            f"this federation has {num_partitions} nodes but the config says "
            f"{cfg.data.partition.num_clients}: they must match",
        )
    return cfg


def _partition(context: Context) -> int:
    return int(context.node_config["partition-id"])


def _newest_state(
    context: Context, store: LocalStateStore, before_round: int
) -> tuple[int, dict[str, torch.Tensor] | None]:
    """(round, state) of this client's newest local state from a round < ``before_round``;
    (0, None) when it has none (it never trained)."""
    if LOCAL_STATE_KEY in context.state:  # this process's, if of this run (a study shares
        held = context.state[LOCAL_ROUND_KEY]  # its client processes between its runs)
        if held["run"] != store.run_key:  # an earlier run's: never used, never carried on
            del context.state[LOCAL_STATE_KEY], context.state[LOCAL_ROUND_KEY]
        elif int(held["round"]) < before_round:
            return int(held["round"]), context.state[LOCAL_STATE_KEY].to_torch_state_dict()
    saved = store.load(before_round)
    if saved is None:
        return 0, None
    _keep(context, store.run_key, *saved)
    return saved


def _keep(
    context: Context, run_key: str, server_round: int, local: dict[str, torch.Tensor]
) -> None:
    context.state[LOCAL_STATE_KEY] = ArrayRecord(local)
    context.state[LOCAL_ROUND_KEY] = ConfigRecord({"round": server_round, "run": run_key})


def _validate(cfg: Config, module: FedwsClassifier, local_shard: ClientShard) -> dict[str, float]:
    if local_shard.num_val == 0:
        return {"val_accuracy": math.nan, "val_loss": math.nan}
    loader = tensor_loader(local_shard.x_val, local_shard.y_val, cfg.train.eval_batch_size)
    (metrics,) = make_trainer(cfg).validate(module, loader, verbose=False)
    return {"val_accuracy": float(metrics["val_acc"]), "val_loss": float(metrics["val_loss"])}


@app.query("partition")
def partition(msg: Message, context: Context) -> Message:
    """Which partition this node holds: the server samples clients by partition id."""
    metrics = MetricRecord(
        {
            PARTITION_KEY: _partition(context),
            "num-partitions": int(context.node_config["num-partitions"]),
        }
    )
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One local fit: the global model (with this client's local state) on this node's shard,
    then the arrays that travel and the fit's metrics back to the server."""
    server_round = int(msg.content["config"]["server-round"])
    local = _prepare(msg, context, before_round=server_round)
    _inject_failure(local.cfg, local.shard.client, server_round)
    train_loss, fit_s = _fit(local)
    val = _validate(local.cfg, local.module, local.shard)
    state = {k: v.detach().cpu() for k, v in local.module.model.state_dict().items()}
    _keep_local_state(context, local, state)
    _inject_nan(local.cfg, local.shard.client, server_round, state, local.policy)
    metrics = MetricRecord(
        {
            "num-examples": local.shard.num_train,
            PARTITION_KEY: local.shard.client,
            "train_loss": train_loss,
            "fit_s": fit_s,
            "local-state-round": local.state_round if local.policy.personal else -1,
            **val,
        }
    )
    arrays = ArrayRecord(select(state, local.policy.travel))
    return Message(content=RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


def _fit(local: Local) -> tuple[float, float]:
    """The Lightning fit of this round (seeded by (seed, round, client)); (train loss, seconds).
    FedProx's anchor and FixBN's freeze are set on the module first."""
    cfg, module, shard = local.cfg, local.module, local.shard
    if module.hparams.proximal_mu > 0:
        module.set_global_weights()
    frozen_after = cfg.bn_statistics_frozen_after
    module.bn_statistics_frozen = frozen_after is not None and local.server_round > frozen_after
    seed = round_seed(cfg, local.server_round, shard.client)
    torch.manual_seed(seed)
    loader = tensor_loader(shard.x_train, shard.y_train, cfg.train.batch_size, True, seed)
    if cfg.train.local_steps is not None:
        trainer = make_trainer(cfg, max_steps=cfg.train.local_steps, max_epochs=-1)
    else:
        trainer = make_trainer(cfg, max_epochs=cfg.train.local_epochs)
    start = time.perf_counter()
    trainer.fit(module, loader)
    fit_s = time.perf_counter() - start
    return float(trainer.callback_metrics["train_loss"]), fit_s


def _keep_local_state(context: Context, local: Local, state: dict[str, torch.Tensor]) -> None:
    """What never leaves this node (FedBN's BN layers, BN counters): in memory and on disk."""
    kept = select(state, local.policy.local)
    if kept:
        _keep(context, local.store.run_key, local.server_round, kept)
        local.store.save(local.server_round, kept)


def _inject_failure(cfg: Config, client: int, server_round: int) -> None:
    """Fault injection (``fault_injection``, robustness tests only): this client raises."""
    if cfg.fault_injection.fails(client, server_round):
        raise RuntimeError(f"injected fault: client {client}, round {server_round}")


def _inject_nan(
    cfg: Config, client: int, server_round: int, state: dict, policy: StatePolicy
) -> None:
    """Fault injection (robustness tests only): this client replies with NaN weights."""
    if cfg.fault_injection.poisons(client, server_round):
        state[policy.travel[0]] = torch.full_like(state[policy.travel[0]], float("nan"))


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """The personalised view: the global model (with this client's local layers) on local
    data. A client whose strategy keeps layers on the node (FedBN) but that never trained has
    no such layers yet: it reports ``local-state-round`` 0 and no accuracy, never the score of
    untrained layers."""
    server_round = int(msg.content["config"]["server-round"])
    local = _prepare(msg, context, before_round=server_round + 1)
    personal = bool(local.policy.personal)
    untrained = personal and local.state_round == 0
    if untrained:
        val = {"val_accuracy": math.nan, "val_loss": math.nan}
    else:
        val = _validate(local.cfg, local.module, local.shard)
    metrics = MetricRecord(
        {
            "num-examples": local.shard.num_val,
            PARTITION_KEY: local.shard.client,
            "local-state-round": local.state_round if personal else -1,
            **val,
        }
    )
    doms = domains(local.cfg.data)
    if doms is not None and personal:  # its domain's test images, with its own BN layers
        d = doms.of_client(local.shard.client)
        test = {"test_acc": math.nan, "test_loss": math.nan}
        if not untrained:
            x, y = domain_test(local.cfg.data, d)
            loader = tensor_loader(x, y, local.cfg.train.eval_batch_size)
            (test,) = make_trainer(local.cfg).test(local.module, loader, verbose=False)
        metrics["domain"] = d
        metrics["domain-test-accuracy"] = float(test["test_acc"])
        metrics["domain-test-loss"] = float(test["test_loss"])
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
