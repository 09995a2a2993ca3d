from __future__ import annotations

import pytest
import torch
from torch import nn

from app.learn.state import load_partial, select, state_policy
from app.nn.models import build_model


def bn_keys(model: nn.Module) -> set[str]:
    keys = set()
    for prefix, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            keys |= {f"{prefix}.{k}" for k in module.state_dict()}
    return keys


@pytest.mark.parametrize("arch", ["cnn", "resnet20"])
def test_fedavg_sends_weights_and_bn_statistics_but_not_counters(arch):
    model = build_model(arch, "bn", 3, 10)
    policy = state_policy(model, "fedavg")
    state = model.state_dict()
    assert set(policy.travel) | set(policy.local) == set(state)
    assert not set(policy.travel) & set(policy.local)
    counters = {k for k, v in state.items() if v.dtype == torch.int64}
    assert counters and set(policy.local) == counters  # num_batches_tracked only
    assert all(torch.is_floating_point(state[k]) for k in policy.travel)
    assert any(k.endswith("running_mean") for k in policy.travel)
    assert any(k.endswith("running_var") for k in policy.travel)
    assert list(policy.travel) == [k for k in state if k in policy.travel]  # state_dict order


@pytest.mark.parametrize("arch", ["cnn", "resnet20"])
def test_fedbn_keeps_every_batchnorm_entry_on_the_client(arch):
    model = build_model(arch, "bn", 3, 10)
    policy = state_policy(model, "fedbn")
    assert set(policy.local) == bn_keys(model)
    assert not bn_keys(model) & set(policy.travel)
    assert "classifier.weight" in policy.travel


@pytest.mark.parametrize("strategy", ["fedavg", "fedbn", "fedprox"])
def test_ws_gn_model_sends_everything(strategy):
    model = build_model("cnn", "ws_gn", 1, 10)
    policy = state_policy(model, strategy)
    assert policy.local == ()
    assert set(policy.travel) == set(model.state_dict())


def test_policy_does_not_depend_on_names():
    """A BatchNorm registered under a misleading name is still found by type."""

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv_bn_free = nn.Conv2d(1, 4, 3)
            self.weights = nn.BatchNorm2d(4)

    policy = state_policy(Odd(), "fedbn")
    assert set(policy.local) == {
        "weights.weight",
        "weights.bias",
        "weights.running_mean",
        "weights.running_var",
        "weights.num_batches_tracked",
    }
    assert set(policy.travel) == {"conv_bn_free.weight", "conv_bn_free.bias"}


def test_load_partial_loads_exactly_the_policy_keys():
    src, dst = build_model("cnn", "bn", 1, 10), build_model("cnn", "bn", 1, 10)
    policy = state_policy(src, "fedbn")
    load_partial(dst, select(src.state_dict(), policy.travel), policy.travel)
    for k in policy.travel:
        assert torch.equal(dst.state_dict()[k], src.state_dict()[k])
    with pytest.raises(ValueError, match="missing"):
        load_partial(dst, select(src.state_dict(), policy.travel[1:]), policy.travel)
    with pytest.raises(ValueError, match="unexpected"):
        load_partial(dst, src.state_dict(), policy.travel)
