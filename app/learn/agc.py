"""Adaptive gradient clipping (Brock et al. 2021, "High-Performance Large-Scale Image Recognition
Without Normalization", arXiv 2102.06171, Sec. 4.1), NFNets' companion to scaled WS.

Unit-wise: for each unit i of a parameter W (an output row of a linear layer, an output channel
of a conv kernel, the whole tensor for a bias or gain vector),

    G_i <- lambda * max(||W_i||, eps) / ||G_i|| * G_i    if ||G_i|| / max(||W_i||, eps) > lambda

with Frobenius norms, eps = 1e-3 (the paper's, so zero-initialised weights can still move) and
``||G_i||`` floored at 1e-6 in the division. The final classifier layer is not clipped (the
paper's ablation: clipping it hurts). Units follow the official JAX code and timm
``timm/utils/agc.py``: a tensor of one dimension or none is one unit.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

AGC_EPS = 1e-3  # Brock et al. 2021: the floor on the weight norm
GRAD_NORM_FLOOR = 1e-6


def unitwise_norm(x: torch.Tensor) -> torch.Tensor:
    """Frobenius norm of each unit, shaped to broadcast against ``x``."""
    if x.ndim <= 1:
        return torch.linalg.vector_norm(x)
    return torch.linalg.vector_norm(x, dim=tuple(range(1, x.ndim)), keepdim=True)


@torch.no_grad()
def clip_gradients(params: Iterable[nn.Parameter], clip: float, eps: float = AGC_EPS) -> None:
    """Clip each parameter's gradient unit-wise, in place (parameters without one are skipped)."""
    for p in params:
        if p.grad is None:
            continue
        max_norm = unitwise_norm(p.detach()).clamp_min(eps) * clip
        grad_norm = unitwise_norm(p.grad)
        clipped = p.grad * (max_norm / grad_norm.clamp_min(GRAD_NORM_FLOOR))
        p.grad.copy_(torch.where(grad_norm > max_norm, clipped, p.grad))


def clipped_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every trainable parameter but those of the final classifier (the model's last
    ``nn.Linear``, found by module type)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    skip = {id(p) for p in linears[-1].parameters()} if linears else set()
    return [p for p in model.parameters() if p.requires_grad and id(p) not in skip]
