"""imagefolder datasets (folders and zips of class folders, the decode cache) and the batched
augmentation of training batches."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import small_config
from PIL import Image

import app.data.imagefolder as imagefolder
from app.config import build
from app.data.augment import random_crop_flip
from app.data.datasets import load_dataset
from app.errors import DataError, DatasetNotFoundError
from app.learn.runtime import new_module
from app.learn.trainer import make_trainer, tensor_loader
from app.tools.cli import main

TRAIN = {"dog": 3, "cat": 2, "zebra": 1}  # sorted labels: cat 0, dog 1, zebra 2
TEST = {"cat": 1, "dog": 2}


def pixel(label: str, index: int) -> int:
    """Each image is one grey level that says its class and number."""
    return 40 * sorted(TRAIN).index(label) + 5 * index + 10


def make_tree(root: Path, train=TRAIN, test=TEST, size=8, suffix=".png", mode="RGB") -> Path:
    for split, counts in (("train", train), ("test", test)):
        for label, n in counts.items():
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.new(mode, (size, size), (pixel(label, i),) * len(mode)).save(
                    folder / f"{i:04d}{suffix}"
                )
    (root / "train" / "README.txt").write_text("not an image, ignored")
    return root


def zip_tree(tree: Path, path: Path, top: str | None = "images") -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for file in sorted(tree.rglob("*")):
            name = file.relative_to(tree).as_posix()
            zf.write(file, f"{top}/{name}" if top else name)
    return path


def load(root: Path):
    return load_dataset(build({"data": {"dataset": "imagefolder", "root": str(root)}}).data)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("FEDWS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FEDWS_DATA", raising=False)
    return tmp_path / "cache"


def check_images(ds) -> None:
    assert ds.classes == ("cat", "dog", "zebra")
    assert ds.x_train.shape == (6, 3, 8, 8) and ds.x_train.dtype == torch.uint8
    assert ds.x_test.shape == (3, 3, 8, 8)
    assert ds.y_train.tolist() == [0, 0, 1, 1, 1, 2] and ds.y_test.tolist() == [0, 1, 1]
    for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
        for image, label in zip(x, y, strict=True):
            value = int(image[0, 0, 0])
            assert (image == value).all()  # PNG is lossless
            assert (value - 10) // 40 == int(label)  # the pixel says the class: right label


def test_a_folder_of_class_folders_loads_with_sorted_labels(tmp_path):
    check_images(load(make_tree(tmp_path / "tree")))


@pytest.mark.parametrize("top", ["images", None])
def test_a_zip_loads_the_same_with_or_without_one_top_folder(tmp_path, top):
    tree = make_tree(tmp_path / "tree")
    ds = load(zip_tree(tree, tmp_path / "images.zip", top))
    check_images(ds)
    assert torch.equal(ds.x_train, load(tree).x_train)


def test_macos_zip_extras_and_hidden_files_are_ignored(tmp_path):
    tree = make_tree(tmp_path / "tree")
    (tree / "train" / "cat" / ".hidden.png").write_bytes(b"not an image")
    source = zip_tree(tree, tmp_path / "mac.zip")
    with zipfile.ZipFile(source, "a") as zf:
        zf.writestr("__MACOSX/images/train/cat/._0000.png", b"resource fork")
        zf.writestr(".DS_Store", b"finder")
    check_images(load(source))


def test_jpeg_and_grayscale(tmp_path):
    ds = load(make_tree(tmp_path / "tree", suffix=".jpg", mode="L"))
    assert ds.x_train.shape == (6, 1, 8, 8)  # grayscale stays one channel
    assert ds.channel_stats()[0].shape == (1,)


def test_the_cache_is_used_on_the_second_load_and_rebuilt_when_the_source_changes(
    tmp_path, cache, monkeypatch
):
    tree = make_tree(tmp_path / "tree")
    source = zip_tree(tree, tmp_path / "images.zip")
    calls = []
    decode = imagefolder.decode_all
    monkeypatch.setattr(imagefolder, "decode_all", lambda *a: calls.append(1) or decode(*a))
    first = load(source)
    assert len(calls) == 1 and len(list(cache.glob("imagefolder-images-*.npz"))) == 1
    second = load(source)
    assert len(calls) == 1  # read from the cache, not decoded
    assert torch.equal(first.x_train, second.x_train) and first.classes == second.classes

    make_tree(tree, train={"zebra": 3}, test={})  # two more zebras
    zip_tree(tree, source)
    os.utime(source, ns=(1, 1))  # a new modification time as well as a new size
    third = load(source)
    assert len(calls) == 2 and len(third.y_train) == 8
    assert load(tree).x_train.shape[0] == 8 and len(calls) == 3  # a folder has its own key
    load(tree)
    assert len(calls) == 3
    (tree / "train" / "cat" / "0000.png").unlink()  # a folder's change is seen too
    assert len(load(tree).y_train) == 7 and len(calls) == 4
    # a file moved to another class keeps its size and time: the listing tells
    os.rename(tree / "train" / "dog" / "0000.png", tree / "train" / "cat" / "0000.png")
    moved = load(tree)
    assert len(calls) == 5 and moved.y_train.bincount().tolist() == [2, 2, 3]


def test_mixed_sizes_are_an_error_unless_image_size_resizes_them(tmp_path):
    tree = make_tree(tmp_path / "tree")
    Image.new("RGB", (12, 10), (1, 2, 3)).save(tree / "train" / "cat" / "big.png")
    with pytest.raises(DataError, match=r"different sizes .* is 12x10.*data.image_size"):
        load(tree)
    cfg = build({"data": {"dataset": "imagefolder", "root": str(tree), "image_size": 16}})
    ds = load_dataset(cfg.data)
    assert ds.x_train.shape == (7, 3, 16, 16) and ds.x_test.shape == (3, 3, 16, 16)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda t: (t / "train" / "emu").mkdir(), "class folder train/emu holds no JPEG or PNG"),
        (lambda t: os.rename(t / "test", t / "valid"), "has no test/ split"),
        (lambda t: os.rename(t / "test" / "dog", t / "test" / "wolf"), "test class 'wolf'"),
        (lambda t: (t / "train" / "cat" / "0000.png").write_bytes(b"junk"), "cannot decode"),
    ],
)
def test_bad_trees_are_clear_errors(tmp_path, damage, message):
    tree = make_tree(tmp_path / "tree")
    damage(tree)
    with pytest.raises(DataError, match=message):
        load(tree)


def test_a_missing_root_exits_2_with_one_line(tmp_path, capsys):
    with pytest.raises(DatasetNotFoundError, match=r"data\.root"):
        load(tmp_path / "nowhere")
    code = main(
        ["partitions", "configs/cifar10_jpeg.yaml", "--set", f"data.root={tmp_path / 'no.zip'}"]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "imagefolder" in err


def test_augment_defaults_by_dataset():
    def augmented(**data) -> bool:
        return build({"data": data}).data.augmented

    assert not augmented(dataset="fashion_mnist") and not augmented(dataset="synthetic")
    assert augmented(dataset="cifar10") and augmented(dataset="imagefolder")
    assert not augmented(dataset="imagefolder", augment=False)
    assert augmented(dataset="fashion_mnist", augment=True)


def test_random_crop_flip_keeps_shapes_and_crops_the_padded_image():
    torch.manual_seed(0)
    x = torch.randn(64, 3, 8, 8)
    out = random_crop_flip(x, padding=2)
    assert out.shape == x.shape and out.dtype == x.dtype
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    flips = 0
    for image, source in zip(out, padded, strict=True):
        crops = {
            (dy, dx, f): (source.flip(2) if f else source)[:, dy : dy + 8, dx : dx + 8]
            for dy in range(5)
            for dx in range(5)
            for f in (False, True)
        }
        match = [k for k, crop in crops.items() if torch.equal(crop, image)]
        assert match  # each output is a (possibly mirrored) crop of its own padded image
        flips += match[0][2]
    assert 16 < flips < 48  # about half mirrored
    same = random_crop_flip(x, padding=0)
    assert all(torch.equal(a, b) or torch.equal(a, b.flip(2)) for a, b in zip(same, x, strict=True))


class Recorder:
    """Wraps a module's steps to keep the batches they see."""

    def __init__(self, module) -> None:
        self.train, self.val = [], []
        train_step, val_step = module.training_step, module.validation_step
        module.training_step = lambda b, *a: self.train.append(b[0].clone()) or train_step(b, *a)
        module.validation_step = lambda b, *a: self.val.append(b[0].clone()) or val_step(b, *a)


@pytest.mark.parametrize("augment", [True, False])
def test_augmentation_changes_training_batches_only(augment):
    cfg = small_config(f"data.augment={str(augment).lower()}")
    ds = load_dataset(cfg.data)
    module = new_module(cfg, ds)
    assert module.hparams.augment is augment
    seen = Recorder(module)
    x, y = ds.normalize(ds.x_train[:64]), ds.y_train[:64]
    trainer = make_trainer(cfg, max_epochs=1, limit_train_batches=2, limit_val_batches=2)
    trainer.fit(module, tensor_loader(x, y, 32), tensor_loader(x, y, 32))
    train, val = torch.cat(seen.train), torch.cat(seen.val)
    assert train.shape == val.shape == x.shape
    assert torch.equal(val, x)  # evaluation batches: never augmented
    assert torch.equal(train, x) is not augment
    if augment:
        padding = float((train == 0).float().mean())  # the data itself has no exact zeros
        assert float((x == 0).float().mean()) == 0 and 0 < padding < 0.5
