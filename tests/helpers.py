"""Test helpers: small synthetic configs, an in-process Grid, and process clean-up for the
tests that start real Flower processes (through benchmarks/measure.py's walk of /proc)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import yaml

from app.config import Config, apply_overrides, build

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO / "benchmarks"))  # measure.py: the walk of /proc, one copy for both

# re-exported for the tests: one copy for the tests and the benchmarks
from measure import free_port as free_port  # noqa: E402
from measure import pids_with as pids_with  # noqa: E402
from measure import start_logged as start_logged  # noqa: E402
from measure import stop_process_group as stop_process_group  # noqa: E402
from measure import wait_for_port as wait_for_port  # noqa: E402

FEDWS = [sys.executable, "-m", "app.tools.cli"]  # the fedws command of this environment

SMALL = {
    "data": {
        "dataset": "synthetic",
        "synthetic": {"train_size": 600, "test_size": 200, "image_size": 16},
        "partition": {"kind": "iid", "num_clients": 4},
    },
    "model": {"arch": "cnn", "norm": "ws_gn", "width": 8},
    "train": {"batch_size": 32},
}


def small_config(*overrides: str) -> Config:
    """The SMALL synthetic config with ``a.b=c`` overrides applied."""
    return build(apply_overrides(SMALL, list(overrides)))


TINY = {  # the tests that start Flower processes: two nodes, little data, a narrow CNN
    "data": {
        "dataset": "synthetic",
        "synthetic": {"train_size": 400, "test_size": 100, "image_size": 16},
        "partition": {"kind": "iid", "num_clients": 2},
    },
    "model": {"arch": "cnn", "norm": "ws_gn", "width": 8},
}


def tiny_config_file(path: Path, *overrides: str) -> Path:
    """The TINY config with ``a.b=c`` overrides applied, written to ``path`` as YAML."""
    path.write_text(yaml.safe_dump(apply_overrides(TINY, list(overrides))))
    return path


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the one TensorBoard event file in ``folder``, read back with
    TensorBoard's own reader: tag -> [(step, value), ...]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = folder.glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


class InProcessGrid:
    """A Flower Grid that delivers each message to a ClientApp in this process: a federation
    without Ray, for fast tests of the ServerApp. Node i holds partition i; a ClientApp that
    raises gives an error reply, as in Flower's runtimes."""

    def __init__(self, client_app, num_nodes: int) -> None:
        from flwr.app import Context, RecordDict

        self.client_app = client_app
        self.contexts = {
            100 + i: Context(
                run_id=1,
                node_id=100 + i,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for i in range(num_nodes)
        }

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None):
        from flwr.app import Error, Message

        replies = []
        for msg in messages:
            try:
                replies.append(self.client_app(msg, self.contexts[msg.metadata.dst_node_id]))
            except Exception as err:
                reason = f"{type(err).__name__}: {err}"
                replies.append(Message(Error(code=0, reason=reason), reply_to=msg))
        return replies


def set_task_identity(monkeypatch) -> None:
    """Messages need the identity a Flower runtime sets for its process."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


def bare_env(**extra: str) -> dict[str, str]:
    """This process's environment with every ``PATH`` folder that holds Flower's executables
    removed (an active venv's ``bin/`` among them): a child process finds Flower only when
    fedws puts it on its ``PATH``, as for a user who never activated the venv."""
    env = dict(os.environ)
    folders = env.get("PATH", os.defpath).split(os.pathsep)
    env["PATH"] = os.pathsep.join(
        f for f in folders if f and not shutil.which("flower-superlink", path=f)
    )
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env.update(extra)
    return env
