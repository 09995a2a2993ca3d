"""Adaptive gradient clipping against hand computations, and inside a Lightning fit."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import small_config
from torch import nn

from app.learn import agc
from app.learn.classifier import FedwsClassifier
from app.learn.trainer import make_trainer, tensor_loader


def test_conv_weight_is_clipped_per_output_channel():
    conv = nn.Conv2d(1, 2, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([3.0, 4.0]).view(2, 1, 1, 1))  # unit norms 3 and 4
    conv.weight.grad = torch.tensor([6.0, 0.2]).view(2, 1, 1, 1)  # ratios 2.0 and 0.05
    agc.clip_gradients([conv.weight], clip=0.1)
    # unit 0: 6 > 0.1 * 3, scaled to 0.1 * 3 = 0.3; unit 1: 0.2 <= 0.4, untouched
    torch.testing.assert_close(conv.weight.grad.flatten(), torch.tensor([0.3, 0.2]))


def test_a_unit_is_every_input_of_an_output_and_a_vector_is_one_unit():
    w = torch.tensor([[3.0, 4.0], [0.0, 0.0]], requires_grad=True)  # row norms 5 and 0
    w.grad = torch.tensor([[0.0, 10.0], [1.0, 0.0]])
    b = torch.tensor([1.0, 2.0, 2.0], requires_grad=True)  # norm 3, one unit
    b.grad = torch.tensor([0.0, 0.0, 1.0])  # norm 1 > 0.2 * 3
    agc.clip_gradients([w, b], clip=0.2)
    # row 0: max 0.2 * 5 = 1 < 10: scaled to norm 1; row 1: weight norm 0 -> eps 1e-3,
    # max 2e-4 < 1: scaled to norm 2e-4 (so zero-initialised weights still move, a little)
    torch.testing.assert_close(w.grad, torch.tensor([[0.0, 1.0], [2e-4, 0.0]]))
    torch.testing.assert_close(b.grad, torch.tensor([0.0, 0.0, 0.6]))


def test_the_classifier_is_never_clipped():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 3), nn.Linear(3, 4))
    clipped = {id(p) for p in agc.clipped_parameters(model)}
    assert {id(p) for p in model[3].parameters()}.isdisjoint(clipped)
    assert {id(p) for p in (*model[0].parameters(), *model[2].parameters())} == clipped


def worst_ratio(model: nn.Module, clip: float) -> float:
    """max over the clipped units of ||G_i|| / (clip * max(||W_i||, 1e-3)), by hand: at most 1
    when AGC with ``clip`` ran (a unit: an output row or channel; a vector is one unit)."""
    worst = 0.0
    for p in agc.clipped_parameters(model):
        w, g = p.detach().double(), p.grad.double()
        if p.ndim > 1:
            w, g = w.flatten(1), g.flatten(1)
        else:
            w, g = w[None], g[None]
        bound = clip * w.norm(dim=1).clamp_min(1e-3)
        worst = max(worst, (g.norm(dim=1) / bound).max().item())
    return worst


@pytest.mark.parametrize("clip", [None, 0.01])
def test_a_lightning_fit_clips_every_step_when_asked(clip, monkeypatch):
    calls, ratios = [], []
    real = agc.clip_gradients

    def spy(params, clip_value, eps=agc.AGC_EPS):
        calls.append(clip_value)
        real(params, clip_value, eps)

    real_hook = FedwsClassifier.on_before_optimizer_step

    def gradients_the_optimizer_gets(self, optimizer):  # the hook is the step's last word
        real_hook(self, optimizer)
        ratios.append(worst_ratio(self.model, 0.01))

    monkeypatch.setattr(agc, "clip_gradients", spy)
    monkeypatch.setattr(FedwsClassifier, "on_before_optimizer_step", gradients_the_optimizer_gets)
    over = [f"optim.agc_clip={clip}"] if clip else []
    cfg = small_config("model.norm=nf", "optim.lr=0.5", *over)
    module = FedwsClassifier.from_config(cfg, 1, 10)
    x, y = torch.randn(64, 1, 16, 16), torch.randint(0, 10, (64,))
    trainer = make_trainer(cfg, max_epochs=1)
    trainer.fit(module, tensor_loader(x, y, 16, shuffle=True))
    assert calls == ([clip] * 4 if clip else [])  # once per optimizer step, only when asked
    assert len(ratios) == 4
    if clip:  # every unit of every step within lambda * max(||W_i||, 1e-3), up to rounding
        assert max(ratios) <= 1 + 1e-5, ratios
    else:  # and the bound is no formality: unclipped gradients break it
        assert max(ratios) > 2, ratios


def test_agc_clip_must_be_positive():
    with pytest.raises(Exception, match="agc_clip: must be > 0"):
        small_config("optim.agc_clip=0")
    assert math.isclose(small_config("optim.agc_clip=0.16").optim.agc_clip, 0.16)
