"""Datasets from local disk (no network): Fashion-MNIST IDX files, CIFAR-10/100 pickle folders,
image trees of class folders (``imagefolder``, see ``app.data.imagefolder``), Hugging Face
datasets (``hf``, see ``app.data.hf``: local copies, or the Hub when online) and a
deterministic synthetic dataset for tests and demos.

Every loader returns an ``ImageDataset`` of uint8 tensors (N, C, H, W); ``normalize`` turns
them into float tensors with the training split's per-channel mean and std. A dataset that is not
on disk raises ``DatasetNotFoundError`` naming every path tried and how to get the data.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import os
import pickle
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from app.config import Config, DataConfig, PartitionConfig, SyntheticConfig
from app.data.hf import load_hf, natural_values
from app.data.imagefolder import load_imagefolder
from app.errors import DataError, DatasetNotFoundError

FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


def standardized(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """[0, 1] images (N, C, H, W) standardized per channel: the model's inputs."""
    return (x - mean[:, None, None]) / std[:, None, None]


@dataclass(frozen=True)
class ImageDataset:
    """A classification dataset held in memory as uint8 images and int64 labels."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: tuple[str, ...]
    source: str  # where it was read from, or "synthetic (generated, seed N)"
    synthetic: bool = False
    # an image tree of domain folders: the domain names and each image's domain index
    domains: tuple[str, ...] = ()
    domain_train: torch.Tensor | None = None
    domain_test: torch.Tensor | None = None
    # a natural partition's column (a writer, a speaker) for each training image
    natural_ids: np.ndarray | None = None
    # ``normalize`` standardizes by the channel statistics; False: [0, 1] pixel values
    standardize: bool = True

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return int(self.x_train.shape[1])

    def channel_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and std of the training split, in [0, 1] units."""
        return self._channel_stats

    @cached_property
    def _channel_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        # exact, from each channel's histogram of the 256 uint8 values: no float copy
        values = torch.arange(256, dtype=torch.float64) / 255.0
        means, stds = [], []
        for c in range(self.in_channels):
            hist = torch.bincount(self.x_train[:, c].reshape(-1).long(), minlength=256).double()
            n = hist.sum()
            mean = (hist * values).sum() / n
            var = (hist * (values - mean) ** 2).sum() / max(n - 1, 1)
            means.append(mean)
            stds.append(var.sqrt())
        return torch.stack(means).float(), torch.stack(stds).float()

    def normalize(self, x: torch.Tensor, style: Callable | None = None) -> torch.Tensor:
        """uint8 (N, C, H, W) -> float32 standardized with the training split's statistics
        (or, with ``standardize`` off, the [0, 1] values); ``style`` (a domain's image style,
        ``app.data.domains``) first transforms the [0, 1] images."""
        x = x.float() / 255.0
        if style is not None:
            x = style(x)
        return standardized(x, *self.channel_stats()) if self.standardize else x

    def subsample(self, train: int | None, test: int | None, seed: int) -> ImageDataset:
        """A seeded random subset of each split (None keeps the split whole)."""
        g = torch.Generator().manual_seed(seed)

        def pick(x: torch.Tensor, y: torch.Tensor, d: torch.Tensor | None, n: int | None):
            if n is None or n >= len(y):
                return x, y, d
            idx = torch.randperm(len(y), generator=g)[:n].sort().values
            return x[idx], y[idx], None if d is None else d[idx]

        if train is not None and train < len(self.y_train) and self.natural_ids is not None:
            raise DataError(
                "data.train_samples: a natural partition keeps every training image of each "
                "writer; leave train_samples null"
            )
        x_train, y_train, d_train = pick(self.x_train, self.y_train, self.domain_train, train)
        x_test, y_test, d_test = pick(self.x_test, self.y_test, self.domain_test, test)
        return replace(
            self,
            x_train=x_train,
            y_train=y_train,
            x_test=x_test,
            y_test=y_test,
            domain_train=d_train,
            domain_test=d_test,
        )


# --- search paths ---------------------------------------------------------------------------


def _search_roots(root: str | None) -> list[Path]:
    """``$FEDWS_DATA`` first, then the config's ``data.root``."""
    roots = []
    if os.environ.get("FEDWS_DATA"):
        roots.append(Path(os.environ["FEDWS_DATA"]).expanduser())
    if root:
        roots.append(Path(root).expanduser())
    return roots


def _find_root(
    candidates: list[Path], is_match: Callable[[Path], bool], dataset: str, how_to_get: str
) -> Path:
    for path in candidates:
        if path.exists() and is_match(path):
            return path
    tried = ", ".join(str(p) for p in candidates) or "(none)"
    raise DatasetNotFoundError(f"dataset {dataset!r} not found; tried: {tried}. {how_to_get}")


# --- Fashion-MNIST (IDX) ----------------------------------------------------------------------

_FMNIST_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


def _idx_file(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (LeCun's MNIST format), gzip-compressed or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(data) - offset != math.prod(shape):
        raise DataError(f"{path}: IDX header says {shape}, file holds {len(data) - offset} bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


def load_fashion_mnist(root: str | None = None) -> ImageDataset:
    candidates = []
    for base in [*_search_roots(root), FASHION_MNIST_SYSTEM_DIR]:
        candidates += [base, base / "fashion-mnist", base / "FashionMNIST" / "raw"]
    folder = _find_root(
        candidates,
        lambda p: all(_idx_file(p, stem) for stem in _FMNIST_FILES.values()),
        "fashion_mnist",
        "Install the Debian/Ubuntu package: sudo apt-get install dataset-fashion-mnist, "
        "or set FEDWS_DATA or data.root to a folder holding the four original IDX files "
        "(train-images-idx3-ubyte.gz, ...).",
    )
    arrays = {key: read_idx(_idx_file(folder, stem)) for key, stem in _FMNIST_FILES.items()}
    return ImageDataset(
        name="fashion_mnist",
        x_train=torch.from_numpy(arrays["x_train"].copy()).unsqueeze(1),
        y_train=torch.from_numpy(arrays["y_train"].astype(np.int64)),
        x_test=torch.from_numpy(arrays["x_test"].copy()).unsqueeze(1),
        y_test=torch.from_numpy(arrays["y_test"].astype(np.int64)),
        classes=FASHION_MNIST_CLASSES,
        source=str(folder),
    )


# --- CIFAR-10 / CIFAR-100 (python pickle folders) --------------------------------------------


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR's batches are pickles of dicts of numpy arrays: allow exactly what they need."""

    _ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset pickle")


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return _NumpyOnlyUnpickler(f, encoding="bytes").load()


def _cifar_arrays(batches: list[dict], label_key: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    x = np.concatenate([np.asarray(b[b"data"], dtype=np.uint8) for b in batches])
    y = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in batches])
    return torch.from_numpy(x.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(y)


def load_cifar(name: str, root: str | None = None) -> ImageDataset:
    """CIFAR-10 (``cifar-10-batches-py``) or CIFAR-100 (``cifar-100-python``) from local disk."""
    if name == "cifar10":
        folder_name, marker = "cifar-10-batches-py", "data_batch_1"
    else:
        folder_name, marker = "cifar-100-python", "train"
    candidates = []
    for base in _search_roots(root):
        candidates += [base, base / folder_name]
    folder = _find_root(
        candidates,
        lambda p: (p / marker).is_file(),
        name,
        f"Put the python version of the dataset ('{folder_name}', from the CIFAR website) on "
        "local disk and set FEDWS_DATA or data.root to it or to its parent folder.",
    )
    if name == "cifar10":
        train = [_unpickle(folder / f"data_batch_{i}") for i in range(1, 6)]
        test = [_unpickle(folder / "test_batch")]
        meta, label_key, names_key = _unpickle(folder / "batches.meta"), b"labels", b"label_names"
    else:
        train, test = [_unpickle(folder / "train")], [_unpickle(folder / "test")]
        meta, label_key, names_key = _unpickle(folder / "meta"), b"fine_labels", b"fine_label_names"
    x_train, y_train = _cifar_arrays(train, label_key)
    x_test, y_test = _cifar_arrays(test, label_key)
    classes = tuple(c.decode() if isinstance(c, bytes) else str(c) for c in meta[names_key])
    return ImageDataset(name, x_train, y_train, x_test, y_test, classes, source=str(folder))


# --- synthetic -------------------------------------------------------------------------------


def _synthetic_split(cfg: SyntheticConfig, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Oriented sine gratings: class c has orientation pi * c / K and one of two frequencies.

    Phase, amplitude and noise are random and each image is standardized to the same mean and
    std, so neither mean intensity nor contrast tells the class: a model must see the pattern.
    """
    g = torch.Generator().manual_seed(seed)
    k, size = cfg.num_classes, cfg.image_size
    labels = torch.randint(0, k, (n,), generator=g)
    theta = math.pi * labels.float() / k
    freq = torch.where(labels % 2 == 0, 2.0, 3.5) / size  # cycles per pixel
    phase = torch.rand(n, generator=g) * 2 * math.pi
    coords = torch.arange(size, dtype=torch.float32)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    proj = xx * torch.cos(theta)[:, None, None] + yy * torch.sin(theta)[:, None, None]
    pattern = torch.sin(2 * math.pi * freq[:, None, None] * proj + phase[:, None, None])
    amplitude = 0.2 + 0.3 * torch.rand(n, 1, 1, 1, generator=g)
    noise = torch.randn(n, cfg.channels, size, size, generator=g)
    x = amplitude * pattern[:, None] + noise
    x = (x - x.mean(dim=(1, 2, 3), keepdim=True)) / x.std(dim=(1, 2, 3), keepdim=True)
    images = (128 + 40 * x).round().clamp(0, 255).to(torch.uint8)
    return images, labels


def make_synthetic(cfg: SyntheticConfig, seed: int) -> ImageDataset:
    x_train, y_train = _synthetic_split(cfg, cfg.train_size, seed)
    x_test, y_test = _synthetic_split(cfg, cfg.test_size, seed + 1_000_003)
    classes = tuple(f"class_{i}" for i in range(cfg.num_classes))
    return ImageDataset(
        name="synthetic",
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        classes=classes,
        source=f"synthetic (generated in memory, seed {seed})",
        synthetic=True,
    )


# --- image folders ---------------------------------------------------------------------------


def _has_splits(path: Path) -> bool:
    """A zip file, or a folder with ``train/`` directly or in its single subfolder."""
    if path.is_file():
        return path.suffix.lower() == ".zip"
    if not path.is_dir():
        return False
    if (path / "train").is_dir():
        return True
    subdirs = [p for p in path.iterdir() if p.is_dir()]
    return len(subdirs) == 1 and (subdirs[0] / "train").is_dir()


def _notice(message: str) -> None:
    print(f"fedws: {message}", file=sys.stderr, flush=True)


def load_image_folder(root: str | None, image_size: int | None = None) -> ImageDataset:
    """``data.root`` (or ``$FEDWS_DATA``): a folder or a zip of ``train/<class>/*`` and
    ``test/<class>/*``; decoded once, then read from the cache (``app.data.imagefolder``)."""
    path = _find_root(
        _search_roots(root),
        _has_splits,
        "imagefolder",
        "Set data.root (--set data.root=PATH) or FEDWS_DATA to a folder or a .zip holding "
        "train/<class>/<image> and test/<class>/<image>.",
    )
    arrays, classes, domains, cache = load_imagefolder(path, image_size, _notice)
    source = f"{path} (decoded images cached in {cache})"
    return ImageDataset("imagefolder", classes=classes, source=source, domains=domains, **arrays)


def dataset_key(data: DataConfig) -> DataConfig:
    """What a dataset depends on: everything but the partition, except its seed (it draws the
    synthetic data and the subsets) and a natural partition's column (it is loaded with it)."""
    p = data.partition
    drawn = data.dataset == "synthetic" or data.train_samples or data.test_samples
    seed = p.data_seed if drawn else 0  # the same images for every seed: loaded once
    if p.by is not None:
        key = PartitionConfig(kind="natural", by=p.by, seed=seed)  # any client count
    else:
        key = PartitionConfig(seed=seed)
    return dataclasses.replace(data, partition=key)


def natural_clients(data: DataConfig) -> tuple[str, ...]:
    """The values of a natural partition's column, in client order (client k holds the k-th),
    read from the dataset's training split without decoding its images."""
    by = data.partition.by
    if data.dataset != "hf":
        raise DataError(
            f"data.partition: kind natural splits by a column ({by!r}) of the dataset: use "
            "data.dataset: hf with a dataset that has it"
        )
    return natural_values(data.hf, by)


def resolve_clients(cfg: Config) -> Config:
    """``cfg`` with a natural partition's ``num_clients`` counted when the config left it out:
    one client per distinct value of its ``by`` column. Every command that turns a YAML file
    into a run (``fedws run``, ``partitions``, a study's cells, ``flwr run .``) calls it before
    anything runs, so the simulated nodes, the strategy, the clients and ``config.yaml`` see one
    number; a config that gives ``num_clients`` is returned as it is."""
    p = cfg.data.partition
    if p.num_clients is not None:
        return cfg
    count = len(natural_clients(cfg.data))
    data = dataclasses.replace(cfg.data, partition=dataclasses.replace(p, num_clients=count))
    return dataclasses.replace(cfg, data=data)


def load_dataset(cfg: DataConfig) -> ImageDataset:
    """Load ``cfg.dataset`` from local disk (or generate it), subsampled as configured.

    The synthetic data and the subsets are drawn from the partition seed: data, not training.
    """
    seed = cfg.partition.data_seed
    if cfg.dataset == "fashion_mnist":
        ds = load_fashion_mnist(cfg.root)
    elif cfg.dataset in ("cifar10", "cifar100"):
        ds = load_cifar(cfg.dataset, cfg.root)
    elif cfg.dataset == "imagefolder":
        ds = load_image_folder(cfg.root, cfg.image_size)
    elif cfg.dataset == "hf":
        ds = ImageDataset("hf", **load_hf(cfg))
    else:
        ds = make_synthetic(cfg.synthetic, seed)
    ds = replace(ds, standardize=cfg.standardize)
    return ds.subsample(cfg.train_samples, cfg.test_samples, seed)
