"""The diagnostics of app.learn.diagnostics on constructed inputs with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import small_config
from torch import nn

from app.data.datasets import ImageDataset
from app.learn import diagnostics as dg
from app.learn.runtime import new_module
from app.learn.state import state_policy
from app.nn.models import build_model
from server.evaluation import GlobalEvaluator

GROUPS = {"conv.weight": "convs", "bn.weight": "norms", "fc.weight": "classifier"}


def arrays(conv, bn, fc) -> dict[str, np.ndarray]:
    return {
        "conv.weight": np.asarray(conv, dtype=np.float32),
        "bn.weight": np.asarray(bn, dtype=np.float32),
        "fc.weight": np.asarray(fc, dtype=np.float32),
    }


def by_key(rows):
    return {(r["quantity"], r["layer"]): r["value"] for r in rows}


SENT = arrays([3.0, 4.0], [1.0, 0.0], [0.0, 2.0])  # norms: 5, 1, 2; all: sqrt(30)


def drift(clients):
    return dg.client_drift(dg.update_sums(SENT, clients, GROUPS))


def cosine(clients):
    return dg.update_cosine(dg.update_sums(SENT, clients, GROUPS))


def test_unchanged_clients_have_zero_drift():
    rows = by_key(drift([dict(SENT), dict(SENT)]))
    for group in ("all", "convs", "norms", "classifier"):
        for quantity in ("drift_mean", "drift_max", "drift_spread"):
            assert rows[(quantity, group)] == 0.0


def test_identical_clients_agree_and_drift_alike():
    moved = arrays([3.5, 4.0], [1.0, 0.2], [0.0, 1.0])
    rows = by_key(drift([moved, dict(moved), dict(moved)]))
    assert rows[("drift_spread", "all")] == pytest.approx(0.0, abs=1e-12)
    assert rows[("drift_mean", "convs")] == pytest.approx(0.5 / 5)
    assert rows[("drift_mean", "norms")] == pytest.approx(0.2 / 1)
    assert rows[("drift_mean", "classifier")] == pytest.approx(1.0 / 2)
    expected = math.sqrt(0.5**2 + 0.2**2 + 1.0**2) / math.sqrt(30)
    assert rows[("drift_mean", "all")] == pytest.approx(expected, rel=1e-6)
    assert rows[("drift_max", "all")] == pytest.approx(expected, rel=1e-6)
    assert cosine([moved, dict(moved), dict(moved)]) == pytest.approx(1.0)


def test_drift_mean_max_and_spread_of_two_clients():
    a = arrays([4.0, 4.0], [1.0, 0.0], [0.0, 2.0])  # moved by 1 in convs
    b = arrays([3.0, 1.0], [1.0, 0.0], [0.0, 2.0])  # moved by 3 in convs
    rows = by_key(drift([a, b]))
    assert rows[("drift_mean", "convs")] == pytest.approx((1 / 5 + 3 / 5) / 2)
    assert rows[("drift_max", "convs")] == pytest.approx(3 / 5)
    # the mean of the two is (3.5, 2.5): a is sqrt(0.25 + 2.25) away, b the same
    assert rows[("drift_spread", "convs")] == pytest.approx(math.sqrt(2.5) / 5)
    assert rows[("drift_mean", "norms")] == 0.0


def test_update_cosine_of_opposite_and_orthogonal_updates():
    up = arrays([4.0, 4.0], [1.0, 0.0], [0.0, 2.0])
    down = arrays([2.0, 4.0], [1.0, 0.0], [0.0, 2.0])
    side = arrays([3.0, 5.0], [1.0, 0.0], [0.0, 2.0])
    assert cosine([up, down]) == pytest.approx(-1.0)
    assert cosine([up, side]) == pytest.approx(0.0)
    assert cosine([up, down, side]) == pytest.approx(-1 / 3)
    assert math.isnan(cosine([up]))  # one client: no pair


def test_symmetric_kl_of_gaussians():
    eps = dg.VAR_EPS
    assert dg.gaussian_symmetric_kl(np.zeros(3), np.ones(3), np.zeros(3), np.ones(3)) == (
        pytest.approx(np.zeros(3))
    )
    # a mean shift d at equal variance v: d^2 / v
    shifted = dg.gaussian_symmetric_kl(np.array([2.0]), np.array([1.0]), np.zeros(1), np.ones(1))
    assert shifted[0] == pytest.approx(4 / (1 + eps))
    # variances 1 and 4, same mean: (1 + e)/(2(4 + e)) + (4 + e)/(2(1 + e)) - 1
    scaled = dg.gaussian_symmetric_kl(np.zeros(1), np.ones(1), np.zeros(1), 4 * np.ones(1))
    assert scaled[0] == pytest.approx((1 + eps) / (2 * (4 + eps)) + (4 + eps) / (2 * (1 + eps)) - 1)


def test_bn_divergence_of_shifted_client_statistics():
    aggregate = {"f.1.running_mean": np.zeros(4), "f.1.running_var": np.ones(4)}
    clients = [
        {"f.1.running_mean": np.full(4, shift), "f.1.running_var": np.ones(4)} for shift in (1, 3)
    ]
    rows = dg.with_layer_mean(dg.bn_divergence(clients, aggregate, ["f.1"]), "bn_divergence")
    expected = (1 + 9) / 2 / (1 + dg.VAR_EPS)
    assert by_key(rows) == pytest.approx(
        {("bn_divergence", "f.1"): expected, ("bn_divergence", "all"): expected}
    )
    # FedBN: statistics that did not travel give no row
    assert dg.bn_divergence([{}], {}, ["f.1"]) == []


def test_test_gap_against_the_statistics_the_data_produce():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Identity(), nn.BatchNorm2d(2))
    x = torch.randn(4096, 2, 3, 3) * 2.0 + 3.0  # mean 3, variance 4 in both channels
    rows = by_key(dg.bn_test_gap(model, x.split(512)))
    # running statistics at init: mean 0, var 1
    expected = dg.gaussian_symmetric_kl(np.zeros(1), np.ones(1), np.full(1, 3.0), np.full(1, 4.0))
    assert rows[("bn_test_gap", "1")] == pytest.approx(expected[0], rel=0.02)
    assert rows[("bn_test_gap", "all")] == rows[("bn_test_gap", "1")]
    dg.recalibrate_bn(model, x.split(512))
    assert by_key(dg.bn_test_gap(model, x.split(512)))[("bn_test_gap", "1")] < 1e-3
    assert dg.bn_test_gap(nn.Sequential(nn.Conv2d(2, 2, 1)), x.split(512)) == []


def test_recalibration_changes_bn_buffers_and_only_them():
    torch.manual_seed(0)
    model = build_model("cnn", "bn", in_channels=1, num_classes=3, width=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = list((torch.randn(256, 1, 12, 12) * 3 + 1).split(64))
    model.train()
    with dg.recalibrated(model, batches):
        inside = model.state_dict()
        changed = {k for k in before if not torch.equal(before[k], inside[k])}
        buffers = set(dg.bn_buffers(model))
        assert changed == buffers  # every BN buffer, no parameter, nothing else
        first = model.features[0][1]
        x = torch.cat(batches)
        with torch.no_grad():
            conv_out = model.features[0][0](x)
        assert torch.allclose(first.running_mean, conv_out.mean(dim=(0, 2, 3)), atol=1e-4)
        assert [m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)] == [0.1] * 4
    assert model.training  # the caller's mode is kept
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # restored on exit


def test_layer_groups_by_module_type():
    model = build_model("cnn", "bn", in_channels=1, num_classes=3, width=4)
    groups = dg.layer_groups(model)
    assert set(groups) == {k for k, _ in model.named_parameters()}
    assert groups["classifier.weight"] == groups["classifier.bias"] == "classifier"
    assert groups["features.0.0.weight"] == "convs" and groups["features.0.1.weight"] == "norms"
    assert dg.bn_layers(model) == ["features.0.1", "features.1.1", "features.3.1", "features.4.1"]
    nf = build_model("cnn", "nf", in_channels=1, num_classes=3, width=4)
    assert dg.bn_layers(nf) == [] and "norms" not in dg.layer_groups(nf).values()


def test_calibration_split_is_drawn_from_training_data_never_from_test_and_gap_from_test():
    # every image is constant at its own value: train 0..99, test 150..249
    x_train = torch.arange(100, dtype=torch.uint8)[:, None, None, None].expand(100, 1, 4, 4)
    x_test = (torch.arange(100) + 150).to(torch.uint8)[:, None, None, None].expand(100, 1, 4, 4)
    ds = ImageDataset(
        "values",
        x_train.clone(),
        torch.arange(100) % 2,
        x_test.clone(),
        torch.arange(100) % 2,
        ("a", "b"),
        "test",
    )
    cfg = small_config(
        "model.norm=bn",
        "server.calibration_samples=40",
        "server.bn_recalibration=true",
        "server.gap_samples=30",
    )
    module = new_module(cfg, ds)
    evaluator = GlobalEvaluator(cfg, ds, module, state_policy(module.model, "fedavg"))
    idx = evaluator.calibration_idx
    assert len(idx) == 40 == len(set(idx.tolist())) and idx.max() < 100
    mean, std = ds.channel_stats()
    seen = torch.cat(evaluator.calibration)[:, 0, 0, 0] * std + mean
    values = set(torch.round(seen * 255).int().tolist())
    assert values == set(idx.tolist())  # exactly the drawn training images
    assert not values & set(range(150, 250))  # none of the test images
    gap = torch.cat(evaluator.gap_batches)[:, 0, 0, 0] * std + mean
    gap_values = set(torch.round(gap * 255).int().tolist())
    assert len(gap_values) == 30 and gap_values <= set(range(150, 250))  # test images only
    assert gap_values != set(range(150, 180))  # a random sample, not the first (class-sorted)
    assert dg.sample_indices(100, 500, 0).tolist() == list(range(100))  # capped
