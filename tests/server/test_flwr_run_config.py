"""`flwr run .`'s run config reaches the ServerApp's main function: a run folder that holds a
run is refused (its files left exactly as they were) unless `resume=true` continues it or
`overwrite=true` replaces it. Driven in-process: the ServerApp's main with a Context and a
Grid that calls the ClientApp directly."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
import yaml
from flwr.app import Context, RecordDict
from helpers import REPO, SMALL, InProcessGrid, set_task_identity

from app.errors import ConfigError
from clients.client_app import app as client_app
from server.server_app import main as server_main

NUM_CLIENTS = 2


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    set_task_identity(monkeypatch)


@pytest.fixture
def config(tmp_path) -> Path:
    raw = {**SMALL, "data": {**SMALL["data"], "partition": {"kind": "iid", "num_clients": 2}}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({**raw, "federation": {"rounds": 2}}))
    return path


def flwr_run(config: Path, out: Path, grid=None, **keys) -> None:
    """The ServerApp's main as `flwr run . --run-config '...'` calls it: the pyproject's
    defaults with ``keys`` on top."""
    run_config = {"config": str(config), "set": "", "out": str(out)}
    run_config.update({"resume": False, "overwrite": False, **keys})
    context = Context(
        run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config
    )
    server_main(grid or InProcessGrid(client_app, NUM_CLIENTS), context)


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder``: its bytes and modification time."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


class Interrupted(Exception):
    pass


class StopInRound(InProcessGrid):
    """Stops the run (as a crash of the server would) when round ``k``'s training starts."""

    def __init__(self, k: int) -> None:
        super().__init__(client_app, NUM_CLIENTS)
        self.k = k

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        for m in messages:
            config = m.content.config_records.get("config")
            if m.metadata.message_type == "train" and int(config["server-round"]) == self.k:
                raise Interrupted
        return super().send_and_receive(messages, timeout)


def test_pyproject_declares_resume_and_overwrite_off():
    keys = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert keys["resume"] is False and keys["overwrite"] is False


def test_a_folder_holding_a_run_is_refused_untouched_unless_overwrite(config, tmp_path):
    out = tmp_path / "run"
    flwr_run(config, out)
    before = snapshot(out)
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"

    with pytest.raises(ConfigError) as refused:
        flwr_run(config, out)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"{out}: holds a run (completed)")
    assert "resume=true continues it, overwrite=true replaces it" in message
    assert snapshot(out) == before  # not a byte nor a timestamp changed

    (out / "notes.txt").write_text("mine")  # not a run file: kept
    flwr_run(config, out, overwrite=True)
    after = snapshot(out)
    assert after["notes.txt"][0] == b"mine"
    assert after["summary.json"] != before["summary.json"]  # a new run
    assert json.loads((out / "summary.json").read_text())["rounds"] == 2


def test_resume_true_continues_the_interrupted_run(config, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Interrupted):
        flwr_run(config, out, grid=StopInRound(2))
    assert json.loads((out / "summary.json").read_text())["status"] == "failed"
    with pytest.raises(ConfigError, match=r"holds a run \(failed\)"):
        flwr_run(config, out)  # a plain re-run would start it over: refused
    with pytest.raises(ConfigError, match="resume continues it: choose one"):
        flwr_run(config, out, resume=True, overwrite=True)

    flwr_run(config, out, resume="true")  # a quoted value from --run-config is taken too
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds"] == 2
    rounds = [int(r.split(",")[0]) for r in (out / "metrics.csv").read_text().splitlines()[1:]]
    assert rounds == [0, 1, 2]  # round 1 kept from before the interruption, not run again


def test_resume_needs_a_checkpoint_and_a_whole_one(config, tmp_path):
    with pytest.raises(ConfigError, match="holds no checkpoint of a fedws run to resume"):
        flwr_run(config, tmp_path / "empty", resume=True)
    out = tmp_path / "run"
    flwr_run(config, out)
    checkpoint = out / "checkpoints" / "last.ckpt"
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[: len(data) // 2])  # a disk that filled up mid-write, once
    before = snapshot(out)
    with pytest.raises(ConfigError) as damaged:
        flwr_run(config, out, resume=True)
    assert "\n" not in str(damaged.value)
    assert str(damaged.value).startswith(
        f"{checkpoint}: not a checkpoint fedws can load safely (damaged?)"
    )
    assert {k: v for k, v in snapshot(out).items() if k != "run.log"} == {
        k: v for k, v in before.items() if k != "run.log"
    }


def test_a_run_config_switch_must_be_true_or_false(config, tmp_path):
    with pytest.raises(ConfigError, match="resume: run-config key must be true or false"):
        flwr_run(config, tmp_path / "run", resume="maybe")
