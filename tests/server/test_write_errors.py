"""A disk that fills up, a path through a file, a damaged checkpoint: one line naming the file
and the reason (exit code 2), and the files a reader trusts (summary.json, config.yaml,
checkpoints) stay whole: the old complete file or none, never a 0-byte or half one."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch
import yaml
from flwr.app import Context, RecordDict
from helpers import SMALL, InProcessGrid, set_task_identity, small_config

from app import rundir
from app.rundir import RunDir, WriteError
from app.tools import run as run_tool
from app.tools.cli import main
from clients.client_app import app as client_app
from server.server_app import run_federation


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    set_task_identity(monkeypatch)


class DiskFull:
    """``os.fsync`` that fails with ENOSPC once ``full`` is set, as a full disk reports a write
    it could not place."""

    def __init__(self, full: bool = True) -> None:
        self.full = full
        self.real = os.fsync

    def __call__(self, fd: int) -> None:
        if self.full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.real(fd)


def leftovers(folder) -> list[str]:
    return [p.name for p in folder.rglob("*.tmp")]


def test_summary_json_is_the_old_whole_file_or_absent_after_a_failed_write(tmp_path, monkeypatch):
    run = RunDir(tmp_path)
    rundir.write_summary(run, {"status": "completed", "rounds": 3})
    old = run.summary.read_bytes()
    monkeypatch.setattr(os, "fsync", DiskFull())
    with pytest.raises(OSError, match="No space left"):
        rundir.write_summary(run, {"status": "failed", "rounds": 4, "pad": "x" * 100_000})
    assert run.summary.read_bytes() == old  # the old complete file
    fresh = RunDir(tmp_path / "fresh")
    fresh.path.mkdir()
    with pytest.raises(OSError):
        rundir.write_summary(fresh, {"status": "completed"})
    assert not fresh.summary.exists()  # absent, not empty
    assert leftovers(tmp_path) == []
    # a study.yaml likewise
    with pytest.raises(OSError):
        rundir.write_study(rundir.StudyDir(tmp_path), {"cells": []})
    assert not (tmp_path / "study.yaml").exists() and leftovers(tmp_path) == []


def test_a_run_folder_under_a_file_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cfg = small_config("federation.rounds=1", "data.partition.num_clients=2")
    with pytest.raises(WriteError) as info:
        run_federation(InProcessGrid(client_app, 2), cfg, blocker / "run")
    assert str(info.value) == f"cannot write {blocker / 'run'}: Not a directory"
    assert info.value.exit_code == 2


def test_a_full_disk_mid_run_is_one_line_and_leaves_the_last_checkpoint_whole(
    tmp_path, monkeypatch
):
    cfg = small_config("federation.rounds=3", "data.partition.num_clients=2")
    disk = DiskFull(full=False)
    monkeypatch.setattr(os, "fsync", disk)

    def after_round(row):
        if row["round"] == 1:  # the disk fills up after round 1 was written
            disk.full = True

    grid = InProcessGrid(client_app, 2)
    with pytest.raises(WriteError) as info:
        run_federation(grid, cfg, tmp_path, progress=after_round)
    message = str(info.value)
    assert "\n" not in message and message.endswith("failed: No space left on device")
    assert message.startswith(f"writing {tmp_path}")
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["fedws"]["round"] == 1  # round 1's, whole: round 2's never replaced it
    assert not (tmp_path / "summary.json").exists()  # never half written
    assert rundir.read_config(tmp_path / "config.yaml") == cfg
    assert leftovers(tmp_path) == []


@pytest.fixture
def in_process_runtime(monkeypatch):
    """``fedws run`` with the ServerApp driven in this process (no Ray)."""

    def simulate(server_app, num_clients, **_):
        context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
        server_app(InProcessGrid(client_app, num_clients), context)

    monkeypatch.setattr(run_tool, "run_simulation", simulate)


def test_fedws_run_on_a_full_disk_says_one_line_and_exits_2(
    tmp_path, monkeypatch, capsys, in_process_runtime
):
    config = tmp_path / "small.yaml"
    config.write_text(yaml.safe_dump(SMALL))
    out = tmp_path / "run"
    monkeypatch.setattr(os, "fsync", DiskFull())
    code = main(
        ["run", str(config), "-o", str(out), "--no-progress", "--set", "federation.rounds=1"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith(f"fedws: error: writing {out}")
    assert err[-1].endswith("failed: No space left on device")
    assert "Traceback" not in "\n".join(err)
    assert not (out / "summary.json").exists() and leftovers(out) == []


def test_resume_from_a_truncated_checkpoint_is_one_line(tmp_path, capsys, in_process_runtime):
    config = tmp_path / "small.yaml"
    config.write_text(yaml.safe_dump(SMALL))
    out = tmp_path / "run"
    args = ["run", str(config), "-o", str(out), "--no-progress", "--set", "federation.rounds=1"]
    assert main(args) == 0
    checkpoint = out / "checkpoints" / "last.ckpt"
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[: len(data) // 2])
    summary = (out / "summary.json").read_bytes()
    capsys.readouterr()
    assert main([*args, "--resume"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(
        f"fedws: config error: {checkpoint}: not a checkpoint fedws can load safely (damaged?)"
    )
    assert (out / "summary.json").read_bytes() == summary  # refused before writing anything
    json.loads(summary)
