"""The ClientApp driven in-process with hand-made Flower messages (no Ray)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from helpers import set_task_identity, small_config

from app.config import Config, dump_config
from app.errors import ConfigError
from app.learn.runtime import CONFIG_KEY, RUN_KEY, dataset, new_module, shard
from app.learn.state import select, state_policy
from app.learn.trainer import make_trainer
from clients import client_app
from clients.client_app import LOCAL_STATE_KEY, app
from clients.local_state import LocalStateStore


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    set_task_identity(monkeypatch)


def global_arrays(cfg: Config) -> ArrayRecord:
    module = new_module(cfg, dataset(cfg.data))
    policy = state_policy(module.model, cfg.federation.strategy)
    return ArrayRecord(select(module.model.state_dict(), policy.travel))


def message(
    cfg: Config,
    arrays: ArrayRecord,
    kind: str = MessageType.TRAIN,
    rnd: int = 1,
    run: str = "test-run",
):
    config = ConfigRecord({CONFIG_KEY: dump_config(cfg), RUN_KEY: run, "server-round": rnd})
    content = RecordDict({"arrays": arrays, "config": config})
    return Message(content=content, dst_node_id=7, message_type=kind)


def context(cfg: Config, client: int = 0, node: dict | None = None) -> Context:
    n = cfg.data.partition.num_clients
    return Context(
        run_id=1,
        node_id=7,
        node_config={"partition-id": client, "num-partitions": n, **(node or {})},
        state=RecordDict(),
        run_config={},
    )


def test_train_reply_has_arrays_and_metrics_with_sample_count():
    cfg = small_config("data.partition.num_clients=3")
    arrays = global_arrays(cfg)
    reply = app(message(cfg, arrays), context(cfg, client=1))
    assert set(reply.content.keys()) == {"arrays", "metrics"}
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] == shard(cfg.data, 1).num_train  # samples, not batches
    assert metrics["partition-id"] == 1
    assert {"train_loss", "val_accuracy", "val_loss", "fit_s"} <= set(metrics.keys())
    assert 0.0 <= metrics["val_accuracy"] <= 1.0 and metrics["fit_s"] > 0
    sent = reply.content["arrays"].to_torch_state_dict()
    assert list(sent) == list(arrays.keys())
    before = arrays.to_torch_state_dict()
    assert any(not torch.equal(sent[k], before[k]) for k in sent)  # it trained


def fit_steps(cfg: Config, monkeypatch) -> list[int]:
    """Optimizer steps of each local fit one train message makes (by spying on its Trainers)."""
    trainers = []

    def spy(*args, **kwargs):
        trainers.append(make_trainer(*args, **kwargs))
        return trainers[-1]

    monkeypatch.setattr(client_app, "make_trainer", spy)
    reply = app(message(cfg, global_arrays(cfg)), context(cfg))
    assert reply.content["metrics"]["num-examples"] == shard(cfg.data, 0).num_train
    return [t.global_step for t in trainers if t.state.fn == "fit"]


def test_local_steps_bound_the_local_fit(monkeypatch):
    cfg = small_config("train.local_steps=2", "train.batch_size=4", "optim.lr=0.01")
    assert fit_steps(cfg, monkeypatch) == [2]
    # without it, one local epoch: every batch of the shard once
    epoch = small_config("train.batch_size=4", "optim.lr=0.01")
    assert fit_steps(epoch, monkeypatch) == [math.ceil(shard(epoch.data, 0).num_train / 4)]


def test_shard_is_built_once_per_process():
    cfg = small_config("data.partition.num_clients=2")
    first = shard(cfg.data, 0)
    app(message(cfg, global_arrays(cfg)), context(cfg))
    assert shard(cfg.data, 0) is first


def test_fedbn_keeps_batchnorm_on_the_client_across_rounds():
    cfg = small_config("model.norm=bn", "federation.strategy=fedbn")
    arrays = global_arrays(cfg)
    model = new_module(cfg, dataset(cfg.data)).model
    policy = state_policy(model, "fedbn")
    assert not any(k in arrays for k in policy.local)
    ctx = context(cfg)
    reply = app(message(cfg, arrays), ctx)
    assert set(reply.content["arrays"].keys()) == set(policy.travel)  # no BN entry leaves
    local = ctx.state[LOCAL_STATE_KEY].to_torch_state_dict()
    assert set(local) == set(policy.local)
    running_mean = next(k for k in local if k.endswith("running_mean"))
    assert local[running_mean].abs().sum() > 0  # statistics of this client's data

    # round 2 starts from this client's own BN state, not from a fresh layer: in this process
    # from Context.state, in a new process of the same node from the node's disk
    arrays = reply.content["arrays"]
    ev = app(message(cfg, arrays, MessageType.EVALUATE, rnd=2), ctx).content["metrics"]
    again = app(message(cfg, arrays, MessageType.EVALUATE, rnd=2), context(cfg))
    assert ev["local-state-round"] == again.content["metrics"]["local-state-round"] == 1
    assert ev["val_loss"] == again.content["metrics"]["val_loss"]
    # a client of another run has no BN layers of its own yet: no number, said so
    other = app(message(cfg, arrays, MessageType.EVALUATE, rnd=2, run="other"), context(cfg))
    assert other.content["metrics"]["local-state-round"] == 0
    assert math.isnan(other.content["metrics"]["val_accuracy"])
    # a process that served the earlier run (a study's shared client processes) drops its
    # state there and then: never used by the other run, never shipped with its messages
    assert LOCAL_STATE_KEY in ctx.state
    other = app(message(cfg, arrays, MessageType.EVALUATE, rnd=2, run="other"), ctx)
    assert other.content["metrics"]["local-state-round"] == 0
    assert LOCAL_STATE_KEY not in ctx.state


def test_a_client_keeps_its_latest_state_on_its_nodes_disk(tmp_path):
    cfg = small_config("model.norm=bn", "federation.strategy=fedbn")
    node = {"state-dir": str(tmp_path / "node")}
    arrays = global_arrays(cfg)
    for rnd in (1, 3, 6):  # it sat out the rounds between
        app(message(cfg, arrays, rnd=rnd), context(cfg, node=node))
    files = sorted(p.name for p in (tmp_path / "node" / "test-run").iterdir())
    assert files == ["client-0.round-3.pt", "client-0.round-6.pt"]  # the newest two
    # a later round, in a new process: the round-6 layers, however long it sat out
    ev = app(message(cfg, arrays, MessageType.EVALUATE, rnd=9), context(cfg, node=node))
    assert ev.content["metrics"]["local-state-round"] == 6
    # a run resumed from round 5 trains round 6 again: from the state before it (round 3)
    store = LocalStateStore(tmp_path / "node", "test-run", 0)
    assert store.load(6)[0] == 3 and store.load(7)[0] == 6 and store.load(3) is None


def test_fedavg_sends_bn_statistics_but_keeps_the_counter():
    cfg = small_config("model.norm=bn")
    ctx = context(cfg)
    reply = app(message(cfg, global_arrays(cfg)), ctx)
    sent = reply.content["arrays"].keys()
    assert any(k.endswith("running_var") for k in sent)
    assert not any(k.endswith("num_batches_tracked") for k in sent)
    counters = ctx.state[LOCAL_STATE_KEY].to_torch_state_dict()
    assert counters and all(v.dtype == torch.int64 and v.item() > 0 for v in counters.values())


def test_fedprox_term_changes_the_update_and_pulls_it_to_the_global_model():
    base = small_config("model.norm=gn", "optim.lr=0.1", "train.local_epochs=2")
    prox = small_config(
        "model.norm=gn",
        "optim.lr=0.1",
        "train.local_epochs=2",
        "federation.strategy=fedprox",
        "federation.proximal_mu=1.0",
    )
    start = global_arrays(base).to_torch_state_dict()

    def update_norm(cfg: Config) -> tuple[dict, float]:
        reply = app(message(cfg, ArrayRecord(start)), context(cfg))
        sent = reply.content["arrays"].to_torch_state_dict()
        return sent, sum((sent[k] - start[k]).pow(2).sum().item() for k in sent) ** 0.5

    avg, avg_norm = update_norm(base)
    fedprox, prox_norm = update_norm(prox)
    assert any(not torch.equal(avg[k], fedprox[k]) for k in avg)
    assert prox_norm < avg_norm


def test_evaluate_reports_the_global_model_on_local_validation_data():
    cfg = small_config()
    reply = app(message(cfg, global_arrays(cfg), MessageType.EVALUATE), context(cfg, client=2))
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] == shard(cfg.data, 2).num_val
    assert set(reply.content.keys()) == {"metrics"}
    assert 0.0 <= metrics["val_accuracy"] <= 1.0


def test_node_count_must_match_the_config():
    cfg = small_config()
    ctx = context(cfg)
    ctx.node_config["num-partitions"] = 9
    with pytest.raises(ConfigError, match=r"num_clients: this federation has 9 nodes but the co"):
        app(message(cfg, global_arrays(cfg)), ctx)


def test_a_process_keeps_shards_up_to_a_byte_budget_least_recently_used_out():
    from app.learn.runtime import _ShardCache

    built = []

    def build(n):
        def make():
            built.append(n)
            x = torch.zeros(n, 1, 2, 2)  # n * 16 bytes
            return dataclasses.replace(shard(small_config().data, 0), x_train=x, x_val=x[:0])

        return make

    cache = _ShardCache(budget=100)
    a = cache.get("a", build(3))  # 48 bytes
    assert cache.get("a", build(3)) is a and built == [3]  # kept: not built again
    cache.get("b", build(3))  # 96 bytes
    cache.get("a", build(3))  # a used last: b is the oldest now
    cache.get("c", build(3))  # 144 > 100: b goes
    assert list(cache.entries) == ["a", "c"] and cache.size == 96


def test_fixbn_clients_stop_moving_bn_statistics_after_the_switch_round():
    """FixBN: up to model.fixbn_round the local fit updates the BN running statistics (FedAvg
    with BN); after it they come back exactly as sent, while every weight (BN's scale and shift
    included) keeps training."""
    cfg = small_config("model.norm=fixbn", "federation.rounds=4", "model.fixbn_round=2")
    arrays = global_arrays(cfg)
    sent = arrays.to_torch_state_dict()
    stats = [k for k in sent if k.endswith(("running_mean", "running_var"))]
    affine = [k for k in sent if k.endswith(("weight", "bias")) and ".1." in k]
    assert stats and affine
    for rnd, frozen in ((1, False), (2, False), (3, True), (4, True)):
        back = app(message(cfg, arrays, rnd=rnd), context(cfg)).content["arrays"]
        back = back.to_torch_state_dict()
        moved = [k for k in stats if not torch.equal(back[k], sent[k])]
        assert (moved == []) == frozen, (rnd, moved)
        assert all(not torch.equal(back[k], sent[k]) for k in affine), rnd
