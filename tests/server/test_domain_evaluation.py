"""Per-domain evaluation (domains.csv): the test images of each domain, scored by the model a
client of that domain would use (in-process grid)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import InProcessGrid, set_task_identity, small_config

from app.learn.runtime import dataset, domain_test, domains, new_module
from app.learn.state import load_partial, state_policy
from app.learn.trainer import make_trainer, tensor_loader
from app.rundir import read_csv
from clients.client_app import app as client_app
from clients.local_state import LocalStateStore, default_root
from server.evaluation import GlobalEvaluator
from server.server_app import run_federation

DOMAINS = "data.partition={kind: domains, num_clients: 4, domains: [identity, invert]}"


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    set_task_identity(monkeypatch)


def test_a_shared_model_is_scored_by_the_server_on_each_domain(tmp_path):
    cfg = small_config(DOMAINS, "federation.rounds=2")
    run_federation(InProcessGrid(client_app, 4), cfg, tmp_path)
    rows = read_csv(tmp_path / "domains.csv")
    assert [(r["round"], r["domain"]) for r in rows] == [
        (str(n), d) for n in range(3) for d in ("identity", "invert")
    ]
    assert {r["scored_by"] for r in rows} == {"global"}
    metrics = read_csv(tmp_path / "metrics.csv")
    for n in range(3):  # equal test splits: the overall accuracy is the mean of the domains'
        pair = [float(r["test_accuracy"]) for r in rows if r["round"] == str(n)]
        assert float(metrics[n]["test_accuracy"]) == pytest.approx(sum(pair) / 2)
    summary = json.loads((tmp_path / "summary.json").read_text())
    final = {r["domain"]: float(r["test_accuracy"]) for r in rows if r["round"] == "2"}
    assert summary["domains"]["test_accuracy"] == pytest.approx(final)
    assert summary["domains"]["mean_test_accuracy"] == pytest.approx(sum(final.values()) / 2)


def test_fedbn_scores_each_domain_with_that_domains_bn_layers(tmp_path):
    cfg = small_config(
        DOMAINS,
        "model.norm=bn",
        "federation.strategy=fedbn",
        "federation.rounds=3",
        "train.local_epochs=3",
        "data.synthetic.train_size=1200",
    )
    run_federation(InProcessGrid(client_app, 4), cfg, tmp_path)
    rows = [r for r in read_csv(tmp_path / "domains.csv") if r["round"] == "3"]
    assert {r["scored_by"] for r in rows} == {"clients"} and {r["clients"] for r in rows} == {"2"}
    by_clients = {r["domain"]: float(r["test_accuracy"]) for r in rows}

    # the server's own model (global weights, its never-trained BN layers) on the same images
    module = new_module(cfg, dataset(cfg.data))
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    module.load_state_dict(last["state_dict"])
    policy = state_policy(module.model, "fedbn")
    _, server_rows = GlobalEvaluator(
        cfg, dataset(cfg.data), module, policy, domains(cfg.data)
    ).test()
    by_server = {r["domain"]: r["test_accuracy"] for r in server_rows}
    assert by_clients.keys() == by_server.keys() == {"identity", "invert"}
    for domain in by_clients:  # the clients' BN layers learned their domain: better
        assert by_clients[domain] > by_server[domain] + 0.03, (by_clients, by_server)

    # and each domain's number is exactly its own clients' models on its test images: the
    # global weights with each client's BN layers (from the node's state), averaged
    run_key = last["fedws"]["resume"]["run_key"]
    doms = domains(cfg.data)
    for d, name in enumerate(doms.names):
        scores = []
        for client in (c for c in range(4) if doms.of_client(c) == d):
            _, local = LocalStateStore(default_root(), run_key, client).load(10**6)
            model = new_module(cfg, dataset(cfg.data))
            model.load_state_dict(last["state_dict"])
            load_partial(model.model, local, policy.local)
            x, y = domain_test(cfg.data, d)
            (metrics,) = make_trainer(cfg).test(model, tensor_loader(x, y, 512), verbose=False)
            scores.append(metrics["test_acc"])
        assert by_clients[name] == pytest.approx(sum(scores) / len(scores), abs=1e-6)
