"""What the README and the packaging say matches the code."""

from __future__ import annotations

import re
import tomllib

import pytest
from helpers import REPO

from app import rundir
from app.tools.cli import main

README = (REPO / "README.md").read_text()


@pytest.mark.parametrize(
    ("name", "columns"),
    [
        ("metrics.csv", rundir.METRIC_COLUMNS),
        ("clients.csv", rundir.CLIENT_COLUMNS),
        ("domains.csv", rundir.DOMAIN_COLUMNS),
    ],
)
def test_the_readme_lists_each_files_columns_as_written(name, columns):
    row = next(line for line in README.splitlines() if line.startswith(f"| `{name}` |"))
    listed = re.search(r"`(round, [a-z_, ]+)`", row).group(1).split(", ")
    assert tuple(listed) == columns


def test_the_license_file_is_the_license_pyproject_declares():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text


def test_version_and_mutually_exclusive_supernode_placement(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and re.match(r"fedws \d+\.\d+", capsys.readouterr().out)
    with pytest.raises(SystemExit) as both:
        main(["deploy", "supernodes", "--gpus", "0", "--count", "2", "--insecure"])
    assert both.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_the_readme_model_table_is_what_fedws_models_prints(capsys):
    assert main(["models"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[1:]  # after the "parameters for" line
    start = README.index("      arch   norm   params  batchnorm")
    block = README[start : README.index("```", start)].strip("\n").splitlines()
    assert block == printed
