"""NIID-Bench's label- and quantity-skew draws, as its own code makes them.

Li, Diao, Chen, He, "Federated Learning on Non-IID Data Silos: An Experimental Study" (ICDE
2022, arXiv 2102.02079); code github.com/Xtra-Computing/NIID-Bench, ``utils.partition_data``.
NIID-Bench seeds numpy's and Python's global generators with ``init_seed`` and then partitions;
here a ``numpy.random.RandomState(seed)`` and a ``random.Random(seed)`` make the same calls in the
same order, so for the same labels (the official training split, in its order) and seed every
client gets the indices NIID-Bench's client gets.

- ``iid`` (NIID-Bench's ``homo``): a permutation of all indices split into n nearly equal
  parts (``array_split``).
- ``dirichlet``: per class k (in label order), shuffle its indices, draw p ~ Dir(beta) over the
  clients; balanced (NIID-Bench): a client already holding at least N / n samples gets p = 0,
  the rest renormalised; split the class at ``cumsum(p) * n_k`` (truncated). The whole draw
  repeats until every client holds at least ``min_size`` samples.
- ``classes`` (#C=k): client i holds label i mod K plus k-1 other labels drawn uniformly (Python's
  ``random.randint``, redrawn on a repeat); each label's shuffled indices are split equally
  (``array_split``) among the clients holding it. k = K: each label split over every client.
  A label no client holds (fewer clients than labels) is left out; NIID-Bench would fail there.
- ``quantity``: a permutation of all indices, sizes from q ~ Dir(beta) redrawn until
  ``min(q) * N >= min_size``, split at ``cumsum(q) * N`` (truncated).
"""

from __future__ import annotations

import random

import numpy as np

from app.errors import DataError

MAX_DRAWS = 10_000  # NIID-Bench loops until its minimum size is met; fedws gives up here


def iid(num_samples: int, num_clients: int, seed: int) -> list[np.ndarray]:
    idxs = np.random.RandomState(seed).permutation(num_samples)
    return [part.astype(np.int64) for part in np.array_split(idxs, num_clients)]


def dirichlet(
    labels: np.ndarray,
    num_clients: int,
    beta: float,
    seed: int,
    *,
    min_size: int = 10,
    balanced: bool = True,
) -> list[np.ndarray]:
    labels = np.asarray(labels)
    rng = np.random.RandomState(seed)
    n = len(labels)
    for _ in range(MAX_DRAWS):
        batches: list[list[int]] = [[] for _ in range(num_clients)]
        for k in range(int(labels.max()) + 1):
            idx_k = np.where(labels == k)[0]
            rng.shuffle(idx_k)
            p = rng.dirichlet(np.repeat(beta, num_clients))
            if balanced:
                full = np.array([len(b) >= n / num_clients for b in batches])
                p = p * ~full
                p = p / p.sum()
            cuts = (np.cumsum(p) * len(idx_k)).astype(int)[:-1]
            parts = np.split(idx_k, cuts)
            batches = [b + part.tolist() for b, part in zip(batches, parts, strict=True)]
        if min(len(b) for b in batches) >= min_size:
            return [np.asarray(b, dtype=np.int64) for b in batches]
    raise DataError(
        f"data.partition (dirichlet): no draw of Dir({beta}) over {num_clients} clients gave "
        f"every client {min_size} samples in {MAX_DRAWS} tries: raise alpha, lower "
        "min_partition_size or use fewer clients"
    )


def classes(labels: np.ndarray, num_clients: int, k: int, seed: int) -> list[np.ndarray]:
    labels = np.asarray(labels)
    num_labels = int(labels.max()) + 1
    if k > num_labels:
        raise DataError(
            f"data.partition.classes_per_client: {k} classes per client but the data has "
            f"{num_labels}"
        )
    rng, py = np.random.RandomState(seed), random.Random(seed)
    parts = [np.zeros(0, dtype=np.int64) for _ in range(num_clients)]
    if k == num_labels:  # NIID-Bench's #C=K case: every label over every client
        for label in range(num_labels):
            idx = np.where(labels == label)[0]
            rng.shuffle(idx)
            for j, split in enumerate(np.array_split(idx, num_clients)):
                parts[j] = np.append(parts[j], split)
        return parts
    times = [0] * num_labels
    held: list[list[int]] = []
    for i in range(num_clients):
        current = [i % num_labels]
        times[i % num_labels] += 1
        while len(current) < k:
            ind = py.randint(0, num_labels - 1)
            if ind not in current:
                current.append(ind)
                times[ind] += 1
        held.append(current)
    for label in range(num_labels):
        idx = np.where(labels == label)[0]
        rng.shuffle(idx)
        if times[label] == 0:
            continue
        splits = iter(np.array_split(idx, times[label]))
        for j in range(num_clients):
            if label in held[j]:
                parts[j] = np.append(parts[j], next(splits))
    return parts


def quantity(
    num_samples: int, num_clients: int, beta: float, seed: int, *, min_size: int = 10
) -> list[np.ndarray]:
    if num_clients * min_size > num_samples:
        raise DataError(
            f"data.partition: {num_clients} clients x min_partition_size {min_size} > "
            f"{num_samples} training samples"
        )
    rng = np.random.RandomState(seed)
    idxs = rng.permutation(num_samples)
    for _ in range(MAX_DRAWS):
        q = rng.dirichlet(np.repeat(beta, num_clients))
        q = q / q.sum()
        if np.min(q * num_samples) >= min_size:
            cuts = (np.cumsum(q) * num_samples).astype(int)[:-1]
            return [part.astype(np.int64) for part in np.split(idxs, cuts)]
    raise DataError(
        f"data.partition (quantity): no draw of Dir({beta}) over {num_clients} clients gave "
        f"every client {min_size} samples in {MAX_DRAWS} tries: raise alpha or lower "
        "min_partition_size"
    )
