"""How fedws runs Lightning: one Trainer per local fit or evaluation, with no logger,
checkpointing or progress bar (the server keeps the run directory itself), and in-memory
tensor batches fed without worker processes or per-sample collation."""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import warnings
from typing import Any

import lightning as L
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

from app.config import Config


class TensorBatches(torch.utils.data.Dataset):
    """Indexed by a list of indices, returns the whole batch: one tensor gather per batch
    instead of a per-sample fetch and collate."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[idx], self.y[idx]


def tensor_loader(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
) -> DataLoader:
    """A DataLoader of in-memory tensors: batched gathers, no worker processes."""
    data = TensorBatches(x, y)
    if shuffle:
        sampler = RandomSampler(data, generator=torch.Generator().manual_seed(seed))
    else:
        sampler = SequentialSampler(data)
    batches = BatchSampler(sampler, batch_size=batch_size, drop_last=False)
    return DataLoader(data, sampler=batches, batch_size=None, num_workers=0)


def quiet_lightning() -> None:
    """Silence Lightning's per-Trainer banners (GPU/TPU available, tips) and the warning about
    fitting without a validation loader, which fedws does on purpose: validation is a separate
    call on the client's local split. Called once per process that trains or evaluates."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*`validation_step` but have no `val_dataloader`")
    warnings.filterwarnings("ignore", message=".*does not have many workers")
    # Lightning 2.6 calling an API that torch 2.13 deprecated: not actionable here
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


@functools.cache
def _entry_points(*, group: str) -> tuple[importlib.metadata.EntryPoint, ...]:
    """``importlib.metadata.entry_points(group=...)``, read once per process."""
    return tuple(importlib.metadata.entry_points(group=group))


def remember_callback_factories() -> None:
    """Every ``Trainer(...)`` asks ``importlib.metadata`` for the installed packages' callback
    factories (entry point group ``lightning.pytorch.callbacks_factory``), which reads the
    metadata of every installed distribution: about 10 ms, paid three or four times per client
    and round (fit, validations, evaluation), more than the rest of a Trainer's set-up. The
    lookup's answer is kept for the process; each factory is still called by Lightning for each
    Trainer, so every Trainer gets callbacks of its own, as before. Left alone if Lightning no
    longer looks them up this way."""
    from lightning.fabric.utilities import registry

    if registry.entry_points is importlib.metadata.entry_points:
        registry.entry_points = _entry_points


def make_trainer(cfg: Config, **kwargs: Any) -> L.Trainer:
    """A Trainer for one local fit or one evaluation: no logger, checkpointing, progress bar or
    model summary; accelerator auto on one device; precision from config."""
    remember_callback_factories()
    options: dict[str, Any] = {
        "accelerator": "auto",
        "devices": 1,
        "precision": cfg.train.precision,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "deterministic": cfg.train.deterministic,
    }
    options.update(kwargs)
    return L.Trainer(**options)
