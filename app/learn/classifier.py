"""The LightningModule every local fit and every server-side evaluation uses.

Lightning's ``backbone_image_classifier`` habits: typed ``__init__``, ``save_hyperparameters``,
the optimizer built from ``self.hparams``, torchmetrics objects as attributes logged as objects.
The model is built from (arch, norm, ...) inside ``__init__``, so a checkpoint reloads with
``FedwsClassifier.load_from_checkpoint(path)``; the hyper-parameters also keep what a prediction
needs besides the weights (class names, input size, the input normalization: ``prepare``).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from app.config import Config
from app.data.augment import random_crop_flip
from app.data.datasets import standardized
from app.learn import agc
from app.nn.models import build_model, no_decay_parameters

_PLAIN_TYPES = frozenset({str, int, float, bool, type(None), torch.Tensor})
# Samples per forward pass of an evaluation batch on CPU: a batch of 1024 (the default
# train.eval_batch_size) has activations of about 100 MB a layer for a 32-channel CNN at 28x28,
# and ran 1.8-2x slower than the same images in passes of 128 on a 2-core machine. In eval mode
# each sample's logits do not depend on the other samples, so the loss and accuracy of the
# batch are the same; on a GPU the batch goes through in one pass.
CPU_EVAL_CHUNK = 128


class FedwsClassifier(L.LightningModule):
    """Cross-entropy classifier around any ``build_model`` network.

    ``proximal_mu > 0`` adds FedProx's proximal term mu/2 * ||w - w_global||^2 (Li et al. 2020,
    arXiv 1812.06127) once ``set_global_weights`` has given it the round's global weights.
    ``augment`` crops and flips each training batch (``app.data.augment``), never an evaluation
    one. ``agc_clip`` turns on adaptive gradient clipping (``app.learn.agc``).

    ``class_names``, ``input_size`` ([height, width]), ``input_mean`` and ``input_std`` (the
    training split's channel statistics; None: inputs were not standardized) are metadata for
    using a checkpoint on its own: nothing in training reads them.
    """

    def __init__(
        self,
        arch: str,
        norm: str,
        in_channels: int,
        num_classes: int,
        model_options: dict[str, Any] | None = None,
        optimizer: str = "sgd",
        lr: float = 0.05,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        decay_norms: bool = False,
        agc_clip: float | None = None,
        proximal_mu: float = 0.0,
        augment: bool = False,
        crop_padding: str = "zeros",
        image_size: int | None = None,
        class_names: list[str] | None = None,
        input_mean: list[float] | None = None,
        input_std: list[float] | None = None,
        input_size: list[int] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = build_model(
            arch, norm, in_channels, num_classes, image_size=image_size, **(model_options or {})
        )
        self._bn_frozen = False
        self.automatic_optimization = False  # training_step takes the step itself
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self._global_params: list[torch.Tensor] | None = None
        self._loss_sum, self._seen = torch.zeros(()), 0  # this epoch's training loss

    def __setattr__(self, name: str, value: Any) -> None:
        # Lightning sets the running hook's name on the module before and after every hook
        # (about 50 times a step), and nn.Module.__setattr__ runs its Parameter, Module and
        # buffer checks each time. An attribute already held as a plain one, given a value of
        # a plain type (never a Parameter or Module, whose types differ, nor a tensor marked as
        # a buffer), is stored as nn.Module.__setattr__ would store it, without those checks.
        if (
            type(value) in _PLAIN_TYPES
            and name in self.__dict__
            and not getattr(value, "_is_buffer", False)  # torch.nn.Buffer(t) is a Tensor
        ):
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    @classmethod
    def from_config(
        cls,
        cfg: Config,
        in_channels: int,
        num_classes: int,
        image_size: int | None = None,
        **inputs: Any,
    ) -> FedwsClassifier:
        """The module ``cfg`` describes; ``inputs``: the metadata of its data (``class_names``,
        ``input_mean``, ``input_std``, ``input_size``; ``app.learn.runtime.new_module``)."""
        mu = cfg.federation.mu if cfg.federation.strategy == "fedprox" else 0.0
        return cls(
            arch=cfg.model.arch,
            norm=cfg.model.norm,
            in_channels=in_channels,
            num_classes=num_classes,
            model_options=cfg.model.options(),
            optimizer=cfg.optim.name,
            lr=cfg.optim.lr,
            momentum=cfg.optim.momentum,
            nesterov=cfg.optim.nesterov,
            weight_decay=cfg.optim.weight_decay,
            decay_norms=cfg.optim.decay_norms,
            agc_clip=cfg.optim.agc_clip,
            proximal_mu=mu,
            augment=cfg.data.augmented,
            crop_padding=cfg.data.crop_padding,
            image_size=image_size,
            **inputs,
        )

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (N, C, H, W) as the inputs the model was trained on: [0, 1] values,
        standardized by the stored channel mean and std when the run standardized its inputs
        (the same float32 operations as ``ImageDataset.normalize``)."""
        x = images.float() / 255.0
        mean, std = self.hparams.get("input_mean"), self.hparams.get("input_std")
        if mean is None or std is None:
            return x
        as_tensor = partial(torch.tensor, dtype=torch.float32, device=x.device)
        return standardized(x, as_tensor(mean), as_tensor(std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    @property
    def bn_statistics_frozen(self) -> bool:
        """FixBN (Zhong et al. 2023, arXiv 2303.06530): while True, every BN layer normalizes
        with its running statistics and never updates them, in training too; its scale and
        shift keep training."""
        return self._bn_frozen

    @bn_statistics_frozen.setter
    def bn_statistics_frozen(self, frozen: bool) -> None:
        self._bn_frozen = frozen
        self.train(self.training)

    def train(self, mode: bool = True) -> FedwsClassifier:
        """``nn.Module.train``, but BN layers stay in eval mode while ``bn_statistics_frozen``
        (Lightning switches modes around a fit's validation, so the freeze lives here)."""
        super().train(mode)
        if mode and getattr(self, "_bn_frozen", False):
            for m in self.model.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def set_global_weights(self) -> None:
        """Snapshot the current parameters as the proximal anchor (call after loading them)."""
        self._global_params = [p.detach().clone() for p in self.model.parameters()]

    def on_fit_start(self) -> None:
        # the anchor goes to the training device once, not with every step
        if self._global_params is not None:
            self._global_params = [g.to(self.device) for g in self._global_params]

    def proximal_term(self) -> torch.Tensor:
        if self._global_params is None:
            return torch.zeros((), device=self.device)
        sq = [
            (p - g.to(p.device)).pow(2).sum()
            for p, g in zip(self.model.parameters(), self._global_params, strict=True)
        ]
        return 0.5 * self.hparams.proximal_mu * torch.stack(sq).sum()

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """``augment``: random crop + flip of each training batch, on its device."""
        if self.hparams.get("augment") and self.trainer.training:
            x, y = batch
            batch = (random_crop_flip(x, mode=self.hparams.get("crop_padding", "zeros")), y)
        return batch

    def on_train_epoch_start(self) -> None:
        self._loss_sum, self._seen = torch.zeros((), device=self.device), 0

    def training_loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The loss a training step minimises (cross-entropy, plus FedProx's proximal term),
        counted into the epoch's mean training loss."""
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        # The epoch's mean loss, weighted by batch size, summed as Lightning's on_epoch logging
        # does (same float32 sums, same order) but logged once at the epoch's end: a
        # ``self.log`` per step costs about a millisecond of Python, more than a small step.
        value = loss.detach()
        if value.dtype not in (torch.float32, torch.float64):
            value = value.float()
        self._loss_sum = self._loss_sum + value * len(y)
        self._seen += len(y)
        if self.hparams.proximal_mu > 0:
            loss = loss + self.proximal_term()
        return loss

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        loss = self.training_loss(batch)
        # The step Lightning's automatic optimization takes (gradients set to None, backward
        # through the precision plugin, the optimizer's step with its hooks), written out:
        # the same operations in the same order, without the closure machinery around them
        # (up to about 0.16 ms a step on a CPU core: benchmarks/step.py's step_ratio_automatic).
        # Outside the precision plugin's autocast, which Lightning enters for training_step
        # only: backward, AGC and the update run as under automatic optimization.
        optimizer = self.optimizers()
        with torch.autocast(self.device.type, enabled=False):
            optimizer.zero_grad(set_to_none=True)
            self.manual_backward(loss)
            optimizer.step()
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        """``agc_clip``: adaptive gradient clipping (``app.learn.agc``) of every parameter but
        the classifier's, after backward (gradients already unscaled under mixed precision)
        and before the optimizer step."""
        if self.hparams.get("agc_clip"):
            agc.clip_gradients(agc.clipped_parameters(self.model), self.hparams.agc_clip)

    def on_train_epoch_end(self) -> None:
        if self._seen:
            self.log("train_loss", self._loss_sum / self._seen, batch_size=1)

    def _eval_step(self, batch, stage: str, metric: MulticlassAccuracy) -> None:
        x, y = batch
        logits = self.eval_logits(x)
        self.log(f"{stage}_loss", F.cross_entropy(logits, y), batch_size=len(y))
        metric(logits, y)
        self.log(f"{stage}_acc", metric, batch_size=len(y))

    def eval_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The logits of an evaluation batch; on CPU in passes of ``CPU_EVAL_CHUNK`` samples."""
        if x.device.type != "cpu" or len(x) <= CPU_EVAL_CHUNK:
            return self(x)
        return torch.cat([self(part) for part in x.split(CPU_EVAL_CHUNK)])

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_acc)

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_acc)

    def parameter_groups(self) -> list[dict[str, Any]]:
        """One group, or with weight decay and ``decay_norms`` off (the default, NFNets'
        practice) two: norm affines, scaled-WS gains and NF skip gains get no weight decay."""
        hp = self.hparams
        if hp.weight_decay == 0 or hp.get("decay_norms", False):
            return [{"params": list(self.parameters())}]
        exempt = {f"model.{name}" for name in no_decay_parameters(self.model)}
        named = list(self.named_parameters())
        return [
            {"params": [p for n, p in named if n not in exempt]},
            {"params": [p for n, p in named if n in exempt], "weight_decay": 0.0},
        ]

    def configure_optimizers(self):
        hp = self.hparams
        params = self.parameter_groups()
        if hp.optimizer == "sgd":
            return torch.optim.SGD(
                params,
                lr=hp.lr,
                momentum=hp.momentum,
                nesterov=hp.nesterov,
                weight_decay=hp.weight_decay,
            )
        if hp.optimizer == "adam":
            return torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
        raise ValueError(f"unknown optimizer {hp.optimizer!r}; known: sgd, adam, adamw")
