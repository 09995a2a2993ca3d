"""What loading an image tree and augmenting its batches cost, each against its baseline.

- decode: every image of the tree with Pillow on 1 thread (baseline) vs a thread pool vs
  ``workers=None`` (what ``app.data.imagefolder`` uses: threads only for large images), on the given
  tree and on a generated tree of large JPEGs; and the second load, which reads the cache;
- augment: random crop + flip of 32-image batches, one image at a time in Python (what a
  per-sample transform does, baseline) vs ``app.data.augment.random_crop_flip`` on the batch.

All timed in this one process, side by side.

    python benchmarks/imagefolder.py PATH/cifar10-jpeg-subset.zip [--large N] [--json OUT]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from measure import write_json

from app.data.augment import CROP_PADDING, random_crop_flip
from app.data.imagefolder import decode_all, load_imagefolder, open_source


def per_sample_crop_flip(x: torch.Tensor, padding: int = CROP_PADDING) -> torch.Tensor:
    """The baseline: the same augmentation, one image at a time."""
    out = torch.empty_like(x)
    h, w = x.shape[2:]
    for i, image in enumerate(x):
        padded = F.pad(image, (padding, padding, padding, padding))
        dy, dx = (int(v) for v in torch.randint(0, 2 * padding + 1, (2,)))
        crop = padded[:, dy : dy + h, dx : dx + w]
        out[i] = crop.flip(2) if torch.rand(()) < 0.5 else crop
    return out


def large_tree(root: Path, n: int, size: int = 384) -> Path:
    """``n`` smooth random JPEGs of ``size`` x ``size`` in two classes (and a small test)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n + 4):
        split = "train" if i < n else "test"
        folder = root / split / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size, size)).save(folder / f"{i}.jpg", quality=90)
    return root


def decode_times(path: Path, threads: int) -> dict[str, float]:
    source, _ = open_source(path)
    return {
        "1_thread_s": round(timed(lambda: decode_all(source, None, workers=1)), 3),
        f"{threads}_threads_s": round(timed(lambda: decode_all(source, None, workers=threads)), 3),
        "auto_s": round(timed(lambda: decode_all(source, None)), 3),
    }


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="a folder or zip of train/ and test/ classes")
    parser.add_argument("--large", type=int, default=400, help="large JPEGs to generate")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    threads = min(8, os.cpu_count() or 1)
    given = decode_times(args.source, threads)
    with tempfile.TemporaryDirectory() as tmp:
        large = decode_times(large_tree(Path(tmp), args.large), threads)
        os.environ["FEDWS_CACHE"] = tmp
        first = timed(lambda: load_imagefolder(args.source))
        second = timed(lambda: load_imagefolder(args.source))

    x = torch.randn(10_240, 3, 32, 32)
    batches = x.split(32)
    loop = timed(lambda: [per_sample_crop_flip(b) for b in batches])
    batched = timed(lambda: [random_crop_flip(b) for b in batches])

    figures = {
        "images": len(open_source(args.source)[0].files),
        **{f"decode_{k}": v for k, v in given.items()},
        f"large_{args.large}_images_384px": "",
        **{f"large_decode_{k}": v for k, v in large.items()},
        "first_load_s": round(first, 3),
        "cached_load_s": round(second, 3),
        "augment_per_sample_s_per_10k": round(loop, 3),
        "augment_batched_s_per_10k": round(batched, 3),
        "augment_speedup": round(loop / batched, 1),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    for key, value in figures.items():
        print(f"{key:>32}: {value}")
    write_json(args.json, figures)


if __name__ == "__main__":
    main()
