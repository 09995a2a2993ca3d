"""NIID-Bench's draws: each rule on a small hand-made case, and every kind index for index
against NIID-Bench's own ``partition_data`` code (copied below, with its global generators)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from app.config import PartitionConfig
from app.data import niid_bench
from app.data.partitions import partition_indices
from app.errors import DataError


def reference(labels: np.ndarray, partition: str, n_parties: int, beta: float, seed: int):  # noqa: C901 - NIID-Bench's code, as written
    """NIID-Bench ``utils.partition_data`` (github.com/Xtra-Computing/NIID-Bench), the label
    and quantity branches as written there, after ``experiments.py`` seeds its generators."""
    np.random.seed(seed)
    random.seed(seed)
    y_train, K, N = labels, 10, labels.shape[0]
    net_dataidx_map = {}
    if partition == "homo":
        idxs = np.random.permutation(N)
        batch_idxs = np.array_split(idxs, n_parties)
        net_dataidx_map = {i: batch_idxs[i] for i in range(n_parties)}
    elif partition == "noniid-labeldir":
        min_size, min_require_size = 0, 10
        while min_size < min_require_size:
            idx_batch = [[] for _ in range(n_parties)]
            for k in range(K):
                idx_k = np.where(y_train == k)[0]
                np.random.shuffle(idx_k)
                proportions = np.random.dirichlet(np.repeat(beta, n_parties))
                proportions = np.array(
                    [p * (len(idx_j) < N / n_parties) for p, idx_j in zip(proportions, idx_batch)]  # noqa: B905
                )
                proportions = proportions / proportions.sum()
                proportions = (np.cumsum(proportions) * len(idx_k)).astype(int)[:-1]
                idx_batch = [
                    idx_j + idx.tolist()
                    for idx_j, idx in zip(idx_batch, np.split(idx_k, proportions))  # noqa: B905
                ]
                min_size = min([len(idx_j) for idx_j in idx_batch])
        for j in range(n_parties):
            np.random.shuffle(idx_batch[j])
            net_dataidx_map[j] = idx_batch[j]
    elif partition.startswith("noniid-#label"):
        num = int(partition[13:])
        if num == 10:
            net_dataidx_map = {i: np.ndarray(0, dtype=np.int64) for i in range(n_parties)}
            for i in range(10):
                idx_k = np.where(y_train == i)[0]
                np.random.shuffle(idx_k)
                split = np.array_split(idx_k, n_parties)
                for j in range(n_parties):
                    net_dataidx_map[j] = np.append(net_dataidx_map[j], split[j])
        else:
            times = [0 for i in range(K)]
            contain = []
            for i in range(n_parties):
                current = [i % K]
                times[i % K] += 1
                j = 1
                while j < num:
                    ind = random.randint(0, K - 1)
                    if ind not in current:
                        j = j + 1
                        current.append(ind)
                        times[ind] += 1
                contain.append(current)
            net_dataidx_map = {i: np.ndarray(0, dtype=np.int64) for i in range(n_parties)}
            for i in range(K):
                idx_k = np.where(y_train == i)[0]
                np.random.shuffle(idx_k)
                split = np.array_split(idx_k, times[i])
                ids = 0
                for j in range(n_parties):
                    if i in contain[j]:
                        net_dataidx_map[j] = np.append(net_dataidx_map[j], split[ids])
                        ids += 1
    elif partition == "iid-diff-quantity":
        idxs = np.random.permutation(N)
        min_size = 0
        while min_size < 10:
            proportions = np.random.dirichlet(np.repeat(beta, n_parties))
            proportions = proportions / proportions.sum()
            min_size = np.min(proportions * len(idxs))
        proportions = (np.cumsum(proportions) * len(idxs)).astype(int)[:-1]
        batch_idxs = np.split(idxs, proportions)
        net_dataidx_map = {i: batch_idxs[i] for i in range(n_parties)}
    return [np.sort(np.asarray(net_dataidx_map[j], dtype=np.int64)) for j in range(n_parties)]


# 2,000 labels of 10 unequal classes in a fixed shuffled order (a stand-in for a training split)
LABELS = np.random.default_rng(5).choice(10, size=2000, p=np.linspace(0.05, 0.15, 10))

CASES = [
    ("homo", {"kind": "iid"}, 0.5),
    ("noniid-labeldir", {"kind": "dirichlet", "alpha": 0.5}, 0.5),
    ("noniid-labeldir", {"kind": "dirichlet", "alpha": 0.1}, 0.1),
    ("noniid-#label1", {"kind": "pathological", "classes_per_client": 1}, 0.5),
    ("noniid-#label2", {"kind": "pathological", "classes_per_client": 2}, 0.5),
    ("noniid-#label3", {"kind": "pathological", "classes_per_client": 3}, 0.5),
    ("noniid-#label10", {"kind": "pathological", "classes_per_client": 10}, 0.5),
    ("iid-diff-quantity", {"kind": "quantity", "alpha": 0.5}, 0.5),
]


@pytest.mark.parametrize(("name", "kw", "beta"), CASES, ids=[c[0] + str(c[2]) for c in CASES])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_client_holds_the_indices_niid_bench_gives_it(name, kw, beta, seed):
    ours = partition_indices(LABELS, PartitionConfig(num_clients=10, seed=seed, **kw))
    theirs = reference(LABELS, name, 10, beta, seed)
    for mine, want in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(mine, want)


def test_balancing_gives_a_full_client_nothing_of_the_next_classes():
    """Hand-checked rule: once a client holds >= N/n samples, later classes skip it (but for
    the float remainder of the truncated cuts, which NIID-Bench's split hands the last client:
    at most one sample)."""
    labels = np.repeat(np.arange(10), 100)  # 1,000 samples, N/n = 100 for 10 clients
    for seed in range(5):
        parts = niid_bench.dirichlet(labels, 10, 0.1, seed, balanced=True)
        held = np.zeros(10, dtype=int)
        for k in range(10):
            of_k = np.array([np.sum(labels[p] == k) for p in parts])
            full = held >= 100
            assert of_k[:-1][full[:-1]].sum() == 0, (seed, k)
            assert not full[-1] or of_k[-1] <= 1, (seed, k)
            held += of_k
        assert min(len(p) for p in parts) >= 10

    def full_client_fed(parts) -> bool:  # a client past N/n got more of a later class
        held = np.zeros(10, dtype=int)
        for k in range(10):
            of_k = np.array([np.sum(labels[p] == k) for p in parts])
            if of_k[:-1][(held >= 100)[:-1]].sum() > 0:
                return True
            held += of_k
        return False

    unbalanced = [niid_bench.dirichlet(labels, 10, 0.1, s, balanced=False) for s in range(5)]
    assert any(full_client_fed(parts) for parts in unbalanced)


def test_one_class_each_is_label_i_for_client_i():
    labels = np.repeat(np.arange(10), 7)
    parts = niid_bench.classes(labels, 10, 1, seed=3)
    for i, p in enumerate(parts):
        assert sorted(p.tolist()) == list(range(7 * i, 7 * i + 7))


def test_a_label_is_split_equally_among_the_clients_holding_it():
    labels = np.repeat(np.arange(4), 9)  # 4 labels of 9 samples, 6 clients, 2 labels each
    parts = niid_bench.classes(labels, 6, 2, seed=0)
    for i, p in enumerate(parts):
        assert i % 4 in set(labels[p].tolist()) and len(set(labels[p].tolist())) == 2
    for label in range(4):
        shares = [int(np.sum(labels[p] == label)) for p in parts if label in labels[p]]
        assert sum(shares) == 9 and max(shares) - min(shares) <= 1


def test_fewer_clients_than_labels_leaves_the_unheld_labels_out():
    labels = np.repeat(np.arange(10), 5)
    parts = niid_bench.classes(labels, 3, 1, seed=0)
    assert [sorted(set(labels[p].tolist())) for p in parts] == [[0], [1], [2]]
    with pytest.raises(DataError, match="classes_per_client"):
        niid_bench.classes(labels, 3, 11, seed=0)


def test_quantity_redraws_until_every_client_has_its_minimum():
    parts = niid_bench.quantity(300, 10, 2.0, seed=4, min_size=10)
    sizes = [len(p) for p in parts]
    assert sum(sizes) == 300 and min(sizes) >= 9  # min(q) * N >= 10, then truncated cuts
    assert sorted(np.concatenate(parts).tolist()) == list(range(300))
    with pytest.raises(DataError, match="no draw"):
        niid_bench.quantity(120, 10, 0.05, seed=0, min_size=12)
