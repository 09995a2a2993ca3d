from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from app.nn.layers import ScaledWSConv2d, SqueezeExcite, WSConv2d
from app.nn.models import (
    NF_ALPHA,
    NFBlock,
    build_model,
    count_parameters,
    has_batchnorm,
    has_normalization,
    list_models,
    no_decay_parameters,
)
from app.nn.norms import NORMS, get_norm, group_norm

INPUTS = {
    "cnn": [(1, 28), (3, 32)],
    "resnet20": [(3, 32), (1, 28)],
    "simple_cnn": [(1, 28), (3, 32)],
}
BATCH_INDEPENDENT = ["none", "gn", "ln", "ws_gn", "nf", "nf_se"]


def test_registries_hold_the_documented_names():
    assert set(NORMS) == {"none", "bn", "fixbn", "gn", "ln", "ws_gn", "ws_bn", "nf", "nf_se"}
    assert {"cnn", "resnet20", "simple_cnn"} <= set(list_models())


def test_simple_cnn_with_none_is_niid_benchs_network_with_its_parameter_counts():
    """NIID-Bench's SimpleCNNMNIST (fc 16*4*4) and SimpleCNN (fc 16*5*5), counted by hand:
    conv 1->6 5x5 + bias 156, conv 6->16 2,416, fc 256->120 30,840, 120->84 10,164, 84->10 850."""
    fmnist = build_model("simple_cnn", "none", 1, 10)
    assert count_parameters(fmnist) == 156 + 2416 + 30840 + 10164 + 850 == 44426
    cifar = build_model("simple_cnn", "none", 3, 10)
    assert count_parameters(cifar) == 456 + 2416 + 48120 + 10164 + 850 == 62006
    assert not has_normalization(fmnist)
    convs = [m for m in fmnist.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (1, 6, (5, 5), (0, 0)),
        (6, 16, (5, 5), (0, 0)),
    ]
    assert all(type(c) is nn.Conv2d and c.bias is not None for c in convs)
    linears = [
        (m.in_features, m.out_features) for m in fmnist.modules() if isinstance(m, nn.Linear)
    ]
    assert linears == [(256, 120), (120, 84), (84, 10)]
    assert count_parameters(build_model("simple_cnn", "none", 3, 10, image_size=64)) > 62006


def test_norm_none_has_no_normalization_layer_in_any_arch():
    for arch in list_models():
        model = build_model(arch, "none", 3, 10)
        assert not has_normalization(model), arch
        assert all(c.bias is not None for c in model.modules() if isinstance(c, nn.Conv2d))


def test_unknown_norm_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown norm 'batchnorm'; known norms: none, bn, fixbn"):
        get_norm("batchnorm")


def test_unknown_arch_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown arch 'vgg'; known archs: cnn, resnet20"):
        build_model("vgg", "bn", 3, 10)


def test_group_norm_uses_the_largest_group_count_that_divides_channels():
    # the largest divisor of the channels <= the bound, as the docstring says (a gcd would
    # give 4 and 8 for the middle two)
    assert group_norm(16, 8).num_groups == 8
    assert group_norm(12, 8).num_groups == 6
    assert group_norm(24, 16).num_groups == 12
    assert group_norm(64, 32).num_groups == 32
    assert group_norm(7, 8).num_groups == 7
    for channels in range(1, 65):
        for bound in (1, 3, 8, 32):
            g = group_norm(channels, bound).num_groups
            assert channels % g == 0 and g <= bound
            assert not any(channels % h == 0 for h in range(g + 1, bound + 1))


def test_no_weight_decay_for_norm_affines_gains_and_skip_gains():
    bn = build_model("resnet20", "bn", 3, 10)
    exempt = set(no_decay_parameters(bn))
    norms = {
        f"{m}.{p}"
        for m, module in bn.named_modules()
        if isinstance(module, nn.BatchNorm2d)
        for p in ("weight", "bias")
    }
    assert len(norms) == 2 * 21 and exempt == norms  # every BN weight and bias, nothing else
    nf = build_model("resnet20", "nf", 3, 10)
    exempt = set(no_decay_parameters(nf))
    assert {n for n in exempt if n.endswith("skip_gain")} == {
        f"blocks.{i}.skip_gain" for i in range(9)
    }
    gains = {n for n, _ in nf.named_parameters() if n.endswith(".gain")}
    assert gains and gains <= exempt
    assert not any(n.endswith((".weight", ".bias")) for n in exempt)  # convs, classifier decay


@pytest.mark.parametrize("arch", list_models())
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("batch", [1, 8])
def test_forward_backward_every_arch_and_norm(arch, norm, batch):
    torch.manual_seed(0)
    for channels, size in INPUTS[arch]:
        model = build_model(arch, norm, channels, 10).train()
        x = torch.randn(batch, channels, size, size)
        out = model(x)
        assert out.shape == (batch, 10)
        assert torch.isfinite(out).all()
        out.logsumexp(1).mean().backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        assert model.classifier.weight.grad.abs().sum() > 0
        model.eval()
        with torch.no_grad():
            assert torch.isfinite(model(x)).all()


@pytest.mark.parametrize("arch", list_models())
@pytest.mark.parametrize("norm", [*BATCH_INDEPENDENT, "bn"])
def test_batch_independence_in_train_mode(arch, norm):
    torch.manual_seed(1)
    model = build_model(arch, norm, 3, 10).train()
    if get_norm(norm).nf:  # open the zero-initialised skip gains so every branch contributes
        for m in model.modules():
            if isinstance(m, NFBlock):
                nn.init.constant_(m.skip_gain, 1.0)
    sample = torch.randn(1, 3, 32, 32)
    batch_a = torch.cat([sample, torch.randn(7, 3, 32, 32)])
    batch_b = torch.cat([sample, 3 * torch.randn(7, 3, 32, 32) + 1])
    with torch.no_grad():
        out_a, out_b = model(batch_a)[0], model(batch_b)[0]
    if norm == "bn":
        assert not torch.allclose(out_a, out_b, atol=1e-4)
    else:
        torch.testing.assert_close(out_a, out_b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", list_models())
@pytest.mark.parametrize("norm", ["nf", "nf_se"])
def test_nf_models_have_no_normalization_layer(arch, norm):
    model = build_model(arch, norm, 3, 10)
    assert not has_normalization(model)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    se_convs = {id(m) for s in model.modules() if isinstance(s, SqueezeExcite) for m in s.modules()}
    assert all(isinstance(m, ScaledWSConv2d) for m in convs if id(m) not in se_convs)
    has_se = any(isinstance(m, SqueezeExcite) for m in model.modules())
    assert has_se == (norm == "nf_se")


@pytest.mark.parametrize("arch", list_models())
@pytest.mark.parametrize("norm", ["ws_gn", "ws_bn"])
def test_ws_models_have_no_plain_conv(arch, norm):
    model = build_model(arch, norm, 3, 10)
    assert not any(type(m) is nn.Conv2d for m in model.modules())
    assert any(isinstance(m, WSConv2d) for m in model.modules())
    assert has_batchnorm(model) == (norm == "ws_bn")


@pytest.mark.parametrize("arch", list_models())
def test_batchnorm_only_where_the_norm_says(arch):
    for norm in NORMS:
        assert has_batchnorm(build_model(arch, norm, 3, 10)) == (
            norm in ("bn", "fixbn", "ws_bn")
        ), norm


def test_bn_model_trains_on_a_single_sample_batch():
    model = build_model("resnet20", "bn", 3, 10).train()
    model(torch.randn(1, 3, 32, 32)).sum().backward()  # BN normalizes over H x W too


def test_nf_resnet_betas_follow_the_expected_variance():
    """beta_i = sqrt(Var(h_i)), Var growing by alpha^2 per block and reset at transitions."""
    model = build_model("resnet20", "nf", 3, 10)
    blocks = [m for m in model.modules() if isinstance(m, NFBlock)]
    assert len(blocks) == 9
    a2 = NF_ALPHA**2
    expected_var = [1.0, 1 + a2, 1 + 2 * a2, 1 + 3 * a2, 1 + a2, 1 + 2 * a2, 1 + 3 * a2]
    expected_var += [1 + a2, 1 + 2 * a2]
    assert [b.beta for b in blocks] == pytest.approx([math.sqrt(v) for v in expected_var])
    assert all(b.alpha == 0.2 for b in blocks)
    assert all(b.skip_gain.detach().item() == 0.0 and b.skip_gain.requires_grad for b in blocks)


def test_nf_resnet_keeps_signal_variance_bounded_at_init():
    torch.manual_seed(2)
    model = build_model("resnet20", "nf", 3, 10)
    for m in model.modules():
        if isinstance(m, NFBlock):
            nn.init.constant_(m.skip_gain, 1.0)
    with torch.no_grad():
        h = model.blocks(model.stem(torch.randn(64, 3, 32, 32)))
    # the analytic expectation at the end of the last stage is 1 + 3 * alpha^2
    assert 0.5 < h.var().item() < 2.0


def test_width_option_changes_parameter_count():
    small = count_parameters(build_model("cnn", "ws_gn", 1, 10, width=8))
    large = count_parameters(build_model("cnn", "ws_gn", 1, 10, width=32))
    assert small < large
