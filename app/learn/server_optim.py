"""Server optimizers (Reddi et al. 2021, "Adaptive Federated Optimization", arXiv 2003.00295):
the global model's own ``torch.optim`` optimizer steps its *trainable parameters* with the
pseudo-gradient ``g = w_prev - sum_k n_k w_k / sum_k n_k`` (the negated sample-weighted mean
client update). Buffers, BatchNorm's running mean and variance among them, take the plain
sample-weighted mean and are never stepped: statistics are not gradients (an optimizer step on
``running_var`` can even drive it below zero). Flower keeps sampling, messaging and the mean.

The updates, per parameter tensor, step t = 1, 2, ... (all state starts at zero):

- ``fedavgm`` (Hsu et al. 2019, arXiv 1909.06335) = ``torch.optim.SGD(lr=server_learning_rate,
  momentum=server_momentum)``: ``b_1 = g_1``, ``b_t = momentum * b_{t-1} + g_t``,
  ``w <- w - lr * b_t``. The same update as Flower's ``FedAvgM``.
- ``fedadagrad`` = ``torch.optim.Adagrad(lr=eta, eps=tau)``: ``v_t = v_{t-1} + g_t^2``,
  ``w <- w - eta * g_t / (sqrt(v_t) + tau)``. The same update as Flower's ``FedAdagrad``.
- ``fedadam`` = ``FedAdam`` below, Reddi et al.'s Algorithm 2 exactly: ``m_t = beta_1 m_{t-1} +
  (1 - beta_1) g_t``, ``v_t = beta_2 v_{t-1} + (1 - beta_2) g_t^2``, ``w <- w - eta * m_t /
  (sqrt(v_t) + tau)``, no bias correction (with ``Delta = -g``: ``x += eta m / (sqrt(v) +
  tau)``). ``torch.optim.Adam`` bias-corrects both moments; Flower's ``FedAdam`` multiplies the
  step by ``sqrt(1 - beta_2^(t+1)) / (1 - beta_1^(t+1))``: neither is Algorithm 2.
- ``fedyogi`` = ``Yogi`` below, Reddi et al.'s Algorithm 2 without bias correction (as Flower's
  ``FedYogi``): ``m_t`` as FedAdam, ``v_t = v_{t-1} - (1 - beta_2) g_t^2 sign(v_{t-1} - g_t^2)``,
  ``w <- w - eta * m_t / (sqrt(v_t) + tau)``.

``eta``, ``beta_1``, ``beta_2`` and ``tau`` left null take Flower's defaults for the strategy
(``DEFAULTS``), so a config keeps the meaning it had with Flower's classes.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from app.config import FederationConfig
from app.errors import FedwsError

SERVER_OPTIMIZERS = ("fedavgm", "fedadam", "fedyogi", "fedadagrad")
# what a saved optimizer state records about the update rule that made it
ALGORITHM_KEY, ALGORITHM = "fedws_algorithm", "reddi-2021-algorithm-2"
# Flower 1.42's defaults for each strategy's hyper-parameters
DEFAULTS: dict[str, dict[str, float]] = {
    "fedadam": {"eta": 0.1, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3},
    "fedyogi": {"eta": 0.01, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3},
    "fedadagrad": {"eta": 0.1, "tau": 1e-3},
}


class _Algorithm2(torch.optim.Optimizer):
    """Reddi et al. 2021, Algorithm 2: a first moment ``m <- beta_1 m + (1 - beta_1) g``, a
    second moment set by the subclass, ``w <- w - lr * m / (sqrt(v) + eps)``; both moments start
    at zero and are never bias-corrected."""

    def __init__(
        self,
        params,
        lr: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float = 1e-3,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            beta_1, beta_2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                m, v, g2 = state["exp_avg"], state["exp_avg_sq"], p.grad * p.grad
                m.mul_(beta_1).add_(p.grad, alpha=1 - beta_1)
                self.second_moment(v, g2, beta_2)
                p.sub_(group["lr"] * m / (v.sqrt() + group["eps"]))
        return loss

    @staticmethod
    def second_moment(v: torch.Tensor, g2: torch.Tensor, beta_2: float) -> None:
        raise NotImplementedError


class FedAdam(_Algorithm2):
    """FedAdam (Reddi et al. 2021, Algorithm 2): ``v <- beta_2 v + (1 - beta_2) g^2``."""

    @staticmethod
    def second_moment(v: torch.Tensor, g2: torch.Tensor, beta_2: float) -> None:
        v.mul_(beta_2).add_(g2, alpha=1 - beta_2)


class Yogi(_Algorithm2):
    """Yogi (Zaheer et al. 2018; as FedYogi in Reddi et al. 2021, Algorithm 2): an additive
    second moment ``v <- v - (1 - beta_2) g^2 sign(v - g^2)`` that cannot grow faster than the
    squared gradient."""

    @staticmethod
    def second_moment(v: torch.Tensor, g2: torch.Tensor, beta_2: float) -> None:
        v.sub_((1 - beta_2) * g2 * torch.sign(v - g2))


def hyper_parameters(fed: FederationConfig) -> dict[str, float]:
    """The server optimizer's settings: the config's values, Flower's defaults for the rest."""
    if fed.strategy == "fedavgm":
        return {"lr": fed.server_lr, "momentum": fed.momentum}
    merged = {k: getattr(fed, k) for k in DEFAULTS[fed.strategy]}
    return {k: DEFAULTS[fed.strategy][k] if v is None else v for k, v in merged.items()}


def build_optimizer(fed: FederationConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    h = hyper_parameters(fed)
    if fed.strategy == "fedavgm":
        return torch.optim.SGD(params, lr=h["lr"], momentum=h["momentum"])
    if fed.strategy == "fedadagrad":
        return torch.optim.Adagrad(params, lr=h["eta"], eps=h["tau"])
    if fed.strategy == "fedadam":
        return FedAdam(params, lr=h["eta"], betas=(h["beta_1"], h["beta_2"]), eps=h["tau"])
    if fed.strategy == "fedyogi":
        return Yogi(params, lr=h["eta"], betas=(h["beta_1"], h["beta_2"]), eps=h["tau"])
    raise ValueError(
        f"{fed.strategy!r} has no server optimizer; those that do: {SERVER_OPTIMIZERS}"
    )


class ServerOptimizer:
    """Applies the strategy's server optimizer to the global ``model``'s trainable parameters.

    ``step(previous, mean)`` takes the global state sent this round and the sample-weighted mean
    of the clients' replies (same keys) and returns the new global state: each trainable
    parameter stepped from ``previous`` with the pseudo-gradient ``previous - mean``, every
    other entry (buffers) equal to ``mean``. The model's parameters hold the stepped values."""

    def __init__(self, model: nn.Module, fed: FederationConfig) -> None:
        self.params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        self.optimizer = build_optimizer(fed, list(self.params.values()))

    def step(
        self, previous: dict[str, torch.Tensor], mean: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        stepped = [name for name in self.params if name in mean]
        with torch.no_grad():
            for name in stepped:
                p = self.params[name]
                p.copy_(previous[name])
                p.grad = (previous[name] - mean[name]).to(device=p.device, dtype=p.dtype)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        out = dict(mean)
        out.update({name: self.params[name].detach().cpu().clone() for name in stepped})
        return out

    def state_dict(self) -> dict[str, Any]:
        """A copy (torch's holds the live moment tensors, which the next step changes), named
        with the update rule that made it (``ALGORITHM``)."""
        return {**copy.deepcopy(self.optimizer.state_dict()), ALGORITHM_KEY: ALGORITHM}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved state; FedAdam's from before ``ALGORITHM`` (fedws 0.1 stepped
        with torch's bias-corrected Adam) is refused: its moments mean something else."""
        state = dict(state)
        made_by = state.pop(ALGORITHM_KEY, None)
        if isinstance(self.optimizer, FedAdam) and made_by != ALGORITHM:
            raise FedwsError(
                "this checkpoint's FedAdam state comes from an earlier fedws (torch's "
                "bias-corrected Adam), not Reddi et al.'s Algorithm 2: resuming would mix the "
                "two; start the run again without --resume"
            )
        self.optimizer.load_state_dict(state)
