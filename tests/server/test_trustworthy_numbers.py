"""Numbers a reviewer can trust: what the server aggregates, which clients it picks, how it picks
the best round, and what it records when a run diverges or a reply fails (in-process grid)."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from flwr.app import Message, MessageType
from helpers import InProcessGrid, set_task_identity, small_config

from app.config import ConfigError
from app.learn.runtime import shard
from app.learn.server_optim import SERVER_OPTIMIZERS
from app.rundir import read_csv
from clients.client_app import app as client_app
from server.evaluation import GlobalEvaluator
from server.sampling import EVALUATE, TRAIN, sample_partitions
from server.server_app import run_federation
from server.strategy import LocalStateLostError, TooFewRepliesError


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    set_task_identity(monkeypatch)


class RecordingGrid(InProcessGrid):
    """Keeps every train message (the global arrays sent) and every train reply."""

    def __init__(self, client_app, num_nodes: int, node_ids: list[int] | None = None) -> None:
        super().__init__(client_app, num_nodes)
        if node_ids is not None:  # other node ids, as a new simulation process gives
            contexts = list(self.contexts.values())
            self.contexts = {n: c for n, c in zip(node_ids, contexts, strict=True)}
            for n, c in self.contexts.items():
                c.node_id = n
        self.sent: list[dict[str, torch.Tensor]] = []  # per round
        self.replies: list[list[tuple[float, dict[str, torch.Tensor]]]] = []
        self.senders: list[list[int]] = []  # per round: the partition of each of replies

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        replies = super().send_and_receive(messages, timeout)
        if messages and messages[0].metadata.message_type == MessageType.TRAIN:
            self.sent.append(messages[0].content["arrays"].to_torch_state_dict())
            ok = [r for r in replies if not r.has_error()]
            self.replies.append(
                [
                    (
                        r.content["metrics"]["num-examples"],
                        r.content["arrays"].to_torch_state_dict(),
                    )
                    for r in ok
                ]
            )
            self.senders.append([self.partition_of(r) for r in ok])
        return replies

    def partition_of(self, reply: Message) -> int:
        """The partition of the node that sent ``reply`` (node i holds partition i)."""
        context = self.contexts[reply.metadata.src_node_id]
        return int(context.node_config["partition-id"])


def weighted_mean(replies, key: str) -> torch.Tensor:
    total = sum(n for n, _ in replies)
    return sum(state[key].double() * (n / total) for n, state in replies).float()


@pytest.mark.parametrize("strategy", SERVER_OPTIMIZERS)
def test_server_optimizers_average_bn_statistics_and_never_step_them(strategy, tmp_path):
    cfg = small_config("model.norm=bn", f"federation.strategy={strategy}", "federation.rounds=3")
    grid = RecordingGrid(client_app, cfg.data.partition.num_clients)
    run_federation(grid, cfg, tmp_path)
    final = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    after = [*grid.sent[1:], {k.removeprefix("model."): v for k, v in final.items()}]
    stats = [k for k in grid.sent[0] if k.endswith(("running_mean", "running_var"))]
    assert stats
    for r, (replies, state) in enumerate(zip(grid.replies, after, strict=True), start=1):
        for key in stats:
            want = weighted_mean(replies, key)
            torch.testing.assert_close(state[key], want, rtol=1e-6, atol=1e-7, msg=f"{key} r{r}")
            if key.endswith("running_var"):
                assert (state[key] > 0).all()
        # and the trainable parameters moved away from the mean: the optimizer stepped them
        # (FedAvgM's first step with learning rate 1 lands on the mean itself)
        weight = next(k for k in grid.sent[0] if k.endswith("weight"))
        if strategy != "fedavgm" or r > 1:
            assert not torch.allclose(state[weight], weighted_mean(replies, weight))


def test_fedavg_and_fedadam_agree_on_bn_statistics_after_one_round(tmp_path):
    """Both land on the clients' BN running statistics averaged with the clients' training set
    sizes as weights, recomputed here: the sizes from the clients' shards (a count the clients
    misreport would not go unseen), unequal (Dirichlet label skew) so that the weights count."""
    skew = ("data.partition.kind=dirichlet", "data.partition.alpha=0.5")
    states, hand, plain = {}, {}, {}
    for strategy in ("fedavg", "fedadam"):
        cfg = small_config(
            "model.norm=bn", f"federation.strategy={strategy}", "federation.rounds=1", *skew
        )
        grid = RecordingGrid(client_app, 4)
        run_federation(grid, cfg, tmp_path / strategy)
        ckpt = torch.load(tmp_path / strategy / "checkpoints" / "last.ckpt", weights_only=True)
        sizes = [shard(cfg.data, c).num_train for c in grid.senders[0]]
        assert sorted(grid.senders[0]) == [0, 1, 2, 3] and len(set(sizes)) > 1
        assert [n for n, _ in grid.replies[0]] == sizes  # the num-examples they reported
        clients = [state for _, state in grid.replies[0]]
        stats = [k for k in clients[0] if k.endswith(("running_mean", "running_var"))]
        states[strategy] = {k: ckpt["state_dict"][f"model.{k}"].double() for k in stats}
        hand[strategy] = {k: mean_by_size([c[k] for c in clients], sizes) for k in stats}
        plain[strategy] = {k: mean_by_size([c[k] for c in clients], [1] * 4) for k in stats}
    assert hand["fedavg"]
    for key, want in hand["fedavg"].items():
        # the clients trained identically in round 1 of both runs
        torch.testing.assert_close(hand["fedadam"][key], want, rtol=0, atol=0)
        for strategy, state in states.items():
            torch.testing.assert_close(
                state[key], want, rtol=1e-6, atol=1e-7, msg=f"{strategy} {key}"
            )
    # the weights matter here: the plain mean of the clients' statistics is another number
    assert any(
        not torch.allclose(plain["fedavg"][k], want, rtol=1e-4)
        for k, want in hand["fedavg"].items()
    )


def mean_by_size(tensors: list[torch.Tensor], sizes: list[int]) -> torch.Tensor:
    """The mean of ``tensors`` weighted by ``sizes``, in float64."""
    return sum(t.double() * n for t, n in zip(tensors, sizes, strict=True)) / sum(sizes)


def test_partitions_are_drawn_from_seed_and_round_alone():
    draw = [sample_partitions(0, r, 20, 0.25, 1, TRAIN) for r in range(1, 6)]
    assert draw == [sample_partitions(0, r, 20, 0.25, 1, TRAIN) for r in range(1, 6)]
    assert all(len(d) == 5 and d == sorted(set(d)) for d in draw)
    assert len({tuple(d) for d in draw}) > 1  # rounds differ
    assert draw[0] != sample_partitions(1, 1, 20, 0.25, 1, TRAIN)  # seeds differ
    assert draw[0] != sample_partitions(0, 1, 20, 0.25, 1, EVALUATE)  # phases draw apart
    assert sample_partitions(0, 3, 20, 1.0, 1, TRAIN) == list(range(20))
    assert sample_partitions(0, 3, 20, 0.01, 3, TRAIN) == sample_partitions(0, 3, 20, 0.1, 3, 0)


def test_the_same_clients_whatever_the_node_ids(tmp_path):
    """Two 'processes' whose nodes have other ids, in another order, pick the same clients."""
    cfg = small_config("federation.fraction_train=0.5", "federation.rounds=4")
    ids = random.Random(7).sample(range(10**6, 10**7), 4)
    run_federation(RecordingGrid(client_app, 4), cfg, tmp_path / "a")
    run_federation(RecordingGrid(client_app, 4, node_ids=ids[::-1]), cfg, tmp_path / "b")
    picked = {}
    for run in ("a", "b"):
        rows = read_csv(tmp_path / run / "clients.csv")
        picked[run] = [
            [r["client"] for r in rows if r["round"] == str(n) and r["num_examples"]]
            for n in range(1, 5)
        ]
    assert picked["a"] == picked["b"]
    assert picked["a"] == [
        [str(c) for c in sample_partitions(cfg.seed, n, 4, 0.5, 1, TRAIN)] for n in range(1, 5)
    ]


def test_a_fedbn_client_that_never_trained_has_no_score(tmp_path):
    cfg = small_config(
        "model.norm=bn",
        "federation.strategy=fedbn",
        "federation.fraction_train=0.25",
        "federation.rounds=2",
    )
    first, second = (sample_partitions(0, r, 4, 0.25, 1, TRAIN) for r in (1, 2))
    assert len(first) == len(second) == 1 and first != second  # seed 0 draws two clients
    run_federation(InProcessGrid(client_app, 4), cfg, tmp_path)
    rows = {(int(r["round"]), int(r["client"])): r for r in read_csv(tmp_path / "clients.csv")}
    assert len(rows) == 2 * 4  # every client evaluated each round
    for (rnd, client), row in rows.items():
        trained_at = [r for r, c in ((1, first[0]), (2, second[0])) if c == client and r <= rnd]
        if trained_at:  # its own BN layers, from the round it last trained in
            assert int(row["local_state_round"]) == trained_at[-1]
            assert 0 <= float(row["global_val_accuracy"]) <= 1
        else:  # never trained: said so, and no number for untrained BN layers
            assert row["local_state_round"] == "0" and row["global_val_accuracy"] == ""
    # the round-1 client sat out round 2 and still scores with the layers it trained
    assert (
        rows[(2, first[0])]["num_examples"] == ""
        and rows[(2, first[0])]["local_state_round"] == "1"
    )


def test_a_client_whose_node_lost_its_state_stops_the_run(tmp_path, monkeypatch):
    cfg = small_config("model.norm=bn", "federation.strategy=fedbn", "federation.rounds=3")

    def stop_after_round_1(row):
        if row["round"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_federation(InProcessGrid(client_app, 4), cfg, tmp_path, progress=stop_after_round_1)
    monkeypatch.setenv("FEDWS_CACHE", str(tmp_path / "another-cache"))  # the state is elsewhere
    with pytest.raises(LocalStateLostError, match="client 0 trained in an earlier round"):
        run_federation(InProcessGrid(client_app, 4), cfg, tmp_path, resume=True)


def test_without_validation_data_no_best_round_is_claimed(tmp_path):
    cfg = small_config("data.val_fraction=0", "federation.rounds=2")
    summary = run_federation(InProcessGrid(client_app, 4), cfg, tmp_path)
    assert summary["best"] is None and summary["final"]["round"] == 2
    assert not (tmp_path / "checkpoints" / "best.ckpt").exists()


def test_a_non_finite_test_loss_is_divergence_too(tmp_path, monkeypatch):
    real = GlobalEvaluator.evaluate

    def evaluate(self):
        test, rows, domain_rows = real(self)
        if self._calls == 2:  # round 2: finite weights, a loss that is not (a BN variance < 0)
            test = {**test, "test_loss": math.nan}
        self._calls += 1
        return test, rows, domain_rows

    monkeypatch.setattr(GlobalEvaluator, "_calls", 0, raising=False)
    monkeypatch.setattr(GlobalEvaluator, "evaluate", evaluate)
    summary = run_federation(
        InProcessGrid(client_app, 4), small_config("federation.rounds=4"), tmp_path
    )
    assert summary["status"] == "diverged" and summary["diverged_round"] == 2
    assert "non-finite test loss" in summary["error"]
    assert summary["final"] is None and summary["best"]["round"] == 1  # never the diverged one
    rows = read_csv(tmp_path / "metrics.csv")
    assert [r["round"] for r in rows] == ["0", "1", "2"] and rows[2]["test_accuracy"] == "nan"


def test_a_diverged_run_is_a_result_with_nulls_not_a_crash(tmp_path):
    cfg = small_config(
        "federation.strategy=fedavgm",
        "federation.server_learning_rate=1.0e+30",
        "federation.rounds=3",
    )
    summary = run_federation(InProcessGrid(client_app, 4), cfg, tmp_path)
    assert summary["status"] == "diverged" and summary["diverged_round"] == 1
    on_disk = json.loads((tmp_path / "summary.json").read_text())  # strict JSON: no NaN
    # weights of 1e29 are finite; the logits they give are not
    assert on_disk["status"] == "diverged" and "round 1: non-finite test loss" in on_disk["error"]
    assert on_disk["final"] is None and on_disk["best"] is None
    assert [r["round"] for r in read_csv(tmp_path / "metrics.csv")] == ["0", "1"]


def test_too_few_finite_updates_is_divergence_and_too_few_replies_is_a_failure(tmp_path):
    every = "nan_clients: [0, 1, 2, 3], rounds: [2]"
    cfg = small_config("federation.rounds=3", f"fault_injection={{{every}}}")
    summary = run_federation(InProcessGrid(client_app, 4), cfg, tmp_path / "nan")
    assert summary["status"] == "diverged" and summary["diverged_round"] == 2
    assert "4 non-finite client updates left 0 usable" in summary["error"]
    assert summary["final"] is None and summary["rounds"] == 2
    rows = read_csv(tmp_path / "nan" / "metrics.csv")
    assert [r["round"] for r in rows] == ["0", "1", "2"]  # the round that stopped it, unscored
    assert (rows[2]["clients_ok"], rows[2]["clients_rejected"], rows[2]["test_accuracy"]) == (
        "0",
        "4",
        "nan",
    )
    # a failed reply among them, but the round short because of the non-finite updates
    faults = "fail_clients: [0], nan_clients: [1, 2, 3], rounds: [2]"
    cfg = small_config(
        "federation.rounds=3", "federation.min_clients=3", f"fault_injection={{{faults}}}"
    )
    summary = run_federation(InProcessGrid(client_app, 4), cfg, tmp_path / "nan-and-failed")
    assert summary["status"] == "diverged" and summary["diverged_round"] == 2
    assert "3 non-finite client updates left 0 usable" in summary["error"]
    assert "first: client 1: non-finite update" in summary["error"]
    row = read_csv(tmp_path / "nan-and-failed" / "metrics.csv")[2]
    assert (row["clients_ok"], row["clients_failed"], row["clients_rejected"]) == ("0", "1", "3")
    # short of min_clients where the failed replies alone would have filled the round: failed
    for name, faults, minimum in (
        ("mixed", "fail_clients: [0, 1], nan_clients: [2], rounds: [2]", 3),
        ("mostly-failed", "fail_clients: [0, 1, 2], nan_clients: [3], rounds: [2]", 1),
    ):
        cfg = small_config(
            "federation.rounds=3",
            f"federation.min_clients={minimum}",
            f"fault_injection={{{faults}}}",
        )
        with pytest.raises(TooFewRepliesError, match=r"round 2: [01] usable client replies"):
            run_federation(InProcessGrid(client_app, 4), cfg, tmp_path / name)
        on_disk = json.loads((tmp_path / name / "summary.json").read_text())
        assert on_disk["status"] == "failed", name


def failing_evaluation(client: int):
    """The ClientApp, except that ``client`` fails every evaluation."""

    def app(msg: Message, context):
        is_eval = msg.metadata.message_type == MessageType.EVALUATE
        if is_eval and context.node_config["partition-id"] == client:
            raise RuntimeError("evaluation broke")
        return client_app(msg, context)

    return app


def test_failed_evaluation_replies_are_counted_and_never_filled_in(tmp_path):
    cfg = small_config("federation.rounds=2")
    run_federation(InProcessGrid(failing_evaluation(2), 4), cfg, tmp_path)
    metrics = read_csv(tmp_path / "metrics.csv")
    assert [(r["eval_ok"], r["eval_failed"]) for r in metrics[1:]] == [("3", "1")] * 2
    rows = [r for r in read_csv(tmp_path / "clients.csv") if r["client"] == "2"]
    assert rows and all(r["global_val_accuracy"] == "" and r["val_accuracy"] for r in rows)


def test_eta_l_is_refused_not_ignored():
    with pytest.raises(ConfigError, match=r"federation\.eta_l: .*optim\.lr"):
        small_config("federation.strategy=fedadam", "federation.eta_l=0.1")
