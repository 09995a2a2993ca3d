"""One federated workload four ways, side by side and interleaved in one invocation:

(a) ``fedws run`` (Flower simulation on Ray, Lightning clients, Lightning server test): on P
    CPUs Ray runs P client processes of 1 thread each (``simulation.num_cpus: 1``, the
    default); the server (test, aggregation) runs in this process with all P threads;
(a2) the same with ``simulation.num_cpus: P``: one client process of P threads;
(b) the floor, laid out as (a): plain PyTorch, the same local steps (same shards, batches,
    seeds, optimizer) in P worker processes of 1 thread each, the weighted mean and the same
    global test here with P threads; no Flower, no Lightning;
(b1) the floor in one process with P threads (clients one after the other), laid out as (a2);
(c) the peer pattern of Flower's quickstart-pytorch-lightning example: per client and round a
    new Lightning Trainer (default logger and checkpointing, the loss logged every step) over
    a DataLoader of a Hugging Face ``datasets.Dataset`` with a per-sample transform and worker
    processes, in one process.

Workload: 10 clients, 5 rounds, ``cnn`` + ``ws_gn``, IID shards of 600 training samples of
Fashion-MNIST (synthetic data of the same shape if the Debian package is absent), 1 local epoch,
batch 32, diagnostics on, the global model tested on the 10,000 test images every round.

    python benchmarks/federation.py [--json PATH] [--rounds 5] [--repeats 2] [--ray-niceness N]

``--ray-niceness N`` runs (a) and (a2) a second time in every repeat, either side first in turn
(balanced for an even ``--repeats``), with Ray's client processes N niceness steps below this
process instead of Ray's default 15 (which fedws keeps; the other side unsets an exported
RAY_worker_niceness), and says whether all those runs gave the same final accuracy.

Seconds per round: the median over every round but the first of each run (round 1 pays the
start-up: Ray and its actors for (a), first touches for the others), over the repeats, with the
spread (min, max). Where fedws's time goes beyond the floor is split into named parts: the
server's own steps timed inside run (a) (update checks, aggregation, diagnostics, checkpoints,
the run log), each client message's steps besides its compute timed here on the same shard
(building the model, the Trainer, Lightning's loop, the reply, the pickling Ray does both ways),
and what is left: Flower and Ray moving the messages (queues, polling, scheduling).
JSON keys: fedws_s_per_round (a), floor_s_per_round (b), fedws_one_process_s_per_round (a2),
floor_serial_s_per_round (b1), peer_s_per_round, ratio_fedws_floor (a/b),
ratio_fedws_floor_one_process (a2/b1), ratio_fedws_best_floor_best (the faster of (a) and (a2)
over the faster of (b) and (b1)), startup_s, breakdown (seconds per round), layout; with
``--ray-niceness``, ray_niceness (the same for (a) and (a2) at niceness +N).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import os
import pickle
import queue
import statistics
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import ClassVar

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import lightning as L
import numpy as np
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from measure import summary as spread
from measure import write_json

from app import rundir
from app.config import Config, build, dump_config
from app.learn.classifier import CPU_EVAL_CHUNK
from app.learn.runtime import dataset, new_module, partitions, round_seed, shard
from app.learn.trainer import make_trainer, quiet_lightning, tensor_loader

CLIENTS, SHARD = 10, 600


def workload(rounds: int, client_cpus: int = 1) -> Config:
    data = "fashion_mnist" if Path("/usr/share/datasets/fashion-mnist").is_dir() else "synthetic"
    return build(
        {
            "seed": 0,
            "data": {
                "dataset": data,
                "train_samples": CLIENTS * SHARD,
                "val_fraction": 0.0,  # shards of exactly 600 training samples
                "synthetic": {"train_size": CLIENTS * SHARD, "test_size": 10000},
                "partition": {"kind": "iid", "num_clients": CLIENTS},
            },
            "model": {"arch": "cnn", "norm": "ws_gn"},
            "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
            "train": {"batch_size": 32, "local_epochs": 1},
            "federation": {"strategy": "fedavg", "rounds": rounds},
            "server": {"diagnostics": True},
            "simulation": {"num_cpus": client_cpus},
        }
    )


# --- (a) fedws, with the server's steps timed ------------------------------------------------


class DriverTimers:
    """Wraps the server's steps (in this process: Flower's simulation runs the ServerApp in a
    thread here) to add up their seconds per round; exclusive times (a step's nested steps
    are counted under their own names)."""

    STEPS: ClassVar[dict[str, list[tuple[str, str]]]] = {  # name -> [(module, attribute)]
        "update checks": [("server.strategy", "_finite"), ("server.server_app", "_finite")],
        "aggregation": [("server.strategy", "RecordingMixin.aggregate_train")],
        "diagnostics": [("server.strategy", "RecordingMixin._diagnose")],
        "server test": [("server.evaluation", "GlobalEvaluator.evaluate")],
        "checkpoints": [("server.evaluation", "GlobalEvaluator.save_checkpoint")],
        "run log": [("server.run_log", "RunLog.log_round")],
    }

    def __init__(self) -> None:
        self.seconds: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.round, self._stack, self._undo = 0, [], []

    def __enter__(self) -> DriverTimers:
        import importlib

        from server import strategy

        for name, places in self.STEPS.items():
            for module_name, path in places:
                owner = importlib.import_module(module_name)
                *parents, attr = path.split(".")
                for parent in parents:
                    owner = getattr(owner, parent)
                self._patch(owner, attr, self._timed(name, getattr(owner, attr)))
        configure = strategy.RecordingMixin.configure_train

        def configure_train(this, server_round, *args, **kwargs):
            self.round = server_round + this.round_offset
            return configure(this, server_round, *args, **kwargs)

        self._patch(strategy.RecordingMixin, "configure_train", configure_train)
        return self

    def _patch(self, owner, attr: str, value) -> None:
        self._undo.append((owner, attr, owner.__dict__[attr]))
        setattr(owner, attr, value)

    def __exit__(self, *exc) -> None:
        for owner, attr, value in reversed(self._undo):
            setattr(owner, attr, value)

    def _timed(self, name: str, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            self._stack.append(0.0)  # seconds of nested timed steps
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                total = time.perf_counter() - start
                nested = self._stack.pop()
                self.seconds[self.round][name] += total - nested
                if self._stack:
                    self._stack[-1] += total

        return wrapper

    def per_round(self, rounds: list[int]) -> dict[str, float]:
        return {name: statistics.mean(self.seconds[r][name] for r in rounds) for name in self.STEPS}


def run_fedws(cfg: Config, out: Path) -> dict:
    from app.tools.run import run

    with DriverTimers() as timers:
        start = time.perf_counter()
        summary = run(cfg, out, progress=False)
        wall = time.perf_counter() - start
    rows = rundir.read_csv(rundir.RunDir(out).metrics)
    round_s = [float(r["round_s"]) for r in rows if int(r["round"]) > 0]
    clients = rundir.read_csv(rundir.RunDir(out).clients)
    later = list(range(2, cfg.federation.rounds + 1))
    fit_s = [sum(float(c["fit_s"]) for c in clients if int(c["round"]) == r) for r in later]
    return {
        "round_s": round_s[1:],
        "startup_s": wall - sum(round_s[1:]) * len(round_s) / max(1, len(round_s) - 1),
        "final_accuracy": summary["final"]["test_accuracy"],
        "server": timers.per_round(later),
        "fit_s_sum": statistics.mean(fit_s),  # clients' Lightning fits, per round
    }


# --- (b) the floor -----------------------------------------------------------------------------


def _local_steps(model, s, cfg: Config, server_round: int) -> None:
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum)
    seed = round_seed(cfg, server_round, s.client)
    torch.manual_seed(seed)
    for xb, yb in tensor_loader(s.x_train, s.y_train, cfg.train.batch_size, True, seed):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(xb), yb).backward()
        opt.step()


def _floor_worker(config: dict, tasks, results) -> None:
    torch.set_num_threads(1)  # as Ray's client processes
    cfg = build(config)
    model = new_module(cfg, dataset(cfg.data)).model
    while (task := tasks.get()) is not None:
        server_round, client, state = task
        s = shard(cfg.data, client)
        model.load_state_dict(state)
        start = time.perf_counter()
        _local_steps(model, s, cfg, server_round)
        fit = time.perf_counter() - start
        # copies: the queue shares a tensor's memory with the receiver, and this model's own
        # tensors change with the next fit before the server averages them
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        results.put((client, s.num_train, state, fit))


class Floor:
    """Plain PyTorch FedAvg: client steps in ``processes`` workers of 1 thread each (0: here,
    one after the other, with all threads), weighted mean and global test here."""

    def __init__(self, cfg: Config, processes: int) -> None:
        self.cfg, self.processes = cfg, processes
        ds = dataset(cfg.data)
        self.model = new_module(cfg, ds).model
        self.x_test, self.y_test = ds.normalize(ds.x_test), ds.y_test
        self.shards = [shard(cfg.data, c) for c in range(CLIENTS)]
        self.workers = []
        if processes:
            ctx = mp.get_context("spawn")
            self.tasks, self.results = ctx.Queue(), ctx.Queue()
            config = json.loads(json.dumps(_plain(cfg)))
            self.workers = [
                ctx.Process(target=_floor_worker, args=(config, self.tasks, self.results))
                for _ in range(processes)
            ]
            for w in self.workers:
                w.start()

    def close(self) -> None:
        for _ in self.workers:
            self.tasks.put(None)
        for w in self.workers:
            w.join()

    def _fit_all(self, state, server_round: int) -> list[tuple]:
        if self.processes:
            for s in self.shards:
                self.tasks.put((server_round, s.client, state))
            return sorted((self.results.get() for _ in self.shards), key=lambda r: r[0])
        replies = []
        for s in self.shards:
            self.model.load_state_dict(state)
            start = time.perf_counter()
            _local_steps(self.model, s, self.cfg, server_round)
            fit = time.perf_counter() - start
            state_k = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            replies.append((s.client, s.num_train, state_k, fit))
        return replies

    def run(self) -> dict:
        state = copy.deepcopy(self.model.state_dict())
        times, acc, aggregate_s, test_s = [], 0.0, [], []
        for rnd in range(1, self.cfg.federation.rounds + 1):
            start = time.perf_counter()
            replies = self._fit_all(state, rnd)
            t0 = time.perf_counter()
            total = sum(n for _, n, _, _ in replies)
            state = {k: sum(st[k] * (n / total) for _, n, st, _ in replies) for k in state}
            t1 = time.perf_counter()
            aggregate_s.append(t1 - t0)
            self.model.load_state_dict(state)
            self.model.eval()
            with torch.inference_mode():  # in fedws's passes: the same test, as fast
                correct = sum(
                    (self.model(x).argmax(1) == y).sum().item()
                    for x, y in zip(
                        self.x_test.split(CPU_EVAL_CHUNK),
                        self.y_test.split(CPU_EVAL_CHUNK),
                        strict=True,
                    )
                )
            acc = correct / len(self.y_test)
            end = time.perf_counter()
            times.append(end - start)
            test_s.append(end - t1)
        return {
            "round_s": times[1:],
            "startup_s": max(0.0, times[0] - statistics.median(times[1:])),
            "final_accuracy": acc,
            "aggregation_s": statistics.mean(aggregate_s[1:]),
            "test_s": statistics.mean(test_s[1:]),
        }


def _plain(cfg: Config) -> dict:
    import yaml

    return yaml.safe_load(dump_config(cfg))


# --- (c) the peer pattern ----------------------------------------------------------------------


def run_peer(cfg: Config, workers: int) -> dict:
    import datasets
    from torch.utils.data import DataLoader

    from app.learn.classifier import FedwsClassifier

    class PeerClassifier(FedwsClassifier):
        """The example's LightningModule: Lightning's automatic optimization, the training
        loss logged at every step."""

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.automatic_optimization = True

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self(x), y)
            self.log("train_loss", loss)
            return loss

    ds = dataset(cfg.data)
    mean, std = (t.item() for t in ds.channel_stats())
    parts = partitions(cfg.data)

    def to_hf(x: torch.Tensor, y: torch.Tensor) -> datasets.Dataset:
        return datasets.Dataset.from_dict({"image": x.numpy(), "label": y.numpy()})

    def apply_transforms(batch):  # per-sample Python, as torchvision's ToTensor + Normalize
        batch["image"] = [
            (torch.tensor(np.asarray(img), dtype=torch.float32) / 255.0 - mean) / std
            for img in batch["image"]
        ]
        return batch

    def collate(items):
        return torch.stack([i["image"] for i in items]), torch.tensor([i["label"] for i in items])

    client_sets = [
        to_hf(ds.x_train[idx], ds.y_train[idx]).with_transform(apply_transforms) for idx in parts
    ]
    test_set = to_hf(ds.x_test, ds.y_test).with_transform(apply_transforms)
    module = new_module(cfg, ds)
    global_state = copy.deepcopy(module.state_dict())
    times, acc = [], 0.0
    with tempfile.TemporaryDirectory() as root:
        for _ in range(cfg.federation.rounds):
            start = time.perf_counter()
            states = []
            for data in client_sets:
                local = PeerClassifier(**module.hparams)
                local.load_state_dict(global_state)
                loader = DataLoader(
                    data, batch_size=32, shuffle=True, num_workers=workers, collate_fn=collate
                )
                trainer = L.Trainer(
                    max_epochs=1,
                    enable_progress_bar=False,
                    default_root_dir=root,
                    accelerator="cpu",
                )
                trainer.fit(local, loader)
                states.append({k: v.detach().clone() for k, v in local.state_dict().items()})
            global_state = {k: sum(s[k] for s in states) / len(states) for k in global_state}
            module.load_state_dict(global_state)
            test_loader = DataLoader(
                test_set, batch_size=32, num_workers=workers, collate_fn=collate
            )
            trainer = L.Trainer(enable_progress_bar=False, default_root_dir=root, accelerator="cpu")
            (metrics,) = trainer.test(module, test_loader, verbose=False)
            acc = metrics["test_acc"]
            times.append(time.perf_counter() - start)
    if acc <= 0.15:  # chance is 0.1: a peer that trains nothing is no comparison
        raise RuntimeError(f"the peer pattern did not learn (final accuracy {acc:.4f})")
    return {
        "round_s": times[1:],
        "startup_s": max(0.0, times[0] - statistics.median(times[1:])),
        "final_accuracy": acc,
    }


def _peer_child(config: dict, workers: int, results) -> None:
    import multiprocessing

    multiprocessing.set_start_method("fork", force=True)  # Linux's default, as for a user
    quiet_lightning()
    warnings.filterwarnings("ignore")
    results.put(run_peer(build(config), workers))


def run_peer_apart(cfg: Config, workers: int) -> dict:
    """(c) in a fresh process, as a user runs the example: its DataLoader workers fork from a
    process that never hosted Ray's threads (forking one that did can crash a worker)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    child = ctx.Process(target=_peer_child, args=(_plain(cfg), workers, results))
    child.start()
    try:
        while True:
            try:
                return results.get(timeout=5)
            except queue.Empty:
                if not child.is_alive():
                    raise RuntimeError(f"(c) ended with exit code {child.exitcode}") from None
    finally:
        child.join()


# --- a client message's steps besides its compute ----------------------------------------------


def client_steps(cfg: Config, repeats: int = 15) -> dict[str, float]:
    """Median seconds of each step a client's train message takes besides the local steps
    themselves, timed here on one shard with 1 thread (as in a Ray client process): the
    ClientApp's preparation (config, shard, a fresh model, the global arrays), the Trainer's
    construction, Lightning's loop beyond the plain one, the reply, and the pickling of the
    message and its reply (what Ray does between the processes)."""
    from flwr.app import (
        ArrayRecord,
        ConfigRecord,
        Context,
        Message,
        MessageType,
        MetricRecord,
        RecordDict,
    )
    from flwr.supercore.task_identity import TaskIdentity

    from app.learn.runtime import CONFIG_KEY, RUN_KEY
    from app.learn.state import select, state_policy
    from clients.client_app import _prepare

    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        setattr(TaskIdentity, name, value)  # what a Flower runtime sets for its process
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        module = new_module(cfg, dataset(cfg.data))
        policy = state_policy(module.model, cfg.federation.strategy)
        arrays = ArrayRecord(select(module.model.state_dict(), policy.travel))
        config = ConfigRecord({CONFIG_KEY: dump_config(cfg), RUN_KEY: "bench", "server-round": 2})
        msg = Message(
            RecordDict({"arrays": arrays, "config": config}),
            dst_node_id=1,
            message_type=MessageType.TRAIN,
        )
        context = Context(1, 1, {"partition-id": 0, "num-partitions": CLIENTS}, RecordDict(), {})
        s = shard(cfg.data, 0)
        samples = defaultdict(list)
        for rep in range(repeats):
            t0 = time.perf_counter()
            local = _prepare(msg, context, before_round=2)
            t1 = time.perf_counter()
            trainer = make_trainer(cfg, max_epochs=cfg.train.local_epochs)
            t2 = time.perf_counter()
            loader = tensor_loader(s.x_train, s.y_train, cfg.train.batch_size, True, rep)
            trainer.fit(local.module, loader)
            t3 = time.perf_counter()
            model = local.module.model
            opt = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum)
            loader = tensor_loader(s.x_train, s.y_train, cfg.train.batch_size, True, rep)
            for xb, yb in loader:
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(xb), yb).backward()
                opt.step()
            t4 = time.perf_counter()
            state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
            metrics = MetricRecord({"num-examples": s.num_train, "train_loss": 0.0})
            content = RecordDict(
                {"arrays": ArrayRecord(select(state, policy.travel)), "m": metrics}
            )
            reply = Message(content, reply_to=msg)
            t5 = time.perf_counter()
            pickle.loads(pickle.dumps((msg, context)))
            pickle.loads(pickle.dumps(reply))
            t6 = time.perf_counter()
            samples["model and arrays (ClientApp preparation)"].append(t1 - t0)
            samples["Trainer construction"].append(t2 - t1)
            samples["Lightning's loop beyond the plain one"].append((t3 - t2) - (t4 - t3))
            samples["reply"].append(t5 - t4)
            samples["pickling message and reply"].append(t6 - t5)
        return {k: statistics.median(v) for k, v in samples.items()}
    finally:
        torch.set_num_threads(threads)


def median(values: list[float]) -> float:
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs of each method")
    parser.add_argument("--peer-workers", type=int, default=2, help="DataLoader workers of (c)")
    parser.add_argument(
        "--ray-niceness",
        type=int,
        metavar="N",
        help="also run (a) and (a2) with Ray's client processes N niceness steps below this "
        "process (Ray's default, which fedws keeps: 15), interleaved with the others",
    )
    args = parser.parse_args()
    quiet_lightning()
    warnings.filterwarnings("ignore")
    cfg = workload(args.rounds)
    cpus = os.cpu_count() or 1
    one_process = workload(args.rounds, client_cpus=cpus)
    print(
        f"workload: {CLIENTS} clients x {SHARD} samples ({cfg.data.dataset}), "
        f"{args.rounds} rounds, cnn + ws_gn, batch 32, 1 local epoch, diagnostics on; "
        f"{cpus} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads)",
        flush=True,
    )
    partitions(cfg.data)  # data loading is not part of any method's rounds
    runs: dict[str, list[dict]] = defaultdict(list)
    for repeat in range(args.repeats):  # interleaved: a, a2, b, b1, c, a, a2, b, b1, c, ...
        for key, config in (("a", cfg), ("a2", one_process)):
            sides = [(key, contextlib.nullcontext())]
            if args.ray_niceness is not None:  # either side first in turn; Ray's default: unset
                sides = [(key, ray_niceness(None))]
                sides.insert(repeat % 2, (f"{key} nice", ray_niceness(args.ray_niceness)))
            for side, setting in sides:
                with tempfile.TemporaryDirectory() as tmp, setting:
                    runs[side].append(run_fedws(config, Path(tmp) / "run"))
        for key, processes in (("b", cpus), ("b1", 0)):
            floor = Floor(cfg, processes)
            try:
                runs[key].append(floor.run())
            finally:
                floor.close()
        runs["c"].append(run_peer_apart(cfg, args.peer_workers))
        print(
            f"[{repeat + 1}/{args.repeats}] s/round "
            + ", ".join(f"{k} {median(v[-1]['round_s']):.3f}" for k, v in runs.items()),
            flush=True,
        )
    steps = client_steps(cfg)

    def per_round(key: str) -> dict[str, float]:
        return spread([t for r in runs[key] for t in r["round_s"]])

    a, a2, b, b1, c = (per_round(k) for k in ("a", "a2", "b", "b1", "c"))
    names = {
        "a": f"(a) fedws run: {cpus} Ray client processes x 1 thread, server {cpus} threads",
        "a2": f"(a2) fedws run, simulation.num_cpus {cpus}: 1 client process x {cpus} threads",
        "b": f"(b) floor: {cpus} worker processes x 1 thread, test {cpus} threads",
        "b1": f"(b1) floor: 1 process x {cpus} threads",
        "c": f"(c) peer: Trainer per client and round, HF DataLoader ({args.peer_workers} workers)",
    }
    print(f"{'method':<74} {'s/round':>8} {'spread':>15} {'start-up s':>10} {'final acc':>9}")
    for key, s in zip(("a", "a2", "b", "b1", "c"), (a, a2, b, b1, c), strict=True):
        startup = median([r["startup_s"] for r in runs[key]])
        acc = runs[key][-1]["final_accuracy"]
        print(
            f"{names[key]:<74} {s['median']:>8.3f} {s['min']:>7.3f}-{s['max']:<7.3f} "
            f"{startup:>10.2f} {acc:>9.4f}"
        )
    ratio = a["median"] / b["median"]
    ratio2 = a2["median"] / b1["median"]
    best = min(a["median"], a2["median"]) / min(b["median"], b1["median"])
    print(
        f"same layouts: (a) / (b) = {ratio:.3f}, (a2) / (b1) = {ratio2:.3f}; "
        f"fedws's fastest layout / the fastest floor = {best:.3f} (target <= 1.10); "
        f"peer / (a) = {c['median'] / a['median']:.3f}"
    )

    # where fedws's round goes beyond the floor's
    slots = min(cpus, CLIENTS)
    server = {k: median([r["server"][k] for r in runs["a"]]) for k in DriverTimers.STEPS}
    floor_aggregation = median([r["aggregation_s"] for r in runs["b"]])
    parts = {
        f"client: {k} (x {CLIENTS} / {slots} processes)": v * CLIENTS / slots
        for k, v in steps.items()
    }
    parts |= {f"server: {k}": v for k, v in server.items() if k != "server test"}
    parts["server: aggregation"] -= floor_aggregation  # the floor averages too
    floor_test = median([r["test_s"] for r in runs["b"]])
    parts["server: Lightning test beyond the floor's plain one"] = (
        server["server test"] - floor_test
    )
    named = sum(parts.values())
    rest = a["median"] - b["median"] - named
    print(f"where fedws's {a['median']:.3f} s per round go beyond the floor's {b['median']:.3f} s:")
    for label, value in parts.items():
        print(f"  {label:<72} {value:>7.3f} s")
    print(
        f"  {'Flower and Ray: moving messages, queues, polling, scheduling (the rest)':<72} "
        f"{rest:>7.3f} s"
    )
    print(f"  (the global test: fedws {server['server test']:.3f} s, floor {floor_test:.3f} s)")
    result = {
        "fedws_s_per_round": a["median"],
        "floor_s_per_round": b["median"],
        "fedws_one_process_s_per_round": a2["median"],
        "floor_serial_s_per_round": b1["median"],
        "peer_s_per_round": c["median"],
        "spread": {"a": a, "a2": a2, "b": b, "b1": b1, "c": c},
        "ratio_fedws_floor": ratio,
        "ratio_fedws_floor_one_process": ratio2,
        "ratio_fedws_floor_serial": a["median"] / b1["median"],
        "ratio_fedws_best_floor_best": best,
        "ratio_peer_fedws": c["median"] / a["median"],
        "startup_s": median([r["startup_s"] for r in runs["a"]]),
        "breakdown": {**parts, "flower_ray_rest": rest, "server_test": server["server test"]},
        "client_steps_s": steps,
        "final_accuracy": {k: runs[k][-1]["final_accuracy"] for k in runs},
        "layout": names,
        "dataset": cfg.data.dataset,
        "cpus": cpus,
        "repeats": args.repeats,
    }
    if args.ray_niceness is not None:
        nice = {k: per_round(f"{k} nice") for k in ("a", "a2")}
        for key, s in nice.items():
            print(
                f"({key}) with Ray's client processes at niceness +{args.ray_niceness}: "
                f"{s['median']:.3f} s/round ({s['min']:.3f}-{s['max']:.3f}), "
                f"{s['median'] / per_round(key)['median']:.3f}x fedws's"
            )
        accuracies = {  # a process's priority changes no number of the run
            key: sorted({r["final_accuracy"] for r in runs[key] + runs[f"{key} nice"]})
            for key in ("a", "a2")
        }
        for key, seen in accuracies.items():
            verdict = "the same" if len(seen) == 1 else "NOT the same (priority or run to run)"
            print(f"({key}) final accuracy over its runs at both priorities: {verdict} ({seen})")
        best_nice = min(s["median"] for s in nice.values()) / min(b["median"], b1["median"])
        print(
            f"fedws's fastest layout / the fastest floor at niceness +{args.ray_niceness}: "
            f"{best_nice:.3f}"
        )
        result["ray_niceness"] = {
            "niceness": args.ray_niceness,
            "fedws_s_per_round": nice["a"]["median"],
            "fedws_one_process_s_per_round": nice["a2"]["median"],
            "spread": nice,
            "ratio_fedws_best_floor_best": best_nice,
            "final_accuracies": accuracies,
        }
    write_json(args.json, result)


WORKER_NICENESS = "RAY_worker_niceness"  # Ray's setting, read when a local instance starts


@contextlib.contextmanager
def ray_niceness(value: int | None):
    """Within: a Ray instance started here runs its worker processes (the clients) ``value``
    niceness steps below the process that starts it (None: Ray's default, whatever the
    environment exported)."""
    before = os.environ.get(WORKER_NICENESS)
    _set_niceness(None if value is None else str(value))
    try:
        yield
    finally:
        _set_niceness(before)


def _set_niceness(value: str | None) -> None:
    """``RAY_worker_niceness`` set to ``value``, or unset for None."""
    if value is None:
        os.environ.pop(WORKER_NICENESS, None)
    else:
        os.environ[WORKER_NICENESS] = value


if __name__ == "__main__":
    main()
