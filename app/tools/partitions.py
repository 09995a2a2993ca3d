"""How a config splits the training data over clients: the per-client table, the
``client,label,count`` CSV (and for a natural partition the ``client,value`` map of each client
to its value of the ``by`` column) and the label heatmap of ``fedws partitions``, and the label
counts the study report draws (from the same code, so both show the same split)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from app.config import DataConfig
from app.data.datasets import ImageDataset, dataset_key, load_dataset
from app.data.domains import domains_of
from app.data.partitions import (
    FeatureShift,
    label_counts,
    label_entropy,
    partition_indices,
    shard_seed,
    split_train_val,
)
from app.tools import plots

PARTITIONS_CSV = "partitions.csv"
CLIENT_VALUES_CSV = "clients_by_value.csv"  # natural partitions: client,value
HEATMAP = "label_distribution.png"
TITLE_VALUES = 3  # a natural partition's values the heatmap's title names before a count


@dataclass(frozen=True)
class PartitionView:
    """A partition of one dataset: each client's indices and its label counts."""

    data: DataConfig
    dataset: ImageDataset
    parts: list[np.ndarray]
    counts: np.ndarray  # clients x classes

    @property
    def entropy(self) -> np.ndarray:
        """Each client's label entropy in bits."""
        return label_entropy(self.counts)

    @property
    def natural_values(self) -> list[str]:
        """A natural partition's client k holds the k-th of these values (sorted as text, as
        flwr-datasets' NaturalIdPartitioner numbers them); empty for every other kind."""
        ids = self.dataset.natural_ids
        if self.data.partition.kind != "natural" or ids is None:
            return []
        return sorted(set(ids.tolist()))

    @property
    def title(self) -> str:
        p = self.data.partition
        tag = " [SYNTHETIC DATA]" if self.dataset.synthetic else ""
        title = f"{self.dataset.name}{tag}: {p.kind}" + (
            f" alpha={p.concentration}" if p.kind == "dirichlet" else ""
        )
        values = self.natural_values
        if values:
            shown = ", ".join(values[:TITLE_VALUES])
            more = f", ... ({len(values)} in all)" if len(values) > TITLE_VALUES else ""
            title += f" by {p.by}: {shown}{more}"
        return title

    def table(self) -> tuple[list[str], list[list[str]]]:
        """Header and a row per client: samples, local train/val, classes present, entropy
        (and the client's feature shift under ``feature`` skew)."""
        data, p = self.data, self.data.partition
        header = ["client", "samples", "train", "val", "classes", "entropy_bits"]
        if p.kind == "feature":
            header += ["noise", "contrast", "rotation"]
        doms = domains_of(data, self.dataset)
        if doms is not None:
            header.append("domain")
        rows = []
        entropy = self.entropy
        for client, idx in enumerate(self.parts):
            train_idx, val_idx = split_train_val(idx, data.val_fraction, shard_seed(p, client))
            row = [
                str(client),
                str(len(idx)),
                str(len(train_idx)),
                str(len(val_idx)),
                str(int((self.counts[client] > 0).sum())),
                f"{entropy[client]:.3f}",
            ]
            if p.kind == "feature":
                s = FeatureShift.for_client(client, p.num_clients, p.shifts)
                row += [f"{s.noise_std:.3f}", f"{s.contrast:.3f}", f"{s.rotation:.1f}"]
            if doms is not None:
                row.append(doms.names[doms.of_client(client)])
            rows.append(row)
        return header, rows

    def write(self, out: Path) -> list[Path]:
        """``out/partitions.csv`` (client,label,count), for a natural partition
        ``out/clients_by_value.csv`` (client,value), and ``out/label_distribution.png``."""
        out.mkdir(parents=True, exist_ok=True)
        path = out / PARTITIONS_CSV
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["client", "label", "count"])
            for client in range(self.counts.shape[0]):
                for label in range(self.counts.shape[1]):
                    writer.writerow([client, label, int(self.counts[client, label])])
        written = [path]
        if self.natural_values:
            written.append(out / CLIENT_VALUES_CSV)
            with open(written[-1], "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["client", "value"])
                writer.writerows(enumerate(self.natural_values))
        return [*written, self.heatmap(out / HEATMAP)]

    def heatmap(self, path: Path, title: str | None = None) -> Path:
        return plots.label_heatmap(self.counts, self.dataset.classes, path, title or self.title)


def partition_views(configs: list[DataConfig]) -> list[PartitionView]:
    """A view of each data config, each dataset loaded once however many partitions use it."""
    loaded: dict[DataConfig, ImageDataset] = {}
    views = []
    for data in configs:
        key = dataset_key(data)
        if key not in loaded:
            loaded[key] = load_dataset(data)
        ds = loaded[key]
        labels = ds.y_train.numpy()
        parts = partition_indices(labels, data.partition, domains_of(data, ds), ds.natural_ids)
        views.append(PartitionView(data, ds, parts, label_counts(labels, parts, ds.num_classes)))
    return views


def partition_view(data: DataConfig) -> PartitionView:
    (view,) = partition_views([data])
    return view
