from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import FEDWS, REPO, SMALL, InProcessGrid, set_task_identity

from app.config import ConfigError, load_config
from app.rundir import read_csv
from app.tools.run import preflight
from app.tools.study import cell_id, dry_run_text, load_study, run_study
from app.tools.study_report import accuracy_table, load_results, write_report
from clients.client_app import app as client_app
from server.server_app import run_federation

TINY = {
    **SMALL,
    "data": {**SMALL["data"], "synthetic": {"train_size": 300, "test_size": 100, "image_size": 12}},
    "federation": {"rounds": 1},
}


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    set_task_identity(monkeypatch)


def write_study(tmp_path: Path, study: dict) -> Path:
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(TINY))
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"base": "base.yaml", **study}, sort_keys=False))
    return path


GRID = {
    "grid": {
        "model.norm": ["bn", "ws_gn"],
        "data.partition": [{"kind": "iid"}, {"kind": "dirichlet", "alpha": 0.5}],
    },
}


def in_process(fail: tuple[str, ...] = (), launched: list[str] | None = None):
    """A cell launcher without Ray: the ServerApp and ClientApp in this process."""

    def launch(config: Path, out: Path, ray_cpus):
        if launched is not None:
            launched.append(out.name)
        if out.name in fail:
            raise RuntimeError("injected failure")
        cfg = load_config(config)
        preflight(cfg, out, overwrite=True)  # as both real launchers do
        run_federation(InProcessGrid(client_app, cfg.data.partition.num_clients), cfg, out)
        return None

    return launch


def test_grid_and_extra_expand_into_cells(tmp_path):
    path = write_study(
        tmp_path,
        {
            **GRID,
            "overrides": {"federation.rounds": 2},
            "extra": [{"model.norm": "bn", "federation.strategy": "fedbn"}],
        },
    )
    study = load_study(path)
    ids = [c.id for c in study.cells]
    assert ids == [
        "norm-bn_partition-iid",
        "norm-bn_partition-dirichlet-0.5",
        "norm-ws_gn_partition-iid",
        "norm-ws_gn_partition-dirichlet-0.5",
        "norm-bn_strategy-fedbn_partition-iid",
        "norm-bn_strategy-fedbn_partition-dirichlet-0.5",
    ]
    cell = study.cells[-1]
    assert cell.config.federation.strategy == "fedbn" and cell.config.model.norm == "bn"
    assert cell.config.data.partition.alpha == 0.5 and cell.config.federation.rounds == 2
    assert study.cells[0].config.data.dataset == "synthetic"  # from the base, relative path
    assert study.axes == ("model.norm", "data.partition", "federation.strategy")


def test_cli_overrides_apply_to_every_cell(tmp_path):
    study = load_study(write_study(tmp_path, GRID), ["federation.rounds=3"])
    assert {c.config.federation.rounds for c in study.cells} == {3}


def test_a_bad_cell_is_a_config_error_naming_it(tmp_path):
    path = write_study(tmp_path, {"grid": {"model.norm": ["bn", "batchnorm"]}})
    with pytest.raises(ConfigError, match=r"cell norm-batchnorm: model\.norm: got 'batchnorm'"):
        load_study(path)
    with pytest.raises(ConfigError, match="unknown key"):
        load_study(write_study(tmp_path, {"grids": {}}))


def test_small_and_large_floats_in_a_grid_stay_numbers(tmp_path):
    study = load_study(write_study(tmp_path, {"grid": {"optim.lr": [1.0e-5, 0.1]}}))
    assert [c.config.optim.lr for c in study.cells] == [1.0e-5, 0.1]


def test_cell_ids_are_readable_folder_names():
    assert cell_id({"model.norm": "nf_se", "seed": 2}) == "norm-nf_se_seed-2"
    assert cell_id({"data.partition": {"kind": "pathological", "classes_per_client": 2}}) == (
        "partition-pathological-2"
    )


@pytest.mark.slow  # a study of four or more whole federations
def test_resume_skips_completed_cells_and_reruns_the_rest(tmp_path):
    study = load_study(write_study(tmp_path, GRID))
    out, launched = tmp_path / "out", []
    statuses = run_study(study, out, launch=in_process(launched=launched), echo=lambda m: None)
    assert set(statuses.values()) == {"completed"} and len(launched) == 4

    launched.clear()
    run_study(study, out, launch=in_process(launched=launched), echo=lambda m: None)
    assert launched == []  # nothing left to do

    (out / "runs" / "norm-ws_gn_partition-iid" / "summary.json").unlink()  # "interrupted"
    run_study(study, out, launch=in_process(launched=launched), echo=lambda m: None)
    assert launched == ["norm-ws_gn_partition-iid"]


@pytest.mark.slow  # a study of four or more whole federations
def test_a_cell_finished_with_other_settings_is_stale_and_runs_again(tmp_path):
    path = write_study(tmp_path, GRID)
    out, launched, said = tmp_path / "out", [], []
    run_study(load_study(path), out, launch=in_process(), echo=lambda m: None)
    logging_only = load_study(path, ["logging.experiment=elsewhere"])
    run_study(logging_only, out, launch=in_process(launched=launched), echo=said.append)
    assert launched == [] and "4 already finished, 0 to run (0 stale" in said[0]

    two = load_study(path, ["federation.rounds=2"])
    assert "stale" in dry_run_text(two, out) and "4 stale" in dry_run_text(two, out)
    said.clear()
    run_study(two, out, launch=in_process(launched=launched), echo=said.append)
    assert len(launched) == 4 and "0 already finished, 4 to run (4 stale" in said[0]
    for cell in two.cells:
        rows = read_csv(out / "runs" / cell.id / "metrics.csv")
        assert [int(r["round"]) for r in rows] == [0, 1, 2]  # trained anew to round 2
    assert "4 finished, 0 stale" in dry_run_text(two, out)


@pytest.mark.slow  # a study of four or more whole federations
def test_a_failing_cell_is_recorded_and_the_study_goes_on(tmp_path):
    study = load_study(write_study(tmp_path, GRID))
    out = tmp_path / "out"
    bad = "norm-bn_partition-dirichlet-0.5"
    statuses = run_study(study, out, launch=in_process(fail=(bad,)), echo=lambda m: None)
    assert statuses[bad] == "failed"
    assert sum(s == "completed" for s in statuses.values()) == 3
    write_report(out)
    rows = {r["cell"]: r for r in read_csv(out / "results.csv")}
    assert rows[bad]["status"] == "failed" and "injected failure" in rows[bad]["error"]
    assert rows["norm-bn_partition-iid"]["status"] == "completed"
    assert f"`{bad}`: RuntimeError: injected failure" in (out / "report.md").read_text()


def test_after_a_failed_client_the_next_cells_start_in_a_fresh_runtime(tmp_path, monkeypatch):
    """The shared runtime (here a Grid in this process per runtime start) serves cells until
    one has a failed client: its process may be dead, so the next cells get a fresh runtime.
    Every cell still runs once, as ``fedws run`` would (its run.log, its summary)."""
    from app.tools import study as study_module

    starts: list[list[str]] = []

    def fake_run_simulation(server_app, num_clients, **_):
        starts.append([])
        server_app._main(InProcessGrid(client_app, num_clients), None)

    def started(cell):
        starts[-1].append(cell.id)

    monkeypatch.setattr(study_module, "run_simulation", fake_run_simulation)
    grid = {"model.norm": ["bn", "ws_gn"], "fault_injection.fail_clients": [[], [0]]}
    study = load_study(write_study(tmp_path, {"grid": grid}))
    out, said = tmp_path / "out", []
    folder = study_module.StudyDir(out)
    study_module.run_shared(study.cells, folder, started, lambda c, s: None, echo=said.append)
    ids = [c.id for c in study.cells]
    # cells 2 and 4 have a failing client: a fresh start after 2; none needed after the last
    assert starts == [ids[:2], ids[2:4]]
    assert len(said) == 1 and ids[1] in said[0] and "fresh simulation runtime" in said[0]
    for cell in ids:
        run = folder.run(cell)
        assert json.loads(run.summary.read_text())["status"] == "completed"
        assert "Starting RecordingFedAvg strategy" in run.run_log.read_text()


def test_a_runtime_that_runs_no_cell_is_an_error_not_a_loop(tmp_path, monkeypatch):
    from app.errors import FedwsError
    from app.tools import study as study_module

    monkeypatch.setattr(study_module, "run_simulation", lambda server_app, **_: None)
    study = load_study(write_study(tmp_path, GRID))
    folder = study_module.StudyDir(tmp_path / "out")
    with pytest.raises(FedwsError, match="ended before running cell"):
        study_module.run_shared(study.cells, folder, lambda c: None, lambda c, s: None)


def test_a_diverged_cell_is_a_result_shown_as_such_and_not_run_again(tmp_path):
    study = load_study(
        write_study(
            tmp_path,
            {
                "grid": {"federation.server_learning_rate": [1.0, 1.0e30]},
                "overrides": {"federation.strategy": "fedavgm", "federation.rounds": 2},
            },
        )
    )
    out, launched = tmp_path / "out", []
    statuses = run_study(study, out, launch=in_process(launched=launched), echo=lambda m: None)
    wild = "server_learning_rate-1e30"
    assert statuses == {"server_learning_rate-1.0": "completed", wild: "diverged"}
    write_report(out)
    rows = {r["cell"]: r for r in read_csv(out / "results.csv")}
    assert rows[wild]["status"] == "diverged" and "diverged at round 1" in rows[wild]["error"]
    assert rows[wild]["final_test_accuracy"] == ""
    report = (out / "report.md").read_text()
    assert "1 diverged" in report and "| 1e+30 | diverged (r1) |" in report
    launched.clear()
    run_study(study, out, launch=in_process(launched=launched), echo=lambda m: None)
    assert launched == []  # a result: not run again


def test_results_name_the_validation_selected_round_and_never_mix_client_metrics(tmp_path):
    study = load_study(write_study(tmp_path, {"grid": {"model.norm": ["ws_gn"]}}))
    out = tmp_path / "out"
    run_study(study, out, launch=in_process(), echo=lambda m: None)
    run = out / "runs" / "norm-ws_gn"
    summary = json.loads((run / "summary.json").read_text())
    clients = read_csv(run / "clients.csv")
    for r in clients:  # client 1's evaluation reply "failed": no global score for it
        if r["client"] == "1":
            r["global_val_accuracy"] = ""
    with open(run / "clients.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(clients[0]))
        writer.writeheader()
        writer.writerows(clients)
    write_report(out)
    (row,) = read_csv(out / "results.csv")
    assert "best_test_accuracy" not in row and "round_to_target" not in row
    assert int(row["best_val_round"]) == summary["best"]["round"]
    assert float(row["test_accuracy_at_best_val"]) == summary["best"]["test_accuracy"]
    last = [r for r in clients if r["round"] == "1" and r["client"] != "1"]
    assert float(row["client_val_mean"]) == pytest.approx(
        np.mean([float(r["global_val_accuracy"]) for r in last])
    )


@pytest.mark.slow  # a study of four or more whole federations
def test_report_table_is_the_seed_mean_of_each_group_and_two_seeds_bold_nothing(tmp_path):
    study = load_study(
        write_study(tmp_path, {"grid": {**GRID["grid"], "seed": [0, 1]}}),
    )
    out = tmp_path / "out"
    run_study(study, out, launch=in_process(), echo=lambda m: None)
    _, cells = load_results(out)
    table = accuracy_table(cells).splitlines()
    assert table[0] == "| | iid | Dir(0.5) |"
    body = table[2:]
    assert [line.split(" | ")[0] for line in body] == ["| bn", "| ws_gn"]
    assert all("±" in line for line in body)
    cols = ["iid", "Dir(0.5)"]
    for i, col in enumerate(cols, start=1):  # each entry: its two runs' mean, marked
        for row in ("bn", "ws_gn"):
            finals = [c.final for c in cells if c.row == row and c.column == col]
            assert len(finals) == 2
            entry = next(line for line in body if line.startswith(f"| {row} ")).split(" | ")[i]
            assert entry.startswith(f"{np.mean(finals):.4f} ± ") and "too few seeds" in entry
    assert "**" not in "\n".join(body)  # two seeds: no winner is bolded


@pytest.mark.slow  # a study of four or more whole federations
def test_report_explains_why_with_diagnostics_and_names_switch_axes(tmp_path):
    study = load_study(
        write_study(
            tmp_path,
            {**GRID, "extra": [{"model.norm": "bn", "server.bn_recalibration": True}]},
        )
    )
    out = tmp_path / "out"
    run_study(study, out, launch=in_process(), echo=lambda m: None)
    report = write_report(out).read_text()
    _, cells = load_results(out)
    assert [c.row for c in cells if c.column == "iid"] == ["bn", "ws_gn", "bn, bn_recalibration"]
    why = report.split("## Why")[1]
    assert "| | iid | Dir(0.5) |" in why and "| bn, bn_recalibration |" in why
    assert "Update agreement" in why and "BN-statistics divergence" in why
    assert "**" not in why.split("Update agreement")[1]  # no "best" for a diagnostic
    assert (out / "figures" / "why_vs_heterogeneity.png").stat().st_size > 1000
    for c in cells:  # each run gets its diagnostics.md, linked from the report
        assert f"runs/{c.id}/diagnostics.md" in why
        assert (out / "runs" / c.id / "diagnostics.md").is_file()


@pytest.mark.slow  # starts Ray
def test_two_by_two_study_end_to_end_through_fedws(tmp_path):
    """The real path: `fedws study` runs each cell as `fedws run` (Ray), two at a time."""
    path = write_study(tmp_path, GRID)
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            *FEDWS,
            "study",
            str(path),
            "-o",
            str(out),
            "--parallel",
            "2",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = read_csv(out / "results.csv")
    assert len(rows) == 4 and {r["status"] for r in rows} == {"completed"}
    assert all(0 <= float(r["final_test_accuracy"]) <= 1 for r in rows)
    assert all(float(r["client_val_mean"]) >= float(r["client_val_worst10"]) for r in rows)
    report = (out / "report.md").read_text()
    assert "| | iid | Dir(0.5) |" in report and "SYNTHETIC" in report
    pngs = list((out / "figures").glob("*.png"))
    assert {p.name for p in pngs} >= {"accuracy_vs_round.png", "client_spread.png"}
    assert all(p.stat().st_size > 1000 for p in pngs)
    for cell in ("norm-bn_partition-iid", "norm-ws_gn_partition-dirichlet-0.5"):
        for name in ("config.yaml", "metrics.csv", "clients.csv", "summary.json"):
            assert (out / "runs" / cell / name).is_file()


@pytest.mark.slow  # starts Ray
def test_a_study_in_one_shared_runtime_gives_each_cell_what_fedws_run_gives(tmp_path):
    """The default path: every cell in one Flower simulation (one Ray start, one pool of client
    processes); each cell's numbers are those of `fedws run` of its config, to the last digit."""
    grid = {**GRID["grid"], "model.norm": ["bn", "ws_gn"]}
    study = {"grid": grid, "extra": [{"model.norm": "bn", "federation.strategy": "fedbn"}]}
    path = write_study(tmp_path, {**study, "overrides": {"federation.rounds": 2}})
    out = tmp_path / "out"
    proc = subprocess.run(
        [*FEDWS, "study", str(path), "-o", str(out), "--no-progress"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert not (out / "runs" / "norm-bn_partition-iid" / "log.txt").exists()  # no subprocess
    for cell in ("norm-ws_gn_partition-dirichlet-0.5", "norm-bn_strategy-fedbn_partition-iid"):
        alone = tmp_path / f"alone-{cell}"
        run = subprocess.run(
            [*FEDWS, "run", str(out / "runs" / cell / "cell.yaml"), "-o", str(alone)],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=600,
        )
        assert run.returncode == 0, run.stderr[-2000:]
        for name in ("metrics.csv", "clients.csv", "diagnostics.csv"):
            shared, single = read_csv(out / "runs" / cell / name), read_csv(alone / name)
            keep = [k for k in single[0] if not k.endswith("_s")]  # but for timings
            assert [[r[k] for k in keep] for r in shared] == [[r[k] for k in keep] for r in single]


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_and_study_is_valid(path):
    if path.parent.name == "studies":
        study = load_study(path)
        assert study.cells and all(c.config.federation.rounds >= 1 for c in study.cells)
    else:
        load_config(path)


def test_the_mechanism_and_cifar_cpu_studies_have_the_cells_they_promise():
    mechanism = load_study(REPO / "configs" / "studies" / "bn_mechanism.yaml")
    rows = {
        (c.config.model.norm, c.config.federation.strategy, c.config.server.bn_recalibration)
        for c in mechanism.cells
    }
    assert rows == {
        ("bn", "fedavg", False),
        ("bn", "fedavg", True),
        ("bn", "fedbn", False),
        ("ws_gn", "fedavg", False),
    }
    assert len(mechanism.cells) == 12
    assert {c.config.data.dataset for c in mechanism.cells} == {"fashion_mnist"}
    cifar = load_study(REPO / "configs" / "studies" / "bn_vs_ws_cifar10_cpu.yaml")
    assert len(cifar.cells) == 12
    assert {c.config.model.norm for c in cifar.cells} == {"bn", "gn", "ws_gn", "nf"}
    assert all(
        c.config.data.dataset == "imagefolder" and c.config.data.augmented for c in cifar.cells
    )


def test_a_labelled_extra_entry_names_its_row(tmp_path):
    study = load_study(
        write_study(
            tmp_path,
            {
                "grid": {"model.norm": ["bn", "ws_gn"], "data.partition": [{"kind": "iid"}]},
                "extra": [{"label": "fedwon", "model.norm": "nf", "optim.agc_clip": 0.16}],
            },
        )
    )
    fedwon = study.cells[-1]
    assert fedwon.id == "label-fedwon_partition-iid" and fedwon.label == "fedwon"
    assert fedwon.config.model.norm == "nf" and fedwon.config.optim.agc_clip == 0.16
    assert "optim.agc_clip" not in study.axes  # the other rows stay "bn", "ws_gn"
    out = tmp_path / "out"
    run_study(study, out, launch=in_process(), echo=lambda m: None)
    _, cells = load_results(out)
    assert [c.row for c in cells] == ["bn", "ws_gn", "fedwon"]
    with pytest.raises(ConfigError, match=r"extra\.label"):
        load_study(write_study(tmp_path, {"extra": [{"label": ""}]}))


def test_the_progress_line_gives_each_cells_own_time(tmp_path):
    import time as clock

    from app import rundir
    from app.rundir import RunDir

    study = load_study(write_study(tmp_path, {"grid": {"model.norm": ["bn", "ws_gn"]}}))
    naps = {"norm-bn": 0.6, "norm-ws_gn": 0.05}

    def launch(config: Path, out: Path, ray_cpus):
        clock.sleep(naps[out.name])
        out.joinpath("config.yaml").write_text(config.read_text())
        rundir.write_summary(RunDir(out), {"status": "completed"})

    said: list[str] = []
    run_study(study, tmp_path / "out", launch=launch, echo=said.append)
    lines = {line.split("]")[1].split(":")[0].strip(): line for line in said[1:]}
    own = {cid: float(line.split(" in ")[1].split(" s")[0]) for cid, line in lines.items()}
    assert own["norm-ws_gn"] < 0.5 <= own["norm-bn"]  # not the time since the study began
    assert all("(study " in line for line in lines.values())


def test_a_study_with_nothing_to_run_starts_no_runtime(tmp_path, monkeypatch):
    from app.tools import study as study_module

    study = load_study(write_study(tmp_path, {"grid": {"model.norm": ["bn"]}}))
    out = tmp_path / "out"
    run_study(study, out, launch=in_process(), echo=lambda m: None)

    def no_runtime(*args, **kwargs):
        raise AssertionError("a runtime was started with nothing to run")

    monkeypatch.setattr(study_module, "run_simulation", no_runtime)
    said: list[str] = []
    run_study(study, out, echo=said.append)  # the default: the shared runtime, if any cell ran
    assert "1 already finished, 0 to run" in said[0]
    assert write_report(out).is_file()


def test_the_simulation_says_what_it_starts():
    from app.tools.simulation import starting_line

    line = starting_line(10, 1.0, 0.0, ray_num_cpus=2)
    assert line.startswith("starting Flower simulation: 10 clients on 2 client processes")
    assert "on 1 client process (2 CPU each)" in starting_line(10, 2.0, 0.0, ray_num_cpus=2)
    assert "on 3 client processes" in starting_line(3, 1.0, 0.0, ray_num_cpus=8)
    assert "Ray cluster at auto" in starting_line(10, 1.0, 0.25, ray_address="auto")
