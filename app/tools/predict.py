"""``fedws predict``: a run's checkpoint on image files, without the run's dataset.

A checkpoint's hyper-parameters hold what a prediction needs besides the weights
(``app.learn.runtime.input_metadata``): the class names, the input size and the input
normalization. Each image is decoded with Pillow, converted to the model's channels (L or RGB),
resized to its input size when it differs (bilinear, as the loaders resize), scaled to [0, 1],
standardized with the stored channel mean and std when the run standardized its inputs
(``FedwsClassifier.prepare``), and the softmax of the logits gives the probabilities. A
checkpoint written before fedws stored that metadata gets it from the run's dataset, through the
run directory's ``config.yaml``.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.data.imagefolder import IMAGE_SUFFIXES
from app.errors import ConfigError, DataError
from app.learn import runtime
from app.learn.classifier import FedwsClassifier
from app.rundir import BEST_CHECKPOINT, CHECKPOINTS, LAST_CHECKPOINT, RunDir, run_config

CHOICES = ("best", "last")
MODES = {1: "L", 3: "RGB"}  # the model's input channels -> the Pillow mode images become
BATCH = 256  # images decoded and classified at a time


@dataclass(frozen=True)
class Prediction:
    image: str
    class_index: int
    class_name: str
    probability: float

    def to_json(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "class": self.class_name,
            "class_index": self.class_index,
            "probability": self.probability,
        }

    def line(self) -> str:
        return f"{self.image}: {self.class_name} ({self.probability:.4f})"


def checkpoint_path(
    run: Path, which: str | None = None, notice: Callable[[str], Any] = print
) -> Path:
    """The run's ``best.ckpt`` or ``last.ckpt`` (``which``); by default best when the run has
    one, else last (``notice`` says so)."""
    folder = RunDir(run)
    if not folder.path.is_dir():
        raise ConfigError(str(run), "no such run directory: give the -o of fedws run")
    paths = {"best": folder.best_checkpoint, "last": folder.last_checkpoint}
    if which is not None:
        if which not in paths:
            raise ConfigError("--checkpoint", f"got {which!r}; allowed: {', '.join(CHOICES)}")
        if not paths[which].is_file():
            why = (
                " (a run with data.val_fraction: 0 has no validation data to choose a best "
                "round by): use --checkpoint last"
                if which == "best"
                else ": the run has not finished a round"
            )
            raise ConfigError("--checkpoint", f"{paths[which]} does not exist{why}")
        return paths[which]
    if paths["best"].is_file():
        return paths["best"]
    if paths["last"].is_file():
        notice(
            f"{run} has no {CHECKPOINTS}/{BEST_CHECKPOINT} (no validation data chose a best "
            f"round): predicting with {LAST_CHECKPOINT}"
        )
        return paths["last"]
    raise ConfigError(
        str(run),
        f"holds no {CHECKPOINTS}/{BEST_CHECKPOINT} or {LAST_CHECKPOINT}: not a fedws run "
        "directory, or no round of it has finished",
    )


def load_model(path: Path, run: Path | None = None) -> FedwsClassifier:
    """The checkpoint's model in eval mode, on the CPU; a checkpoint without the input
    metadata (written by an earlier fedws) gets it from the dataset of ``run``'s config."""
    try:
        module = FedwsClassifier.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(str(path), f"not a checkpoint fedws can load: {first}") from None
    if module.hparams.get("class_names") is None:
        cfg = None if run is None else run_config(RunDir(run))
        if cfg is None:
            raise ConfigError(
                str(path),
                "holds no class names or input normalization (an earlier fedws wrote it) "
                "and no config.yaml beside it tells the dataset to take them from",
            )
        module.hparams.update(runtime.input_metadata(runtime.dataset(cfg.data)))
    return module.eval()


def image_files(paths: Sequence[str | Path]) -> list[Path]:
    """Image files, folders expanded to every .png/.jpg/.jpeg inside (recursively, sorted,
    hidden files and folders left out)."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(
                f
                for f in path.rglob("*")
                if f.is_file()
                and f.suffix.lower() in IMAGE_SUFFIXES
                and not any(part.startswith(".") for part in f.relative_to(path).parts)
            )
            if not found:
                raise DataError(f"{path}: a folder with no .png, .jpg or .jpeg image in it")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{path}: no such image file or folder")
    return files


def read_image(path: Path, channels: int, size: Sequence[int] | None) -> torch.Tensor:
    """One image as uint8 (C, H, W): in the model's channels, resized to ``size`` (height,
    width) when it differs."""
    from PIL import Image

    mode = MODES.get(channels)
    if mode is None:
        raise DataError(
            f"the model takes {channels}-channel images; fedws predict reads images as 1 (L) "
            "or 3 (RGB) channels"
        )
    try:
        with Image.open(path) as img:
            img = img.convert(mode)
            if size is not None and img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            array = np.array(img, dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"{path}: not an image Pillow can read ({first})") from None
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(array))


def predict(module: FedwsClassifier, files: Sequence[Path]) -> list[Prediction]:
    """The most probable class of each image and its probability (softmax of the logits)."""
    hp = module.hparams
    size = hp.get("input_size") or ([hp.image_size] * 2 if hp.get("image_size") else None)
    names = hp.get("class_names") or [str(i) for i in range(hp.num_classes)]
    out: list[Prediction] = []
    for start in range(0, len(files), BATCH):
        chunk = files[start : start + BATCH]
        images = [read_image(f, hp.in_channels, size) for f in chunk]
        if len({tuple(t.shape) for t in images}) > 1:
            raise DataError(
                "the images differ in size and the checkpoint does not name the model's input "
                "size: resize them to the size of the run's images"
            )
        with torch.inference_mode():
            probs = torch.softmax(module(module.prepare(torch.stack(images))).float(), dim=1)
        best, index = probs.max(dim=1)
        out += [
            Prediction(str(f), int(i), names[int(i)], float(p))
            for f, i, p in zip(chunk, index, best, strict=True)
        ]
    return out


def predict_run(
    run: Path,
    images: Sequence[str | Path],
    which: str | None = None,
    notice: Callable[[str], Any] = print,
) -> list[Prediction]:
    """``fedws predict``: the run's checkpoint (``which``: best or last; default best when
    there is one) on ``images`` (files or folders)."""
    path = checkpoint_path(run, which, notice)
    files = image_files(images)
    return predict(load_model(path, run), files)
