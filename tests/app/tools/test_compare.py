"""`fedws compare`: runs side by side with only the config keys that differ."""

from __future__ import annotations

import pytest
from helpers import InProcessGrid, set_task_identity, small_config

from app.rundir import read_csv
from app.tools.cli import main
from clients.client_app import app as client_app
from server.server_app import run_federation


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    set_task_identity(monkeypatch)


def test_compare_two_runs_names_what_differs_and_draws_them(tmp_path, capsys):
    runs = {
        "bn": small_config("federation.rounds=2", "model.norm=bn"),
        "ws": small_config("federation.rounds=2", "model.norm=ws_gn", "optim.lr=0.1"),
    }
    summaries = {
        name: run_federation(InProcessGrid(client_app, 4), cfg, tmp_path / name)
        for name, cfg in runs.items()
    }
    out = tmp_path / "cmp"
    assert main(["compare", str(tmp_path / "bn"), str(tmp_path / "ws"), "-o", str(out)]) == 0
    rows = read_csv(out / "compare.csv")
    # only the keys whose values differ: the norm and the learning rate
    assert list(rows[0])[6:] == ["model.norm", "optim.lr"]
    assert [(r["run"], r["model.norm"], r["optim.lr"]) for r in rows] == [
        ("bn", "bn", "0.05"),
        ("ws", "ws_gn", "0.1"),
    ]
    for r in rows:
        summary = summaries[r["run"]]
        assert float(r["final_test_accuracy"]) == pytest.approx(
            summary["final"]["test_accuracy"], abs=1e-4
        )
        assert int(r["best_val_round"]) == summary["best"]["round"]
    assert (out / "accuracy_vs_round.png").stat().st_size > 1000
    assert "| run | status |" in (out / "compare.md").read_text()
    assert "model.norm" in capsys.readouterr().out


def test_compare_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["compare", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_runs_of_the_same_name_are_told_apart_by_their_parents(tmp_path):
    from app.tools.compare import _names

    a, b = tmp_path / "sa" / "runs" / "c1", tmp_path / "sb" / "runs" / "c1"
    assert _names([a, b]) == ["sa/runs/c1", "sb/runs/c1"]
    assert _names([a, tmp_path / "x"]) == ["c1", "x"]
