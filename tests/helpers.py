"""Small synthetic configs so unit tests stay fast and offline."""

from __future__ import annotations

from app.config import Config, apply_overrides, build

SMALL = {
    "data": {
        "dataset": "synthetic",
        "synthetic": {"train_size": 600, "test_size": 200, "image_size": 16},
        "partition": {"kind": "iid", "num_clients": 4},
    },
    "model": {"arch": "cnn", "norm": "ws_gn", "width": 8},
    "train": {"batch_size": 32},
}


def small_config(*overrides: str) -> Config:
    """The SMALL synthetic config with ``a.b=c`` overrides applied."""
    return build(apply_overrides(SMALL, list(overrides)))
