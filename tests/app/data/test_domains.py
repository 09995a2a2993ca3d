"""Multi-domain clients: each image style against its definition, domain partitions of built-in
data and of imagefolder domain trees."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import small_config
from PIL import Image

from app import config
from app.config import ConfigError, build
from app.data import domains as dm
from app.data.datasets import load_dataset
from app.data.domains import TEST, TRAIN, domains_of
from app.data.partitions import label_counts, make_shard, partition_indices
from app.errors import DataError

torch.manual_seed(0)
GREY = torch.rand(4, 1, 12, 12)
COLOUR = torch.rand(4, 3, 12, 12)


def test_the_registry_is_keyed_by_the_configs_style_names():
    assert tuple(dm.STYLES) == config.DOMAIN_STYLES


def test_identity_invert_contrast():
    assert torch.equal(dm.identity(GREY), GREY)
    torch.testing.assert_close(dm.invert(GREY), 1 - GREY)
    torch.testing.assert_close(dm.contrast(GREY), 0.5 + 0.4 * (GREY - 0.5))


def test_noise_is_seeded_zero_mean_with_the_documented_std():
    x = torch.full((64, 1, 16, 16), 0.5)
    a, b, c = dm.noise(x, seed=3), dm.noise(x, seed=3), dm.noise(x, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a - 0.5).std().item() == pytest.approx(0.2, abs=0.01)  # 0.5 +- 0.2: rarely clipped
    assert abs((a - 0.5).mean().item()) < 0.01 and a.min() >= 0 and a.max() <= 1


def test_blur_keeps_flat_images_and_spreads_a_point_by_the_gaussian():
    flat = torch.full((1, 1, 9, 9), 0.3)
    torch.testing.assert_close(dm.blur(flat), flat)
    point = torch.zeros(1, 1, 9, 9)
    point[0, 0, 4, 4] = 1.0
    out = dm.blur(point)[0, 0]
    g = torch.exp(-(torch.arange(-2.0, 3.0) ** 2) / 2)  # sigma 1
    g = g / g.sum()
    torch.testing.assert_close(out[2:7, 2:7], g[:, None] * g[None, :])
    assert out.sum().item() == pytest.approx(1.0)


def test_grayscale_is_bt601_luma_in_every_channel():
    out = dm.grayscale(COLOUR)
    luma = 0.299 * COLOUR[:, 0] + 0.587 * COLOUR[:, 1] + 0.114 * COLOUR[:, 2]
    for c in range(3):
        torch.testing.assert_close(out[:, c], luma)
    with pytest.raises(DataError, match="needs colour"):
        dm.grayscale(GREY)


def test_hue_turns_colours_about_the_grey_axis():
    grey = torch.full((1, 3, 2, 2), 0.4)
    torch.testing.assert_close(dm.hue(grey), grey)  # no colour, nothing to turn
    mid = 0.5 + 0.2 * (COLOUR - 0.5)  # inside the gamut: no clipping
    out = dm.hue(mid)
    torch.testing.assert_close(out.mean(1), mid.mean(1))  # the grey level is kept
    # the chroma vector keeps its length and turns by 90 degrees
    chroma_in, chroma_out = mid - mid.mean(1, keepdim=True), out - out.mean(1, keepdim=True)
    torch.testing.assert_close(chroma_out.norm(dim=1), chroma_in.norm(dim=1))
    assert (chroma_in * chroma_out).sum(1).abs().max() < 1e-5
    with pytest.raises(DataError, match="needs colour"):
        dm.hue(GREY)


def test_domains_config_is_checked():
    with pytest.raises(ConfigError, match=r"domains\[1\]: got 'sepia'"):
        small_config("data.partition={kind: domains, domains: [identity, sepia]}")
    with pytest.raises(ConfigError, match="at most once"):
        small_config("data.partition={kind: domains, domains: [invert, invert]}")
    with pytest.raises(ConfigError, match="only for kind: domains"):
        small_config("data.partition={kind: iid, domains: [invert]}")


def domain_config(*extra: str):
    return small_config(
        "data.partition={kind: domains, num_clients: 6, domains: [identity, invert, noise]}",
        *extra,
    )


CHI2_45_P99 = 69.96  # the 99th percentile of chi-square with (6 - 1) x (10 - 1) = 45 dof


def homogeneity_chi2(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Pearson's chi-square of the clients x classes table against every client holding each
    class in proportion to its size (IID labels): about its 45 degrees of freedom when IID."""
    counts = np.stack([np.bincount(labels[idx], minlength=10) for idx in parts])
    expected = counts.sum(1, keepdims=True) * counts.sum(0, keepdims=True) / counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_clients_get_round_robin_domains_in_their_style_with_iid_labels():
    cfg = domain_config()
    ds = load_dataset(cfg.data)
    doms = domains_of(cfg.data, ds)
    assert doms.names == ("identity", "invert", "noise")
    assert [doms.of_client(i) for i in range(6)] == [0, 1, 2, 0, 1, 2]
    labels = ds.y_train.numpy()
    parts = partition_indices(labels, cfg.data.partition, doms)
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(ds.y_train)))  # disjoint
    # IID labels: equal shares, every class in every client, each in proportion to its share
    counts = np.stack([np.bincount(labels[idx], minlength=10) for idx in parts])
    assert counts.sum(1).tolist() == [len(labels) // 6] * 6 and (counts > 0).all()
    assert homogeneity_chi2(labels, parts) < CHI2_45_P99
    # while alpha's Dirichlet label skew inside the domains is far from IID by the same measure
    skewed = domain_config("data.partition.alpha=0.1")
    skewed_parts = partition_indices(labels, skewed.data.partition, domains_of(skewed.data, ds))
    assert homogeneity_chi2(labels, skewed_parts) > 3 * CHI2_45_P99
    for client in (0, 1):  # client 1's images are client 1's share, inverted
        shard = make_shard(ds, parts[client], client, cfg.data, doms)
        raw = ds.x_train[torch.from_numpy(np.sort(parts[client]))]
        expected = ds.normalize(raw, dm.invert if client == 1 else None)
        got = torch.cat([shard.x_train, shard.x_val])
        assert sorted(got.sum((1, 2, 3)).tolist()) == pytest.approx(
            sorted(expected.sum((1, 2, 3)).tolist()), rel=1e-5
        )
    # the noise of a domain's test split is fixed; its training noise differs per client
    x = torch.full((2, 1, 4, 4), 0.5)
    assert torch.equal(doms.style(2, TEST)(x), doms.style(2, TEST)(x))
    assert not torch.equal(doms.style(2, TRAIN, 2)(x), doms.style(2, TRAIN, 5)(x))


def test_alpha_adds_dirichlet_label_skew_inside_the_domains():
    iid = domain_config()
    skewed = domain_config("data.partition.alpha=0.1")
    ds = load_dataset(iid.data)
    entropy = []
    for cfg in (iid, skewed):
        parts = partition_indices(ds.y_train.numpy(), cfg.data.partition, domains_of(cfg.data, ds))
        counts = label_counts(ds.y_train.numpy(), parts, 10)
        p = counts / counts.sum(1, keepdims=True)
        entropy.append(-np.nansum(p * np.log2(np.where(p > 0, p, 1)), axis=1).mean())
    assert entropy[0] > 3.0 and entropy[1] < entropy[0] - 0.5


def test_more_domains_than_clients_is_refused():
    cfg = small_config(
        "data.partition={kind: domains, num_clients: 2, domains: [identity, invert, blur]}"
    )
    with pytest.raises(DataError, match="3 domains"):
        domains_of(cfg.data, load_dataset(cfg.data))


def make_domain_tree(root, monkeypatch):
    """Two domains (bright, dark), two classes; each image's grey level says its domain."""
    monkeypatch.setenv("FEDWS_CACHE", str(root / "cache"))
    for split, n in (("train", 6), ("test", 2)):
        for domain, level in (("bright", 200), ("dark", 30)):
            for label in ("a", "b"):
                folder = root / "tree" / split / domain / label
                folder.mkdir(parents=True)
                for i in range(n):
                    Image.new("L", (8, 8), level + i).save(folder / f"{i}.png")
    return root / "tree"


def test_an_imagefolder_tree_of_domain_folders(tmp_path, monkeypatch):
    tree = make_domain_tree(tmp_path, monkeypatch)
    raw = {
        "data": {
            "dataset": "imagefolder",
            "root": str(tree),
            "partition": {"kind": "domains", "num_clients": 4},
        }
    }
    cfg = build(raw)
    ds = load_dataset(cfg.data)
    assert ds.domains == ("bright", "dark") and ds.classes == ("a", "b")
    bright = ds.x_train[:, 0, 0, 0] >= 200
    assert torch.equal(ds.domain_train == 0, bright)
    doms = domains_of(cfg.data, ds)
    parts = partition_indices(ds.y_train.numpy(), cfg.data.partition, doms)
    for client, idx in enumerate(parts):  # clients 0, 2 bright; 1, 3 dark; each its own half
        assert len(idx) == 6
        assert (ds.domain_train[torch.from_numpy(idx)] == client % 2).all()
    assert len(doms.test_indices(1, len(ds.y_test))) == 4  # the dark test images
    with pytest.raises(DataError, match="leave domains empty"):
        raw["data"]["partition"]["domains"] = ["invert"]
        domains_of(build(raw).data, ds)
    assert math.isfinite(float(ds.normalize(ds.x_test).mean()))


def test_alpha_skews_labels_inside_each_domain_not_across_them():
    cfg = domain_config("data.partition.alpha=0.1", "data.synthetic.train_size=1800")
    ds = load_dataset(cfg.data)
    doms = domains_of(cfg.data, ds)
    labels = ds.y_train.numpy()
    parts = partition_indices(labels, cfg.data.partition, doms)
    for d in range(doms.count):  # a domain's clients together: an IID share of the labels
        union = np.concatenate([parts[c] for c in range(6) if doms.of_client(c) == d])
        counts = np.bincount(labels[union], minlength=10)
        assert counts.min() > 0.5 * counts.mean()
        assert abs(len(union) - len(labels) / 3) <= 1


def test_noise_differs_between_a_clients_train_and_val_and_many_clients_never_collide():
    doms = domains_of(domain_config().data, load_dataset(domain_config().data))
    x = torch.full((1, 1, 4, 4), 0.5)
    assert not torch.equal(doms.style(2, dm.TRAIN, 2)(x), doms.style(2, dm.VAL, 2)(x))
    seeds = {
        doms.style(2, split, client).keywords["seed"]
        for split in (dm.TRAIN, dm.VAL, dm.TEST)
        for client in range(400)
    }
    assert len(seeds) == 3 * 400


def test_domain_trees_say_what_is_wrong(tmp_path, monkeypatch):
    tree = make_domain_tree(tmp_path, monkeypatch)
    Image.new("L", (8, 8), 1).save(tree / "train" / "bright" / "stray.png")
    with pytest.raises(DataError, match="images at two depths"):
        load_dataset(build({"data": {"dataset": "imagefolder", "root": str(tree)}}).data)
    (tree / "train" / "bright" / "stray.png").unlink()
    for f in (tree / "test" / "dark").rglob("*.png"):
        f.unlink()
    for folder in sorted((tree / "test" / "dark").rglob("*"), reverse=True):
        folder.rmdir()
    (tree / "test" / "dark").rmdir()
    raw = {"dataset": "imagefolder", "root": str(tree), "partition": {"kind": "domains"}}
    cfg = build({"data": raw})
    with pytest.raises(DataError, match="domain 'dark' has no test images"):
        domains_of(cfg.data, load_dataset(cfg.data))
