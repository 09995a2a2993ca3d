"""The Flower ClientApp: local Lightning fit and evaluation on this node's shard.

Thin by design (Flower's quickstart-pytorch-lightning habit): the model, data and state policy
live in ``app/``. The node's shard is chosen by ``partition-id`` in its node config.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from app.config import Config
from app.data.partitions import ClientShard
from app.learn.classifier import FedwsClassifier
from app.learn.runtime import (
    CONFIG_KEY,
    STATE_DIR_KEY,
    config_from_text,
    dataset,
    new_module,
    round_seed,
    shard_on,
)
from app.learn.state import StatePolicy, load_partial, select, state_policy
from app.learn.trainer import make_trainer, quiet_lightning, tensor_loader

# Lightning's fork check can hang inside Ray actors (see Lightning issue 18640 and Flower docs)
os.environ.setdefault("PL_DISABLE_FORK", "1")
LOCAL_STATE_KEY = "fedws.local"  # Context.state entry: tensors that never leave this node

app = ClientApp()


def _prepare(
    msg: Message, context: Context
) -> tuple[Config, ClientShard, FedwsClassifier, StatePolicy]:
    """Config from the message, this node's shard, and the model holding the global arrays
    plus this node's local state (FedBN layers, BN counters) from earlier rounds."""
    quiet_lightning()
    cfg = config_from_text(str(msg.content["config"][CONFIG_KEY]))
    if context.node_config.get("data-path"):  # a deployed node's own copy of the data
        data = dataclasses.replace(cfg.data, root=str(context.node_config["data-path"]))
        cfg = dataclasses.replace(cfg, data=data)
    client = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    if num_partitions != cfg.data.partition.num_clients:
        raise ValueError(
            f"this federation has {num_partitions} nodes but data.partition.num_clients is "
            f"{cfg.data.partition.num_clients}: they must match"
        )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the GPU Ray gave us
    local_shard = shard_on(cfg.data, client, device)
    module = new_module(cfg, dataset(cfg.data))
    policy = state_policy(module.model, cfg.federation.strategy)
    load_partial(module.model, msg.content["arrays"].to_torch_state_dict(), policy.travel)
    if LOCAL_STATE_KEY not in context.state:  # a new process: a resumed run's saved state
        saved = _state_file(msg, client, int(msg.content["config"]["server-round"]) - 1)
        if saved is not None and saved.is_file():
            local = torch.load(saved, weights_only=True, map_location="cpu")
            context.state[LOCAL_STATE_KEY] = ArrayRecord(local)
    if LOCAL_STATE_KEY in context.state:
        local = context.state[LOCAL_STATE_KEY].to_torch_state_dict()
        load_partial(module.model, local, policy.local)
    return cfg, local_shard, module, policy


def _state_file(msg: Message, client: int, server_round: int) -> Path | None:
    folder = msg.content["config"].get(STATE_DIR_KEY)
    return Path(str(folder)) / f"client-{client}.round-{server_round}.pt" if folder else None


def _save_local_state(msg: Message, client: int, server_round: int, local: dict) -> None:
    """Keep this round's local state on disk (atomically) so a resumed run finds it; the
    file of two rounds ago is no longer needed."""
    path = _state_file(msg, client, server_round)
    if path is None or not local:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(local, tmp)
    os.replace(tmp, path)
    old = _state_file(msg, client, server_round - 2)
    if old is not None:
        old.unlink(missing_ok=True)


def _validate(cfg: Config, module: FedwsClassifier, local_shard: ClientShard) -> dict[str, float]:
    if local_shard.num_val == 0:
        return {"val_accuracy": math.nan, "val_loss": math.nan}
    loader = tensor_loader(local_shard.x_val, local_shard.y_val, cfg.train.eval_batch_size)
    (metrics,) = make_trainer(cfg).validate(module, loader, verbose=False)
    return {"val_accuracy": float(metrics["val_acc"]), "val_loss": float(metrics["val_loss"])}


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, local_shard, module, policy = _prepare(msg, context)
    server_round = int(msg.content["config"]["server-round"])
    if cfg.faults.fails(local_shard.client, server_round):
        raise RuntimeError(f"injected fault: client {local_shard.client}, round {server_round}")
    if module.hparams.proximal_mu > 0:
        module.set_global_weights()
    seed = round_seed(cfg, server_round, local_shard.client)
    torch.manual_seed(seed)
    loader = tensor_loader(
        local_shard.x_train, local_shard.y_train, cfg.train.batch_size, shuffle=True, seed=seed
    )
    if cfg.train.local_steps is not None:
        trainer = make_trainer(cfg, max_steps=cfg.train.local_steps, max_epochs=-1)
    else:
        trainer = make_trainer(cfg, max_epochs=cfg.train.local_epochs)
    start = time.perf_counter()
    trainer.fit(module, loader)
    fit_s = time.perf_counter() - start
    train_loss = float(trainer.callback_metrics["train_loss"])
    val = _validate(cfg, module, local_shard)

    state = {k: v.detach().cpu() for k, v in module.model.state_dict().items()}
    local = select(state, policy.local)
    context.state[LOCAL_STATE_KEY] = ArrayRecord(local)
    _save_local_state(msg, local_shard.client, server_round, local)
    if cfg.faults.poisons(local_shard.client, server_round):
        state[policy.travel[0]] = torch.full_like(state[policy.travel[0]], float("nan"))
    metrics = MetricRecord(
        {
            "num-examples": local_shard.num_train,
            "partition-id": local_shard.client,
            "train_loss": train_loss,
            "fit_s": fit_s,
            **val,
        }
    )
    content = RecordDict({"arrays": ArrayRecord(select(state, policy.travel)), "metrics": metrics})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """The personalised view: the global model (with this node's local state) on local data."""
    cfg, local_shard, module, _ = _prepare(msg, context)
    metrics = MetricRecord(
        {
            "num-examples": local_shard.num_val,
            "partition-id": local_shard.client,
            **_validate(cfg, module, local_shard),
        }
    )
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
