"""A real `fedws run` killed with SIGKILL, then `fedws run --resume`: the same final weights
and metrics as a run that was never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import FEDWS, REPO

from app.rundir import read_csv

pytestmark = pytest.mark.slow  # starts Ray or Flower processes

ROUNDS = 6
CONFIG = {
    "seed": 3,
    "data": {
        "dataset": "synthetic",
        "synthetic": {"train_size": 2400, "test_size": 200, "image_size": 16},
        "partition": {"kind": "dirichlet", "alpha": 1.0, "num_clients": 3},
    },
    # BN + FedBN with 2 of 3 clients a round: each client's BatchNorm state must survive the
    # kill too (the nodes' state files), also for a client that sat out the round before it
    "model": {"arch": "cnn", "norm": "bn", "width": 8},
    "federation": {"strategy": "fedbn", "rounds": ROUNDS, "fraction_train": 0.67},
}


def command(config: Path, out: Path, *extra: str) -> list[str]:
    return [
        *FEDWS,
        "run",
        str(config),
        "-o",
        str(out),
        "--no-progress",
        *extra,
    ]


def rounds_done(out: Path) -> int:
    try:
        return max((int(r["round"]) for r in read_csv(out / "metrics.csv")), default=0)
    except (ValueError, KeyError):  # a row being written (no file: no rows, 0)
        return 0


def test_sigkill_then_resume_matches_the_uninterrupted_run(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    subprocess.run(command(config, whole), cwd=REPO, check=True, capture_output=True, timeout=600)

    proc = subprocess.Popen(
        command(config, cut),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the kill reaches Ray's processes too
    )
    try:
        deadline = time.monotonic() + 300
        # round 3's row is written after round 2's checkpoint: a kill now has one to resume
        while rounds_done(cut) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    killed_at = torch.load(cut / "checkpoints" / "last.ckpt", weights_only=True)["fedws"]["round"]
    assert 2 <= killed_at < ROUNDS
    assert not (cut / "summary.json").exists()

    resumed = subprocess.run(
        command(config, cut, "--resume"), cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((cut / "summary.json").read_text())["status"] == "completed"

    a = torch.load(whole / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(cut / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["fedws"]["round"] == b["fedws"]["round"] == ROUNDS
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    ra, rb = read_csv(whole / "metrics.csv"), read_csv(cut / "metrics.csv")
    columns = [c for c in ra[0] if c not in ("round_s", "test_loss")]
    assert [[r[c] for c in columns] for r in ra] == [[r[c] for c in columns] for r in rb]
    # The server's test loss of the restarted process has been seen to differ in the last
    # float32 bit (2.4e-7 at 2.19) while weights and accuracies matched exactly: compare it to
    # a few ulps; anything a wrong resume would change moves it by far more.
    losses = [(float(a["test_loss"]), float(b["test_loss"])) for a, b in zip(ra, rb, strict=True)]
    assert all(a == pytest.approx(b, rel=1e-6) for a, b in losses)
    ca, cb = read_csv(whole / "clients.csv"), read_csv(cut / "clients.csv")
    keys = (
        "round",
        "client",
        "num_examples",
        "train_loss",
        "val_accuracy",
        "global_val_accuracy",
        "local_state_round",
    )
    assert ca and [[r[k] for k in keys] for r in ca] == [[r[k] for k in keys] for r in cb]
