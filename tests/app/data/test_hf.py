"""Hugging Face datasets from local copies (nothing downloads): a save_to_disk folder and
parquet files, and natural partitions by a writer column."""

from __future__ import annotations

import dataclasses

import datasets
import numpy as np
import pytest
import yaml
from helpers import SMALL, small_config
from PIL import Image

from app.config import apply_overrides, load_config
from app.data.datasets import load_dataset, resolve_clients
from app.data.partitions import partition_indices
from app.errors import ConfigError, DataError, DatasetNotFoundError
from app.rundir import read_csv
from app.tools.cli import main
from app.tools.partitions import partition_view

WRITERS = ("ann", "bob", "cy")


def tiny_dataset() -> datasets.DatasetDict:
    """Grey 8x8 images whose level says label and writer; writer w wrote 3 + 2w images."""

    def split(n_per_writer) -> dict:
        rows = {"image": [], "label": [], "writer": []}
        for w, writer in enumerate(WRITERS):
            for i in range(n_per_writer(w)):
                label = i % 3
                rows["image"].append(Image.new("L", (8, 8), 10 + 60 * label + 5 * w))
                rows["label"].append(label)
                rows["writer"].append(writer)
        return rows

    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=["zero", "one", "two"]),
            "writer": datasets.Value("string"),
        }
    )
    return datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(split(lambda w: 3 + 2 * w), features=features),
            "test": datasets.Dataset.from_dict(split(lambda w: 2), features=features),
        }
    )


@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    dd = tiny_dataset()
    dd.save_to_disk(str(root / "saved"))
    (root / "parquet").mkdir()
    for name, split in dd.items():
        split.to_parquet(str(root / "parquet" / f"{name}-00000-of-00001.parquet"))
    return root


def hf_config(path, *extra: str):
    return small_config("data.dataset=hf", f"data.hf.path={path}", *extra)


@pytest.mark.parametrize("copy", ["saved", "parquet"])
def test_a_local_copy_loads_as_images_labels_and_class_names(copies, copy):
    ds = load_dataset(hf_config(copies / copy).data)
    assert ds.classes == ("zero", "one", "two")
    assert ds.x_train.shape == (3 + 5 + 7, 1, 8, 8) and ds.x_test.shape == (6, 1, 8, 8)
    levels = ds.x_train[:, 0, 0, 0].long()
    # the pixel level says the label: the right label came with each image
    assert (((levels - 10) // 60) == ds.y_train).all()


def test_a_natural_partition_gives_one_client_per_writer(copies):
    cfg = hf_config(
        copies / "parquet", "data.partition={kind: natural, by: writer, num_clients: 3}"
    )
    ds = load_dataset(cfg.data)
    parts = partition_indices(ds.y_train.numpy(), cfg.data.partition, natural_ids=ds.natural_ids)
    assert [len(p) for p in parts] == [3, 5, 7]  # sorted writers: ann, bob, cy
    for w, idx in enumerate(parts):
        assert set(ds.natural_ids[idx].tolist()) == {WRITERS[w]}
        levels = ds.x_train[idx, 0, 0, 0].long()
        assert (((levels - 10) % 60) // 5 == w).all()  # each image carries its writer
    view = partition_view(cfg.data)
    assert view.counts.sum(axis=1).tolist() == [3, 5, 7]


def test_natural_partitions_say_what_is_wrong(copies):
    wrong_count = hf_config(
        copies / "saved", "data.partition={kind: natural, by: writer, num_clients: 2}"
    )
    with pytest.raises(DataError, match="3 distinct values, one client each: set num_clients: 3"):
        ds = load_dataset(wrong_count.data)
        partition_indices(ds.y_train.numpy(), wrong_count.data.partition, None, ds.natural_ids)
    no_column = hf_config(
        copies / "saved", "data.partition={kind: natural, by: speaker, num_clients: 3}"
    )
    with pytest.raises(DataError, match="no column 'speaker'"):
        load_dataset(no_column.data)
    with pytest.raises(DataError, match="no split 'validation'"):
        load_dataset(hf_config(copies / "saved", "data.hf.test_split=validation").data)
    not_hf = small_config("data.partition={kind: natural, by: writer, num_clients: 3}")
    with pytest.raises(DataError, match=r"use data\.dataset: hf"):
        ds = load_dataset(not_hf.data)
        partition_indices(ds.y_train.numpy(), not_hf.data.partition, None, ds.natural_ids)


def test_every_other_partition_kind_works_on_hf_data(copies):
    cfg = hf_config(
        copies / "saved",
        "data.partition={kind: dirichlet, num_clients: 2, alpha: 100.0, min_partition_size: 1}",
    )
    ds = load_dataset(cfg.data)
    parts = partition_indices(ds.y_train.numpy(), cfg.data.partition)
    assert sorted(np.concatenate(parts).tolist()) == list(range(15))


def test_a_natural_partition_counts_its_clients_when_num_clients_is_left_out(copies):
    cfg = hf_config(copies / "parquet", "data.partition={kind: natural, by: writer}")
    assert cfg.data.partition.num_clients is None  # counted when the run's config is resolved
    resolved = resolve_clients(cfg)
    assert resolved.data.partition.num_clients == 3  # ann, bob, cy
    assert resolve_clients(resolved) == resolved
    ds = load_dataset(resolved.data)
    parts = partition_indices(ds.y_train.numpy(), resolved.data.partition, None, ds.natural_ids)
    assert [len(p) for p in parts] == [3, 5, 7]
    # the other kinds keep their default
    assert (
        hf_config(copies / "parquet", "data.partition={kind: iid}").data.partition.num_clients == 10
    )
    too_many = hf_config(
        copies / "parquet",
        "data.partition={kind: natural, by: writer}",
        "federation.min_clients=4",
    )
    with pytest.raises(
        ConfigError, match=r"min_clients: must be <= data\.partition\.num_clients \(3\)"
    ):
        resolve_clients(too_many)
    with pytest.raises(DataError, match=r"use data\.dataset: hf"):
        resolve_clients(small_config("data.partition={kind: natural, by: writer}"))


def test_fedws_partitions_maps_each_natural_client_to_its_value(copies, tmp_path, capsys):
    config = tmp_path / "natural.yaml"
    raw = apply_overrides(
        SMALL,
        [
            "data.dataset=hf",
            f"data.hf.path={copies / 'saved'}",
            "data.partition={kind: natural, by: writer}",
        ],
    )
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    assert main(["partitions", str(config), "-o", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "partition: natural, 3 clients" in stdout
    rows = read_csv(out / "clients_by_value.csv")
    assert rows == [{"client": str(i), "value": w} for i, w in enumerate(WRITERS)]
    # each client holds exactly its value's images: writer w wrote 3 + 2w training images
    counts = [0, 0, 0]
    for r in read_csv(out / "partitions.csv"):
        counts[int(r["client"])] += int(r["count"])
    assert counts == [3, 5, 7]
    view = partition_view(resolve_clients(load_config(config)).data)
    for client, idx in enumerate(view.parts):
        assert set(view.dataset.natural_ids[idx].tolist()) == {rows[client]["value"]}
    assert view.title == "hf: natural by writer: ann, bob, cy"
    many = np.array([f"w{i:02d}" for i in range(40)])
    shown = dataclasses.replace(view, dataset=dataclasses.replace(view.dataset, natural_ids=many))
    assert shown.title == "hf: natural by writer: w00, w01, w02, ... (40 in all)"


def test_a_saved_dataset_that_is_not_a_dataset_dict_is_told_what_to_save(tmp_path, monkeypatch):
    tiny_dataset()["train"].save_to_disk(str(tmp_path / "one"))
    cfg = hf_config(tmp_path / "one", "data.hf.test_split=validation")
    with pytest.raises(DataError) as err:
        load_dataset(cfg.data)
    message = str(err.value)
    assert "holds one Dataset saved with save_to_disk" in message and "\n" not in message
    assert "a DatasetDict with splits 'train' and 'validation'" in message
    assert "DatasetDict({'train': train, 'validation': test}).save_to_disk(FOLDER)" in message

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset(hf_config("someone/femnist").data)
    message = str(err.value)
    assert "the Hugging Face Hub cannot be reached" in message
    assert "save a DatasetDict with splits 'train' and 'test'" in message
