"""Bad input, table-driven: every malformed config or CLI use exits with code 2 and one line
that says what is wrong, never a traceback."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from helpers import FEDWS, REPO

from app.tools.cli import main

SYNTHETIC = "data:\n  dataset: synthetic\n  synthetic: {train_size: 200, test_size: 50}\n"

# (name, files to write {name: text}, argv with {tmp} for the folder, expected text in the line)
CASES = [
    (
        "unknown key",
        {"c.yaml": "federation:\n  roundz: 3\n"},
        ["run", "{tmp}/c.yaml"],
        "federation.roundz: unknown key",
    ),
    (
        "bad type",
        {"c.yaml": "federation:\n  rounds: many\n"},
        ["run", "{tmp}/c.yaml"],
        "federation.rounds: expected integer",
    ),
    (
        "negative rounds",
        {"c.yaml": "federation:\n  rounds: -3\n"},
        ["run", "{tmp}/c.yaml"],
        "federation.rounds: must be >= 1",
    ),
    (
        "alpha 0",
        {"c.yaml": "data:\n  partition: {kind: dirichlet, alpha: 0}\n"},
        ["partitions", "{tmp}/c.yaml"],
        "data.partition.alpha: must be > 0",
    ),
    (
        "unknown strategy",
        {"c.yaml": "federation: {strategy: scaffold}\n"},
        ["run", "{tmp}/c.yaml"],
        "federation.strategy: got 'scaffold'",
    ),
    (
        "unknown norm",
        {"c.yaml": "model: {norm: batchnorm}\n"},
        ["run", "{tmp}/c.yaml"],
        "model.norm: got 'batchnorm'",
    ),
    (
        "fraction outside (0, 1]",
        {"c.yaml": "federation: {fraction_train: 0}\n"},
        ["run", "{tmp}/c.yaml"],
        "federation.fraction_train: must be in (0, 1]",
    ),
    (
        "missing dataset folder",
        {"c.yaml": "data: {dataset: cifar10, root: /nonexistent/cifar}\n"},
        ["run", "{tmp}/c.yaml"],
        "dataset 'cifar10' not found; tried: /nonexistent/cifar",
    ),
    (
        "more clients than samples",
        {"c.yaml": SYNTHETIC.replace("200", "5") + "  partition: {num_clients: 10}\n"},
        ["partitions", "{tmp}/c.yaml"],
        "10 clients but only 5 training samples",
    ),
    ("unreadable YAML", {"c.yaml": "seed: [1, 2\n"}, ["run", "{tmp}/c.yaml"], "invalid YAML"),
    (
        "YAML with a python tag",
        {"c.yaml": "seed: !!python/object/apply:os.getpid []\n"},
        ["run", "{tmp}/c.yaml"],
        "invalid YAML",
    ),
    (
        "binary file",
        {"c.yaml": b"\x89PNG\r\n\x1a\n\xff\xfe"},
        ["run", "{tmp}/c.yaml"],
        "cannot read it as text",
    ),
    ("a folder as config", {}, ["run", "{tmp}"], "is a folder, not a YAML file"),
    ("missing config file", {}, ["run", "{tmp}/nope.yaml"], "config file not found"),
    (
        "--set without =",
        {"c.yaml": SYNTHETIC},
        ["run", "{tmp}/c.yaml", "--set", "seed"],
        "expected key.path=value",
    ),
    (
        "--set into a scalar",
        {"c.yaml": SYNTHETIC},
        ["run", "{tmp}/c.yaml", "--set", "seed.x=1"],
        "seed: expected integer, got {'x': 1}",
    ),
    ("unknown command", {}, ["train", "{tmp}/c.yaml"], "invalid choice: 'train'"),
    ("missing argument", {}, ["run"], "the following arguments are required: config"),
    (
        "--parallel 0",
        {"s.yaml": "base: c.yaml\n", "c.yaml": SYNTHETIC},
        ["study", "{tmp}/s.yaml", "--parallel", "0"],
        "--parallel: must be >= 1",
    ),
    (
        "study without base",
        {"s.yaml": "grid: {seed: [0, 1]}\n"},
        ["study", "{tmp}/s.yaml"],
        "base: missing",
    ),
    ("report of a non-study folder", {}, ["report", "{tmp}"], "not a study folder"),
    (
        "resume with nothing to resume",
        {"c.yaml": SYNTHETIC},
        ["run", "{tmp}/c.yaml", "-o", "{tmp}/empty", "--resume"],
        "no checkpoint of a fedws run",
    ),
]


@pytest.mark.parametrize(("name", "files", "argv", "expected"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_code_2(name, files, argv, expected, tmp_path, capsys):
    for filename, content in files.items():
        path = tmp_path / filename
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    args = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    try:
        code = main(args)
    except SystemExit as exit_:  # argparse's own exits
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("fedws: "), err
    assert expected in err
    assert "Traceback" not in err


def test_a_tampered_checkpoint_is_refused_on_resume(tmp_path, capsys):
    """Checkpoints load with weights_only=True: a pickled object is refused, not run."""
    (tmp_path / "c.yaml").write_text(SYNTHETIC)
    (tmp_path / "out" / "checkpoints").mkdir(parents=True)
    torch.save(
        {"fedws": {"resume": {}}, "payload": Path("x")}, tmp_path / "out/checkpoints/last.ckpt"
    )
    assert main(["run", str(tmp_path / "c.yaml"), "-o", str(tmp_path / "out"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "not a checkpoint fedws can load safely" in err and err.count("\n") == 1


@pytest.mark.slow  # a fedws process reading the real dataset
def test_the_console_script_prints_no_traceback(tmp_path):
    (tmp_path / "c.yaml").write_text("model: {arch: vgg}\n")
    proc = subprocess.run(
        [*FEDWS, "run", str(tmp_path / "c.yaml")],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "fedws: config error: model.arch: got 'vgg'; allowed: cnn, resnet20, simple_cnn"
    ]
