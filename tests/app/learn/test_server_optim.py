"""The server optimizers against hand computations of their documented updates, two rounds each:
trainable parameters stepped with g = previous - mean, buffers equal to the mean."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import set_task_identity, small_config
from torch import nn

from app.learn.server_optim import ServerOptimizer, Yogi

W, B = "0.weight", "0.bias"
MEAN, VAR = "1.running_mean", "1.running_var"


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))


def fed(strategy: str, *overrides: str):
    return small_config(f"federation.strategy={strategy}", *overrides).federation


def rounds_of_means(net: nn.Module):
    """Two rounds: the global state sent, and the clients' weighted mean that came back."""
    start = {k: v.detach().clone() for k, v in net.state_dict().items() if v.is_floating_point()}
    g = torch.Generator().manual_seed(1)
    means = []
    for _ in range(2):
        means.append(
            {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in start.items()}
            | {VAR: torch.rand(2, generator=g) * 1e-3}  # small variances: a step could go < 0
        )
    return start, means


def run_two_rounds(strategy: str, *overrides: str):
    net = model()
    opt = ServerOptimizer(net, fed(strategy, *overrides))
    previous, means = rounds_of_means(net)
    states = []
    for mean in means:
        previous = opt.step(previous, mean)
        states.append(previous)
    return rounds_of_means(model())[0], means, states


def hand(strategy: str, p0: np.ndarray, means: list[np.ndarray], h: dict) -> list[np.ndarray]:
    """The documented update (app.learn.server_optim), in float64 numpy."""
    w, m, v, out = p0.astype(np.float64), 0.0, 0.0, []
    for t, mean in enumerate(means, start=1):
        g = w - mean
        if strategy == "fedavgm":
            m = g if t == 1 else h["momentum"] * m + g
            w = w - h["lr"] * m
        elif strategy == "fedadagrad":
            v = v + g * g
            w = w - h["eta"] * g / (np.sqrt(v) + h["tau"])
        elif strategy == "fedadam":
            m = h["beta_1"] * m + (1 - h["beta_1"]) * g
            v = h["beta_2"] * v + (1 - h["beta_2"]) * g * g
            w = w - h["eta"] * m / (np.sqrt(v) + h["tau"])  # Algorithm 2: no bias correction
        elif strategy == "fedyogi":
            m = h["beta_1"] * m + (1 - h["beta_1"]) * g
            v = v - (1 - h["beta_2"]) * g * g * np.sign(v - g * g)
            w = w - h["eta"] * m / (np.sqrt(v) + h["tau"])
        out.append(w)
    return out


CASES = {
    "fedavgm": ((), {"lr": 1.0, "momentum": 0.9}),
    "fedadagrad": ((), {"eta": 0.1, "tau": 1e-3}),  # Flower's defaults
    "fedadam": ((), {"eta": 0.1, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}),
    "fedyogi": ((), {"eta": 0.01, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}),
}
CONFIGURED = {  # the config's values where given
    "fedavgm": (
        ("federation.server_learning_rate=0.5", "federation.server_momentum=0.3"),
        {"lr": 0.5, "momentum": 0.3},
    ),
    "fedadam": (
        ("federation.eta=0.02", "federation.beta_1=0.5", "federation.tau=0.1"),
        {"eta": 0.02, "beta_1": 0.5, "beta_2": 0.99, "tau": 0.1},
    ),
}


@pytest.mark.parametrize(
    ("strategy", "overrides", "h"),
    [(s, o, h) for s, (o, h) in CASES.items()] + [(s, o, h) for s, (o, h) in CONFIGURED.items()],
)
def test_update_equals_the_hand_computation_for_two_rounds(strategy, overrides, h):
    start, means, states = run_two_rounds(strategy, *overrides)
    for key in (W, B):
        expected = hand(strategy, start[key].numpy(), [m[key].numpy() for m in means], h)
        for state, want in zip(states, expected, strict=True):
            np.testing.assert_allclose(state[key].numpy(), want, rtol=1e-5, atol=1e-7)
        assert not np.allclose(states[-1][key].numpy(), means[-1][key].numpy())  # it stepped


@pytest.mark.parametrize("strategy", list(CASES))
def test_buffers_take_the_weighted_mean_and_are_never_stepped(strategy):
    _, means, states = run_two_rounds(strategy)
    for state, mean in zip(states, means, strict=True):
        assert torch.equal(state[MEAN], mean[MEAN]) and torch.equal(state[VAR], mean[VAR])
        assert (state[VAR] > 0).all()


def test_yogi_second_moment_moves_by_at_most_the_squared_gradient():
    p = nn.Parameter(torch.zeros(1))
    opt = Yogi([p], lr=0.0, betas=(0.0, 0.5), eps=1.0)
    for grad, v in ((2.0, 2.0), (1.0, 1.5), (3.0, 6.0)):  # v - 0.5 g^2 sign(v - g^2)
        p.grad = torch.tensor([grad])
        opt.step()
        assert opt.state[p]["exp_avg_sq"].item() == pytest.approx(v)


def test_fedadam_is_flowers_fedadam_with_its_bias_factor_divided_out(monkeypatch):
    """Flower's FedAdam scales eta by sqrt(1 - b2^(t+1)) / (1 - b1^(t+1)) in round t: with eta
    divided by that factor each round it must take fedws's (Algorithm 2) steps."""
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.serverapp.strategy import FedAdam as FlowerFedAdam

    set_task_identity(monkeypatch)
    h = CASES["fedadam"][1]
    start, means, states = run_two_rounds("fedadam")
    keys = (W, B)
    flower = FlowerFedAdam(beta_1=h["beta_1"], beta_2=h["beta_2"], tau=h["tau"])
    flower.current_arrays = {k: start[k].numpy().astype(np.float64) for k in keys}
    for t, (mean, state) in enumerate(zip(means, states, strict=True), start=1):
        factor = np.sqrt(1 - h["beta_2"] ** (t + 1)) / (1 - h["beta_1"] ** (t + 1))
        flower.eta = h["eta"] / factor
        arrays = ArrayRecord({k: Array(mean[k].numpy().astype(np.float64)) for k in keys})
        content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 1})})
        reply = Message(content=content, dst_node_id=1, message_type="train")
        new, _ = flower.aggregate_train(t, [reply])
        got = {k: v.numpy() for k, v in new.items()}
        for k in keys:
            np.testing.assert_allclose(state[k].numpy(), got[k], rtol=1e-5, atol=1e-7)
        flower.current_arrays = got
    unscaled = hand("fedadam", start[W].numpy(), [m[W].numpy() for m in means], h)[0]
    factor_1 = np.sqrt(1 - h["beta_2"] ** 2) / (1 - h["beta_1"] ** 2)
    step_ours, step_flower = unscaled - start[W].numpy(), factor_1 * (unscaled - start[W].numpy())
    assert not np.allclose(step_ours, step_flower)  # the two differ as documented


def test_state_survives_a_save_and_restore():
    net = model()
    opt = ServerOptimizer(net, fed("fedadam"))
    previous, means = rounds_of_means(net)
    after_one = opt.step(previous, means[0])
    saved = opt.state_dict()
    straight = opt.step(after_one, means[1])
    other = model()
    restored = ServerOptimizer(other, fed("fedadam"))
    restored.load_state_dict(saved)
    again = restored.step(after_one, means[1])
    assert all(torch.equal(straight[k], again[k]) for k in straight)


def test_a_fedadam_state_from_torchs_adam_is_refused_on_resume():
    from app.errors import FedwsError

    net = model()
    old = torch.optim.Adam(net.parameters(), lr=0.1)  # what fedws 0.1 saved for fedadam
    restored = ServerOptimizer(model(), fed("fedadam"))
    with pytest.raises(FedwsError, match="earlier fedws"):
        restored.load_state_dict(old.state_dict())
    yogi = ServerOptimizer(model(), fed("fedyogi"))
    yogi.load_state_dict(Yogi(model().parameters()).state_dict())  # unchanged rules still load
