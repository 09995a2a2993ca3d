"""One federated workload three ways, side by side in one invocation:

(a) ``fedws run`` (Flower simulation on Ray, Lightning clients, Lightning server evaluation);
(b) the floor: a plain PyTorch in-process FedAvg loop doing exactly the same local steps (same
    shards, same batches, same optimizer) and the same global evaluation; no Flower, no Lightning;
(c) the peer pattern of Flower's quickstart-pytorch-lightning example: per client and round a new
    Lightning Trainer (default logger and checkpointing) over a DataLoader of a Hugging Face
    ``datasets.Dataset`` with a per-sample transform and worker processes.

Workload: 10 clients, 5 rounds, ``cnn`` + ``ws_gn``, IID shards of 600 training samples of
Fashion-MNIST (synthetic data of the same shape if the Debian package is absent), 1 local epoch,
batch 32, and the global model tested on the 10,000 test images every round.

    python benchmarks/federation.py [--json PATH] [--rounds 5]

Seconds per round exclude start-up (round 1 of each method is start-up: Ray and actors for (a),
first-touch costs for (b) and (c)). JSON keys: fedws_s_per_round, floor_s_per_round,
peer_s_per_round, startup_s, and the breakdown.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from app import rundir
from app.config import Config, build
from app.learn.runtime import dataset, new_module, partitions, round_seed, shard
from app.learn.trainer import make_trainer, quiet_lightning, tensor_loader

CLIENTS, SHARD = 10, 600


def workload(rounds: int) -> Config:
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
        }
    )


# --- (a) fedws -------------------------------------------------------------------------------


def run_fedws(cfg: Config, out: Path) -> dict[str, float]:
    from app.tools.run import run

    start = time.perf_counter()
    summary = run(cfg, out, progress=False)
    wall = time.perf_counter() - start
    rows = rundir.read_csv(rundir.RunDir(out).metrics)
    round_s = [float(r["round_s"]) for r in rows if int(r["round"]) > 0]
    per_round = statistics.mean(round_s[1:])
    return {
        "s_per_round": per_round,
        "startup_s": wall - len(round_s) * per_round,
        "wall_s": wall,
        "final_accuracy": summary["final"]["test_accuracy"],
    }


# --- (b) the floor ---------------------------------------------------------------------------


def run_floor(cfg: Config) -> dict[str, float]:
    ds = dataset(cfg.data)
    model = new_module(cfg, ds).model
    x_test, y_test = ds.normalize(ds.x_test), ds.y_test
    shards = [shard(cfg.data, c) for c in range(CLIENTS)]
    global_state = copy.deepcopy(model.state_dict())
    times, acc, train_s = [], 0.0, []
    for rnd in range(1, cfg.federation.rounds + 1):
        start = time.perf_counter()
        states, weights, fit = [], [], 0.0
        for s in shards:
            model.load_state_dict(global_state)
            model.train()
            opt = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum)
            seed = round_seed(cfg, rnd, s.client)
            torch.manual_seed(seed)
            t0 = time.perf_counter()
            for xb, yb in tensor_loader(s.x_train, s.y_train, cfg.train.batch_size, True, seed):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(xb), yb).backward()
                opt.step()
            fit += time.perf_counter() - t0
            states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            weights.append(s.num_train)
        total = sum(weights)
        global_state = {
            k: sum(st[k] * (w / total) for st, w in zip(states, weights, strict=True))
            for k in global_state
        }
        model.load_state_dict(global_state)
        model.eval()
        with torch.inference_mode():
            correct = sum(
                (model(x_test[i : i + 1024]).argmax(1) == y_test[i : i + 1024]).sum().item()
                for i in range(0, len(y_test), 1024)
            )
        acc = correct / len(y_test)
        times.append(time.perf_counter() - start)
        train_s.append(fit)
    return {
        "s_per_round": statistics.mean(times[1:]),
        "train_s_per_round": statistics.mean(train_s[1:]),
        "startup_s": max(0.0, times[0] - statistics.mean(times[1:])),
        "final_accuracy": acc,
    }


# --- (c) the peer pattern --------------------------------------------------------------------


def run_peer(cfg: Config, workers: int) -> dict[str, float]:
    import datasets
    from torch.utils.data import DataLoader

    from app.learn.classifier import FedwsClassifier

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
                local = FedwsClassifier(**module.hparams)
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
    return {
        "s_per_round": statistics.mean(times[1:]),
        "startup_s": max(0.0, times[0] - statistics.mean(times[1:])),
        "final_accuracy": acc,
    }


# --- where fedws's time goes -----------------------------------------------------------------


def lightning_fit_overhead(cfg: Config, repeats: int = 5) -> float:
    """Seconds a Lightning fit of one shard costs beyond the same plain loop (Trainer setup,
    hooks, metric logging), in this process."""
    s = shard(cfg.data, 0)
    module = new_module(cfg, dataset(cfg.data))
    lightning_s, plain_s = [], []
    for rep in range(repeats):
        loader = tensor_loader(s.x_train, s.y_train, cfg.train.batch_size, True, rep)
        t0 = time.perf_counter()
        make_trainer(cfg, max_epochs=1).fit(module, loader)
        lightning_s.append(time.perf_counter() - t0)
        opt = torch.optim.SGD(module.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum)
        t0 = time.perf_counter()
        for xb, yb in tensor_loader(s.x_train, s.y_train, cfg.train.batch_size, True, rep):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(module(xb), yb).backward()
            opt.step()
        plain_s.append(time.perf_counter() - t0)
    return min(lightning_s) - min(plain_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--peer-workers", type=int, default=2, help="DataLoader workers of (c)")
    args = parser.parse_args()
    quiet_lightning()
    warnings.filterwarnings("ignore")
    cfg = workload(args.rounds)
    print(
        f"workload: {CLIENTS} clients x {SHARD} samples ({cfg.data.dataset}), "
        f"{args.rounds} rounds, cnn + ws_gn, batch 32, 1 local epoch; "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}"
    )
    partitions(cfg.data)  # data loading is not part of any method's rounds

    with tempfile.TemporaryDirectory() as tmp:
        fedws = run_fedws(cfg, Path(tmp) / "run")
    floor = run_floor(cfg)
    peer = run_peer(cfg, args.peer_workers)
    overhead = lightning_fit_overhead(cfg)

    slots = max(1, (os.cpu_count() or 1))  # clients fit in parallel, one CPU each
    lightning_per_round = overhead * CLIENTS / slots
    framework = fedws["s_per_round"] - floor["s_per_round"] - lightning_per_round
    rows = [
        ("(a) fedws run", fedws),
        ("(b) floor: plain PyTorch loop", floor),
        ("(c) peer: Trainer per round + HF DataLoader", peer),
    ]
    print(f"{'method':<45} {'s/round':>8} {'start-up s':>10} {'final acc':>9}")
    for name, r in rows:
        cols = f"{r['s_per_round']:>8.3f} {r['startup_s']:>10.2f} {r['final_accuracy']:>9.4f}"
        print(f"{name:<45} {cols}")
    ab = fedws["s_per_round"] / floor["s_per_round"]
    ca = peer["s_per_round"] / fedws["s_per_round"]
    print(f"ratio a/b (fedws / floor): {ab:.3f} (target <= 1.3)")
    print(f"ratio c/a (peer / fedws):  {ca:.3f} (target > 1)")
    lines = [
        ("compute: the floor's round (local steps, aggregation, test)", floor["s_per_round"]),
        (
            f"Lightning: {overhead:.3f} s per fit x {CLIENTS} clients / {slots} CPUs",
            lightning_per_round,
        ),
        ("Flower + Ray: messages, serialization, scheduling (the rest)", framework),
    ]
    print("where fedws's time goes, per round:")
    for label, value in lines:
        print(f"  {label:<66} {value:>7.3f} s")
    print(
        f"  {'once per run: Ray start, actors, first-round extras':<66} "
        f"{fedws['startup_s']:>7.2f} s"
    )
    result = {
        "fedws_s_per_round": fedws["s_per_round"],
        "floor_s_per_round": floor["s_per_round"],
        "peer_s_per_round": peer["s_per_round"],
        "startup_s": fedws["startup_s"],
        "ratio_fedws_floor": ab,
        "ratio_peer_fedws": ca,
        "lightning_fit_overhead_s": overhead,
        "framework_s_per_round": framework,
        "final_accuracy": {
            k: r["final_accuracy"] for k, r in zip("abc", (fedws, floor, peer), strict=True)
        },
        "dataset": cfg.data.dataset,
        "cpus": os.cpu_count(),
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
