from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import small_config

from app.config import FeatureSkewConfig, PartitionConfig
from app.data import niid_bench
from app.data.datasets import load_dataset
from app.data.partitions import (
    FeatureShift,
    label_counts,
    label_entropy,
    make_shard,
    partition_indices,
    split_train_val,
)
from app.errors import DataError

# 3000 samples, 10 balanced classes, in a shuffled order
LABELS = np.random.default_rng(0).permutation(np.repeat(np.arange(10), 300))


def parts_for(kind: str, **kw) -> list[np.ndarray]:
    kw.setdefault("seed", 0)
    return partition_indices(LABELS, PartitionConfig(kind=kind, num_clients=10, **kw))


def mean_entropy(parts) -> float:
    return float(label_entropy(label_counts(LABELS, parts, 10)).mean())


@pytest.mark.parametrize(
    ("kind", "kw"),
    [
        ("iid", {}),
        ("dirichlet", {"alpha": 0.1}),
        ("dirichlet", {"alpha": 10.0}),
        ("pathological", {"classes_per_client": 2}),
        ("shards", {"shards_per_client": 2}),
        ("quantity", {"alpha": 0.5}),
        ("feature", {}),
    ],
)
def test_every_sample_is_in_exactly_one_client(kind, kw):
    parts = parts_for(kind, **kw)
    assert len(parts) == 10
    assert all(len(p) > 0 for p in parts)
    everything = np.concatenate(parts)
    np.testing.assert_array_equal(np.sort(everything), np.arange(len(LABELS)))


def test_dirichlet_skew_lowers_label_entropy():
    low, high, iid = (
        mean_entropy(parts_for("dirichlet", alpha=0.1)),
        mean_entropy(parts_for("dirichlet", alpha=10.0)),
        mean_entropy(parts_for("iid")),
    )
    assert low < high - 0.5 and low < iid - 0.5
    assert iid == pytest.approx(np.log2(10), abs=0.05)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_pathological_gives_at_most_k_classes_per_client(k):
    counts = label_counts(LABELS, parts_for("pathological", classes_per_client=k), 10)
    assert ((counts > 0).sum(axis=1) <= k).all()
    assert ((counts > 0).sum(axis=1) == k).any()


def test_shards_give_few_classes_per_client():
    counts = label_counts(LABELS, parts_for("shards", shards_per_client=2), 10)
    assert ((counts > 0).sum(axis=1) <= 2).all()


def test_quantity_skew_varies_sizes_but_not_labels():
    parts = parts_for("quantity", alpha=0.3, min_partition_size=20)
    sizes = np.array([len(p) for p in parts])
    assert sizes.min() >= 20 and sizes.sum() == len(LABELS)
    assert sizes.max() > 3 * sizes.min()
    big = int(np.argmax(sizes))
    assert label_entropy(label_counts(LABELS, [parts[big]], 10))[0] > 3.2


def test_quantity_skew_refuses_an_impossible_minimum():
    p = PartitionConfig(kind="quantity", num_clients=10, min_partition_size=6, seed=0)
    with pytest.raises(DataError, match="min_partition_size"):
        partition_indices(LABELS[:50], p)


def test_a_partition_outside_a_run_config_must_name_its_seed():
    with pytest.raises(ValueError, match="unresolved"):
        partition_indices(LABELS, PartitionConfig(kind="iid"))


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "pathological", "shards", "quantity"])
def test_same_seed_same_partition_other_seed_other_partition(kind):
    a, b = parts_for(kind, seed=3), parts_for(kind, seed=3)
    c = parts_for(kind, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_impossible_dirichlet_is_a_clear_data_error(monkeypatch):
    monkeypatch.setattr(niid_bench, "MAX_DRAWS", 500)  # gives up as at 10,000, sooner
    with pytest.raises(DataError, match=r"data\.partition \(dirichlet\): .* in 500 tries"):
        partition_indices(
            LABELS[:100],
            PartitionConfig(
                kind="dirichlet", num_clients=10, alpha=0.01, min_partition_size=10, seed=0
            ),
        )
    with pytest.raises(DataError, match="only 5 training samples"):
        partition_indices(LABELS[:5], PartitionConfig(num_clients=10, seed=0))


def test_label_entropy_known_values():
    counts = np.array([[5, 5, 5, 5], [10, 0, 0, 0], [3, 3, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_allclose(label_entropy(counts), [2.0, 0.0, 1.0, 0.0])


def test_train_val_split_is_disjoint_complete_and_seeded():
    idx = np.arange(100, 200)
    train, val = split_train_val(idx, 0.2, seed=1)
    assert len(val) == 20 and len(train) == 80
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), idx)
    again = split_train_val(idx, 0.2, seed=1)
    assert np.array_equal(val, again[1])
    assert not np.array_equal(val, split_train_val(idx, 0.2, seed=2)[1])
    one_train, one_val = split_train_val(np.array([7]), 0.5, seed=0)
    assert one_train.tolist() == [7] and len(one_val) == 0


def test_shard_holds_normalized_float_tensors_of_its_indices():
    cfg = small_config("data.val_fraction=0.25")
    ds = load_dataset(cfg.data)
    idx = np.arange(0, 80)
    shard = make_shard(ds, idx, 0, cfg.data)
    assert shard.num_train == 60 and shard.num_val == 20
    assert shard.x_train.dtype == torch.float32 and shard.x_train.shape[1:] == (1, 16, 16)
    expected = ds.normalize(ds.x_train[idx])
    rows = {tuple(r.flatten().tolist()) for r in expected}
    assert all(tuple(r.flatten().tolist()) in rows for r in shard.x_val)
    assert shard.shift is None


def test_feature_skew_shifts_clients_deterministically():
    cfg = small_config("data.partition.kind=feature", "data.partition.num_clients=4")
    ds = load_dataset(cfg.data)
    idx = np.arange(40)
    clean = make_shard(ds, idx, 0, cfg.data)
    shifted = make_shard(ds, idx, 3, cfg.data)
    plain = ds.normalize(ds.x_train[np.sort(split_train_val(idx, 0.1, 0)[0])])
    torch.testing.assert_close(clean.x_train, plain)  # client 0: level 0, no shift
    assert shifted.shift == FeatureShift(noise_std=0.3, contrast=0.5, rotation=30.0)
    assert not torch.allclose(shifted.x_train, make_shard(ds, idx, 3, small_config().data).x_train)
    torch.testing.assert_close(shifted.x_train, make_shard(ds, idx, 3, cfg.data).x_train)


def test_feature_shift_components():
    x = torch.randn(4, 1, 16, 16)
    assert torch.allclose(FeatureShift(0.0, 0.5, 0.0).apply(x, 0), 0.5 * x)
    rotated = FeatureShift(0.0, 1.0, 90.0).apply(x, 0)
    torch.testing.assert_close(rotated, torch.rot90(x, k=1, dims=(2, 3)), atol=1e-4, rtol=0)
    noisy = FeatureShift(0.3, 1.0, 0.0).apply(torch.zeros(200, 1, 16, 16), 0)
    assert noisy.std().item() == pytest.approx(0.3, rel=0.05)
    levels = [FeatureShift.for_client(i, 5, FeatureSkewConfig()).rotation for i in range(5)]
    assert levels == [0.0, 7.5, 15.0, 22.5, 30.0]
