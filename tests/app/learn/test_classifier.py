from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from helpers import small_config

from app.config import NORMS
from app.data.datasets import load_dataset
from app.data.partitions import make_shard
from app.learn.classifier import FedwsClassifier
from app.learn.runtime import new_module
from app.learn.trainer import make_trainer, tensor_loader
from app.nn.models import no_decay_parameters

# fits here run without a validation loader on purpose
pytestmark = pytest.mark.filterwarnings("ignore:You defined a `validation_step`")


def quiet_trainer(**kw) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kw,
    )


@pytest.fixture(scope="module")
def shard_and_data():
    cfg = small_config("data.synthetic.train_size=1200", "data.partition.num_clients=1")
    ds = load_dataset(cfg.data)
    shard = make_shard(ds, np.arange(len(ds.y_train)), 0, cfg.data)
    return cfg, ds, shard


def test_lightning_fit_learns_the_synthetic_task(shard_and_data):
    cfg, ds, shard = shard_and_data
    L.seed_everything(0, verbose=False)
    module = FedwsClassifier.from_config(cfg, ds.in_channels, ds.num_classes)
    trainer = quiet_trainer(max_epochs=10)
    trainer.fit(
        module,
        tensor_loader(shard.x_train, shard.y_train, 32, shuffle=True),
        tensor_loader(shard.x_val, shard.y_val, 256),
    )
    metrics = trainer.callback_metrics
    assert {"train_loss", "val_loss", "val_acc"} <= set(metrics)
    assert metrics["val_acc"] > 0.5  # chance is 0.1
    (test,) = trainer.test(
        module, tensor_loader(ds.normalize(ds.x_test), ds.y_test, 256), verbose=False
    )
    assert test["test_acc"] > 0.5 and np.isfinite(test["test_loss"])


class PerStepLogging(FedwsClassifier):
    """The usual Lightning way: Lightning's automatic optimization, and ``self.log(...,
    on_epoch=True)`` in every training step."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.automatic_optimization = True

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=len(y))
        if self.hparams.proximal_mu > 0:
            loss = loss + self.proximal_term()
        return loss

    def on_train_epoch_end(self) -> None:
        pass


@pytest.mark.parametrize(
    "limits",
    [{"max_epochs": 1}, {"max_epochs": 3}, {"max_steps": 7, "max_epochs": -1}],
    ids=["one epoch", "three epochs", "stops mid-epoch"],
)
def test_train_loss_and_weights_are_lightnings_automatic_step_bit_for_bit(shard_and_data, limits):
    """fedws's own optimizer step leaves exactly the weights Lightning's automatic
    optimization leaves, step for step, and train_loss, logged once per epoch, is exactly what
    per-step on_epoch logging gives (the last epoch's batch-size-weighted mean), also when
    max_steps stops mid-epoch."""
    cfg, ds, shard = shard_and_data
    losses, weights, steps = [], [], []
    for cls in (FedwsClassifier, PerStepLogging):
        torch.manual_seed(0)
        module = cls.from_config(cfg, ds.in_channels, ds.num_classes)
        trainer = quiet_trainer(**limits)
        trainer.fit(module, tensor_loader(shard.x_train, shard.y_train, 48, True, seed=3))
        losses.append(trainer.callback_metrics["train_loss"])
        weights.append(module.model.state_dict())
        steps.append(trainer.global_step)
    assert losses[0].item() == losses[1].item()
    assert steps[0] == steps[1] == limits.get("max_steps", steps[1]) > 0
    for key, value in weights[0].items():
        assert torch.equal(value, weights[1][key]), key


# NIID-Bench's network without normalization (its fully connected layer expects 28x28 images)
SIMPLE_CNN = (
    "model.arch=simple_cnn",
    "model.norm=none",
    "model.width=null",
    "data.synthetic.image_size=28",
)


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.norm=bn", "optim.weight_decay=1e-4"],
        ["model.norm=nf", "optim.agc_clip=0.01", "optim.lr=0.5"],
        ["optim.name=adam", "optim.lr=0.01", "federation.strategy=fedprox"],
        [*SIMPLE_CNN, "train.precision=bf16-mixed"],
        ["optim.name=adamw", "optim.weight_decay=0.01", "optim.decay_norms=false"],
        ["optim.nesterov=true", "optim.weight_decay=1e-4", "model.norm=gn"],
        ["model.norm=nf", "optim.agc_clip=0.01", "train.precision=bf16-mixed"],
        ["model.norm=fixbn", "federation.rounds=4"],  # with its BN statistics frozen
    ],
    ids=[
        "bn, weight decay",
        "nf, AGC",
        "adam, fedprox",
        "simple_cnn, bf16-mixed",
        "adamw, decay groups",
        "nesterov, gn",
        "nf, AGC, bf16-mixed",
        "fixbn, frozen",
    ],
)
def test_every_setting_steps_as_lightnings_automatic_optimization(overrides):
    cfg = small_config("data.synthetic.train_size=300", "data.partition.num_clients=1", *overrides)
    ds = load_dataset(cfg.data)
    shard = make_shard(ds, np.arange(len(ds.y_train)), 0, cfg.data)
    weights = []
    for cls in (FedwsClassifier, PerStepLogging):
        torch.manual_seed(0)
        module = cls.from_config(cfg, ds.in_channels, ds.num_classes)
        module.set_global_weights()
        module.bn_statistics_frozen = cfg.model.norm == "fixbn"
        trainer = quiet_trainer(max_epochs=2, precision=cfg.train.precision)
        trainer.fit(module, tensor_loader(shard.x_train, shard.y_train, 32, True, seed=3))
        weights.append(module.model.state_dict())
    for key, value in weights[0].items():
        assert torch.equal(value, weights[1][key]), key
    torch.manual_seed(0)
    start = FedwsClassifier.from_config(cfg, ds.in_channels, ds.num_classes).model.state_dict()
    moved = [
        k for k, v in start.items() if v.is_floating_point() and not torch.equal(v, weights[0][k])
    ]
    assert len(moved) >= len(list(module.model.parameters()))  # every weight trained


def test_checkpoint_reloads_the_same_model(shard_and_data, tmp_path):
    cfg, ds, shard = shard_and_data
    module = FedwsClassifier.from_config(cfg, ds.in_channels, ds.num_classes)
    trainer = quiet_trainer(max_steps=3, limit_val_batches=0)
    trainer.fit(module, tensor_loader(shard.x_train, shard.y_train, 32))
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    loaded = FedwsClassifier.load_from_checkpoint(tmp_path / "m.ckpt", weights_only=True)
    assert loaded.hparams.norm == "ws_gn" and loaded.hparams.model_options == {
        "gn_groups": 8,
        "width": 8,
    }
    module.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(shard.x_val), module(shard.x_val))


@pytest.mark.parametrize("standardize", [True, False])
def test_a_module_carries_its_inputs_and_prepares_them_as_the_dataset(standardize):
    cfg = small_config(f"data.standardize={str(standardize).lower()}")
    ds = load_dataset(cfg.data)
    module = new_module(cfg, ds)
    hp = module.hparams
    assert hp.class_names == list(ds.classes) and hp.input_size == [16, 16]
    if standardize:
        mean, std = ds.channel_stats()
        assert hp.input_mean == mean.tolist() and hp.input_std == std.tolist()
    else:
        assert hp.input_mean is None and hp.input_std is None
    # the same inputs, to the bit, as the run's own normalization gives
    assert torch.equal(module.prepare(ds.x_test), ds.normalize(ds.x_test))
    # metadata only: the same initial weights as a module built without it
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        bare = FedwsClassifier.from_config(cfg, ds.in_channels, ds.num_classes, image_size=16)
    for (name, value), other in zip(
        module.state_dict().items(), bare.state_dict().values(), strict=True
    ):
        assert torch.equal(value, other), name


@pytest.mark.parametrize(
    ("override", "cls", "check"),
    [
        ("optim.name=sgd", torch.optim.SGD, {"momentum": 0.9, "nesterov": False}),
        ("optim.nesterov=true", torch.optim.SGD, {"nesterov": True}),
        ("optim.name=adam", torch.optim.Adam, {"weight_decay": 0.001}),
        ("optim.name=adamw", torch.optim.AdamW, {"weight_decay": 0.001}),
    ],
)
def test_optimizer_comes_from_config(override, cls, check):
    cfg = small_config("optim.lr=0.01", "optim.weight_decay=0.001", override)
    opt = FedwsClassifier.from_config(cfg, 1, 10).configure_optimizers()
    assert type(opt) is cls
    group = opt.param_groups[0]
    assert group["lr"] == 0.01
    assert all(group[k] == v for k, v in check.items())


def test_weight_decay_spares_norms_and_gains_unless_asked():
    cfg = small_config("model.norm=nf", "optim.weight_decay=0.001")
    module = FedwsClassifier.from_config(cfg, 1, 10)
    decayed, spared = module.configure_optimizers().param_groups
    names = {id(p): n for n, p in module.named_parameters()}
    assert decayed["weight_decay"] == 0.001 and spared["weight_decay"] == 0.0
    assert {names[id(p)] for p in spared["params"]} == {
        f"model.{n}" for n in no_decay_parameters(module.model)
    }
    assert all(names[id(p)].endswith((".weight", ".bias")) for p in decayed["params"])
    everything = small_config("model.norm=nf", "optim.weight_decay=0.001", "optim.decay_norms=true")
    (group,) = FedwsClassifier.from_config(everything, 1, 10).configure_optimizers().param_groups
    assert len(group["params"]) == len(list(module.parameters()))


def test_deterministic_asks_lightning_for_deterministic_algorithms():
    try:
        make_trainer(small_config("train.deterministic=true"))
        assert torch.are_deterministic_algorithms_enabled()
        make_trainer(small_config())
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


def test_proximal_term_is_on_only_for_fedprox():
    assert FedwsClassifier.from_config(small_config(), 1, 10).hparams.proximal_mu == 0.0
    cfg = small_config("federation.strategy=fedprox", "federation.proximal_mu=0.5")
    assert FedwsClassifier.from_config(cfg, 1, 10).hparams.proximal_mu == 0.5


def test_proximal_term_value():
    module = FedwsClassifier("cnn", "gn", 1, 10, model_options={"width": 4}, proximal_mu=0.5)
    assert module.proximal_term().item() == 0.0  # no anchor yet
    module.set_global_weights()
    assert module.proximal_term().item() == 0.0
    with torch.no_grad():
        module.model.classifier.bias.add_(2.0)  # 10 entries moved by 2
    assert module.proximal_term().item() == pytest.approx(0.5 / 2 * 10 * 4.0)


def test_proximal_term_keeps_local_weights_near_the_global_ones(shard_and_data):
    shard = shard_and_data[2]

    def drift(mu: float) -> float:
        torch.manual_seed(0)
        module = FedwsClassifier("cnn", "gn", 1, 10, model_options={"width": 8}, proximal_mu=mu)
        start = [p.detach().clone() for p in module.parameters()]
        module.set_global_weights()
        quiet_trainer(max_steps=15, limit_val_batches=0).fit(
            module, tensor_loader(shard.x_train, shard.y_train, 32, shuffle=True)
        )
        return sum(
            (p.detach() - s).pow(2).sum().item()
            for p, s in zip(module.parameters(), start, strict=True)
        )

    assert drift(5.0) < 0.7 * drift(0.0)


def test_tensor_loader_batches_cover_the_data_once_and_shuffle_by_seed():
    x, y = torch.arange(10).float()[:, None], torch.arange(10)
    batches = list(tensor_loader(x, y, 4))
    assert [len(b[1]) for b in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([b[1] for b in batches]), y)
    order = lambda s: torch.cat([b[1] for b in tensor_loader(x, y, 4, shuffle=True, seed=s)])  # noqa: E731
    assert torch.equal(order(1), order(1)) and not torch.equal(order(1), order(2))
    assert sorted(order(1).tolist()) == list(range(10))
    xb, yb = next(iter(tensor_loader(x, y, 4, shuffle=True, seed=1)))
    assert torch.equal(xb[:, 0].long(), yb)  # images stay with their labels


def test_trainers_read_the_callback_factories_once_and_each_gets_its_own_callbacks(monkeypatch):
    import importlib.metadata

    from app.learn import trainer as trainer_module

    made = []

    class Factory:  # an installed package's callback factory, as an entry point loads it
        name = "some-package"

        def load(self):
            def factory():
                made.append(L.Callback())
                return [made[-1]]

            return factory

    reads = []

    def entry_points(*, group):
        reads.append(group)
        return [Factory()] if group == "lightning.pytorch.callbacks_factory" else []

    trainer_module.remember_callback_factories()  # as the first make_trainer of a process
    from lightning.fabric.utilities import registry

    assert registry.entry_points is trainer_module._entry_points
    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    trainer_module._entry_points.cache_clear()
    try:
        cfg = small_config()
        first, second = make_trainer(cfg), make_trainer(cfg)
    finally:
        trainer_module._entry_points.cache_clear()  # forget the fake installed package
    assert reads.count("lightning.pytorch.callbacks_factory") == 1  # read once
    assert len(made) == 2 and made[0] is not made[1]  # but called for each Trainer
    assert made[0] in first.callbacks and made[1] in second.callbacks


@pytest.mark.parametrize(
    "overrides",
    [(f"model.norm={norm}",) for norm in NORMS]
    + [
        SIMPLE_CNN,
        ("model.arch=resnet20", "model.norm=bn"),
        ("model.norm=ws_gn", "train.precision=bf16-mixed"),
    ],
    ids=[*NORMS, "simple_cnn none", "resnet20 bn", "ws_gn bf16-mixed"],
)
def test_cpu_evaluation_in_passes_gives_the_metrics_of_one_pass(overrides, monkeypatch):
    from app.learn import classifier

    cfg = small_config("data.synthetic.train_size=300", "data.partition.num_clients=1", *overrides)
    ds = load_dataset(cfg.data)
    torch.manual_seed(0)
    module = FedwsClassifier.from_config(cfg, ds.in_channels, ds.num_classes)
    shard = make_shard(ds, np.arange(len(ds.y_train)), 0, cfg.data)
    quiet_trainer(max_steps=3, limit_val_batches=0).fit(
        module, tensor_loader(shard.x_train, shard.y_train, 32)
    )  # BN running statistics other than their initial values
    x, y = ds.normalize(ds.x_test), ds.y_test
    n = len(y)
    assert n > 64
    passes = []
    module.model.register_forward_hook(lambda m, args, out: passes.append(len(args[0])))
    results = {}
    for chunk in (10**9, 64, n - 1):  # one pass; several and a short last one; a last of 1
        monkeypatch.setattr(classifier, "CPU_EVAL_CHUNK", chunk)
        passes.clear()
        trainer = quiet_trainer(precision=cfg.train.precision)
        (results[chunk],) = trainer.test(module, tensor_loader(x, y, n), verbose=False)
        assert max(passes) == min(chunk, n) and sum(passes) == n
        assert results[chunk] == results[10**9], chunk
