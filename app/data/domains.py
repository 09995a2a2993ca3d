"""Multi-domain clients (feature shift, the setting of FedBN, Li et al. 2021, arXiv 2102.07623,
and FedWon, Zhuang & Lyu 2024, arXiv 2306.05879): each client holds images of one domain.

Domains come from either
- ``data.partition.domains``: image *styles* from the registry below, applied to any built-in
  dataset; domain k's clients see their images, and its test split, in style k; or
- an ``imagefolder`` tree ``train/<domain>/<class>/...`` + ``test/<domain>/<class>/...``: the
  folders are the domains (Digits-Five, Office-Caltech-10, PACS, DomainNet...).

Client i belongs to domain ``i mod K``. Every style is a fixed, batched, deterministic transform
of [0, 1] images (N, C, H, W); the random one (``noise``) draws from a generator seeded by the
partition seed, the domain and the split, never from the global one:

| style | what it does |
| --- | --- |
| ``identity`` | the images as they are |
| ``invert`` | ``1 - x`` |
| ``noise`` | ``x + N(0, 0.2^2)`` per pixel, clipped to [0, 1] |
| ``blur`` | Gaussian blur, sigma 1 pixel (5x5 kernel, reflected borders) |
| ``contrast`` | ``0.5 + 0.4 (x - 0.5)``: 40% of the contrast |
| ``grayscale`` | colour only: BT.601 luma ``0.299 R + 0.587 G + 0.114 B`` in each channel |
| ``hue`` | colour images only: hue rotated by 90 degrees about the grey axis, clipped to [0, 1] |
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

from app.config import DataConfig
from app.data.datasets import ImageDataset
from app.errors import DataError

NOISE_STD = 0.2
BLUR_SIGMA = 1.0
CONTRAST = 0.4
HUE_DEGREES = 90.0
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601
TRAIN, VAL, TEST = 0, 1, 2  # splits, for the noise seeds

Style = Callable[[torch.Tensor], torch.Tensor]  # [0, 1] images -> [0, 1] images


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


def invert(x: torch.Tensor) -> torch.Tensor:
    return 1.0 - x


def noise(x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (x + NOISE_STD * torch.randn(x.shape, generator=g, dtype=x.dtype)).clamp(0.0, 1.0)


def blur(x: torch.Tensor) -> torch.Tensor:
    radius = 2
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k1 = torch.exp(-(t**2) / (2 * BLUR_SIGMA**2))
    k1 = k1 / k1.sum()
    c = x.shape[1]
    kernel = (k1[:, None] * k1[None, :]).expand(c, 1, 2 * radius + 1, 2 * radius + 1)
    padded = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    return F.conv2d(padded, kernel, groups=c)


def contrast(x: torch.Tensor) -> torch.Tensor:
    return 0.5 + CONTRAST * (x - 0.5)


def _colour(name: str, x: torch.Tensor) -> None:
    if x.shape[1] != 3:
        raise DataError(
            f"data.partition.domains: style {name!r} needs colour (3-channel) images, these "
            f"have {x.shape[1]} channel(s)"
        )


def grayscale(x: torch.Tensor) -> torch.Tensor:
    _colour("grayscale", x)
    luma = sum(w * x[:, i : i + 1] for i, w in enumerate(LUMA))
    return luma.expand_as(x).contiguous()


def hue(x: torch.Tensor) -> torch.Tensor:
    """Rotate every pixel's colour about the grey axis (1, 1, 1) by ``HUE_DEGREES``
    (Rodrigues' rotation), which turns its hue and keeps its grey level."""
    _colour("hue", x)
    a = math.radians(HUE_DEGREES)
    cos, sin, third = math.cos(a), math.sin(a), 1.0 / 3.0
    s = math.sqrt(third) * sin
    d, o = cos + third * (1 - cos), third * (1 - cos)
    rotation = torch.tensor(
        [[d, o - s, o + s], [o + s, d, o - s], [o - s, o + s, d]], dtype=x.dtype
    )
    return torch.einsum("oc,nchw->nohw", rotation, x).clamp(0.0, 1.0)


STYLES: dict[str, Callable[..., torch.Tensor]] = {
    "identity": identity,
    "invert": invert,
    "noise": noise,
    "blur": blur,
    "contrast": contrast,
    "grayscale": grayscale,
    "hue": hue,
}
SEEDED = frozenset({"noise"})


@dataclass(frozen=True)
class Domains:
    """The domains of a run: their names, each one's style, and which images are whose."""

    names: tuple[str, ...]
    styles: tuple[str, ...]  # a style name per domain ("identity" for folder domains)
    seed: int  # the partition seed: the seeded styles draw from it
    of_train: np.ndarray | None = None  # folder domains: each training image's domain
    of_test: np.ndarray | None = None

    @property
    def count(self) -> int:
        return len(self.names)

    def of_client(self, client: int) -> int:
        return client % self.count

    def style(self, domain: int, split: int, client: int = 0) -> Style:
        """Domain ``domain``'s style for one split of one client (the test split: client 0)."""
        fn = STYLES[self.styles[domain]]
        if self.styles[domain] not in SEEDED:
            return fn
        if client < 101:  # (split, client) packed without collisions below 101 clients
            seed = self.seed * 1_000_003 + domain * 10_007 + split * 101 + client
        else:
            seed = int(
                np.random.SeedSequence([self.seed, domain, split, client]).generate_state(1)[0]
            )
        return partial(fn, seed=seed)

    def test_indices(self, domain: int, num_test: int) -> np.ndarray:
        """The test images of ``domain``: all of them for styles, its own for folders."""
        if self.of_test is None:
            return np.arange(num_test)
        return np.flatnonzero(self.of_test == domain)


def domains_of(data: DataConfig, ds: ImageDataset) -> Domains | None:
    """The run's domains, or None unless ``data.partition.kind`` is ``domains``."""
    p = data.partition
    if p.kind != "domains":
        return None
    if ds.domains:
        if p.domains:
            raise DataError(
                "data.partition.domains: this imagefolder tree has domain folders "
                f"({', '.join(ds.domains)}); they are the domains, so leave domains empty"
            )
        names, styles = ds.domains, ("identity",) * len(ds.domains)
        of_train, of_test = ds.domain_train.numpy(), ds.domain_test.numpy()
        untested = [n for d, n in enumerate(names) if not (of_test == d).any()]
        if untested:
            raise DataError(
                f"imagefolder: domain {untested[0]!r} has no test images (test/<domain>/<class>/"
                "...), or data.test_samples left it none: each domain is scored on its own"
            )
    else:
        if not p.domains:
            raise DataError(
                "data.partition.domains: give the domains' image styles (e.g. [identity, "
                f"invert]; known: {', '.join(STYLES)}), or use an imagefolder tree "
                "train/<domain>/<class>/..."
            )
        names, styles, of_train, of_test = p.domains, p.domains, None, None
    if p.num_clients < len(names):
        raise DataError(
            f"data.partition.num_clients: {p.num_clients} clients for {len(names)} domains: "
            "each domain needs a client (client i belongs to domain i mod K)"
        )
    return Domains(tuple(names), tuple(styles), p.data_seed, of_train, of_test)
