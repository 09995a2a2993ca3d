"""Which model state travels to the server, and which stays on the client.

One policy, decided by module type and tensor dtype, never by a substring of a name
(pfl-research's ``convert_batchnorm_modules`` habit):

- Integer buffers (BatchNorm's ``num_batches_tracked``) are counters, not weights: averaging
  them would turn them into floats. They stay on the client under every strategy.
- ``fedbn`` (Li et al. 2021, arXiv 2102.07623): every BatchNorm layer, its affine parameters
  and its running statistics, stays on the client.
- Every other strategy sends all floating-point parameters and buffers, so FedAvg averages BN
  running mean/var together with the weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

LOCAL_BN_STRATEGIES = frozenset({"fedbn"})


@dataclass(frozen=True)
class StatePolicy:
    """``travel``: state_dict keys the server receives and sends; ``local``: the rest;
    ``personal``: the local keys that shape predictions (FedBN's BN layers), not counters."""

    travel: tuple[str, ...]
    local: tuple[str, ...]
    personal: tuple[str, ...] = ()


def state_policy(model: nn.Module, strategy: str) -> StatePolicy:
    keep_bn_local = strategy in LOCAL_BN_STRATEGIES
    state_keys = set(model.state_dict())
    travel, local = [], []
    for prefix, module in model.named_modules():
        is_bn = isinstance(module, nn.modules.batchnorm._BatchNorm)
        tensors = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        for name, tensor in tensors:
            key = f"{prefix}.{name}" if prefix else name
            if key not in state_keys:  # a non-persistent buffer
                continue
            counter = not torch.is_floating_point(tensor)
            (local if counter or (is_bn and keep_bn_local) else travel).append(key)
    order = {key: i for i, key in enumerate(model.state_dict())}
    floating = {k for k, v in model.state_dict().items() if torch.is_floating_point(v)}
    local = sorted(local, key=order.get)
    return StatePolicy(
        tuple(sorted(travel, key=order.get)),
        tuple(local),
        tuple(k for k in local if k in floating),
    )


def select(state: dict[str, torch.Tensor], keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The entries of ``state`` named in ``keys``, in that order."""
    return {k: state[k] for k in keys}


def load_partial(model: nn.Module, state: dict[str, torch.Tensor], keys: tuple[str, ...]) -> None:
    """Load exactly ``keys`` from ``state`` into ``model``; anything else missing is an error."""
    missing = [k for k in keys if k not in state]
    extra = [k for k in state if k not in keys]
    if missing or extra:
        raise ValueError(
            f"state does not match the policy: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    model.load_state_dict(state, strict=False)
