from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import REPO, SMALL

from app.nn.models import list_models
from app.nn.norms import NORMS
from app.rundir import read_csv
from app.tools.cli import main

COMMANDS = (
    "run",
    "study",
    "report",
    "diagnose",
    "compare",
    "predict",
    "deploy",
    "partitions",
    "models",
)


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    # each command starts its own line of the command list, with its help beside or below it
    listed = re.findall(r"^ {4}(\w+)(?: {2,}\S|$)", text, flags=re.M)
    assert tuple(listed) == COMMANDS
    for command in COMMANDS:  # and each is a working subcommand with its own --help
        with pytest.raises(SystemExit) as sub:
            main([command, "--help"])
        assert sub.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: fedws {command} ")


def test_partitions_writes_table_csv_and_heatmap(tmp_path, capsys):
    config = tmp_path / "small.yaml"
    raw = {**SMALL, "data": {**SMALL["data"], "partition": {"kind": "pathological"}}}
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    assert (
        main(["partitions", str(config), "-o", str(out), "--set", "data.partition.num_clients=10"])
        == 0
    )
    stdout = capsys.readouterr().out
    assert "[SYNTHETIC DATA]" in stdout
    assert "pathological, 10 clients" in stdout
    table = [line.split() for line in stdout.splitlines() if line.split()[:1] in (["0"], ["9"])]
    assert len(table) == 2 and all(int(row[4]) <= 2 for row in table)  # classes per client

    rows = read_csv(out / "partitions.csv")
    assert list(rows[0]) == ["client", "label", "count"]
    assert len(rows) == 10 * 10  # every client x every label, zeros included
    assert sum(int(r["count"]) for r in rows) == 600  # every class has a first owner
    counts = np.zeros((10, 10), dtype=int)
    for r in rows:
        counts[int(r["client"]), int(r["label"])] = int(r["count"])
    assert ((counts > 0).sum(axis=1) <= 2).all()
    png = out / "label_distribution.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _partitions_csv(tmp_path: Path, name: str, *sets: str) -> str:
    config = tmp_path / "small.yaml"
    raw = {**SMALL, "data": {**SMALL["data"], "partition": {"kind": "dirichlet", "alpha": 0.5}}}
    config.write_text(yaml.safe_dump(raw))
    args = ["partitions", str(config), "-o", str(tmp_path / name)]
    assert main([*args, *(x for s in sets for x in ("--set", s))]) == 0
    return (tmp_path / name / "partitions.csv").read_text()


def test_the_seed_draws_the_partition_unless_the_partition_seed_pins_it(tmp_path, capsys):
    seed0 = _partitions_csv(tmp_path, "a", "seed=0")
    seed1 = _partitions_csv(tmp_path, "b", "seed=1")
    assert seed0 != seed1
    pinned0 = _partitions_csv(tmp_path, "c", "seed=0", "data.partition.seed=7")
    pinned1 = _partitions_csv(tmp_path, "d", "seed=1", "data.partition.seed=7")
    assert pinned0 == pinned1 and pinned0 not in (seed0, seed1)
    out = capsys.readouterr().out
    assert "data seed 1 (the run's seed)" in out and "data seed 7 (pinned)" in out


def test_a_folder_holding_a_run_is_refused_and_left_as_it_was(tmp_path, capsys):
    config = tmp_path / "small.yaml"
    config.write_text(yaml.safe_dump(SMALL))
    out = tmp_path / "run"
    out.mkdir()
    files = {"config.yaml": "seed: 0\n", "metrics.csv": "round\n0\n", "summary.json": "{}"}
    for name, text in files.items():
        (out / name).write_text(text)
    assert main(["run", str(config), "-o", str(out), "--set", "federation.rounds=2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds a run" in err and "--overwrite" in err
    assert {p.name: p.read_text() for p in out.iterdir()} == files  # nothing written
    assert main(["run", str(config), "-o", str(out), "--resume", "--overwrite"]) == 2


def test_run_dry_run_prints_the_resolved_config_and_partition_and_writes_nothing(tmp_path, capsys):
    config = tmp_path / "small.yaml"
    config.write_text(yaml.safe_dump(SMALL))
    out = tmp_path / "run"
    assert main(["run", str(config), "-o", str(out), "--dry-run", "--set", "seed=4"]) == 0
    text = capsys.readouterr().out
    resolved = yaml.safe_load(text.split("# the partition", 1)[0])
    assert resolved["seed"] == 4 and resolved["data"]["partition"]["seed"] is None  # follows
    assert "iid, 4 clients, data seed 4" in text and "mean label entropy" in text
    assert not out.exists()


def test_models_table_has_every_arch_and_norm(capsys):
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines[2:]]
    assert {(r[0], r[1]) for r in rows} == {(a, n) for a in list_models() for n in NORMS}
    bn_column = {(r[0], r[1]): r[3] for r in rows}
    assert bn_column[("cnn", "bn")] == "yes" and bn_column[("resnet20", "nf")] == "no"


@pytest.mark.slow  # a fedws process reading the real dataset
def test_console_script_runs_the_quickstart_partitions(tmp_path):
    """The README's main job, through the installed console script, on the real data."""
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "fedws"),
            "partitions",
            "configs/quickstart.yaml",
            "-o",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "dirichlet, 10 clients" in proc.stdout
    assert "assigned 60000 of 60000 samples" in proc.stdout
    assert (tmp_path / "partitions.csv").exists()


def test_run_with_missing_data_fails_before_starting_ray(tmp_path, capsys, no_fedws_data):
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  dataset: cifar10\n  root: {tmp_path / 'nothing'}\n")
    assert main(["run", str(config), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "dataset 'cifar10' not found" in err
    assert not (tmp_path / "out").exists()
