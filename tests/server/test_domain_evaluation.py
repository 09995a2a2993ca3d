"""Per-domain evaluation (domains.csv): the test images of each domain, scored by the model a
client of that domain would use (in-process grid)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from helpers import InProcessGrid, set_task_identity, small_config

from app.learn.runtime import dataset, domains, new_module
from app.learn.state import state_policy
from app.rundir import read_csv
from clients.client_app import app as client_app
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

    # and each domain's number is exactly its own clients' models on its test images, redone by
    # hand: the checkpoint's global weights with the BN layers each client's node saved in
    # round 3 (read from the file), scored on the test split in the domain's style
    ds = dataset(cfg.data)
    bn_keys = {
        f"{layer}.{entry}"
        for layer, m in module.model.named_modules()
        if isinstance(m, torch.nn.BatchNorm2d)
        for entry in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    }
    global_weights = {k.removeprefix("model."): v for k, v in last["state_dict"].items()}
    saved = Path(os.environ["FEDWS_CACHE"]) / "client-state" / last["fedws"]["resume"]["run_key"]
    styles = {"identity": lambda x: x, "invert": lambda x: 1 - x}
    for d, name in enumerate(("identity", "invert")):
        x, y = ds.normalize(ds.x_test, styles[name]), ds.y_test  # every test image, styled
        scores = []
        for client in (d, d + 2):  # client i belongs to domain i mod 2
            local = torch.load(saved / f"client-{client}.round-3.pt", weights_only=True)
            assert set(local) == bn_keys  # FedBN keeps exactly the BN layers on the node
            model = new_module(cfg, ds).model
            model.load_state_dict({**global_weights, **local})  # strict: every entry given
            model.eval()
            with torch.no_grad():
                scores.append((model(x).argmax(1) == y).double().mean().item())
        assert by_clients[name] == pytest.approx(sum(scores) / 2, abs=1e-6)
