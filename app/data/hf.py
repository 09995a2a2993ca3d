"""Hugging Face datasets (``data.dataset: hf``), read with the ``datasets`` library as
flwr-datasets does, then held as uint8 image tensors like every other fedws dataset.

``data.hf.path`` is a local copy (works offline) or a Hub id (needs the internet):

- a ``DatasetDict.save_to_disk`` folder (it holds ``dataset_dict.json``);
- a folder of data files that ``datasets.load_dataset`` understands (parquet, csv, json,
  image folders), one file or file pattern per split as the library names them
  (``train-*.parquet``, ``test-*.parquet``...);
- a Hub id such as ``flwrlabs/femnist`` (the library's cache is used when present).

The image column holds images (decoded by the ``Image`` feature, or arrays); the label column
integers (a ``ClassLabel`` gives the class names). With ``data.partition.kind: natural`` the
column ``data.partition.by`` (a writer, a speaker) is kept: each of its values is one client,
and ``natural_values`` reads that column alone (no image decoded) to count them.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import numpy as np
import torch

from app.config import DataConfig, HfConfig
from app.errors import DataError, DatasetNotFoundError


def _what_to_save(hf: HfConfig) -> str:
    """What a local copy must hold, in the config's split names."""
    return (
        f"a DatasetDict with splits {hf.train_split!r} and {hf.test_split!r} (data.hf."
        f"train_split, data.hf.test_split): DatasetDict({{{hf.train_split!r}: train, "
        f"{hf.test_split!r}: test}}).save_to_disk(FOLDER)"
    )


def _open(hf: HfConfig):
    import datasets

    path = hf.path
    local = Path(path).expanduser()
    if (local / "state.json").is_file() and (local / "dataset_info.json").is_file():
        raise DataError(
            f"data.hf.path {path!r} holds one Dataset saved with save_to_disk, not its splits: "
            f"save {_what_to_save(hf)} and point data.hf.path at FOLDER"
        )
    try:
        if local.is_dir() and (local / "dataset_dict.json").is_file():
            return datasets.load_from_disk(str(local))
        if local.exists():
            return datasets.load_dataset(str(local))
        return datasets.load_dataset(path)
    except FileNotFoundError as err:
        raise DatasetNotFoundError(f"data.hf.path {path!r}: {err}") from None
    except ConnectionError as err:
        raise DatasetNotFoundError(
            f"data.hf.path {path!r} is not a local folder and the Hugging Face Hub cannot be "
            f"reached ({err}): where it can be reached, save {_what_to_save(hf)} (or copy its "
            "parquet files to FOLDER) and point data.hf.path at FOLDER"
        ) from None
    except ValueError as err:  # e.g. a folder with no data file the library knows
        raise DataError(f"data.hf.path {path!r}: {err}") from None


def _pil(value):
    """An image cell (a PIL image, or an array of 0-255 or 0-1 values) as a PIL image."""
    from PIL import Image

    if isinstance(value, Image.Image):
        return value
    array = np.asarray(value)
    if array.dtype != np.uint8:
        array = np.clip(array * (255 if array.max() <= 1 else 1), 0, 255).astype(np.uint8)
    return Image.fromarray(array)


def _images(column, name: str, image_size: int | None) -> torch.Tensor:
    """A column of images as uint8 (N, C, H, W): all colour if any image is colour, all
    grayscale otherwise; resized to ``image_size`` when given."""
    from PIL import Image
    from tqdm.auto import tqdm

    images = [_pil(v) for v in column]
    colour = any(img.mode not in ("1", "L", "LA", "I", "I;16", "F") for img in images)
    arrays = []
    for img in tqdm(images, desc=f"images of {name}", unit="img", file=sys.stderr, leave=False):
        img = img.convert("RGB" if colour else "L")
        if image_size is not None and img.size != (image_size, image_size):
            img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
        array = np.asarray(img, dtype=np.uint8)
        arrays.append(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise DataError(
            f"data.hf: images of {name} differ in size {sorted(shapes)[:3]}: set "
            "data.image_size to resize them all"
        )
    return torch.from_numpy(np.stack(arrays))


def _splits(hf: HfConfig) -> dict:
    """The train and test splits of ``hf``, each checked for the image and label columns."""
    dd = _open(hf)
    splits = {}
    for role, split in (("train", hf.train_split), ("test", hf.test_split)):
        if split not in dd:
            raise DataError(
                f"data.hf.{role}_split: {hf.path!r} has no split {split!r}; it has: {', '.join(dd)}"
            )
        ds = dd[split]
        for column in (hf.image_column, hf.label_column):
            if column not in ds.column_names:
                raise DataError(
                    f"data.hf: split {split!r} has no column {column!r}; its columns: "
                    f"{', '.join(ds.column_names)}"
                )
        splits[role] = ds
    return splits


def _natural_column(train, by: str) -> list[str]:
    """The training split's column ``by`` as text (the natural partition's ids)."""
    if by not in train.column_names:
        raise DataError(
            f"data.partition.by: the training split has no column {by!r}; its columns: "
            f"{', '.join(train.column_names)}"
        )
    return [str(v) for v in train[by]]


@functools.lru_cache(maxsize=8)
def natural_values(hf: HfConfig, by: str) -> tuple[str, ...]:
    """The distinct values of the training split's column ``by``, sorted as text: client k of
    a natural partition holds the k-th (flwr-datasets' NaturalIdPartitioner numbers them so).
    Reads that column alone, no image."""
    return tuple(sorted(set(_natural_column(_splits(hf)["train"], by))))


def load_hf(data: DataConfig) -> dict:
    """The ``ImageDataset`` fields of ``data.hf``: both splits, the class names, the natural
    partition column when asked for, and where it came from."""
    hf = data.hf
    splits = _splits(hf)
    feature = splits["train"].features[hf.label_column]
    names = getattr(feature, "names", None)
    labels = {r: np.asarray(splits[r][hf.label_column]) for r in splits}
    if names:
        classes = tuple(str(n) for n in names)
        y = {r: labels[r].astype(np.int64) for r in labels}
        for role, values in y.items():
            outside = values[(values < 0) | (values >= len(classes))]
            if len(outside):
                raise DataError(
                    f"data.hf: the {role} split has label {int(outside[0])}, not one of the "
                    f"{len(classes)} classes (a split without labels cannot be used)"
                )
    else:
        values = sorted(set(labels["train"].tolist()))
        index = {v: i for i, v in enumerate(values)}
        unknown = sorted(set(labels["test"].tolist()) - set(values))
        if unknown:
            raise DataError(f"data.hf: test label {unknown[0]!r} has no training images")
        classes = tuple(str(v) for v in values)
        y = {r: np.array([index[v] for v in labels[r].tolist()], np.int64) for r in labels}
    x = {r: _images(splits[r][hf.image_column], r, data.image_size) for r in splits}
    fields = {
        "x_train": x["train"],
        "y_train": torch.from_numpy(y["train"]),
        "x_test": x["test"],
        "y_test": torch.from_numpy(y["test"]),
        "classes": classes,
        "source": f"hf: {hf.path}",
    }
    by = data.partition.by
    if by is not None:
        fields["natural_ids"] = np.asarray(_natural_column(splits["train"], by))
    return fields
