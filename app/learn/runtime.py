"""What a client or server process builds once and keeps: the config sent in messages, the
dataset, its partition and each client's shard (per-process caches), and fresh models.

The ServerApp sends the resolved YAML config in every message's ConfigRecord under
``CONFIG_KEY``, so a ClientApp needs nothing but the message: the same code runs under
``fedws run``, ``flwr run .`` and a real deployment.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from app.config import Config, DataConfig, build, yaml_load
from app.data.datasets import ImageDataset, dataset_key, load_dataset
from app.data.domains import TEST, Domains, domains_of
from app.data.partitions import ClientShard, make_shard, partition_indices
from app.learn.classifier import FedwsClassifier

# The message contract between the ServerApp and the ClientApp
CONFIG_KEY = "fedws-config"  # ConfigRecord entry: the resolved YAML config
RUN_KEY = "fedws-run-key"  # ConfigRecord entry: names this run's client state on the nodes
PARTITION_KEY = "partition-id"  # node config and reply metrics: the client's partition
PARTITION_QUERY = "query.partition"  # message type: "which partition do you hold?"


@functools.lru_cache(maxsize=8)
def config_from_text(text: str) -> Config:
    return build(yaml_load(text))


def dataset(data: DataConfig) -> ImageDataset:
    """The dataset of ``data``, loaded once per process for every partition of it (the runs
    of a study that vary only the partition share one copy)."""
    return _dataset(dataset_key(data))


@functools.lru_cache(maxsize=2)
def _dataset(key: DataConfig) -> ImageDataset:
    return load_dataset(key)


@functools.lru_cache(maxsize=2)
def domains(data: DataConfig) -> Domains | None:
    """The run's domains (``data.partition.kind: domains``), or None."""
    return domains_of(data, dataset(data))


@functools.lru_cache(maxsize=2)
def partitions(data: DataConfig) -> tuple[np.ndarray, ...]:
    ds = dataset(data)
    parts = partition_indices(ds.y_train.numpy(), data.partition, domains(data), ds.natural_ids)
    return tuple(parts)


SHARD_CACHE_BYTES = 512 * 2**20  # per process: the shards kept, most recently used first


class _ShardCache:
    """The shards this process built, kept up to ``SHARD_CACHE_BYTES`` (least recently used
    out first): a client process of a simulation serves many clients in turn, and keeping
    every shard it ever served would grow with the number of clients."""

    def __init__(self, budget: int) -> None:
        self.budget, self.size = budget, 0
        self.entries: OrderedDict[tuple, tuple[ClientShard, int]] = OrderedDict()

    def get(self, key: tuple, build) -> ClientShard:
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key][0]
        value = build()
        nbytes = _nbytes(value)
        self.entries[key] = (value, nbytes)
        self.size += nbytes
        while self.size > self.budget and len(self.entries) > 1:
            _, (_, freed) = self.entries.popitem(last=False)
            self.size -= freed
        return value


def _nbytes(local: ClientShard) -> int:
    """The bytes of a shard's images."""
    return sum(t.numel() * t.element_size() for t in (local.x_train, local.x_val))


_shards = _ShardCache(SHARD_CACHE_BYTES)


def shard(data: DataConfig, client: int) -> ClientShard:
    """Client ``client``'s shard, built on first use in this process and kept while the
    cache's budget allows."""
    return _shards.get(
        (data, client),
        lambda: make_shard(dataset(data), partitions(data)[client], client, data, domains(data)),
    )


@functools.lru_cache(maxsize=4)
def domain_test(data: DataConfig, domain: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Domain ``domain``'s test images (normalized, in its style) and labels."""
    ds, doms = dataset(data), domains(data)
    idx = torch.from_numpy(doms.test_indices(domain, len(ds.y_test)))
    return ds.normalize(ds.x_test[idx], doms.style(domain, TEST)), ds.y_test[idx]


def shard_on(data: DataConfig, client: int, device: torch.device) -> ClientShard:
    """The shard moved to ``device`` once per process when it fits (a quarter of the free
    device memory at most), so batches are gathered on the device instead of copied to it."""
    local = shard(data, client)
    if device.type == "cpu":
        return local
    return _on_device.get((data, client, str(device)), lambda: _moved(local, str(device)))


_on_device = _ShardCache(SHARD_CACHE_BYTES)  # device copies, with a budget of their own


def _moved(local: ClientShard, device: str) -> ClientShard:
    size = _nbytes(local)
    if device.startswith("cuda") and size > torch.cuda.mem_get_info(torch.device(device))[0] / 4:
        return local  # too large: Lightning copies each batch instead
    move = {f: getattr(local, f).to(device) for f in ("x_train", "y_train", "x_val", "y_val")}
    return dataclasses.replace(local, **move)


def new_module(cfg: Config, ds: ImageDataset) -> FedwsClassifier:
    """A freshly initialised model; the same weights in every process (seeded by ``seed``).
    Its hyper-parameters carry ``input_metadata(ds)``, so a checkpoint predicts on its own."""
    inputs = input_metadata(ds)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return FedwsClassifier.from_config(
            cfg, ds.in_channels, ds.num_classes, image_size=int(ds.x_train.shape[-1]), **inputs
        )


def input_metadata(ds: ImageDataset) -> dict[str, Any]:
    """What a prediction needs besides the weights: the class names, the image size and the
    input normalization (``input_mean``/``input_std``: None when inputs are not standardized).
    Metadata only: neither the weights nor training depend on it."""
    mean, std = ds.channel_stats() if ds.standardize else (None, None)
    return {
        "class_names": list(ds.classes),
        "input_mean": None if mean is None else mean.tolist(),
        "input_std": None if std is None else std.tolist(),
        "input_size": [int(ds.x_train.shape[-2]), int(ds.x_train.shape[-1])],
    }


def round_seed(cfg: Config, server_round: int, client: int) -> int:
    """Seed of one client's local training in one round."""
    return (cfg.seed * 1_000_003 + server_round * 10_007 + client) % 2**31
