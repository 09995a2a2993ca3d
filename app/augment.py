"""Batched data augmentation on tensors: one gather per batch, on the batch's device.

The CIFAR recipe (He et al. 2016): pad by 4 pixels, take a random crop of the original size,
flip horizontally with probability 1/2. The batches are already normalized, so the padding is 0
(the channel mean), not black. Per-sample Python (torchvision transforms in a Dataset) would
cost more than the small models' step on a CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CROP_PADDING = 4


def random_crop_flip(x: torch.Tensor, padding: int = CROP_PADDING) -> torch.Tensor:
    """Each image of ``x`` (N, C, H, W): a random HxW crop of it zero-padded by ``padding``,
    mirrored left-right with probability 1/2. Draws from torch's global generator."""
    n, _, h, w = x.shape
    device = x.device
    padded = F.pad(x, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n, 1), device=device)
    dx = torch.randint(0, 2 * padding + 1, (n, 1), device=device)
    flip = torch.rand(n, 1, device=device) < 0.5
    rows = dy + torch.arange(h, device=device)  # (N, H)
    cols = torch.arange(w, device=device).expand(n, w)
    cols = torch.where(flip, cols.flip(1), cols) + dx  # (N, W): mirrored columns where flipped
    index = torch.arange(n, device=device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[index, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()
