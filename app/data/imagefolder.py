"""Your own images: a folder, or a ``.zip``, of ``train/<class>/*`` and ``test/<class>/*``.

Class folder names, sorted, are the labels (the training split's classes; the test split may
lack a class but not add one). JPEG and PNG files are decoded once with Pillow (large images in
threads: its decoders release the GIL) into uint8 arrays and cached in ``$FEDWS_CACHE`` (default
``~/.cache/fedws``) under a key made of the source's path, size and modification time (for a
folder: its files' count, total size and latest modification time), the image names and
``data.image_size``: the second load reads one ``.npz`` file, and a changed source is decoded
again. Grayscale images stay one channel unless the tree mixes them with colour images.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import threading
import time
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from tqdm.auto import tqdm

from app.errors import DataError

SPLITS = ("train", "test")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
CACHE_VERSION = 2  # 2: domain trees (domain_train, domain_test, domains)


def cache_dir() -> Path:
    return Path(os.environ.get("FEDWS_CACHE") or "~/.cache/fedws").expanduser()


@dataclass(frozen=True)
class ImageFile:
    split: str
    label: str
    name: str  # path inside the source (a zip member name or a path relative to the folder)
    domain: str = ""  # a domain tree's domain folder (train/<domain>/<class>/...)


@dataclass(frozen=True)
class Source:
    """An image tree: where it is, its files, how to read one, and its cache fingerprint."""

    path: Path
    files: tuple[ImageFile, ...]
    read: Callable[[str], bytes]
    fingerprint: str


def _tree(names: list[str]) -> tuple[str, list[ImageFile]]:
    """The prefix holding ``train/`` (none, or one top-level folder) and the images below it:
    ``split/class/image``, or in a domain tree (no image directly in a class folder)
    ``split/domain/class/image``."""
    parts = [PurePosixPath(n).parts for n in names]
    if any(p[0] in SPLITS and len(p) > 1 for p in parts):
        prefix = ()
    else:
        tops = {p[0] for p in parts if len(p) > 1}
        if len(tops) == 1 and any(len(p) > 2 and p[1] in SPLITS for p in parts):
            prefix = (tops.pop(),)
        else:
            prefix = None
    entries: list[ImageFile] = []
    if prefix is not None:
        k = len(prefix)
        images = [
            (name, p)
            for name, p in zip(names, parts, strict=True)
            if p[:k] == prefix
            and len(p) > k + 2
            and p[k] in SPLITS
            and PurePosixPath(p[-1]).suffix.lower() in IMAGE_SUFFIXES
        ]
        depths = {len(p) for _, p in images if len(p) in (k + 3, k + 4)}
        if len(depths) > 1:
            flat = next(n for n, p in images if len(p) == k + 3)
            deep = next(n for n, p in images if len(p) == k + 4)
            raise DataError(
                f"imagefolder: images at two depths, e.g. {flat} (split/class/image) and {deep} "
                "(split/domain/class/image): a tree holds class folders or domain folders of "
                "class folders, not both"
            )
        depth = depths.pop() if depths else k + 3
        for name, p in images:
            if len(p) == depth == k + 3:
                entries.append(ImageFile(p[k], p[k + 1], name))
            elif len(p) == depth:
                entries.append(ImageFile(p[k], p[k + 2], name, domain=p[k + 1]))
    return "/".join(prefix or ()), entries


def _class_dirs(names: list[str], prefix: str, domains: bool) -> dict[str, set[str]]:
    """Every class folder of each split (also empty ones), from the entries' paths; in a
    domain tree a class folder is named ``<domain>/<class>``."""
    start = len(PurePosixPath(prefix).parts) if prefix else 0
    level = 2 if domains else 1
    out: dict[str, set[str]] = {s: set() for s in SPLITS}
    for name in names:
        p = PurePosixPath(name).parts[start:]
        if len(p) > level and p[0] in SPLITS and (len(p) > level + 1 or name.endswith("/")):
            out[p[0]].add("/".join(p[1 : level + 1]))
    return out


def open_source(root: Path) -> tuple[Source, dict[str, set[str]]]:
    """The image tree at ``root`` (a folder or a zip) and each split's class folders."""
    if root.is_file() and zipfile.is_zipfile(root):
        with zipfile.ZipFile(root) as zf:
            names = zf.namelist()
        handles = threading.local()  # one open ZipFile per decoding thread

        def read(name: str) -> bytes:
            if not hasattr(handles, "zip"):
                handles.zip = zipfile.ZipFile(root)
            return handles.zip.read(name)

        stat = root.stat()
        fingerprint = f"zip:{root.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    elif root.is_dir():
        names, total, latest = [], 0, 0
        for dirpath, dirnames, filenames in os.walk(root):
            rel = Path(dirpath).relative_to(root).as_posix()
            base = "" if rel == "." else rel + "/"
            names += [base + d + "/" for d in dirnames]
            for f in filenames:
                st = os.stat(os.path.join(dirpath, f))
                names.append(base + f)
                total, latest = total + st.st_size, max(latest, st.st_mtime_ns)
        fingerprint = f"dir:{root.resolve()}:{len(names)}:{total}:{latest}"

        def read(name: str) -> bytes:
            return (root / name).read_bytes()
    else:
        raise DataError(f"imagefolder: {root} is neither a folder nor a zip file")
    # macOS zips carry __MACOSX/ resource forks; hidden files and folders are never data
    names = sorted(n for n in names if not any(_hidden(p) for p in PurePosixPath(n).parts))
    prefix, entries = _tree(names)
    files = tuple(entries)
    # the file names count too: a file moved to another class keeps size and time
    listing = hashlib.sha256("\n".join(f.name for f in files).encode()).hexdigest()[:16]
    domains = any(f.domain for f in files)
    return Source(root, files, read, f"{fingerprint}:{listing}"), _class_dirs(
        names, prefix, domains
    )


def _hidden(part: str) -> bool:
    return part.startswith(".") or part == "__MACOSX"


def _decode(data: bytes, name: str, size: int | None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert("L" if img.mode in ("1", "L", "I", "I;16", "F") else "RGB")
            if size is not None and img.size != (size, size):
                img = img.resize((size, size), Image.Resampling.BILINEAR)
            array = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"imagefolder: cannot decode {name}: {err}") from None
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


PROBE = 32  # images decoded on one thread to judge whether threads pay off
PROGRESS_FROM = 1000  # images: a progress bar (on a terminal) for decoding at least this many
THREADED_MS = 0.5  # per image: above it, decoding (GIL released) outweighs Python overhead


def decode_all(source: Source, image_size: int | None, workers: int | None = None) -> list:
    """Every file of ``source`` as a (C, H, W) uint8 array, in ``source.files`` order.

    ``workers=None`` decides from the first images: small ones (CIFAR's 32x32 JPEGs take
    ~0.25 ms) decode faster on one thread, where the per-image Python work holds the GIL;
    large ones spend their time in Pillow's decoders, which release it, so a thread pool
    (``min(8, cpus)`` threads) decodes the rest."""

    def one(f: ImageFile) -> np.ndarray:
        return _decode(source.read(f.name), f"{source.path}:{f.name}", image_size)

    files = list(source.files)
    done: list[np.ndarray] = []
    if workers is None:
        done = [one(f) for f in files[:1]]  # not timed: the first one loads Pillow's plugins
        start = time.perf_counter()
        done += [one(f) for f in files[1 : PROBE + 1]]
        per_image_ms = 1000 * (time.perf_counter() - start) / max(1, len(done) - 1)
        workers = min(8, os.cpu_count() or 1) if per_image_ms > THREADED_MS else 1
    rest = files[len(done) :]
    bar = tqdm(
        total=len(files),
        initial=len(done),
        desc="decoding images",
        unit="img",
        file=sys.stderr,
        leave=False,
        disable=None if len(files) >= PROGRESS_FROM else True,  # None: only on a terminal
    )
    try:
        if workers <= 1:
            return done + [_ticked(bar, one(f)) for f in rest]
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return done + [_ticked(bar, a) for a in pool.map(one, rest, chunksize=16)]
    finally:
        bar.close()


def _ticked(bar, array: np.ndarray) -> np.ndarray:
    bar.update(1)
    return array


def _size(array: np.ndarray) -> str:
    return f"{array.shape[2]}x{array.shape[1]}"


def _stack(arrays: list[np.ndarray], files: list[ImageFile]) -> np.ndarray:
    """One (N, C, H, W) array; different sizes are an error naming two of the files."""
    for f, a in zip(files, arrays, strict=True):
        if a.shape[1:] != arrays[0].shape[1:]:
            raise DataError(
                f"imagefolder: images of different sizes ({files[0].name} is "
                f"{_size(arrays[0])}, {f.name} is {_size(a)}); set data.image_size to "
                "resize them all"
            )
    if any(a.shape[0] == 3 for a in arrays):  # grayscale mixed with colour: all colour
        arrays = [np.repeat(a, 3, axis=0) if a.shape[0] == 1 else a for a in arrays]
    return np.stack(arrays)


def _cache_path(source: Source, image_size: int | None) -> Path:
    key = f"{CACHE_VERSION}|{source.fingerprint}|{image_size}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    stem = source.path.name.removesuffix(".zip") or "images"
    return cache_dir() / f"imagefolder-{stem}-{digest}.npz"


def _check_classes(source: Source, class_dirs: dict[str, set[str]]) -> tuple[str, ...]:
    where = source.path
    counts = {s: {} for s in SPLITS}
    folders = {s: {} for s in SPLITS}  # class folders, "<domain>/<class>" in a domain tree
    for f in source.files:
        counts[f.split][f.label] = counts[f.split].get(f.label, 0) + 1
        folder = f"{f.domain}/{f.label}" if f.domain else f.label
        folders[f.split][folder] = True
    for split in SPLITS:
        if not class_dirs[split] and not counts[split]:
            raise DataError(
                f"imagefolder: {where} has no {split}/ split: expected {split}/<class>/<image> "
                f"(JPEG or PNG), or {split}/<domain>/<class>/<image>, directly or inside one "
                "top-level folder"
            )
        empty = sorted(class_dirs[split] - set(folders[split]))
        if empty:
            raise DataError(
                f"imagefolder: {where}: class folder {split}/{empty[0]} holds no JPEG or PNG image"
            )
    train_domains = {f.domain for f in source.files if f.split == "train"}
    test_domains = {f.domain for f in source.files if f.split == "test"}
    if test_domains - train_domains:
        raise DataError(
            f"imagefolder: {where}: test domain {sorted(test_domains - train_domains)[0]!r} has "
            "no training images"
        )
    classes = tuple(sorted(counts["train"]))
    extra = sorted(set(counts["test"]) - set(classes))
    if extra:
        raise DataError(
            f"imagefolder: {where}: test class {extra[0]!r} has no training images "
            f"(training classes: {', '.join(classes)})"
        )
    return classes


def load_imagefolder(
    root: Path, image_size: int | None = None, progress: Callable[[str], None] | None = None
) -> tuple[dict[str, torch.Tensor], tuple[str, ...], tuple[str, ...], Path]:
    """``{"x_train", "y_train", "x_test", "y_test"}`` (and, for a domain tree, each image's
    domain index as ``domain_train``, ``domain_test``), the class names, the domain names (none
    for a class tree) and the cache file."""
    source, class_dirs = open_source(root)
    classes = _check_classes(source, class_dirs)
    domains = tuple(sorted({f.domain for f in source.files if f.domain}))
    cache = _cache_path(source, image_size)
    if cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as npz:
                names = [k for k in npz.files if k not in ("classes", "domains")]
                arrays = {k: torch.from_numpy(npz[k].copy()) for k in names}
                cached_classes = tuple(str(c) for c in npz["classes"])
                cached_domains = tuple(str(d) for d in npz["domains"])
            if cached_classes == classes and cached_domains == domains:
                return arrays, classes, domains, cache
        except (OSError, ValueError, KeyError):
            pass  # a damaged (or older) cache file is rebuilt
    if progress is not None:
        progress(f"decoding {len(source.files)} images from {root} (cached for later runs)")
    decoded = decode_all(source, image_size)
    label = {c: i for i, c in enumerate(classes)}
    domain = {d: i for i, d in enumerate(domains)}
    arrays = {}
    for split in SPLITS:
        picked = [(f, a) for f, a in zip(source.files, decoded, strict=True) if f.split == split]
        files = [f for f, _ in picked]
        arrays[f"x_{split}"] = _stack([a for _, a in picked], files)
        arrays[f"y_{split}"] = np.array([label[f.label] for f in files], dtype=np.int64)
        if domains:
            arrays[f"domain_{split}"] = np.array([domain[f.domain] for f in files], np.int64)
    shapes = {arrays["x_train"].shape[1:], arrays["x_test"].shape[1:]}
    if len(shapes) > 1:
        raise DataError(
            f"imagefolder: {root}: train and test images differ in shape (C, H, W) "
            f"{sorted(shapes)}; set data.image_size to resize them all"
        )
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp.npz")
    np.savez(tmp, classes=np.array(classes), domains=np.array(domains, dtype=str), **arrays)
    os.replace(tmp, cache)
    return {k: torch.from_numpy(v) for k, v in arrays.items()}, classes, domains, cache
