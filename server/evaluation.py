"""Server-side evaluation of the global model with Lightning, and its checkpoints.

Besides accuracy and loss, an evaluation measures the BN train/test statistics gap
(``app.learn.diagnostics``) and, with ``server.bn_recalibration``, tests the model a second time
with its BN statistics re-estimated on a server-held calibration sample of the training split
(never the test split). Recalibration is for evaluation only: the model sent to the clients and the
checkpoints keep the aggregated statistics.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning
import torch
from flwr.app import ArrayRecord

from app.config import Config
from app.data.datasets import ImageDataset
from app.learn import diagnostics
from app.learn.classifier import FedwsClassifier
from app.learn.state import StatePolicy, load_partial
from app.learn.trainer import make_trainer, tensor_loader


class GlobalEvaluator:
    """Holds the global model; loads each round's arrays, tests it on the official test split."""

    def __init__(
        self, cfg: Config, ds: ImageDataset, module: FedwsClassifier, policy: StatePolicy
    ) -> None:
        self.cfg, self.module, self.policy = cfg, module, policy
        batch, server = cfg.train.eval_batch_size, cfg.server
        x_test = ds.normalize(ds.x_test)
        self.loader = tensor_loader(x_test, ds.y_test, batch)
        has_bn = bool(diagnostics.bn_layers(module.model))
        # what the BN diagnostics and recalibration use, prepared only when they will run
        self.diagnose = server.diagnostics and has_bn
        self.recalibrate = server.bn_recalibration and has_bn
        self.gap_batches: list[torch.Tensor] = []
        self.calibration: list[torch.Tensor] = []
        if self.diagnose:
            gap_idx = diagnostics.sample_indices(len(x_test), server.gap_samples, cfg.seed)
            self.gap_batches = list(x_test[torch.from_numpy(gap_idx)].split(batch))
        if self.recalibrate:
            self.calibration_idx = diagnostics.sample_indices(
                len(ds.x_train), server.calibration_samples, cfg.seed
            )
            x = ds.normalize(ds.x_train[torch.from_numpy(self.calibration_idx)])
            self.calibration = list(x.split(batch))

    def load(self, arrays: ArrayRecord) -> None:
        load_partial(self.module.model, arrays.to_torch_state_dict(), self.policy.travel)

    def test(self) -> dict[str, float]:
        """Accuracy and loss of the current global model on the test split (Lightning test)."""
        (metrics,) = make_trainer(self.cfg).test(self.module, self.loader, verbose=False)
        return {
            "test_accuracy": float(metrics["test_acc"]),
            "test_loss": float(metrics["test_loss"]),
        }

    def evaluate(self) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """``test()``, with recalibrated BN statistics when configured, and the diagnostics
        rows: the BN statistics gap before (and after) recalibration, the test accuracy and
        loss without recalibration."""
        model = self.module.model
        rows = diagnostics.bn_test_gap(model, self.gap_batches) if self.diagnose else []
        if not self.recalibrate:
            return self.test(), rows
        raw = self.test()
        rows += [diagnostics.row(f"{k}_raw", diagnostics.ALL, v) for k, v in raw.items()]
        with diagnostics.recalibrated(model, self.calibration):
            test = self.test()
            if self.diagnose:
                rows += diagnostics.bn_test_gap(model, self.gap_batches, "bn_test_gap_recalibrated")
        return test, rows

    def save_checkpoint(
        self, path: Path, server_round: int, resume: dict[str, Any] | None = None
    ) -> None:
        """A Lightning checkpoint of the global model, written atomically (tmp file + rename);
        ``FedwsClassifier.load_from_checkpoint(path)`` opens it. ``resume`` holds what
        ``fedws run --resume`` needs besides the weights (tensors and plain data only)."""
        checkpoint = {
            "state_dict": {k: v.detach().cpu() for k, v in self.module.state_dict().items()},
            "hyper_parameters": dict(self.module.hparams),
            "pytorch-lightning_version": lightning.__version__,
            "epoch": 0,
            "global_step": 0,
            "fedws": {
                "round": server_round,
                "strategy": self.cfg.federation.strategy,
                "resume": resume,
            },
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)
