"""Batch-independent layers: Weight Standardization, scaled WS and squeeze-excitation.

- ``WSConv2d``: Weight Standardization, Qiao et al. 2019, https://arxiv.org/abs/1903.10520
- ``ScaledWSConv2d``: Scaled WS of normalization-free networks, Brock et al. 2021,
  https://arxiv.org/abs/2101.08692 (NF-ResNets) and https://arxiv.org/abs/2102.06171 (NFNets)
- ``SqueezeExcite``: channel attention, Hu et al. 2018, https://arxiv.org/abs/1709.01507, used
  with NF networks by ANFR, Siomos et al. 2024, https://arxiv.org/abs/2410.02006
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# Gamma makes a nonlinearity variance-preserving for unit-Gaussian inputs:
# Var(relu(x)) = (1 - 1/pi) / 2 for x ~ N(0, 1), so gamma = sqrt(2 / (1 - 1/pi)).
# Brock et al. 2021 (arXiv 2101.08692), Sec. 4; timm `nfnet.py` `_nonlin_gamma["relu"]`.
RELU_GAMMA = math.sqrt(2.0 / (1.0 - 1.0 / math.pi))


class _StandardizedConv2d(nn.Conv2d):
    """A Conv2d that convolves with ``standardized_weight()`` instead of its raw weight.

    In eval mode with gradients off (``torch.no_grad()`` / ``torch.inference_mode()``) the
    standardized weight is computed once and reused until a parameter changes: the cache key
    holds each parameter's storage pointer and version counter, which every in-place update
    of the parameter itself bumps (an optimizer step, ``load_state_dict``, ``p.copy_()`` under
    ``torch.no_grad()``, assigning ``p.data = t``). The limit: an in-place write through the
    ``.data`` alias (``p.data.copy_(t)``, ``p.data.mul_(2)``) bumps the alias's own counter,
    not the parameter's, so the cache cannot see it; call ``clear_weight_cache()`` after one.
    fedws itself never writes that way.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._cache_key: tuple | None = None
        self._cached_weight: torch.Tensor | None = None

    def standardized_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def clear_weight_cache(self) -> None:
        """Forget the cached standardized weight (after a write through ``.data``)."""
        self._cache_key = self._cached_weight = None

    def _param_key(self) -> tuple:
        return tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in self.parameters())

    def _weight_for_forward(self) -> torch.Tensor:
        if self.training or torch.is_grad_enabled():
            if self._cached_weight is not None:  # a training step: forget an eval-time weight
                self.clear_weight_cache()
            return self.standardized_weight()
        key = self._param_key()
        if key != self._cache_key or self._cached_weight is None:
            self._cached_weight = self.standardized_weight()
            self._cache_key = key
        return self._cached_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self._weight_for_forward(), self.bias)


class WSConv2d(_StandardizedConv2d):
    """Conv2d with Weight Standardization (Qiao et al. 2019, arXiv 1903.10520).

    Per output channel, over the fan-in I = C_in * k_h * k_w:
    ``W_hat = (W - mean) / sqrt(var + eps)`` with the *biased* variance and ``eps`` inside the
    root, as in timm ``StdConv2d`` and BiT. (The paper's code adds eps to the unbiased std
    instead; the difference is a factor sqrt(I / (I - 1)) that the following norm absorbs.)
    No affine term: a GroupNorm or BatchNorm follows.
    """

    def __init__(self, *args, eps: float = 1e-5, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.eps = eps

    def standardized_weight(self) -> torch.Tensor:
        # batch_norm over a (1, C_out, fan_in) view: biased variance, eps inside the root.
        w = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1),
            None,
            None,
            training=True,
            momentum=0.0,
            eps=self.eps,
        )
        return w.reshape_as(self.weight)


class ScaledWSConv2d(_StandardizedConv2d):
    """Scaled Weight Standardization of normalization-free networks (Brock et al. 2021).

    ``W_hat = gain * gamma * (W - mean) / sqrt(N * var + eps)`` per output channel, N the
    fan-in, biased variance, ``gain`` learnable per output channel (init 1), ``gamma`` the
    variance-preserving constant of the nonlinearity *before* this conv (``RELU_GAMMA`` after a
    ReLU, 1 on the network input). ``eps`` defaults to 1e-4 as in the NFNets reference code.
    """

    def __init__(self, *args, gamma: float = 1.0, eps: float = 1e-4, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gamma = gamma
        self.eps = eps
        self.gain = nn.Parameter(torch.ones(self.out_channels))

    def standardized_weight(self) -> torch.Tensor:
        fan_in = self.weight[0].numel()
        # (W - mean) / sqrt(N var + eps) == (W - mean) / sqrt(var + eps / N) / sqrt(N)
        w = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1),
            None,
            None,
            weight=self.gain * (self.gamma / math.sqrt(fan_in)),
            training=True,
            momentum=0.0,
            eps=self.eps / fan_in,
        )
        return w.reshape_as(self.weight)


class GlobalAvgPool(nn.Module):
    """Mean over the spatial dimensions, keeping them as 1x1: ``nn.AdaptiveAvgPool2d(1)``'s
    result (bit for bit on the CPU), but with a backward pass that is deterministic on CUDA,
    where ``AdaptiveAvgPool2d``'s raises under ``torch.use_deterministic_algorithms(True)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3), keepdim=True)


class SqueezeExcite(nn.Module):
    """Squeeze-excitation channel attention (Hu et al. 2018), batch-independent.

    ``gain`` = 2 keeps the signal variance of NF networks at init (sigmoid(0) = 0.5), as in the
    NFNets reference code and timm ``nfnet.py`` (``attn_gain=2.0``).
    """

    def __init__(self, channels: int, rd_ratio: float = 0.25, gain: float = 2.0) -> None:
        super().__init__()
        hidden = max(1, int(channels * rd_ratio))
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, channels, 1)
        self.gain = gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=(2, 3), keepdim=True)
        s = self.fc2(F.relu(self.fc1(s)))
        return x * torch.sigmoid(s) * self.gain
