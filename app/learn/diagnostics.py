"""Why BN breaks under non-IID data: the quantities behind the accuracy numbers.

All of them are computed by the server from what it already holds: the weights it sent, the
weights each client returned, the aggregate, and the global model with the test split.

- client drift: ``||w_k - w_prev|| / ||w_prev||`` per client, mean and max over clients, for
  the whole model and per layer group (``convs``, ``norms``, ``classifier``, ``other``), plus
  the spread of the clients around their mean (``||w_k - mean_j w_j|| / ||w_prev||``): zero
  when every client returns the same weights;
- update agreement: the mean pairwise cosine similarity of the client updates ``w_k - w_prev``;
- BN-statistics divergence: per BatchNorm layer, the symmetric KL divergence between the
  Gaussians N(mu_k, var_k) of each client's running statistics and N(mu, var) of the
  aggregated ones, mean over channels, then mean over clients;
- train/test statistics gap: per BatchNorm layer, the same divergence between the global
  model's running statistics and the batch statistics the test data produce at that layer.

And the remedy that separates "BN statistics are wrong" from "BN weights are wrong": BN
recalibration, re-estimating the running statistics on server-held training data.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

GROUPS = ("convs", "norms", "classifier", "other")
ALL = "all"
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
VAR_EPS = 1e-5  # BatchNorm's own eps: variances are compared as the layer uses them

Arrays = Mapping[str, np.ndarray]  # a state dict as numpy arrays (possibly read lazily)
Row = dict[str, Any]  # {"quantity": str, "layer": str, "value": float}


def row(quantity: str, layer: str, value: float) -> Row:
    return {"quantity": quantity, "layer": layer, "value": float(value)}


def layer_groups(model: nn.Module) -> dict[str, str]:
    """Each trainable parameter's state_dict key -> its group, by module type: the model's
    last ``Linear`` is the ``classifier``, convolutions (WS and scaled-WS ones with their
    gains) are ``convs``, BN/GN/LN affine parameters are ``norms``, anything else ``other``."""
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    classifier = linears[-1] if linears else None
    groups = {}
    for prefix, module in model.named_modules():
        if prefix == classifier:
            group = "classifier"
        elif isinstance(module, nn.modules.conv._ConvNd):
            group = "convs"
        elif isinstance(module, _NORM_TYPES):
            group = "norms"
        else:
            group = "other"
        for name, _ in module.named_parameters(recurse=False):
            groups[f"{prefix}.{name}" if prefix else name] = group
    return groups


def bn_layers(model: nn.Module) -> list[str]:
    """Names of the BatchNorm layers that keep running statistics."""
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]


@dataclass
class UpdateSums:
    """Squared norms summed key by key, so no flat copy of all clients' models is needed:
    per group ``prev`` = ||w_prev||^2, ``drift[k]`` = ||w_k - w_prev||^2, ``spread[k]`` =
    ||w_k - mean_j w_j||^2; ``gram[k, j]`` = <w_k - w_prev, w_j - w_prev> over all keys."""

    prev: dict[str, float]
    drift: dict[str, np.ndarray]
    spread: dict[str, np.ndarray]
    gram: np.ndarray


def update_sums(sent: Arrays, clients: list[Arrays], groups: dict[str, str]) -> UpdateSums:
    keys = [k for k in groups if k in sent and all(k in c for c in clients)]
    n = len(clients)
    sums = UpdateSums({}, {}, {}, np.zeros((n, n)))
    for key in keys:
        prev = sent[key].astype(np.float64).ravel()
        local = np.stack([c[key].astype(np.float64).ravel() for c in clients])
        update, centred = local - prev, local - local.mean(axis=0)
        for group in (ALL, groups[key]):
            sums.prev[group] = sums.prev.get(group, 0.0) + float(prev @ prev)
            sums.drift[group] = sums.drift.get(group, 0.0) + (update**2).sum(axis=1)
            sums.spread[group] = sums.spread.get(group, 0.0) + (centred**2).sum(axis=1)
        sums.gram += update @ update.T
    return sums


def client_drift(sums: UpdateSums) -> list[Row]:
    """Drift rows (``drift_mean``, ``drift_max``, ``drift_spread``) for ``all`` and each group
    present, over the trainable parameters the clients sent back."""
    rows: list[Row] = []
    for group in (ALL, *GROUPS):
        if sums.prev.get(group, 0.0) == 0.0:
            continue  # absent, or initialised to zero (NF skip gains): no relative drift
        scale = np.sqrt(sums.prev[group])
        drift = np.sqrt(sums.drift[group]) / scale
        rows += [
            row("drift_mean", group, drift.mean()),
            row("drift_max", group, drift.max()),
            row("drift_spread", group, (np.sqrt(sums.spread[group]) / scale).mean()),
        ]
    return rows


def update_cosine(sums: UpdateSums) -> float:
    """Mean pairwise cosine similarity of the client updates ``w_k - w_prev`` over the
    trainable parameters (NaN with fewer than two clients or when an update is zero)."""
    k = len(sums.gram)
    norms = np.sqrt(np.diag(sums.gram))
    if k < 2 or (norms == 0).any():
        return float("nan")
    cosine = sums.gram / np.outer(norms, norms)
    return float((cosine.sum() - np.trace(cosine)) / (k * (k - 1)))


def update_rows(sent: Arrays, clients: list[Arrays], groups: dict[str, str]) -> list[Row]:
    """``client_drift`` rows and the ``update_cosine`` row, from one pass over the keys."""
    sums = update_sums(sent, clients, groups)
    return [*client_drift(sums), row("update_cosine", ALL, update_cosine(sums))]


def gaussian_symmetric_kl(
    mean_a: np.ndarray, var_a: np.ndarray, mean_b: np.ndarray, var_b: np.ndarray
) -> np.ndarray:
    """Per channel KL(a||b) + KL(b||a) of 1-D Gaussians; ``VAR_EPS`` is added to both
    variances, as BatchNorm adds it before dividing."""
    va = np.asarray(var_a, dtype=np.float64) + VAR_EPS
    vb = np.asarray(var_b, dtype=np.float64) + VAR_EPS
    d2 = (np.asarray(mean_a, dtype=np.float64) - np.asarray(mean_b, dtype=np.float64)) ** 2
    return (va + d2) / (2 * vb) + (vb + d2) / (2 * va) - 1.0


def bn_divergence(clients: list[Arrays], aggregate: Arrays, layers: list[str]) -> list[Row]:
    """``bn_divergence`` rows: per BN layer whose statistics travelled, the mean over clients of
    the channel-mean symmetric KL between the client's and the aggregated running stats."""
    rows = []
    for layer in layers:
        mean_key, var_key = f"{layer}.running_mean", f"{layer}.running_var"
        if mean_key not in aggregate or not all(mean_key in c for c in clients):
            continue  # FedBN: the statistics stay on the clients
        values = [
            gaussian_symmetric_kl(
                c[mean_key], c[var_key], aggregate[mean_key], aggregate[var_key]
            ).mean()
            for c in clients
        ]
        rows.append(row("bn_divergence", layer, np.mean(values)))
    return rows


def with_layer_mean(rows: list[Row], quantity: str) -> list[Row]:
    """``rows`` plus one ``all`` row: the mean over the layers of ``quantity``."""
    values = [r["value"] for r in rows if r["quantity"] == quantity]
    return rows + ([row(quantity, ALL, np.mean(values))] if values else [])


def _forward(model: nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """Run every batch through ``model`` on the model's device (outputs unused: hooks and
    BatchNorm's running statistics are what the callers want)."""
    device = next(model.parameters()).device
    for x in batches:
        model(x.to(device))


def _modules(model: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    named = dict(model.named_modules())
    return {n: named[n] for n in names}


@torch.no_grad()
def batch_statistics(
    model: nn.Module, batches: Iterable[torch.Tensor], layers: list[str]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per BN layer, the per-channel mean and (biased) variance of the layer's input over all
    of ``batches``: the statistics the data actually produce there. The model runs in eval
    mode, so every layer before it normalizes with its running statistics, as at test time."""
    sums: dict[str, list[torch.Tensor]] = {}

    def hook(name: str):
        def record(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].detach().double().transpose(0, 1).flatten(1)  # channels x rest
            s = sums.setdefault(name, [0, 0, 0])
            s[0], s[1], s[2] = s[0] + x.sum(1), s[1] + (x * x).sum(1), s[2] + x.shape[1]

        return record

    was_training = model.training
    model.eval()
    handles = [m.register_forward_pre_hook(hook(n)) for n, m in _modules(model, layers).items()]
    try:
        _forward(model, batches)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out = {}
    for name, (total, squares, count) in sums.items():
        mean = total / count
        out[name] = (mean.cpu().numpy(), (squares / count - mean**2).clamp_min(0).cpu().numpy())
    return out


def bn_test_gap(
    model: nn.Module, batches: Iterable[torch.Tensor], quantity: str = "bn_test_gap"
) -> list[Row]:
    """Per BN layer (and ``all``, their mean): the symmetric KL between the running statistics
    and the statistics ``batches`` (test data) produce at that layer."""
    layers = bn_layers(model)
    if not layers:
        return []
    stats = batch_statistics(model, batches, layers)
    modules = _modules(model, layers)
    rows = []
    for name in layers:
        bn = modules[name]
        mean, var = stats[name]
        kl = gaussian_symmetric_kl(
            bn.running_mean.detach().cpu().numpy(), bn.running_var.detach().cpu().numpy(), mean, var
        )
        rows.append(row(quantity, name, kl.mean()))
    return with_layer_mean(rows, quantity)


def bn_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every BatchNorm buffer (running mean/var, batch counter), by state_dict key."""
    out = {}
    for name, module in _modules(model, bn_layers(model)).items():
        for key, buf in module.named_buffers(recurse=False):
            out[f"{name}.{key}"] = buf.detach().clone()
    return out


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """Re-estimate every BatchNorm layer's running statistics on ``batches`` (training-
    distribution data): reset them, then a cumulative average over the batches (momentum None),
    with only the BN layers in train mode. Weights are untouched."""
    modules = list(_modules(model, bn_layers(model)).values())
    if not modules:
        return
    was_training = model.training
    momenta = [m.momentum for m in modules]
    model.eval()
    for m in modules:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        _forward(model, batches)
    finally:
        for m, momentum in zip(modules, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)


@contextmanager
def recalibrated(model: nn.Module, batches: Iterable[torch.Tensor]) -> Iterator[None]:
    """Inside: the model with recalibrated BN statistics; after: its own statistics back."""
    saved = bn_buffers(model)
    recalibrate_bn(model, batches)
    try:
        yield
    finally:
        model.load_state_dict(saved, strict=False)


def sample_indices(n: int, size: int, seed: int) -> np.ndarray:
    """``min(size, n)`` distinct indices into a split of ``n`` samples (sorted), drawn with
    ``seed``: a random sample, never the first ones (image trees list their files by class)."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=min(size, n), replace=False))


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """For ``summary.json``: each quantity's ``all`` row, its final value and mean over rounds
    (finite values only)."""
    series: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        value = float(r["value"])
        if r["layer"] == ALL and np.isfinite(value):
            series.setdefault(r["quantity"], []).append((int(r["round"]), value))
    out = {}
    for quantity, points in series.items():
        points.sort()
        trained = [v for rnd, v in points if rnd > 0] or [v for _, v in points]
        out[quantity] = {
            "final": round(points[-1][1], 6),
            "mean": round(float(np.mean(trained)), 6),
        }
    return out
