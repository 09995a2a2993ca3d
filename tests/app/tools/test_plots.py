"""Figures a reader understands without the code: categories as points with their interval,
no empty panels, plain tick labels, heatmaps from zero, layers named by what they are."""

from __future__ import annotations

import numpy as np
import pytest

from app.tools import plots
from app.tools.run_report import layer_names


@pytest.fixture
def saved(monkeypatch):
    figures = []

    def keep(fig, path):
        figures.append(fig)
        return path

    monkeypatch.setattr(plots, "_save", keep)
    return figures


def test_partitions_are_points_with_intervals_never_joined_and_empty_panels_dropped(
    tmp_path, saved
):
    panels = {
        "Update agreement": {"bn": {"iid": [0.3, 0.4, 0.35], "Dir(0.1)": [0.01, 0.02, 0.03]}},
        "BN statistics: clients vs aggregate": {"bn": {"iid": [0.04], "Dir(0.1)": [0.2]}},
        "nothing measured": {"ws_gn": {}},
    }
    plots.category_panels(
        panels,
        tmp_path / "why.png",
        categories=["iid", "Dir(0.1)"],
        xlabel="partition",
        ylabels={"Update agreement": "mean cosine of client updates"},
        log_y=("BN statistics: clients vs aggregate",),
    )
    (fig,) = saved
    shown = [ax for ax in fig.axes if ax.get_visible() and ax.axison]
    assert [ax.get_title() for ax in shown] == list(panels)[:2]  # no empty panel
    cosine = shown[0]
    assert cosine.get_ylabel() == "mean cosine of client updates"
    assert [t.get_text() for t in cosine.get_xticklabels()] == ["iid", "Dir(0.1)"]
    for line in cosine.get_lines():
        assert line.get_linestyle() == "None"  # points (and error bars), never a joining line
    caps = [seg for coll in cosine.collections for seg in coll.get_segments()]
    assert caps  # the seeds' interval is drawn
    fig.canvas.draw()
    log_ticks = [t.get_text() for t in shown[1].get_yticklabels() if t.get_text()]
    assert log_ticks and not any("times" in t or "^" in t for t in log_ticks)


def test_the_heatmap_scale_starts_at_zero(tmp_path, saved):
    near_uniform = np.array([[100, 101], [99, 100]])
    plots.label_heatmap(near_uniform, ["a", "b"], tmp_path / "h.png", "iid")
    (fig,) = saved
    assert fig.axes[0].images[0].norm.vmin == 0


def test_bn_layers_are_named_by_what_they_are():
    names = layer_names(["model.features.0.1", "model.features.1.1", "all"])
    assert names == {
        "model.features.0.1": "norm 1",
        "model.features.1.1": "norm 2",
        "all": "mean over layers",
    }
