from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import small_config

import app.data.datasets as data_mod
from app.config import DataConfig, PartitionConfig, SyntheticConfig
from app.data.datasets import (
    DatasetNotFoundError,
    load_cifar,
    load_dataset,
    load_fashion_mnist,
    make_synthetic,
    read_idx,
)
from app.errors import DataError
from app.tools.cli import main


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def make_fmnist_folder(folder: Path, n_train=50, n_test=20, compress=True) -> dict:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": np.arange(n_test) % 10,
    }
    folder.mkdir(parents=True, exist_ok=True)
    for stem, array in arrays.items():
        write_idx(folder / (stem + (".gz" if compress else "")), array, compress)
    return arrays


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_round_trips(tmp_path, compress):
    array = np.random.default_rng(1).integers(0, 256, (3, 5, 4))
    path = tmp_path / ("x.gz" if compress else "x")
    write_idx(path, array, compress)
    np.testing.assert_array_equal(read_idx(path), array)


def test_read_idx_rejects_a_truncated_file(tmp_path):
    path = tmp_path / "x"
    write_idx(path, np.zeros((4, 4)), compress=False)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(DataError, match="IDX header says"):
        read_idx(path)


def test_fashion_mnist_from_data_root(tmp_path, no_fedws_data):
    arrays = make_fmnist_folder(tmp_path / "fm")
    ds = load_fashion_mnist(str(tmp_path / "fm"))
    assert ds.x_train.shape == (50, 1, 28, 28) and ds.x_train.dtype == torch.uint8
    assert ds.x_test.shape == (20, 1, 28, 28)
    np.testing.assert_array_equal(ds.x_train[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.y_test.numpy(), arrays["t10k-labels-idx1-ubyte"])
    assert ds.num_classes == 10 and ds.classes[0] == "T-shirt/top"


def test_fedws_data_env_comes_first_and_subfolders_are_searched(tmp_path, monkeypatch):
    make_fmnist_folder(tmp_path / "env" / "fashion-mnist", n_train=30, compress=False)
    make_fmnist_folder(tmp_path / "root", n_train=40)
    monkeypatch.setenv("FEDWS_DATA", str(tmp_path / "env"))
    ds = load_fashion_mnist(str(tmp_path / "root"))
    assert len(ds.y_train) == 30
    assert ds.source == str(tmp_path / "env" / "fashion-mnist")


def test_missing_fashion_mnist_names_paths_and_the_debian_package(
    tmp_path, monkeypatch, no_fedws_data
):
    monkeypatch.setattr(data_mod, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "system")
    with pytest.raises(DatasetNotFoundError) as info:
        load_fashion_mnist(str(tmp_path / "mine"))
    message = str(info.value)
    assert str(tmp_path / "mine") in message and str(tmp_path / "system") in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "\n" not in message


def test_missing_dataset_is_one_line_exit_1_never_synthetic(tmp_path, capsys, no_fedws_data):
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  dataset: cifar10\n  root: {tmp_path / 'nothing'}\n")
    code = main(["partitions", str(config), "-o", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.count("\n") == 1
    assert "dataset 'cifar10' not found; tried:" in captured.err
    assert "cifar-10-batches-py" in captured.err
    assert "synthetic" not in captured.out.lower()
    assert not (tmp_path / "out").exists()


def _write_pickle(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def make_cifar10_folder(folder: Path, per_batch=6) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(2)
    for i in range(1, 6):
        _write_pickle(
            folder / f"data_batch_{i}",
            {
                b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                b"labels": [(i + j) % 10 for j in range(per_batch)],
            },
        )
    _write_pickle(
        folder / "test_batch",
        {b"data": np.arange(4 * 3072, dtype=np.uint8).reshape(4, 3072), b"labels": [0, 1, 2, 3]},
    )
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer"]
    names += [b"dog", b"frog", b"horse", b"ship", b"truck"]
    _write_pickle(folder / "batches.meta", {b"label_names": names})


def test_cifar10_pickle_folder(tmp_path, no_fedws_data):
    make_cifar10_folder(tmp_path / "cifar-10-batches-py")
    ds = load_cifar("cifar10", str(tmp_path))  # the parent folder is enough
    assert ds.x_train.shape == (30, 3, 32, 32) and ds.in_channels == 3
    assert ds.classes[0] == "airplane" and ds.num_classes == 10
    # CHW layout: the first 1024 bytes of a row are the red plane
    expected = np.arange(3072, dtype=np.uint8).reshape(3, 32, 32)
    np.testing.assert_array_equal(ds.x_test[0].numpy(), expected)
    assert ds.y_test.tolist() == [0, 1, 2, 3]


def test_cifar100_pickle_folder(tmp_path, no_fedws_data):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    data = np.zeros((5, 3072), dtype=np.uint8)
    _write_pickle(folder / "train", {b"data": data, b"fine_labels": [0, 1, 2, 3, 99]})
    _write_pickle(folder / "test", {b"data": data[:2], b"fine_labels": [5, 6]})
    _write_pickle(folder / "meta", {b"fine_label_names": [f"c{i}".encode() for i in range(100)]})
    ds = load_cifar("cifar100", str(folder))
    assert ds.num_classes == 100 and ds.y_train.tolist() == [0, 1, 2, 3, 99]


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_dataset_pickles_cannot_run_code(tmp_path, no_fedws_data):
    make_cifar10_folder(tmp_path / "cifar-10-batches-py")
    _write_pickle(tmp_path / "cifar-10-batches-py" / "test_batch", {b"data": _Evil()})
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load builtins\.print"):
        load_cifar("cifar10", str(tmp_path))


def test_synthetic_is_deterministic_and_labelled_synthetic():
    cfg = SyntheticConfig(train_size=100, test_size=30, image_size=16, channels=3)
    a, b, c = make_synthetic(cfg, 0), make_synthetic(cfg, 0), make_synthetic(cfg, 1)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
    assert not torch.equal(a.x_train, c.x_train)
    assert not torch.equal(a.x_train[:30], a.x_test)  # the test split is its own draw
    assert a.synthetic and "synthetic" in a.source
    assert a.x_train.shape == (100, 3, 16, 16) and a.x_train.dtype == torch.uint8


def test_synthetic_classes_are_not_separable_by_intensity_or_contrast():
    ds = make_synthetic(SyntheticConfig(train_size=2000, test_size=10), 0)
    x, y = ds.x_train.float(), ds.y_train
    means = torch.stack([x[y == c].mean() for c in range(10)])
    stds = torch.stack([x[y == c].std(dim=(1, 2, 3)).mean() for c in range(10)])
    assert means.max() - means.min() < 0.5  # out of 255
    assert stds.max() - stds.min() < 0.5
    # ...while the class patterns differ: class 0's grating frequency peak is absent in class 5
    spectra = torch.stack([torch.fft.fft2(x[y == c, 0] - 128).abs().mean(0) for c in (0, 5)])
    peak = spectra[0].flatten().argmax()
    assert spectra[0].flatten()[peak] > 3 * spectra[1].flatten()[peak]


def test_load_dataset_subsamples_with_the_partition_seed():
    cfg = small_config("data.train_samples=100", "data.test_samples=50").data
    a, b = load_dataset(cfg), load_dataset(cfg)
    assert len(a.y_train) == 100 and len(a.y_test) == 50
    assert torch.equal(a.x_train, b.x_train)
    other = load_dataset(DataConfig(**{**cfg.__dict__, "partition": PartitionConfig(seed=5)}))
    assert not torch.equal(a.x_train, other.x_train)


def test_normalize_uses_training_split_statistics():
    ds = load_dataset(small_config().data)
    x = ds.normalize(ds.x_train)
    assert x.dtype == torch.float32
    assert abs(x.mean().item()) < 1e-3 and abs(x.std().item() - 1) < 1e-3


@pytest.mark.skipif(
    not data_mod.FASHION_MNIST_SYSTEM_DIR.is_dir(),
    reason="the Debian package dataset-fashion-mnist is not installed (sudo apt-get install "
    "dataset-fashion-mnist; .ci/run installs it)",
)
@pytest.mark.slow  # reads the real dataset
def test_real_fashion_mnist_from_the_debian_package(no_fedws_data):
    """The quick start's data: .ci/run installs the Debian package dataset-fashion-mnist."""
    ds = load_fashion_mnist()
    assert ds.source == "/usr/share/datasets/fashion-mnist"
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert torch.bincount(ds.y_train).tolist() == [6000] * 10
    assert torch.bincount(ds.y_test).tolist() == [1000] * 10
