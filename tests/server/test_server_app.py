"""The ServerApp's federation loop, driven in-process through a Grid that calls the ClientApp
directly (no Ray): run directory contract, state policy on the server, failures, strategies."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from flwr.serverapp import strategy as fl
from helpers import InProcessGrid, set_task_identity, small_config, tensorboard_scalars

from app.config import STRATEGIES, ConfigError, build
from app.learn.classifier import FedwsClassifier
from app.learn.runtime import dataset, new_module
from app.learn.server_optim import FedAdam
from app.learn.state import state_policy
from app.learn.trainer import tensor_loader
from app.rundir import read_csv
from clients.client_app import app as client_app
from server.evaluation import GlobalEvaluator
from server.run_log import CLIENT_COLUMNS, METRIC_COLUMNS
from server.sampling import TRAIN
from server.server_app import run_federation
from server.strategy import TooFewRepliesError, build_strategy


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    set_task_identity(monkeypatch)


def federate(cfg, out: Path):
    return run_federation(InProcessGrid(client_app, cfg.data.partition.num_clients), cfg, out)


def test_run_directory_contract(tmp_path):
    cfg = small_config("federation.rounds=2", "data.partition.num_clients=3")
    summary = federate(cfg, tmp_path)

    assert build(yaml.safe_load((tmp_path / "config.yaml").read_text())) == cfg
    metrics = read_csv(tmp_path / "metrics.csv")
    assert set(METRIC_COLUMNS) <= set(metrics[0])
    assert [int(r["round"]) for r in metrics] == [0, 1, 2]
    assert all(int(r["clients_ok"]) == 3 and int(r["clients_failed"]) == 0 for r in metrics[1:])
    assert all(0 <= float(r["test_accuracy"]) <= 1 for r in metrics)
    assert all(float(r["round_s"]) > 0 for r in metrics)  # round 0: the initial evaluation

    clients = read_csv(tmp_path / "clients.csv")
    assert list(clients[0]) == list(CLIENT_COLUMNS)
    assert [(int(r["round"]), int(r["client"])) for r in clients] == [
        (r, c) for r in (1, 2) for c in range(3)
    ]
    assert all(int(r["num_examples"]) > 0 and float(r["fit_s"]) > 0 for r in clients)

    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == summary
    assert summary["status"] == "completed" and summary["rounds"] == 2
    assert summary["final"]["test_accuracy"] == pytest.approx(float(metrics[-1]["test_accuracy"]))
    # the best round is chosen on the clients' validation data, never on the test split
    val = {int(r["round"]): float(r["global_val_accuracy"]) for r in metrics[1:]}
    chosen = max(val, key=val.get)
    assert summary["best"]["selected_by"] == "global_val_accuracy"
    assert summary["best"]["round"] == chosen
    assert summary["best"]["global_val_accuracy"] == pytest.approx(val[chosen])
    assert summary["best"]["test_accuracy"] == pytest.approx(
        float(metrics[chosen]["test_accuracy"])
    )
    assert all(int(r["eval_ok"]) == 3 and int(r["eval_failed"]) == 0 for r in metrics[1:])
    assert summary["synthetic_data"] is True and summary["seed"] == 0
    assert {"torch", "lightning", "flwr"} <= set(summary["versions"])
    assert summary["wall_s"] > 0

    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "checkpoints" / "best.ckpt").is_file()
    assert not list((tmp_path / "checkpoints").glob(".*tmp"))


def test_checkpoint_loads_through_lightning_with_the_logged_accuracy(tmp_path):
    cfg = small_config("federation.rounds=2", "data.partition.num_clients=2")
    summary = federate(cfg, tmp_path)
    module = FedwsClassifier.load_from_checkpoint(
        tmp_path / "checkpoints" / "last.ckpt", weights_only=True
    )
    ds = dataset(cfg.data)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    (metrics,) = trainer.test(
        module, tensor_loader(ds.normalize(ds.x_test), ds.y_test, 64), verbose=False
    )
    assert metrics["test_acc"] == pytest.approx(summary["final"]["test_accuracy"], abs=1e-6)
    assert metrics["test_loss"] == pytest.approx(summary["final"]["test_loss"], rel=1e-5)


def test_fedbn_server_never_holds_batchnorm_entries(tmp_path, monkeypatch):
    cfg = small_config("model.norm=bn", "federation.strategy=fedbn", "federation.rounds=2")
    seen: list[set[str]] = []
    original = GlobalEvaluator.load

    def spy(self, arrays):
        seen.append(set(arrays.keys()))
        original(self, arrays)

    monkeypatch.setattr(GlobalEvaluator, "load", spy)
    federate(cfg, tmp_path)
    model = new_module(cfg, dataset(cfg.data)).model
    policy = state_policy(model, "fedbn")
    bn_keys = {
        f"{name}.{key}"
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.BatchNorm2d)
        for key in m.state_dict()
    }
    assert len(seen) == 3  # round 0 (initial), 1, 2
    assert all(keys == set(policy.travel) and not keys & bn_keys for keys in seen)


def test_a_client_that_raises_is_counted_and_the_round_goes_on(tmp_path):
    cfg = small_config(
        "federation.rounds=3",
        "federation.min_clients=2",
        "fault_injection={fail_clients: [1], rounds: [2]}",
    )
    federate(cfg, tmp_path)
    rows = read_csv(tmp_path / "metrics.csv")[1:]
    assert [(int(r["clients_ok"]), int(r["clients_failed"])) for r in rows] == [
        (4, 0),
        (3, 1),
        (4, 0),
    ]
    round2 = [r for r in read_csv(tmp_path / "clients.csv") if r["round"] == "2"]
    assert {int(r["client"]) for r in round2 if r["num_examples"]} == {0, 2, 3}
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "completed"


def test_non_finite_updates_are_rejected_and_the_model_stays_finite(tmp_path):
    cfg = small_config("federation.rounds=2", "fault_injection={nan_clients: [0, 2]}")
    summary = federate(cfg, tmp_path)
    rows = read_csv(tmp_path / "metrics.csv")[1:]
    assert all(int(r["clients_rejected"]) == 2 and int(r["clients_ok"]) == 2 for r in rows)
    assert math.isfinite(summary["final"]["test_loss"])
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_too_few_replies_stop_the_run_with_a_clear_error_after_a_checkpoint(tmp_path):
    cfg = small_config(
        "federation.rounds=3",
        "federation.min_clients=3",
        "fault_injection={fail_clients: [0, 1], rounds: [2]}",
    )
    with pytest.raises(TooFewRepliesError, match="round 2: 2 usable client replies") as info:
        federate(cfg, tmp_path)
    assert "injected fault" in str(info.value)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and "min_clients is 3" in summary["error"]
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["fedws"]["round"] == 1  # the last completed round


def test_eval_every_skips_test_rounds_but_not_the_last(tmp_path):
    cfg = small_config("federation.rounds=3", "server.eval_every=2")
    federate(cfg, tmp_path)
    acc = [float(r["test_accuracy"]) for r in read_csv(tmp_path / "metrics.csv")]
    assert [math.isnan(a) for a in acc] == [False, True, False, False]


def test_same_config_same_metrics(tmp_path):
    cfg = small_config("federation.rounds=2", "model.norm=bn")
    federate(cfg, tmp_path / "a")
    federate(cfg, tmp_path / "b")
    a, b = (read_csv(tmp_path / d / "metrics.csv") for d in ("a", "b"))
    for key in ("test_accuracy", "test_loss", "train_loss", "val_accuracy"):
        assert [r[key] for r in a] == [r[key] for r in b]


def strategy_of(*overrides: str):
    cfg = small_config(*overrides)
    return build_strategy(cfg, new_module(cfg, dataset(cfg.data)).model)


# what each configurable strategy is built on, written out here rather than read from
# server/strategy.py: Flower's FedProx, or Flower's FedAvg (with fedws's server optimizer for
# FedAvgM, FedAdam, FedYogi, FedAdagrad; with the FedBN state policy for fedbn)
FLOWER_BASE = {
    "fedavg": fl.FedAvg,
    "fedprox": fl.FedProx,
    "fedavgm": fl.FedAvg,
    "fedadam": fl.FedAvg,
    "fedyogi": fl.FedAvg,
    "fedadagrad": fl.FedAvg,
    "fedbn": fl.FedAvg,
}
WITH_SERVER_OPTIMIZER = {"fedavgm", "fedadam", "fedyogi", "fedadagrad"}


@pytest.mark.parametrize("name", STRATEGIES)  # every name a config accepts
def test_every_strategy_is_flowers_own_class_and_runs(name, tmp_path):
    cfg = small_config(f"federation.strategy={name}", "federation.rounds=1")
    strategy = strategy_of(f"federation.strategy={name}")
    mro = type(strategy).__mro__
    flower = next(c for c in mro if c.__module__.startswith("flwr."))  # its nearest Flower class
    assert flower is FLOWER_BASE[name] and flower is getattr(fl, flower.__name__)
    # below it only Flower's own classes: fedws adds its recording layer on top, nothing between
    below = mro[mro.index(flower) :]
    assert all(c.__module__.startswith(("flwr.", "abc")) or c is object for c in below), below
    assert fl.Strategy in below
    assert (strategy.server_optimizer is not None) == (name in WITH_SERVER_OPTIMIZER)
    summary = federate(cfg, tmp_path)
    assert summary["status"] == "completed" and math.isfinite(summary["final"]["test_loss"])


def test_strategy_hyper_parameters_come_from_config():
    fedavgm = strategy_of("federation.strategy=fedavgm").server_optimizer.optimizer
    assert isinstance(fedavgm, torch.optim.SGD)
    assert fedavgm.defaults["momentum"] == 0.9 and fedavgm.defaults["lr"] == 1.0
    prox = strategy_of("federation.strategy=fedprox", "federation.proximal_mu=0.3")
    assert isinstance(prox, fl.FedProx) and prox.proximal_mu == 0.3
    adam = strategy_of("federation.strategy=fedadam", "federation.eta=0.02").server_optimizer
    assert isinstance(adam.optimizer, FedAdam)  # Reddi et al.'s Algorithm 2, not torch's Adam
    assert adam.optimizer.defaults["lr"] == 0.02 and adam.optimizer.defaults["eps"] == 0.001
    assert adam.optimizer.defaults["betas"] == (0.9, 0.99)  # unset: Flower's defaults
    sampled = strategy_of("federation.fraction_train=0.5")
    assert sampled.fraction_train == 0.5 and sampled.clients.partitions(1, TRAIN) == [1, 3]


def test_tensorboard_logger_when_asked(tmp_path):
    cfg = small_config("federation.rounds=1", "logging.loggers=[csv, tensorboard]")
    federate(cfg, tmp_path)
    metrics = read_csv(tmp_path / "metrics.csv")  # the CSV logger stays on
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    for column in ("test_accuracy", "test_loss"):  # each round's number, read back
        assert [step for step, _ in scalars[column]] == [0, 1]
        want = [float(r[column]) for r in metrics]
        assert [value for _, value in scalars[column]] == pytest.approx(want, rel=1e-6)


class Interrupted(Exception):
    pass


@pytest.mark.parametrize(
    "overrides",
    [
        ("model.norm=ws_gn", "federation.strategy=fedavg"),
        ("model.norm=bn", "federation.strategy=fedbn"),  # client-side state across the break
        # ... of clients that sat out the round before the break (their latest state, not r-1)
        ("model.norm=bn", "federation.strategy=fedbn", "federation.fraction_train=0.5"),
        ("model.norm=gn", "federation.strategy=fedadam"),
        ("model.norm=gn", "federation.strategy=fedavg", "federation.fraction_train=0.5"),
        ("model.norm=bn", "server.bn_recalibration=true"),  # evaluation-only BN statistics
    ],
)
def test_resume_after_an_interruption_gives_the_uninterrupted_run(tmp_path, overrides):
    cfg = small_config("federation.rounds=4", *overrides)
    federate(cfg, tmp_path / "whole")

    def stop_after_round_2(row):
        if row["round"] == 2:
            raise Interrupted

    grid = InProcessGrid(client_app, cfg.data.partition.num_clients)
    with pytest.raises(Interrupted):
        run_federation(grid, cfg, tmp_path / "cut", progress=stop_after_round_2)
    assert len(read_csv(tmp_path / "cut" / "metrics.csv")) == 3
    fresh_grid = InProcessGrid(client_app, cfg.data.partition.num_clients)  # new processes
    summary = run_federation(fresh_grid, cfg, tmp_path / "cut", resume=True)

    assert summary["status"] == "completed" and summary["rounds"] == 4
    whole = torch.load(tmp_path / "whole" / "checkpoints" / "last.ckpt", weights_only=True)
    cut = torch.load(tmp_path / "cut" / "checkpoints" / "last.ckpt", weights_only=True)
    assert whole["state_dict"].keys() == cut["state_dict"].keys()
    assert all(
        torch.equal(whole["state_dict"][k], cut["state_dict"][k]) for k in whole["state_dict"]
    )
    a, b = (read_csv(tmp_path / d / "metrics.csv") for d in ("whole", "cut"))
    columns = [c for c in a[0] if c != "round_s"]
    assert [[r[c] for c in columns] for r in a] == [[r[c] for c in columns] for r in b]
    ca, cb = (read_csv(tmp_path / d / "clients.csv") for d in ("whole", "cut"))
    assert ca == [{**r, "fit_s": a["fit_s"]} for r, a in zip(cb, ca, strict=True)]
    da, db = (read_csv(tmp_path / d / "diagnostics.csv") for d in ("whole", "cut"))
    assert da == db and da


def test_resume_refuses_a_different_config_or_an_empty_folder(tmp_path):
    cfg = small_config("federation.rounds=1")
    grid = InProcessGrid(client_app, 4)
    with pytest.raises(ConfigError, match="no checkpoint of a fedws run"):
        run_federation(grid, cfg, tmp_path, resume=True)
    federate(cfg, tmp_path)
    with pytest.raises(ConfigError, match="config differs"):
        run_federation(grid, small_config("federation.rounds=2", "seed=5"), tmp_path, resume=True)


def diagnostics_of(out: Path) -> dict[tuple[int, str, str], float]:
    return {
        (int(r["round"]), r["quantity"], r["layer"]): float(r["value"])
        for r in read_csv(out / "diagnostics.csv")
    }


def quantities(rows, server_round: int) -> set[str]:
    return {q for (r, q, _) in rows if r == server_round}


def test_diagnostics_of_a_bn_model_under_label_skew(tmp_path):
    skew = ("data.partition.kind=dirichlet", "data.partition.alpha=0.1")
    cfg = small_config(
        "federation.rounds=2", "data.partition.num_clients=3", "model.norm=bn", *skew
    )
    summary = federate(cfg, tmp_path)
    rows = diagnostics_of(tmp_path)
    assert list(read_csv(tmp_path / "diagnostics.csv")[0]) == [
        "round",
        "quantity",
        "layer",
        "value",
    ]
    assert quantities(rows, 0) == {"bn_test_gap"}  # nothing trained yet
    trained = {"drift_mean", "drift_max", "drift_spread", "update_cosine", "bn_divergence"}
    assert quantities(rows, 2) == trained | {"bn_test_gap"}
    layers = {layer for (r, q, layer) in rows if q == "bn_divergence"}
    assert layers == {"features.0.1", "features.1.1", "features.3.1", "features.4.1", "all"}
    assert {g for (r, q, g) in rows if q == "drift_mean"} == {"all", "convs", "norms", "classifier"}
    for r in (1, 2):
        assert 0 < rows[(r, "drift_mean", "all")] <= rows[(r, "drift_max", "all")]
        assert -1 <= rows[(r, "update_cosine", "all")] < 1
        assert rows[(r, "bn_divergence", "all")] > 0
    # the same run without the skew: the skew is what the diagnostics must see. Its clients'
    # updates agree less, their BN statistics diverge more, they spread further apart
    iid = diagnostics_of_run(tmp_path / "iid", "model.norm=bn", "data.partition.num_clients=3")
    assert rows[(1, "update_cosine", "all")] < iid[(1, "update_cosine", "all")] - 0.2
    assert rows[(1, "bn_divergence", "all")] > 5 * iid[(1, "bn_divergence", "all")]
    assert rows[(1, "drift_spread", "all")] > 2 * iid[(1, "drift_spread", "all")]
    assert set(summary["diagnostics"]) == trained | {"bn_test_gap"}
    gap = [rows[(r, "bn_test_gap", "all")] for r in (0, 1, 2)]
    assert summary["diagnostics"]["bn_test_gap"]["final"] == pytest.approx(gap[-1], rel=1e-5)
    assert summary["diagnostics"]["bn_test_gap"]["mean"] == pytest.approx(sum(gap[1:]) / 2, 1e-5)


def test_fedbn_sends_no_statistics_and_ws_gn_has_no_bn_diagnostics(tmp_path):
    fedbn = diagnostics_of_run(tmp_path / "fedbn", "model.norm=bn", "federation.strategy=fedbn")
    assert "bn_divergence" not in quantities(fedbn, 1)
    assert {"drift_mean", "update_cosine", "bn_test_gap"} <= quantities(fedbn, 1)
    ws = diagnostics_of_run(tmp_path / "ws", "model.norm=ws_gn")
    assert quantities(ws, 1) == {"drift_mean", "drift_max", "drift_spread", "update_cosine"}
    off = diagnostics_of_run(tmp_path / "off", "model.norm=bn", "server.diagnostics=false")
    assert off == {}


def diagnostics_of_run(out: Path, *overrides: str):
    federate(small_config("federation.rounds=1", "data.partition.num_clients=2", *overrides), out)
    return diagnostics_of(out)


def test_recalibration_changes_only_the_evaluation(tmp_path):
    skew = ("data.partition.kind=dirichlet", "data.partition.alpha=0.1", "model.norm=bn")
    plain = small_config("federation.rounds=2", *skew)
    recal = small_config("federation.rounds=2", "server.bn_recalibration=true", *skew)
    federate(plain, tmp_path / "plain")
    federate(recal, tmp_path / "recal")
    rows = diagnostics_of(tmp_path / "recal")
    metrics = {d: read_csv(tmp_path / d / "metrics.csv") for d in ("plain", "recal")}
    for r in (0, 1, 2):  # training is the same: the raw accuracy is the plain run's
        plain_acc = float(metrics["plain"][r]["test_accuracy"])
        assert rows[(r, "test_accuracy_raw", "all")] == pytest.approx(plain_acc, abs=1e-7)
        assert rows[(r, "bn_test_gap_recalibrated", "all")] < rows[(r, "bn_test_gap", "all")]
    recal_acc = [float(m["test_accuracy"]) for m in metrics["recal"]]
    assert recal_acc != [float(m["test_accuracy"]) for m in metrics["plain"]]
    a, b = (
        torch.load(tmp_path / d / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        for d in ("plain", "recal")
    )
    assert all(torch.equal(a[k], b[k]) for k in a)  # the checkpoint holds the aggregate


def test_fedws_diagnose_writes_markdown_and_figures(tmp_path):
    from app.tools.cli import main

    cfg = small_config("federation.rounds=2", "model.norm=bn", "server.bn_recalibration=true")
    federate(cfg, tmp_path)
    assert main(["diagnose", str(tmp_path)]) == 0
    text = (tmp_path / "diagnostics.md").read_text()
    for figure in ("diag_drift.png", "diag_bn_statistics.png", "diag_accuracy.png"):
        assert f"figures/{figure}" in text
        assert (tmp_path / "figures" / figure).stat().st_size > 1000
    assert "| bn_divergence |" in text and "| test_accuracy_raw |" in text
    assert main(["diagnose", str(tmp_path / "nothing")]) == 2
    elsewhere = tmp_path / "report"
    assert main(["diagnose", str(tmp_path), "-o", str(elsewhere)]) == 0
    assert (elsewhere / "diagnostics.md").read_text() == text
    assert (elsewhere / "figures" / "diag_bn_statistics.png").stat().st_size > 1000
