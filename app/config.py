"""Typed, frozen, validated run configs (pfl-research's ``hyperparam/base.py`` habit).

YAML is read with ``yaml.safe_load`` only, ``--set a.b=c`` overrides are applied to the raw
mapping, and ``build`` turns it into frozen dataclasses, checking every key, type and range at
the edge. Any problem is a ``ConfigError`` whose one-line message names the field and what is
allowed; after that, code trusts the config.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from app.errors import ConfigError

# The names a config may use. Plain tuples, so that reading a config never imports torch; the
# registries (``app.nn.models.MODELS``, ``app.nn.norms``) are keyed by exactly these names
# (a test checks they agree).
ARCHS = ("cnn", "resnet20", "simple_cnn")
NORMS = ("none", "bn", "fixbn", "gn", "ln", "ws_gn", "ws_bn", "nf", "nf_se")
CROP_PADDINGS = ("zeros", "reflect")  # how augmentation pads before its random crop
DATASETS = ("fashion_mnist", "cifar10", "cifar100", "imagefolder", "hf", "synthetic")
AUGMENTED_BY_DEFAULT = ("cifar10", "cifar100", "imagefolder")  # natural images
PARTITIONS = (
    "iid",
    "dirichlet",
    "pathological",
    "shards",
    "quantity",
    "feature",
    "domains",
    "natural",
)
LOGGERS = ("csv", "tensorboard", "mlflow", "wandb")  # Lightning's loggers fedws can write to
# image styles of multi-domain clients (``app.data.domains`` keys its registry by these)
DOMAIN_STYLES = ("identity", "invert", "noise", "blur", "contrast", "grayscale", "hue")
DEFAULT_ALPHA = 0.5  # Dirichlet concentration when dirichlet/quantity leave alpha null
DEFAULT_CLIENTS = 10  # data.partition.num_clients when null (but for kind natural)
STRATEGIES = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedbn")
OPTIMIZERS = ("sgd", "adam", "adamw")
# the server optimizers' settings each strategy uses (any other set is refused, never ignored)
SERVER_OPTIMIZER_SETTINGS = {
    "fedadam": ("eta", "beta_1", "beta_2", "tau"),
    "fedyogi": ("eta", "beta_1", "beta_2", "tau"),
    "fedadagrad": ("eta", "tau"),
    "fedavgm": ("server_learning_rate", "server_momentum"),
    "fedprox": ("proximal_mu",),
}
# the partition settings each kind uses (a setting another kind would ignore is refused)
PARTITION_SETTINGS = {
    "alpha": ("dirichlet", "quantity", "domains"),
    "balanced": ("dirichlet", "domains"),
    "classes_per_client": ("pathological",),
    "shards_per_client": ("shards",),
    "min_partition_size": ("dirichlet", "quantity", "domains"),
}
PRECISIONS = ("32-true", "16-mixed", "bf16-mixed", "64-true")


def _check(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise ConfigError(field_name, message)


def _one_of(value: str, allowed: tuple[str, ...] | list[str], field_name: str) -> None:
    _check(value in allowed, field_name, f"got {value!r}; allowed: {', '.join(allowed)}")


def _fraction(value: float, field_name: str) -> None:
    _check(0.0 < value <= 1.0, field_name, f"must be in (0, 1], got {value}")


@dataclass(frozen=True)
class FeatureSkewConfig:
    """Per-client feature skew (NIID-Bench): client i of n gets the level i / (n - 1) of each
    maximum below, so client 0 sees clean data and the last client the strongest shift."""

    noise_std: float = 0.3  # Gaussian noise std, in units of the normalized input
    contrast: float = 0.5  # contrast scaled by (1 - level * contrast)
    rotation: float = 30.0  # degrees

    def __post_init__(self) -> None:
        _check(self.noise_std >= 0, "noise_std", f"must be >= 0, got {self.noise_std}")
        _check(0 <= self.contrast < 1, "contrast", f"must be in [0, 1), got {self.contrast}")
        _check(0 <= self.rotation <= 180, "rotation", f"must be in [0, 180], got {self.rotation}")


@dataclass(frozen=True)
class PartitionConfig:
    kind: str = "iid"
    # null: 10; with kind natural, one client per value of the ``by`` column, counted from the
    # dataset when a run's config is resolved (``app.data.datasets.resolve_clients``: the
    # commands and ``flwr run .`` resolve it before anything runs, and config.yaml records it)
    num_clients: int | None = None
    # Dirichlet concentration: label skew (dirichlet; domains: inside each domain, only when
    # given) or client sizes (quantity); null: 0.5 for dirichlet and quantity
    alpha: float | None = None
    # dirichlet: NIID-Bench's balancing step (a client already holding the mean client size
    # gets no more samples of the next classes); false: the unbalanced draw
    balanced: bool | None = None
    classes_per_client: int | None = None  # pathological (#C=k); null: 2
    shards_per_client: int | None = None  # shards; null: 2
    # dirichlet / quantity: the draw repeats until every client holds this many; null: 10
    min_partition_size: int | None = None
    # seed of every draw from the data (partition, subsets, train/val split, synthetic data);
    # null: the run's ``seed`` (resolved when the run's config is built), so seeds vary the
    # partition too; a number pins the data draws alone
    seed: int | None = None
    feature: FeatureSkewConfig | None = None  # feature: the per-client shifts; null: defaults
    # domains: the image style of each domain; client i belongs to domain i mod K. Empty for
    # an imagefolder tree of domain folders (train/<domain>/<class>/...): the folders are them
    domains: tuple[str, ...] = ()
    by: str | None = None  # natural: the column whose values are the clients (e.g. writer)

    @property
    def concentration(self) -> float:
        """``alpha``, or its default 0.5 when null."""
        return DEFAULT_ALPHA if self.alpha is None else self.alpha

    @property
    def is_balanced(self) -> bool:
        """Dirichlet draws: NIID-Bench's balancing step on (the default) or off."""
        return self.balanced is not False

    @property
    def classes(self) -> int:
        """#C=k: the classes per client (``classes_per_client``, default 2)."""
        return 2 if self.classes_per_client is None else self.classes_per_client

    @property
    def shards(self) -> int:
        return 2 if self.shards_per_client is None else self.shards_per_client

    @property
    def min_size(self) -> int:
        """The smallest client a Dirichlet or quantity draw accepts (NIID-Bench: 10)."""
        return 10 if self.min_partition_size is None else self.min_partition_size

    @property
    def shifts(self) -> FeatureSkewConfig:
        return FeatureSkewConfig() if self.feature is None else self.feature

    @property
    def data_seed(self) -> int:
        """The seed of the data draws; a partition outside a built run config must name it."""
        if self.seed is None:
            raise ValueError("data.partition.seed is unresolved: build the run's Config first")
        return self.seed

    def __post_init__(self) -> None:
        _one_of(self.kind, PARTITIONS, "kind")
        _check(self.seed is None or self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        for name in ("balanced", "min_partition_size"):
            _check(
                self.kind != "domains" or self.alpha is not None or getattr(self, name) is None,
                name,
                "with kind domains only when alpha is given (label skew inside each domain)",
            )
        if self.num_clients is None and self.kind != "natural":
            object.__setattr__(self, "num_clients", DEFAULT_CLIENTS)
        _check(
            self.num_clients is None or self.num_clients >= 1,
            "num_clients",
            f"must be >= 1, got {self.num_clients}",
        )
        _check(
            self.alpha is None or self.alpha > 0, "alpha", f"must be > 0 or null, got {self.alpha}"
        )
        for i, style in enumerate(self.domains):
            _one_of(style, DOMAIN_STYLES, f"domains[{i}]")
        _check(
            len(set(self.domains)) == len(self.domains),
            "domains",
            f"each style names one domain, at most once: got {list(self.domains)}",
        )
        _check(
            not self.domains or self.kind == "domains",
            "domains",
            f"only for kind: domains, got kind {self.kind!r}",
        )
        _check(
            (self.by is not None) == (self.kind == "natural"),
            "by",
            "kind natural needs by: <column> (e.g. writer), and only it takes one",
        )
        for name in ("classes_per_client", "shards_per_client", "min_partition_size"):
            value = getattr(self, name)
            _check(value is None or value >= 1, name, f"must be >= 1, got {value}")
        for name, kinds in PARTITION_SETTINGS.items():
            _check(
                getattr(self, name) is None or self.kind in kinds,
                name,
                f"is not used by kind {self.kind} (only by {', '.join(kinds)}): remove it",
            )
        _check(
            self.feature is None or self.kind == "feature",
            "feature",
            f"only for kind: feature, got kind {self.kind!r}: remove it",
        )


@dataclass(frozen=True)
class SyntheticConfig:
    train_size: int = 2000
    test_size: int = 500
    image_size: int = 28
    channels: int = 1
    num_classes: int = 10

    def __post_init__(self) -> None:
        for name in ("train_size", "test_size", "channels"):
            _check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        _check(self.image_size >= 8, "image_size", f"must be >= 8, got {self.image_size}")
        _check(self.num_classes >= 2, "num_classes", f"must be >= 2, got {self.num_classes}")


@dataclass(frozen=True)
class HfConfig:
    """A Hugging Face dataset (``data.dataset: hf``), read with the ``datasets`` library: a Hub
    id (needs the internet), or a local copy: a folder of data files (parquet, ...), one
    ``.parquet`` file per split given as a folder, or a ``DatasetDict.save_to_disk`` folder."""

    path: str | None = None
    image_column: str = "image"
    label_column: str = "label"
    train_split: str = "train"
    test_split: str = "test"

    def __post_init__(self) -> None:
        for name in ("image_column", "label_column", "train_split", "test_split"):
            _check(bool(getattr(self, name)), name, "must not be empty")


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "fashion_mnist"
    root: str | None = None  # a folder holding the dataset; searched before the defaults
    train_samples: int | None = None  # use a seeded random subset of the training split
    test_samples: int | None = None  # use a seeded random subset of the test split
    val_fraction: float = 0.1  # share of each client's shard held out for local validation
    image_size: int | None = None  # imagefolder: resize every image to this square size
    # random crop (4-pixel padding) + horizontal flip of each training batch; null: on for
    # natural images (cifar10, cifar100, imagefolder), off for fashion_mnist and synthetic
    augment: bool | None = None
    # augmentation's padding before the random crop: zeros (the channel mean of standardized
    # inputs) or reflect (NIID-Bench's CIFAR-10 recipe)
    crop_padding: str = "zeros"
    # inputs standardized by the training split's channel mean and std; false: pixel values
    # in [0, 1], as torchvision's ToTensor gives them (NIID-Bench feeds its models so)
    standardize: bool = True
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    hf: HfConfig = field(default_factory=HfConfig)

    @property
    def augmented(self) -> bool:
        """Whether training batches are augmented (``augment`` resolved by dataset)."""
        return self.dataset in AUGMENTED_BY_DEFAULT if self.augment is None else self.augment

    def __post_init__(self) -> None:
        _one_of(self.dataset, DATASETS, "dataset")
        _one_of(self.crop_padding, CROP_PADDINGS, "crop_padding")
        _check(
            self.dataset != "hf" or self.hf.path is not None,
            "hf.path",
            "data.dataset hf needs data.hf.path: a Hub id or a local dataset folder",
        )
        _check(
            self.image_size is None or self.image_size >= 8,
            "image_size",
            f"must be >= 8 or null, got {self.image_size}",
        )
        for name in ("train_samples", "test_samples"):
            value = getattr(self, name)
            _check(value is None or value >= 1, name, f"must be >= 1 or null, got {value}")
        _check(
            0.0 <= self.val_fraction < 1.0,
            "val_fraction",
            f"must be in [0, 1), got {self.val_fraction}",
        )


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "cnn"
    norm: str = "ws_gn"
    width: int | None = None  # channels of the first stage; the arch's default when null
    gn_groups: int = 8  # GroupNorm uses the largest group count <= this dividing the channels
    # norm fixbn (Zhong et al. 2023, arXiv 2303.06530): the last round whose local fits update
    # the BN running statistics; every later round normalizes with the global statistics,
    # frozen (scale, shift and the other weights keep training); >= 1. null: half of the rounds
    # (at least 1)
    fixbn_round: int | None = None

    def __post_init__(self) -> None:
        _one_of(self.arch, ARCHS, "arch")
        _one_of(self.norm, NORMS, "norm")
        _check(self.width is None or self.width >= 1, "width", f"must be >= 1, got {self.width}")
        _check(
            self.width is None or self.arch != "simple_cnn",
            "width",
            "simple_cnn is NIID-Bench's fixed network (6 and 16 channels): remove width",
        )
        _check(self.gn_groups >= 1, "gn_groups", f"must be >= 1, got {self.gn_groups}")
        _check(
            self.fixbn_round is None or self.norm == "fixbn",
            "fixbn_round",
            f"only for norm: fixbn, got norm {self.norm!r}: remove it",
        )
        _check(
            self.fixbn_round is None or self.fixbn_round >= 1,
            "fixbn_round",
            "must be >= 1 (round 0 has no statistics to freeze but the initial ones) or null, "
            f"got {self.fixbn_round}",
        )

    def options(self) -> dict[str, Any]:
        """Keyword options for ``build_model``."""
        opts: dict[str, Any] = {"gn_groups": self.gn_groups}
        if self.width is not None:
            opts["width"] = self.width
        return opts


@dataclass(frozen=True)
class OptimConfig:
    name: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    # weight decay on norm affines, scaled-WS gains and NF skip gains too (NFNets: not)
    decay_norms: bool = False
    # adaptive gradient clipping lambda (Brock et al. 2021, arXiv 2102.06171); null: off
    agc_clip: float | None = None

    def __post_init__(self) -> None:
        _one_of(self.name, OPTIMIZERS, "name")
        _check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        _check(0 <= self.momentum < 1, "momentum", f"must be in [0, 1), got {self.momentum}")
        _check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(
            self.agc_clip is None or self.agc_clip > 0,
            "agc_clip",
            f"must be > 0 or null, got {self.agc_clip}",
        )
        _check(
            not self.nesterov or (self.name == "sgd" and self.momentum > 0),
            "nesterov",
            "needs name: sgd and momentum > 0",
        )


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 32
    local_epochs: int = 1
    local_steps: int | None = None  # when set, overrides local_epochs
    eval_batch_size: int = 1024
    precision: str = "32-true"
    # Lightning deterministic=True: deterministic algorithms only, cuDNN benchmark off (GPU)
    deterministic: bool = False

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.local_epochs >= 1, "local_epochs", f"must be >= 1, got {self.local_epochs}")
        _check(
            self.local_steps is None or self.local_steps >= 1,
            "local_steps",
            f"must be >= 1 or null, got {self.local_steps}",
        )
        _check(
            self.eval_batch_size >= 1,
            "eval_batch_size",
            f"must be >= 1, got {self.eval_batch_size}",
        )
        _one_of(self.precision, PRECISIONS, "precision")


@dataclass(frozen=True)
class FederationConfig:
    strategy: str = "fedavg"
    rounds: int = 10
    fraction_train: float = 1.0  # share of clients sampled for training each round
    fraction_evaluate: float = 1.0  # share of clients sampled for local evaluation
    min_clients: int = 1  # fewest successful replies a round needs
    proximal_mu: float | None = None  # fedprox; null: 0.01
    server_learning_rate: float | None = None  # fedavgm; null: 1.0
    server_momentum: float | None = None  # fedavgm; null: 0.9 (Hsu et al. 2019)
    # fedadam / fedyogi / fedadagrad (Reddi et al. 2021); null keeps Flower's default
    eta: float | None = None
    eta_l: float | None = None  # refused: the clients' learning rate is optim.lr
    beta_1: float | None = None
    beta_2: float | None = None
    tau: float | None = None

    def __post_init__(self) -> None:
        _one_of(self.strategy, STRATEGIES, "strategy")
        _check(self.rounds >= 1, "rounds", f"must be >= 1, got {self.rounds}")
        _fraction(self.fraction_train, "fraction_train")
        _fraction(self.fraction_evaluate, "fraction_evaluate")
        _check(self.min_clients >= 1, "min_clients", f"must be >= 1, got {self.min_clients}")
        mu, lr, momentum = self.proximal_mu, self.server_learning_rate, self.server_momentum
        _check(mu is None or mu >= 0, "proximal_mu", f"must be >= 0, got {mu}")
        _check(lr is None or lr > 0, "server_learning_rate", f"must be > 0, got {lr}")
        _check(
            momentum is None or 0 <= momentum < 1,
            "server_momentum",
            f"must be in [0, 1), got {momentum}",
        )
        for name in ("eta", "tau"):
            value = getattr(self, name)
            _check(value is None or value > 0, name, f"must be > 0 or null, got {value}")
        _check(
            self.eta_l is None,
            "eta_l",
            "is the clients' learning rate (Reddi et al.'s eta_l), which fedws clients take "
            f"from optim.lr: set optim.lr instead, got {self.eta_l}",
        )
        for name in ("beta_1", "beta_2"):
            value = getattr(self, name)
            _check(value is None or 0 <= value < 1, name, f"must be in [0, 1), got {value}")
        used = SERVER_OPTIMIZER_SETTINGS.get(self.strategy, ())
        for name in {n for names in SERVER_OPTIMIZER_SETTINGS.values() for n in names}:
            users = [k for k, v in SERVER_OPTIMIZER_SETTINGS.items() if name in v]
            _check(
                getattr(self, name) is None or name in used,
                name,
                f"is not used by strategy {self.strategy} (only by {', '.join(users)}): "
                "remove it, or choose one of those",
            )

    @property
    def mu(self) -> float:
        """FedProx's proximal mu (``proximal_mu``, default 0.01)."""
        return 0.01 if self.proximal_mu is None else self.proximal_mu

    @property
    def server_lr(self) -> float:
        """FedAvgM's server learning rate (default 1.0)."""
        return 1.0 if self.server_learning_rate is None else self.server_learning_rate

    @property
    def momentum(self) -> float:
        """FedAvgM's server momentum (default 0.9, Hsu et al. 2019)."""
        return 0.9 if self.server_momentum is None else self.server_momentum

    def strategy_options(self) -> dict[str, float]:
        """Keyword arguments of the chosen Flower strategy class (the server optimizers'
        settings go to ``app.learn.server_optim``, not to Flower)."""
        if self.strategy == "fedprox":
            return {"proximal_mu": self.mu}
        return {}


@dataclass(frozen=True)
class ServerConfig:
    eval_every: int = 1  # evaluate the global model on the test split every N rounds (and last)
    diagnostics: bool = True  # drift, update agreement, BN statistics -> OUT/diagnostics.csv
    gap_samples: int = 2048  # test samples whose BN-layer statistics the gap is measured on
    bn_recalibration: bool = False  # re-estimate BN statistics on server data before testing
    calibration_samples: int = 1024  # training samples the server holds for recalibration

    def __post_init__(self) -> None:
        _check(self.eval_every >= 1, "eval_every", f"must be >= 1, got {self.eval_every}")
        _check(self.gap_samples >= 1, "gap_samples", f"must be >= 1, got {self.gap_samples}")
        _check(
            self.calibration_samples >= 1,
            "calibration_samples",
            f"must be >= 1, got {self.calibration_samples}",
        )


@dataclass(frozen=True)
class LoggingConfig:
    """Where each round's numbers go besides the run directory: Lightning's loggers."""

    loggers: tuple[str, ...] = ("csv",)  # csv (always: metrics.csv), tensorboard, mlflow, wandb
    # MLflow tracking store; null: a SQLite database mlflow.db beside the run directory
    mlflow_uri: str | None = None
    experiment: str | None = None  # MLflow experiment / W&B project; null: the study's name

    def __post_init__(self) -> None:
        for i, name in enumerate(self.loggers):
            _one_of(name, LOGGERS, f"loggers[{i}]")
        _check(
            "csv" in self.loggers,
            "loggers",
            "must include csv: it writes the run directory's metrics.csv, which fedws reads",
        )
        _check(
            len(set(self.loggers)) == len(self.loggers),
            "loggers",
            f"each at most once, got {list(self.loggers)}",
        )


@dataclass(frozen=True)
class SimulationConfig:
    """Resources of each simulated client (Flower's Ray backend ``client_resources``)."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    ray_num_cpus: int | None = None  # CPUs the local Ray instance may use (null: all)
    ray_address: str | None = None  # an existing Ray cluster ("auto", "host:6379"); or RAY_ADDRESS

    def __post_init__(self) -> None:
        _check(self.num_cpus > 0, "num_cpus", f"must be > 0, got {self.num_cpus}")
        _check(self.num_gpus >= 0, "num_gpus", f"must be >= 0, got {self.num_gpus}")
        _check(
            self.ray_num_cpus is None or self.ray_num_cpus >= 1,
            "ray_num_cpus",
            f"must be >= 1 or null, got {self.ray_num_cpus}",
        )


@dataclass(frozen=True)
class FaultInjection:
    """Fault injection, for tests of fedws's own robustness only (off by default; no run that
    reports a result sets it): in the listed rounds
    (every round when ``rounds`` is empty) a client in ``fail_clients`` raises during training
    and a client in ``nan_clients`` replies with NaN weights."""

    fail_clients: tuple[int, ...] = ()
    nan_clients: tuple[int, ...] = ()
    rounds: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("fail_clients", "nan_clients", "rounds"):
            values = getattr(self, name)
            _check(all(v >= 0 for v in values), name, f"must be >= 0, got {list(values)}")

    def fails(self, client: int, server_round: int) -> bool:
        return client in self.fail_clients and (not self.rounds or server_round in self.rounds)

    def poisons(self, client: int, server_round: int) -> bool:
        return client in self.nan_clients and (not self.rounds or server_round in self.rounds)


@dataclass(frozen=True)
class Config:
    # the run's seed: model init, batch order and (unless data.partition.seed pins them) every
    # draw from the data (NIID-Bench's init_seed habit)
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    fault_injection: FaultInjection = field(default_factory=FaultInjection)

    def __post_init__(self) -> None:
        _check(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        p = self.data.partition
        if p.seed is None:  # the data draws follow the run's seed
            data = dataclasses.replace(self.data, partition=dataclasses.replace(p, seed=self.seed))
            object.__setattr__(self, "data", data)
        fixbn = self.model.fixbn_round
        _check(
            fixbn is None or fixbn <= self.federation.rounds,
            "model.fixbn_round",
            f"must be <= federation.rounds ({self.federation.rounds}), got {fixbn}",
        )
        n = self.data.partition.num_clients  # None: a natural partition's, not yet counted
        _check(
            n is None or self.federation.min_clients <= n,
            "federation.min_clients",
            f"must be <= data.partition.num_clients ({n}), got {self.federation.min_clients}",
        )

    @property
    def bn_statistics_frozen_after(self) -> int | None:
        """norm fixbn: the last round that updates BN statistics (``model.fixbn_round``, or
        half of the rounds); None for every other norm."""
        if self.model.norm != "fixbn":
            return None
        fixbn = self.model.fixbn_round
        return max(1, self.federation.rounds // 2) if fixbn is None else fixbn

    @property
    def server_model_untrained(self) -> bool:
        """FedBN on a model with BatchNorm: the server's BN layers never train, so its own test
        accuracy measures the shared layers only, not the method."""
        return self.federation.strategy == "fedbn" and self.model.norm in ("bn", "fixbn", "ws_bn")

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-safe data (tuples become lists)."""
        return dataclasses.asdict(self, dict_factory=lambda items: {k: _plain(v) for k, v in items})

    def flat(self) -> dict[str, Any]:
        """``{"data.partition.kind": "iid", ...}``: every leaf by its dotted key (lists as
        text), as ``--set`` names them."""
        out: dict[str, Any] = {}

        def walk(prefix: str, node: Any) -> None:
            if isinstance(node, dict):
                for key, value in node.items():
                    walk(f"{prefix}.{key}" if prefix else key, value)
            else:
                out[prefix] = str(node) if isinstance(node, list) else node

        walk("", self.to_dict())
        return out


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


# --- building from raw mappings ---------------------------------------------------------------


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return {bool: "boolean", int: "integer", float: "number", str: "string"}.get(tp, str(tp))


def _convert(value: Any, tp: Any, path: str) -> Any:
    """``value`` (from YAML) as the schema's type ``tp``, or a ConfigError naming ``path``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _convert_union(value, tp, path)
    if origin is tuple:  # tuple[X, ...] from a YAML list
        (item, _) = typing.get_args(tp)
        if isinstance(value, list):
            return tuple(_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value))
        raise ConfigError(path, f"expected a list of {_type_name(item)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return _build(tp, value, path)
    elif tp not in _SCALARS:  # pragma: no cover - a schema bug, not a user error
        raise TypeError(f"unsupported config type {tp!r} at {path}")
    elif _SCALARS[tp](value):
        return float(value) if tp is float else value
    raise ConfigError(path, f"expected {_type_name(tp)}, got {value!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# each scalar type of the schema: which YAML values it accepts (an int is a float, a bool not)
_SCALARS = {
    type(None): lambda v: v is None,
    bool: lambda v: isinstance(v, bool),
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    float: _is_number,
    str: lambda v: isinstance(v, str),
}


def _convert_union(value: Any, tp: Any, path: str) -> Any:
    """The first member of ``X | Y`` that accepts ``value``; an error inside a nested value
    (a mapping that is the right type but holds a bad key) is reported as it is."""
    for arg in typing.get_args(tp):
        try:
            return _convert(value, arg, path)
        except ConfigError as err:
            if err.field != path:
                raise
    raise ConfigError(path, f"expected {_type_name(tp)}, got {value!r}")


def _build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(where, f"unknown key; allowed here: {', '.join(names)}")
    kwargs = {}
    for key, value in raw.items():
        where = f"{prefix}.{key}" if prefix else key
        kwargs[key] = _convert(value, hints[key], where)
    try:
        return cls(**kwargs)
    except ConfigError as err:  # raised by this class's own __post_init__: a relative name
        if prefix:
            raise ConfigError(f"{prefix}.{err.field}", err.message) from None
        raise


def with_current_names(raw: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A copy of a raw config with the names fedws before 0.2 used replaced by today's, and a
    line per replacement (``faults`` is ``fault_injection``; ``server.tensorboard: true`` is
    ``tensorboard`` in ``logging.loggers``), so a config or run folder written then still reads."""
    raw = copy.deepcopy(raw)
    notes = []
    if "faults" in raw and "fault_injection" not in raw:
        raw["fault_injection"] = raw.pop("faults")
        notes.append("faults: read as fault_injection (its name before fedws 0.2)")
    server = raw.get("server")
    if isinstance(server, dict) and "tensorboard" in server:
        if server.pop("tensorboard"):
            logging = raw["logging"] = dict(raw.get("logging") or {})
            loggers = list(logging.get("loggers") or ["csv"])
            logging["loggers"] = loggers + ["tensorboard"] * ("tensorboard" not in loggers)
        notes.append("server.tensorboard: read as 'tensorboard' in logging.loggers (before 0.2)")
    return raw, notes


def without_unused_settings(raw: dict[str, Any]) -> dict[str, Any]:
    """A copy of a raw config under today's names and without the settings its strategy or
    partition kind does not use (fedws before 0.2 wrote them all, with their defaults, into
    every ``config.yaml``)."""
    return _without_unused(with_current_names(raw)[0])


def _without_unused(raw: dict[str, Any]) -> dict[str, Any]:
    fed = raw.get("federation")
    if isinstance(fed, dict):
        used = SERVER_OPTIMIZER_SETTINGS.get(fed.get("strategy", "fedavg"), ())
        for names in SERVER_OPTIMIZER_SETTINGS.values():
            for name in names:
                if name not in used and fed.get(name) is not None:
                    del fed[name]
    part = (raw.get("data") or {}).get("partition")
    if isinstance(part, dict):
        kind = part.get("kind", "iid")
        for name, kinds in PARTITION_SETTINGS.items():
            if kind not in kinds and part.get(name) is not None:
                del part[name]
        if kind != "feature":
            part.pop("feature", None)
    return raw


def build(raw: dict[str, Any] | None) -> Config:
    """Validate a raw mapping (from YAML) into a frozen ``Config``."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError("<top>", f"a config must be a mapping, got {type(raw).__name__}")
    return _build(Config, raw, "")


class _SafeLoader12(yaml.SafeLoader):
    """``yaml.SafeLoader`` reading numbers as YAML 1.2 does: ``1e-3``, ``1E-3`` and ``5e+2``
    are floats (YAML 1.1, PyYAML's rule, reads a float without a dot as text)."""


class _SafeDumper12(yaml.SafeDumper):
    """``yaml.SafeDumper`` quoting every string the loader above would read as a number (a run
    name ``1e5`` stays a string across a save and a reload)."""


_FLOAT_12 = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
for _cls in (_SafeLoader12, _SafeDumper12):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+0123456789"))


def yaml_dump(data: Any, **kwargs: Any) -> str:
    """Safe YAML that ``yaml_load`` reads back as it was written."""
    return yaml.dump(data, Dumper=_SafeDumper12, **kwargs)


def yaml_load(text: str) -> Any:
    """Safe YAML with YAML 1.2 numbers: every config, override and study file is read so."""
    return yaml.load(text, Loader=_SafeLoader12)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=c`` -> (["a", "b"], c), the value parsed as YAML (``1`` int, ``null``, ``{k: v}``)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError("--set", f"expected key.path=value, got {text!r}")
    try:
        parsed = yaml_load(value) if value.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(key.strip(), f"--set value is not valid YAML: {value!r}") from err
    return key.strip().split("."), parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each ``a.b=c`` set (intermediate mappings are created)."""
    raw = copy.deepcopy(raw)
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for i, key in enumerate(keys[:-1]):
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                where = ".".join(keys[: i + 1])
                raise ConfigError(where, f"is {child!r}, not a mapping: cannot set {text!r}")
            node = child
        node[keys[-1]] = value
    return raw


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(str(path), "config file not found") from None
    except IsADirectoryError:
        raise ConfigError(str(path), "is a folder, not a YAML file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(str(path), f"cannot read it as text: {err}") from None
    try:
        raw = yaml_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(where, f"invalid YAML: {getattr(err, 'problem', err)}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(str(path), f"a config must be a mapping, got {type(raw).__name__}")
    return raw


def load_config(
    path: str | Path, overrides: list[str] | None = None, saved: bool = False
) -> Config:
    """Read a YAML config, apply ``--set`` overrides and validate it. Names from before
    fedws 0.2 are read as today's, with a line on stderr for each. ``saved``: the file is a
    run folder's own ``config.yaml`` (a resume), where fedws before 0.2 also wrote the settings
    the run did not use: those are dropped, not refused."""
    raw, notes = with_current_names(read_yaml(path))
    if saved:
        raw = _without_unused(raw)
    for note in notes:
        print(f"fedws: {path}: {note}", file=sys.stderr)
    return build(apply_overrides(raw, overrides or []))


def dump_config(config: Config) -> str:
    """The config as YAML; a data seed that followed the run's seed is written as null, so a
    rerun of the file with another ``seed`` draws its own data, as the original would have."""
    raw = config.to_dict()
    partition = raw["data"]["partition"]
    if partition["seed"] == config.seed:
        partition["seed"] = None
    return yaml_dump(raw, sort_keys=False)
