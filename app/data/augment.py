"""Batched data augmentation on tensors.

Two ``torch.gather`` calls per batch (rows, then columns), on the batch's device.
The CIFAR recipe (He et al. 2016): pad by 4 pixels, take a random crop of the original size,
flip horizontally with probability 1/2. The batches are already normalized, so the padding is 0
(the channel mean), not black. ``benchmarks/imagefolder.py`` times it against the same
augmentation done image by image (what a per-sample transform in a Dataset does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CROP_PADDING = 4


def random_crop_flip(
    x: torch.Tensor, padding: int = CROP_PADDING, mode: str = "zeros"
) -> torch.Tensor:
    """Each image of ``x`` (N, C, H, W): a random HxW crop of it padded by ``padding`` (with
    zeros, or ``mode="reflect"``: mirrored edges, NIID-Bench's CIFAR-10 recipe), mirrored
    left-right with probability 1/2. Draws from torch's global generator."""
    n, c, h, w = x.shape
    device, size = x.device, 2 * padding + 1
    pad = (padding, padding, padding, padding)
    padded = F.pad(x, pad, mode="reflect") if mode == "reflect" else F.pad(x, pad)
    dy = torch.randint(0, size, (n, 1, 1, 1), device=device)
    dx = torch.randint(0, size, (n, 1, 1, 1), device=device)
    flip = torch.rand(n, 1, 1, 1, device=device) < 0.5
    rows = dy + torch.arange(h, device=device).view(1, 1, h, 1)
    cropped = torch.gather(padded, 2, rows.expand(n, c, h, w + 2 * padding))  # rows first
    cols = torch.arange(w, device=device).view(1, 1, 1, w).expand(n, 1, 1, w)
    cols = torch.where(flip, cols.flip(3), cols) + dx  # mirrored columns where flipped
    return torch.gather(cropped, 3, cols.expand(n, c, h, w))
