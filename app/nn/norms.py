"""The norm registry: one YAML string -> which conv and which normalization layer a model uses.

Models take the resolved ``NormSpec`` and build their layers through it (timm's
``create_norm.py`` habit): switching BN for WS+GN is a different argument, not another model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from torch import nn

from app.nn.layers import ScaledWSConv2d, WSConv2d

# Wu & He 2018 (arXiv 1803.08494) use 32 groups on ImageNet-width nets; CIFAR-width nets
# (16-64 channels) need fewer. The number actually used divides the channel count.
DEFAULT_GN_GROUPS = 8


def gn_groups(channels: int, groups: int = DEFAULT_GN_GROUPS) -> int:
    """The largest group count <= ``groups`` that divides ``channels`` (24 channels, at most
    16 groups: 12; a power-of-two width and 8 groups: 8)."""
    return max(g for g in range(1, min(groups, channels) + 1) if channels % g == 0)


def group_norm(channels: int, groups: int = DEFAULT_GN_GROUPS) -> nn.GroupNorm:
    """GroupNorm with ``gn_groups(channels, groups)`` groups."""
    return nn.GroupNorm(gn_groups(channels, groups), channels)


def layer_norm(channels: int) -> nn.GroupNorm:
    """LayerNorm over (C, H, W) per sample: GroupNorm with one group (Wu & He 2018)."""
    return nn.GroupNorm(1, channels)


@dataclass(frozen=True)
class NormSpec:
    """How to build a model's conv + norm pairs.

    ``conv(in, out, kernel_size, stride=..., padding=..., gamma=...)``; ``gamma`` is the
    variance-preserving constant of the preceding nonlinearity, used by scaled WS only.
    ``norm(channels)`` is None for normalization-free networks (``nf=True``) and for ``none``
    (plain convolutions with bias and no normalization layer, the baseline of NIID-Bench's
    ``simple-cnn``).
    """

    name: str
    description: str
    conv: Callable[..., nn.Conv2d]
    norm: Callable[[int], nn.Module] | None
    nf: bool = False
    se: bool = False


def _plain_conv(*args, gamma: float = 1.0, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(*args, **kwargs)


def _ws_conv(*args, gamma: float = 1.0, **kwargs) -> nn.Conv2d:
    return WSConv2d(*args, **kwargs)


def _scaled_ws_conv(*args, gamma: float = 1.0, **kwargs) -> nn.Conv2d:
    return ScaledWSConv2d(*args, gamma=gamma, **kwargs)


def _norm_map(gn_groups: int) -> dict[str, NormSpec]:
    gn = partial(group_norm, groups=gn_groups)
    return {
        "none": NormSpec("none", "Conv2d, no normalization layer", _plain_conv, None),
        "bn": NormSpec("bn", "Conv2d + BatchNorm2d", _plain_conv, nn.BatchNorm2d),
        # FixBN's layers are BN's; the freezing is a training policy (app.learn.classifier)
        "fixbn": NormSpec(
            "fixbn",
            "Conv2d + BatchNorm2d, statistics frozen after a round (FixBN)",
            _plain_conv,
            nn.BatchNorm2d,
        ),
        "gn": NormSpec("gn", "Conv2d + GroupNorm", _plain_conv, gn),
        "ln": NormSpec("ln", "Conv2d + GroupNorm(1 group) = LayerNorm", _plain_conv, layer_norm),
        "ws_gn": NormSpec("ws_gn", "WSConv2d + GroupNorm", _ws_conv, gn),
        "ws_bn": NormSpec("ws_bn", "WSConv2d + BatchNorm2d", _ws_conv, nn.BatchNorm2d),
        "nf": NormSpec("nf", "ScaledWSConv2d, no norm layer", _scaled_ws_conv, None, nf=True),
        "nf_se": NormSpec(
            "nf_se",
            "ScaledWSConv2d + squeeze-excitation, no norm layer",
            _scaled_ws_conv,
            None,
            nf=True,
            se=True,
        ),
    }


NORMS: tuple[str, ...] = tuple(_norm_map(DEFAULT_GN_GROUPS))


def get_norm(name: str, gn_groups: int = DEFAULT_GN_GROUPS) -> NormSpec:
    """Resolve a norm name from YAML; an unknown name is a ValueError listing the known ones."""
    specs = _norm_map(gn_groups)
    if name not in specs:
        raise ValueError(f"unknown norm {name!r}; known norms: {', '.join(NORMS)}")
    return specs[name]
