"""The model registry: every arch takes every norm of ``app.nn.norms``.

- ``cnn``: four 3x3 convs (two blocks of conv-norm-ReLU x2 + max-pool), global pool, linear; for
  28x28 and 32x32 inputs.
- ``simple_cnn``: NIID-Bench's ``simple-cnn`` (Li et al. 2022, arXiv 2102.02079; its
  ``model.py`` ``SimpleCNNMNIST`` / ``SimpleCNN``): conv 5x5 C->6, ReLU, max-pool 2, conv 5x5
  6->16, ReLU, max-pool 2, fc 16*s*s->120->84->classes with ReLUs (s = 4 for 28x28 inputs, 5
  for 32x32); the norm switch puts the chosen normalization after each conv (``none``: the
  original network).
- ``resnet20``: the CIFAR ResNet of He et al. 2016 (arXiv 1512.03385, Sec. 4.2): 3 stages of
  3 basic blocks, 16/32/64 channels; projection shortcuts (1x1 conv + norm) where shape changes.

With an ``nf*`` norm the same archs follow the NF-ResNet recipe (Brock et al. 2021,
arXiv 2101.08692): scaled-WS convs whose gamma undoes the preceding ReLU's variance change, no
normalization layer, and residual blocks ``h + alpha * skip_gain * f(h / beta)`` with
``alpha = 0.2``, ``beta`` the analytically expected std of ``h`` and ``skip_gain`` a learnable
scalar initialised to zero (SkipInit, De & Smith 2020). ``nf_se`` adds squeeze-excitation in each
block (ANFR, Siomos et al. 2024, arXiv 2410.02006).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from app.nn.layers import RELU_GAMMA, GlobalAvgPool, ScaledWSConv2d, SqueezeExcite
from app.nn.norms import DEFAULT_GN_GROUPS, NORMS, NormSpec, get_norm

NF_ALPHA = 0.2  # Brock et al. 2021 (arXiv 2101.08692), NF-ResNets use alpha = 0.2


def _conv_norm_act(
    spec: NormSpec, cin: int, cout: int, stride: int, gamma: float, kernel: int = 3
) -> nn.Sequential:
    """conv (3x3, 'same' padding; 5x5 unpadded as NIID-Bench's) -> norm -> ReLU; conv bias
    only where no norm follows (NF, none)."""
    padding = 1 if kernel == 3 else 0
    layers: list[nn.Module] = [
        spec.conv(
            cin, cout, kernel, stride=stride, padding=padding, bias=spec.norm is None, gamma=gamma
        )
    ]
    if spec.norm is not None:
        layers.append(spec.norm(cout))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class SmallCNN(nn.Module):
    """Four 3x3 convs in two pooled blocks; ``width`` channels, then ``2 * width``."""

    def __init__(self, spec: NormSpec, in_channels: int, num_classes: int, width: int = 32):
        super().__init__()
        w1, w2 = width, 2 * width
        # The first conv sees the (normalized) input, later ones a ReLU output.
        block1: list[nn.Module] = [
            _conv_norm_act(spec, in_channels, w1, 1, gamma=1.0),
            _conv_norm_act(spec, w1, w1, 1, gamma=RELU_GAMMA),
        ]
        block2: list[nn.Module] = [
            _conv_norm_act(spec, w1, w2, 1, gamma=RELU_GAMMA),
            _conv_norm_act(spec, w2, w2, 1, gamma=RELU_GAMMA),
        ]
        if spec.se:
            block1.append(SqueezeExcite(w1))
            block2.append(SqueezeExcite(w2))
        self.features = nn.Sequential(
            *block1, nn.MaxPool2d(2), *block2, nn.MaxPool2d(2), GlobalAvgPool()
        )
        self.classifier = nn.Linear(w2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class SimpleCNN(nn.Module):
    """NIID-Bench's ``simple-cnn`` with a norm after each conv (none: the original)."""

    def __init__(
        self, spec: NormSpec, in_channels: int, num_classes: int, image_size: int | None = None
    ) -> None:
        super().__init__()
        # NIID-Bench pairs 1 channel with 28x28 (MNIST, FMNIST) and 3 with 32x32 (CIFAR-10)
        size = image_size or (28 if in_channels == 1 else 32)
        side = ((size - 4) // 2 - 4) // 2
        if side < 1:
            raise ValueError(f"simple_cnn needs images of at least 16x16 pixels, got {size}")
        attn = SqueezeExcite if spec.se else (lambda channels: nn.Identity())
        self.features = nn.Sequential(
            *_conv_norm_act(spec, in_channels, 6, 1, gamma=1.0, kernel=5),
            attn(6),
            nn.MaxPool2d(2),
            *_conv_norm_act(spec, 6, 16, 1, gamma=RELU_GAMMA, kernel=5),
            attn(16),
            nn.MaxPool2d(2),
        )
        self.fc = nn.Sequential(
            nn.Linear(16 * side * side, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU()
        )
        self.classifier = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.fc(torch.flatten(self.features(x), 1)))


def _norm_or_identity(spec: NormSpec, channels: int) -> nn.Module:
    return nn.Identity() if spec.norm is None else spec.norm(channels)


class BasicBlock(nn.Module):
    """Post-activation basic block of He et al. 2016 with injected conv and norm layers
    (norm ``none``: convs with bias and no normalization)."""

    def __init__(self, spec: NormSpec, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        bias = spec.norm is None
        self.conv1 = spec.conv(cin, cout, 3, stride=stride, padding=1, bias=bias)
        self.norm1 = _norm_or_identity(spec, cout)
        self.conv2 = spec.conv(cout, cout, 3, stride=1, padding=1, bias=bias)
        self.norm2 = _norm_or_identity(spec, cout)
        self.act = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                spec.conv(cin, cout, 1, stride=stride, bias=bias), _norm_or_identity(spec, cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.act(out + self.shortcut(x))


class NFBlock(nn.Module):
    """Normalization-free pre-activation block: ``h + alpha * skip_gain * f(relu(h) / beta)``.

    ``beta`` is the expected std of the block input; with a projection shortcut the shortcut
    takes the rescaled input too, so the signal variance restarts at 1 (NF-ResNet transition
    block; timm ``NormFreeBlock``).
    """

    def __init__(
        self, spec: NormSpec, cin: int, cout: int, stride: int, alpha: float, beta: float
    ) -> None:
        super().__init__()
        self.alpha, self.beta = alpha, beta
        self.act = nn.ReLU()
        self.conv1 = spec.conv(cin, cout, 3, stride=stride, padding=1, gamma=RELU_GAMMA)
        self.conv2 = spec.conv(cout, cout, 3, stride=1, padding=1, gamma=RELU_GAMMA)
        self.attn = SqueezeExcite(cout) if spec.se else nn.Identity()
        self.shortcut: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.shortcut = spec.conv(cin, cout, 1, stride=stride, gamma=RELU_GAMMA)
        self.skip_gain = nn.Parameter(torch.zeros(()))

    @property
    def resets_variance(self) -> bool:
        return self.shortcut is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(x) / self.beta
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv2(self.act(self.conv1(out)))
        out = self.attn(out)
        return shortcut + out * (self.alpha * self.skip_gain)


class ResNetCifar(nn.Module):
    """CIFAR ResNet-(6n+2) (He et al. 2016, Sec. 4.2); NF-ResNet blocks when ``spec.nf``."""

    def __init__(
        self,
        spec: NormSpec,
        in_channels: int,
        num_classes: int,
        blocks_per_stage: int = 3,
        width: int = 16,
        alpha: float = NF_ALPHA,
    ) -> None:
        super().__init__()
        widths = (width, 2 * width, 4 * width)
        if spec.nf:
            self.stem: nn.Module = spec.conv(in_channels, width, 3, padding=1, gamma=1.0)
        else:
            self.stem = _conv_norm_act(spec, in_channels, width, 1, gamma=1.0)
        blocks: list[nn.Module] = []
        cin, expected_var = width, 1.0
        for stage, cout in enumerate(widths):
            for i in range(blocks_per_stage):
                stride = 2 if stage > 0 and i == 0 else 1
                if spec.nf:
                    block = NFBlock(spec, cin, cout, stride, alpha, beta=expected_var**0.5)
                    if block.resets_variance:
                        expected_var = 1.0
                    expected_var += alpha**2
                else:
                    block = BasicBlock(spec, cin, cout, stride)
                blocks.append(block)
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        # NF blocks are pre-activation: the final ReLU closes the residual stream.
        self.head_act = nn.ReLU() if spec.nf else nn.Identity()
        self.pool = GlobalAvgPool()
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head_act(self.blocks(self.stem(x)))
        return self.classifier(torch.flatten(self.pool(x), 1))


@dataclass(frozen=True)
class ArchSpec:
    name: str
    description: str
    builder: Callable[..., nn.Module]
    sized: bool = False  # the builder takes the input's image_size (a fixed-size classifier)


MODELS: dict[str, ArchSpec] = {
    "cnn": ArchSpec("cnn", "4 conv layers, 28x28 / 32x32 inputs", SmallCNN),
    "resnet20": ArchSpec("resnet20", "CIFAR ResNet-20 (He et al. 2016)", ResNetCifar),
    "simple_cnn": ArchSpec(
        "simple_cnn", "NIID-Bench's simple-cnn (2 conv, 3 fc)", SimpleCNN, sized=True
    ),
}


def list_models() -> list[str]:
    return list(MODELS)


def build_model(
    arch: str,
    norm: str,
    in_channels: int,
    num_classes: int,
    *,
    gn_groups: int = DEFAULT_GN_GROUPS,
    image_size: int | None = None,
    **options,
) -> nn.Module:
    """Build ``arch`` with ``norm``; ``options`` go to the arch (e.g. ``width``);
    ``image_size`` to an arch whose classifier depends on it (``simple_cnn``).

    Unknown names raise ValueError listing the known ones.
    """
    if arch not in MODELS:
        raise ValueError(f"unknown arch {arch!r}; known archs: {', '.join(MODELS)}")
    spec = get_norm(norm, gn_groups=gn_groups)
    if MODELS[arch].sized:
        options["image_size"] = image_size
    return MODELS[arch].builder(spec, in_channels, num_classes, **options)


NORMALIZATION_TYPES = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.modules.instancenorm._InstanceNorm,
)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def has_normalization(model: nn.Module) -> bool:
    return any(isinstance(m, NORMALIZATION_TYPES) for m in model.modules())


def no_decay_parameters(model: nn.Module) -> list[str]:
    """Names of the parameters NFNets keep out of weight decay (Brock et al. 2021, arXiv
    2102.06171): every normalization layer's affine weight and bias, the scaled-WS convs'
    gains and the NF blocks' skip gains; chosen by module type, never by name."""
    names = []
    for prefix, module in model.named_modules():
        own = dict(module.named_parameters(recurse=False))
        if isinstance(module, NORMALIZATION_TYPES):
            keep = list(own)
        elif isinstance(module, ScaledWSConv2d):
            keep = ["gain"]
        elif isinstance(module, NFBlock):
            keep = ["skip_gain"]
        else:
            keep = []
        names += [f"{prefix}.{k}" if prefix else k for k in keep if k in own]
    return names


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "MODELS",
    "NORMS",
    "build_model",
    "count_parameters",
    "has_batchnorm",
    "has_normalization",
    "list_models",
    "no_decay_parameters",
]
