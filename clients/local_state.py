"""A node's own storage of its clients' local state: the tensors that never leave the node
(FedBN's BatchNorm layers, BN batch counters), kept across rounds and processes so that a client
that sat out rounds, a resumed run and a restarted node start from the latest state they had.

The files live on the node, never at a path the server chose: under the node config's
``state-dir`` (``fedws deploy supernodes --state-dir``) or, without one (Flower's simulation
runtime gives nodes no config of fedws's), under ``$FEDWS_CACHE/client-state`` (default
``~/.cache/fedws/client-state``), one folder per run (the run key the server sends, kept in the
server's checkpoint so that ``--resume`` finds the same folder):
``<root>/<run key>/client-<partition>.round-<r>.pt``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from app.data.imagefolder import cache_dir

STATE_DIR = "state-dir"  # node config key
_FILE = re.compile(r"client-(\d+)\.round-(\d+)\.pt")


def default_root() -> Path:
    return cache_dir() / "client-state"


def state_root(node_config: Mapping[str, Any]) -> Path:
    """Where this node keeps client state: its ``state-dir``, else the default root."""
    folder = node_config.get(STATE_DIR)
    return Path(str(folder)).expanduser() if folder else default_root()


class LocalStateStore:
    """One client's saved local states on this node, a file per round it trained in; the
    newest two are kept (the older one serves a run resumed from before the newest round)."""

    def __init__(self, root: Path, run_key: str, client: int) -> None:
        self.folder = root / run_key
        self.run_key, self.client = run_key, client

    def _path(self, server_round: int) -> Path:
        return self.folder / f"client-{self.client}.round-{server_round}.pt"

    def rounds(self) -> list[int]:
        """The rounds with a saved state, ascending."""
        if not self.folder.is_dir():
            return []
        found = []
        for entry in self.folder.iterdir():
            match = _FILE.fullmatch(entry.name)
            if match and int(match[1]) == self.client:
                found.append(int(match[2]))
        return sorted(found)

    def load(self, before_round: int) -> tuple[int, dict[str, torch.Tensor]] | None:
        """(round, state) of the newest state saved in a round < ``before_round``, or None."""
        usable = [r for r in self.rounds() if r < before_round]
        if not usable:
            return None
        path = self._path(usable[-1])
        return usable[-1], torch.load(path, weights_only=True, map_location="cpu")

    def save(self, server_round: int, state: dict[str, torch.Tensor]) -> None:
        """Write this round's state atomically, then drop all but the newest two."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self._path(server_round)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)
        for old in self.rounds()[:-2]:
            self._path(old).unlink(missing_ok=True)
