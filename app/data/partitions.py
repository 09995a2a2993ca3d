"""Non-IID partitions of a training split into client shards (NIID-Bench's taxonomy,
Li et al. 2022, arXiv 2102.02079).

Kinds: ``iid`` (NIID-Bench's ``homo``); ``dirichlet`` label skew Dir(alpha), balanced unless
``balanced: false``; ``pathological`` #C=k classes per client; ``quantity`` skew (client sizes
from Dir(alpha), IID labels); ``feature`` skew (an IID split, then a per-client
noise/contrast/rotation); these are drawn exactly as NIID-Bench's code draws them
(``app.data.niid_bench``). ``shards`` (sorted-label shards, McMahan et al. 2017) comes from
flwr-datasets' partitioner, run over an in-memory ``datasets.Dataset`` of two columns, ``idx``
and ``label``, shuffled by the data seed; ``domains`` gives each client the images of one
domain (``app.data.domains``); ``natural`` one client per value of a column. The images never
leave their tensor: each client's indices are then split into local train/val by the same
seed, and the shard is held as float tensors (no per-sample transform in the training loop).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from app.config import DataConfig, FeatureSkewConfig, PartitionConfig
from app.data import niid_bench
from app.data.datasets import ImageDataset
from app.data.domains import TRAIN, VAL, Domains
from app.errors import DataError


def _partitioner(p: PartitionConfig):
    """flwr-datasets' partitioner for the kind NIID-Bench's code does not define."""
    from flwr_datasets import partitioner as fp

    n = p.num_clients
    if p.kind == "shards":
        return fp.ShardPartitioner(
            num_partitions=n,
            partition_by="label",
            num_shards_per_partition=p.shards,
            seed=p.data_seed,
        )
    raise AssertionError(f"unhandled partition kind {p.kind}")  # the config rejects others


def _niid_bench(labels: np.ndarray, p: PartitionConfig) -> list[np.ndarray]:
    """The kinds drawn as NIID-Bench's own code draws them (``app.data.niid_bench``)."""
    if p.kind in ("iid", "feature"):  # feature skew: an IID split, then per-client shifts
        return niid_bench.iid(len(labels), p.num_clients, p.data_seed)
    if p.kind == "dirichlet":
        return niid_bench.dirichlet(
            labels,
            p.num_clients,
            p.concentration,
            p.data_seed,
            min_size=p.min_size,
            balanced=p.is_balanced,
        )
    if p.kind == "pathological":
        return niid_bench.classes(labels, p.num_clients, p.classes, p.data_seed)
    return niid_bench.quantity(
        len(labels), p.num_clients, p.concentration, p.data_seed, min_size=p.min_size
    )


NIID_BENCH_KINDS = ("iid", "feature", "dirichlet", "pathological", "quantity")


def partition_indices(
    labels: np.ndarray,
    p: PartitionConfig,
    domains: Domains | None = None,
    natural_ids: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Indices into ``labels`` for each client; every index is in exactly one client or, for
    ``pathological``/``shards``, in none when the partitioner drops a remainder. ``domains``
    (with ``kind: domains``): the run's domains (``app.data.domains``); ``natural_ids`` (with
    ``kind: natural``): each sample's value of the ``by`` column."""
    import datasets

    if p.kind == "domains":
        return _domain_partition(np.asarray(labels), p, domains)
    if p.kind == "natural":
        return _natural_partition(p, natural_ids)

    labels = np.asarray(labels)
    if len(labels) < p.num_clients:
        raise DataError(
            f"data.partition.num_clients: {p.num_clients} clients but only "
            f"{len(labels)} training samples"
        )
    if p.kind in NIID_BENCH_KINDS:
        return [np.sort(part) for part in _niid_bench(labels, p)]
    order = np.random.default_rng(p.data_seed).permutation(len(labels))
    table = datasets.Dataset.from_dict({"idx": order, "label": labels[order]})
    part = _partitioner(p)
    part.dataset = table
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # pyarrow deprecations inside datasets
            return [
                np.sort(part.load_partition(i).with_format("arrow")[:]["idx"].to_numpy())
                for i in range(p.num_clients)
            ]
    except ValueError as err:  # flwr-datasets explains why (e.g. Dirichlet min size unmet)
        raise DataError(f"data.partition ({p.kind}): {err}") from err


def _domain_partition(labels: np.ndarray, p: PartitionConfig, domains: Domains | None):
    """Client i holds images of domain i mod K: IID among the domain's clients, or with
    Dirichlet(alpha) label skew inside each domain when ``alpha`` is given. Folder domains split
    each domain's own images among that domain's clients; style domains share the training
    split (with ``alpha``: first an IID pool per domain, then split like a folder domain)."""
    if domains is None:
        raise DataError("data.partition: kind domains needs the run's domains")

    def split(sub_labels: np.ndarray, clients: int, domain: int | None) -> list[np.ndarray]:
        if p.alpha is None:
            return split_iid(sub_labels, clients, domain)
        sub = dataclasses.replace(
            p, kind="dirichlet", num_clients=clients, domains=(), seed=_seed_of(domain)
        )
        return partition_indices(sub_labels, sub)

    def split_iid(sub_labels: np.ndarray, pools: int, domain: int | None) -> list[np.ndarray]:
        sub = dataclasses.replace(
            p,
            kind="iid",
            num_clients=pools,
            alpha=None,
            balanced=None,
            min_partition_size=None,
            domains=(),
            seed=_seed_of(domain),
        )
        return partition_indices(sub_labels, sub)

    def _seed_of(domain: int | None) -> int:
        """Each domain's split draws from a seed of its own (derived from the data seed), so
        the domains' label skews are independent draws."""
        if domain is None:
            return p.data_seed
        return int(np.random.SeedSequence([p.data_seed, domain]).generate_state(1)[0] % 2**31)

    of_train = domains.of_train
    if of_train is None:
        if p.alpha is None:  # IID labels: one IID split, each client's share in its style
            return split(labels, p.num_clients, None)
        # label skew *inside* each domain: an IID pool of images per domain first
        of_train = np.empty(len(labels), dtype=np.int64)
        for d, pool in enumerate(split_iid(labels, domains.count, None)):
            of_train[pool] = d
    parts: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * p.num_clients
    for d in range(domains.count):
        clients = [i for i in range(p.num_clients) if domains.of_client(i) == d]
        mine = np.flatnonzero(of_train == d)
        for client, idx in zip(clients, split(labels[mine], len(clients), d), strict=True):
            parts[client] = np.sort(mine[idx])
    return parts


def _natural_partition(p: PartitionConfig, natural_ids: np.ndarray | None) -> list[np.ndarray]:
    """One client per distinct value of the ``by`` column (flwr-datasets'
    NaturalIdPartitioner: client k holds the k-th value in sorted order); a given
    ``num_clients`` must be their number, a null one is (``datasets.resolve_clients``)."""
    import datasets
    from flwr_datasets.partitioner import NaturalIdPartitioner

    if natural_ids is None:
        raise DataError(
            f"data.partition: kind natural splits by a column ({p.by!r}) of the dataset: use "
            "data.dataset: hf with a dataset that has it"
        )
    distinct = len(set(natural_ids.tolist()))
    if p.num_clients is not None and distinct != p.num_clients:
        raise DataError(
            f"data.partition.num_clients: the column {p.by!r} has {distinct} distinct values, "
            f"one client each: set num_clients: {distinct}, or leave it out to have it counted"
        )
    table = datasets.Dataset.from_dict({"idx": np.arange(len(natural_ids)), "id": natural_ids})
    part = NaturalIdPartitioner(partition_by="id")
    part.dataset = table
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return [
            np.sort(part.load_partition(i).with_format("arrow")[:]["idx"].to_numpy())
            for i in range(distinct)
        ]


def label_counts(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """(clients, classes) matrix of sample counts."""
    labels = np.asarray(labels)
    return np.stack([np.bincount(labels[idx], minlength=num_classes) for idx in parts])


def label_entropy(counts: np.ndarray) -> np.ndarray:
    """Shannon entropy (bits) of each row's label distribution."""
    counts = np.asarray(counts, dtype=np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    p = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log2(p), 0.0)
    return terms.sum(axis=1)


@dataclass(frozen=True)
class FeatureShift:
    """A client's deterministic input shift (feature skew)."""

    noise_std: float
    contrast: float
    rotation: float

    @classmethod
    def for_client(cls, client: int, num_clients: int, cfg: FeatureSkewConfig) -> FeatureShift:
        level = client / (num_clients - 1) if num_clients > 1 else 0.0
        return cls(
            noise_std=level * cfg.noise_std,
            contrast=1.0 - level * cfg.contrast,
            rotation=level * cfg.rotation,
        )

    def apply(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        """Rotate, scale contrast, add noise; ``x`` is a normalized float batch (N, C, H, W)."""
        if self.rotation:
            a = math.radians(self.rotation)
            theta = torch.tensor(
                [[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]],
                dtype=x.dtype,
            ).expand(len(x), 2, 3)
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, align_corners=False)  # zeros outside = the mean pixel
        x = x * self.contrast
        if self.noise_std:
            g = torch.Generator().manual_seed(seed)
            x = x + self.noise_std * torch.randn(x.shape, generator=g, dtype=x.dtype)
        return x


@dataclass(frozen=True)
class ClientShard:
    """One client's local data, normalized float tensors ready for training."""

    client: int
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    shift: FeatureShift | None = None

    @property
    def num_train(self) -> int:
        return len(self.y_train)

    @property
    def num_val(self) -> int:
        return len(self.y_val)


def shard_seed(p: PartitionConfig, client: int) -> int:
    """Seed of a client's train/val split and feature shift, derived from the partition seed."""
    return p.data_seed * 100_003 + client


def split_train_val(indices: np.ndarray, val_fraction: float, seed: int):
    """Seeded split of a client's indices; a client with >= 2 samples keeps >= 1 for training."""
    perm = np.random.default_rng(seed).permutation(indices)
    n_val = round(len(perm) * val_fraction)
    n_val = min(n_val, max(len(perm) - 1, 0))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def make_shard(
    dataset: ImageDataset,
    indices: np.ndarray,
    client: int,
    cfg: DataConfig,
    domains: Domains | None = None,
) -> ClientShard:
    """Materialize one client's shard (train/val split by the partition seed), in its
    domain's image style when the run has ``domains``."""
    p = cfg.partition
    seed = shard_seed(p, client)
    train_idx, val_idx = split_train_val(indices, cfg.val_fraction, seed)
    styles: tuple = (None, None)
    if domains is not None:
        d = domains.of_client(client)
        styles = (domains.style(d, TRAIN, client), domains.style(d, VAL, client))
    x_train = dataset.normalize(dataset.x_train[train_idx], styles[0])
    x_val = dataset.normalize(dataset.x_train[val_idx], styles[1])
    shift = None
    if p.kind == "feature":
        shift = FeatureShift.for_client(client, p.num_clients, p.shifts)
        x_train, x_val = shift.apply(x_train, seed), shift.apply(x_val, seed + 1)
    return ClientShard(
        client=client,
        x_train=x_train,
        y_train=dataset.y_train[train_idx],
        x_val=x_val,
        y_val=dataset.y_train[val_idx],
        shift=shift,
    )
