"""Server-side evaluation of the global model with Lightning, and its checkpoints.

Besides accuracy and loss, an evaluation measures the BN train/test statistics gap
(``app.learn.diagnostics``) and, with ``server.bn_recalibration``, tests the model a second time
with its BN statistics re-estimated on a server-held calibration sample of the training split
(never the test split). Recalibration is for evaluation only: the model sent to the clients and the
checkpoints keep the aggregated statistics.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import lightning
import torch
from flwr.app import ArrayRecord

from app import rundir
from app.config import Config
from app.data.datasets import ImageDataset
from app.data.domains import TRAIN, Domains
from app.learn import diagnostics
from app.learn.classifier import FedwsClassifier
from app.learn.runtime import domain_test
from app.learn.state import StatePolicy, load_partial
from app.learn.trainer import make_trainer, tensor_loader

GLOBAL_MODEL = "global"  # domains.csv scored_by: the server's model on each domain


class GlobalEvaluator:
    """Holds the global model; loads each round's arrays, tests it on the official test split
    (in a multi-domain run: on each domain's test images, in that domain's style)."""

    def __init__(
        self,
        cfg: Config,
        ds: ImageDataset,
        module: FedwsClassifier,
        policy: StatePolicy,
        domains: Domains | None = None,
    ) -> None:
        self.cfg, self.module, self.policy = cfg, module, policy
        batch, server = cfg.train.eval_batch_size, cfg.server
        self.domains = domains
        if domains is None:
            x_test, y_test = ds.normalize(ds.x_test), ds.y_test
            self.parts = [(None, tensor_loader(x_test, y_test, batch), len(y_test))]
        else:
            tests = [domain_test(cfg.data, d) for d in range(domains.count)]
            self.parts = [
                (name, tensor_loader(x, y, batch), len(y))
                for name, (x, y) in zip(domains.names, tests, strict=True)
            ]
            x_test = torch.cat([x for x, _ in tests])
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
            images = ds.x_train[torch.from_numpy(self.calibration_idx)]
            if domains is not None and domains.of_train is None:  # styles: an equal share each
                chunks = images.chunk(domains.count)
                x = torch.cat(
                    [ds.normalize(c, domains.style(d, TRAIN)) for d, c in enumerate(chunks)]
                )
            else:
                x = ds.normalize(images)
            self.calibration = list(x.split(batch))

    def load(self, arrays: ArrayRecord) -> None:
        load_partial(self.module.model, arrays.to_torch_state_dict(), self.policy.travel)

    def test(self) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """Accuracy and loss of the current global model on the test split (Lightning test),
        and in a multi-domain run one ``domains.csv`` row per domain (the overall numbers are
        then those of all domains' test images together)."""
        per_part = []
        for name, loader, n in self.parts:
            (metrics,) = make_trainer(self.cfg).test(self.module, loader, verbose=False)
            per_part.append((name, float(metrics["test_acc"]), float(metrics["test_loss"]), n))
        total = sum(n for *_, n in per_part)
        overall = {
            "test_accuracy": sum(acc * n for _, acc, _, n in per_part) / total,
            "test_loss": sum(loss * n for _, _, loss, n in per_part) / total,
        }
        if self.domains is None:
            return overall, []
        rows = [
            {
                "domain": name,
                "test_accuracy": acc,
                "test_loss": loss,
                "scored_by": GLOBAL_MODEL,
                "clients": "",
            }
            for name, acc, loss, _ in per_part
        ]
        return overall, rows

    def evaluate(
        self,
    ) -> tuple[dict[str, float], list[dict[str, Any]], list[dict[str, Any]]]:
        """``test()``, with recalibrated BN statistics when configured; the diagnostics rows
        (the BN statistics gap before and after recalibration, the test accuracy and loss
        without recalibration) and the per-domain rows."""
        model = self.module.model
        rows = diagnostics.bn_test_gap(model, self.gap_batches) if self.diagnose else []
        if not self.recalibrate:
            test, domain_rows = self.test()
            return test, rows, domain_rows
        raw, _ = self.test()
        rows += [diagnostics.row(f"{k}_raw", diagnostics.ALL, v) for k, v in raw.items()]
        with diagnostics.recalibrated(model, self.calibration):
            test, domain_rows = self.test()
            if self.diagnose:
                rows += diagnostics.bn_test_gap(model, self.gap_batches, "bn_test_gap_recalibrated")
        return test, rows, domain_rows

    def save_checkpoint(
        self, path: Path, server_round: int, resume: dict[str, Any] | None = None
    ) -> None:
        """A Lightning checkpoint of the global model, written atomically (``rundir.write_whole``:
        a tmp file, removed on failure, renamed over the old one; an ``OSError`` is one line);
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
        # serialized in memory first: torch.save into a file on a full disk raises a
        # RuntimeError that has lost the OSError; written whole or not at all
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        with rundir.writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            rundir.write_whole(path, buffer.getbuffer())
