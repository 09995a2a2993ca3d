"""Studies: a grid of runs over config keys, run cell by cell, resumable.

A study file::

    base: ../quickstart.yaml          # relative to the study file
    overrides: {federation.rounds: 15}
    grid:                             # every combination is a cell
      model.norm: [bn, gn, ws_gn, nf]
      data.partition: [{kind: iid}, {kind: dirichlet, alpha: 0.1}]
      seed: [0, 1, 2]
    extra:                            # more cells: each entry over the grid axes it leaves free
      - {model.norm: bn, federation.strategy: fedbn}
      - {label: fedwon, model.norm: nf, optim.agc_clip: 0.16}   # a named recipe: its row
    target_accuracy: 0.8              # optional: results.csv reports the first round reaching it
    baseline: nf                      # optional: the row paired differences are taken against
                                      # (default: BatchNorm under FedAvg)

Every cell is a run exactly like ``fedws run`` into ``OUT/runs/<cell-id>/``: one after the
other in one Flower simulation runtime (one Ray start, one pool of client processes for the
study), or with ``--parallel N`` / ``--isolated`` each in a subprocess of its own. A cell
whose ``summary.json`` says ``completed`` (or ``diverged``: a result too) is skipped, so an
interrupted study continues where it stopped; a failed cell is recorded and the study goes on.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from tqdm.auto import tqdm

from app import rundir
from app.config import (
    Config,
    apply_overrides,
    build,
    dump_config,
    load_config,
    read_yaml,
    yaml_dump,
)
from app.data.datasets import resolve_clients
from app.errors import ConfigError, FedwsError
from app.rundir import RunDir, StudyDir
from app.tools.console import console_stream
from app.tools.run import attach_report, preflight
from app.tools.simulation import run_simulation
from server.server_app import run_federation

STUDY_KEYS = ("base", "overrides", "grid", "extra", "target_accuracy", "baseline")
LABEL = "label"  # in an extra entry: the name of its row (not a config key)


@dataclass(frozen=True)
class Cell:
    """One run of a study: its id, the axis values that define it, its resolved config."""

    id: str
    axes: dict[str, Any]
    config: Config
    label: str | None = None  # an extra entry's name for its row (e.g. "fedwon")


@dataclass(frozen=True)
class Study:
    path: Path
    cells: tuple[Cell, ...]
    axes: tuple[str, ...]
    target_accuracy: float | None
    baseline: str | None = None  # a row label; None: BatchNorm under FedAvg


def _fmt(value: Any) -> str:
    if isinstance(value, dict):
        return "-".join(_fmt(v) for v in value.values())
    if isinstance(value, list):
        return "-".join(_fmt(v) for v in value)
    return str(value)


def cell_id(axes: dict[str, Any]) -> str:
    """A readable folder name: ``norm-bn_partition-dirichlet-0.1_seed-0``."""
    parts = [f"{key.split('.')[-1]}-{_fmt(value)}" for key, value in axes.items()]
    return re.sub(r"[^A-Za-z0-9._-]+", "", "_".join(parts))


def axis_label(value: Any) -> str:
    """How an axis value is shown in tables and plots."""
    if isinstance(value, dict):
        kind = value.get("kind")
        if kind == "dirichlet":
            return f"Dir({value.get('alpha', '?')})"
        if kind == "pathological":
            return f"#C={value.get('classes_per_client', 2)}"
        if kind is not None:
            rest = [f"{k}={v}" for k, v in value.items() if k != "kind"]
            return f"{kind}({', '.join(rest)})" if rest else str(kind)
    return _fmt(value)


def _overrides(mapping: dict[str, Any]) -> list[str]:
    """``{a.b: v}`` -> ``["a.b=<v as YAML>"]`` for ``apply_overrides``. YAML, not JSON: JSON
    writes 1e-05 for 0.00001, which YAML reads back as a string."""
    return [f"{key}={_yaml_value(value)}" for key, value in mapping.items()]


def _yaml_value(value: Any) -> str:
    flow = yaml_dump([value], default_flow_style=True, sort_keys=False, width=10**9)
    return flow.strip()[1:-1]  # the one item of a one-item flow list


def load_study(path: str | Path, cli_overrides: list[str] | None = None) -> Study:
    """Read and expand a study file; every cell's config is validated before anything runs."""
    path = Path(path)
    raw = _read_study_file(path)
    base = read_yaml((path.parent / str(raw["base"])).resolve())
    grid, extra = raw.get("grid") or {}, raw.get("extra") or []
    base_overridden = apply_overrides(base, _overrides(raw.get("overrides") or {}))
    cells, seen = [], set()
    for axes, label, named in _assignments(path, grid, extra):
        cid = cell_id(named)
        if cid in seen:
            continue
        seen.add(cid)
        raw_cfg = apply_overrides(base_overridden, _overrides(axes) + list(cli_overrides or []))
        cells.append(Cell(cid, axes, _cell_config(raw_cfg, cid, path), label))
    keys = list(grid)
    # the axes rows and columns are told apart by (a labelled cell's own keys are its label's)
    axes = tuple(dict.fromkeys([*keys, *(k for c in cells if not c.label for k in c.axes)]))
    target = raw.get("target_accuracy")
    target = float(target) if target is not None else None
    return Study(path, tuple(cells), axes, target, raw.get("baseline"))


def _read_study_file(path: Path) -> dict[str, Any]:
    """The study file, its keys and their shapes checked (one ConfigError naming the key)."""
    raw = read_yaml(path)
    unknown = sorted(set(raw) - set(STUDY_KEYS))
    if unknown:
        raise ConfigError(f"{path}: {unknown[0]}", f"unknown key; allowed: {', '.join(STUDY_KEYS)}")
    if "base" not in raw:
        raise ConfigError(f"{path}: base", "missing: the config the study starts from")
    for name in ("grid", "overrides"):
        if not isinstance(raw.get(name) or {}, dict):
            raise ConfigError(f"{path}: {name}", "must be a mapping of config keys")
    extra = raw.get("extra") or []
    if not isinstance(extra, list) or not all(isinstance(e, dict) for e in extra):
        raise ConfigError(f"{path}: extra", "must be a list of mappings of config keys")
    for key, values in (raw.get("grid") or {}).items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: grid.{key}", "must be a non-empty list of values")
    target = raw.get("target_accuracy")
    if target is not None and not (isinstance(target, int | float) and 0 < target <= 1):
        raise ConfigError(f"{path}: target_accuracy", f"must be in (0, 1], got {target!r}")
    baseline = raw.get("baseline")
    if baseline is not None and not isinstance(baseline, str):
        raise ConfigError(f"{path}: baseline", f"must be a row label, got {baseline!r}")
    return raw


def _assignments(
    path: Path, grid: dict[str, list], extra: list[dict]
) -> list[tuple[dict[str, Any], str | None, dict[str, Any]]]:
    """Each cell as (its config keys, its label, what names it: its axes, or its label and
    the grid axes it leaves free): the grid's combinations, then each extra entry over them."""
    keys = list(grid)
    combos = [dict(zip(keys, values, strict=True)) for values in itertools.product(*grid.values())]
    out: list[tuple[dict[str, Any], str | None, dict[str, Any]]] = [(c, None, c) for c in combos]
    for entry in extra:
        entry = dict(entry)
        label = entry.pop(LABEL, None)
        if label is not None and (not isinstance(label, str) or not label.strip()):
            raise ConfigError(f"{path}: extra.{LABEL}", f"must be a non-empty name, got {label!r}")
        free = [k for k in keys if k not in entry]
        for combo in {cell_id({k: c[k] for k in free}): c for c in combos}.values():
            axes = {**entry, **{k: combo[k] for k in free}}
            named = {LABEL: label, **{k: combo[k] for k in free}} if label else axes
            out.append((axes, label, named))
    return out


def _cell_config(raw_cfg: dict[str, Any], cid: str, path: Path) -> Config:
    """A cell's validated config (a natural partition's client count resolved); a study is one
    experiment (MLflow, W&B) named after it."""
    try:
        cfg = resolve_clients(build(raw_cfg))
    except ConfigError as err:
        raise ConfigError(f"cell {cid}: {err.field}", err.message) from None
    if cfg.logging.experiment is None:
        cfg = dataclasses.replace(
            cfg, logging=dataclasses.replace(cfg.logging, experiment=path.stem)
        )
    return cfg


def launch_subprocess(config: Path, out: Path, ray_cpus: int | None) -> str | None:
    """Run one cell as ``fedws run`` in a subprocess; return None, or the error it reported."""
    command = [sys.executable, "-m", "app.tools.cli", "run", str(config), "-o", str(out)]
    command += ["--no-progress", "--overwrite"]  # a failed or stale cell's old files go
    if ray_cpus is not None:
        command += ["--set", f"simulation.ray_num_cpus={ray_cpus}"]
    log_path = RunDir(out).cell_log
    with open(log_path, "w") as log:
        proc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False)
    if proc.returncode == 0:
        return None
    return _last_error(log_path) or f"fedws run exited with code {proc.returncode}"


def _last_error(log: Path) -> str | None:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("fedws:") or "Error" in line:
            return line
    return lines[-1] if lines else None


Launcher = Callable[[Path, Path, "int | None"], "str | None"]


def run_cell(cell: Cell, out: Path, ray_cpus: int | None, launch: Launcher) -> str:
    """Run one cell into ``out``; a failure is written to its ``summary.json``."""
    out.mkdir(parents=True, exist_ok=True)
    run = RunDir(out)
    run.cell_config.write_text(dump_config(cell.config))
    try:
        error = launch(run.cell_config, out, ray_cpus)
    except Exception as err:  # a cell's failure must not stop the study
        error = f"{type(err).__name__}: {err}"
    status = rundir.run_status(run)
    if error is None and status in rundir.FINISHED:  # a diverged run is a result too
        return status
    summary = (rundir.read_summary(run) or {}) if status == rundir.FAILED else {}
    summary.update({"status": rundir.FAILED, "error": summary.get("error") or error or "unknown"})
    rundir.write_summary(run, summary)
    return rundir.FAILED


def _runtime_key(cfg: Config) -> tuple:
    """What a Flower simulation fixes for all of its runs: its nodes and their resources."""
    sim = cfg.simulation
    return (
        cfg.data.partition.num_clients,
        sim.num_cpus,
        sim.num_gpus,
        sim.ray_num_cpus,
        sim.ray_address,
    )


def run_shared(
    cells: list[Cell],
    folder: StudyDir,
    started: Callable[[Cell], Any],
    finished: Callable[[Cell, str], Any],
    echo: Callable[[str], Any] = print,
) -> None:
    """Run ``cells`` one after the other inside one Flower simulation per group of cells that
    share its nodes (client count and resources): one Ray runtime and one pool of client
    processes, with their imports and datasets, for the whole group instead of one per cell.
    Each cell is ``run_federation`` on the shared grid, exactly as ``fedws run`` runs it
    (the same preflight, and the MLflow report afterwards). After a cell in which a client
    failed (or the cell failed), the group's next cells start in a fresh runtime: a failed
    client may have left its process dead, and Flower would keep handing it messages."""
    groups: dict[tuple, list[Cell]] = {}
    for cell in cells:
        groups.setdefault(_runtime_key(cell.config), []).append(cell)
    for group in groups.values():
        todo = list(group)
        while todo:
            before = len(todo)
            server_app = ServerApp()

            @server_app.main()
            def main(grid: Grid, context: Context, todo: list[Cell] = todo) -> None:
                while todo:
                    cell = todo.pop(0)
                    run = folder.run(cell.id)
                    started(cell)
                    finished(cell, run_cell(cell, run.path, None, _in_runtime(grid)))
                    if todo and _troubled(run):
                        echo(
                            f"{cell.id}: a client or the cell failed; the next cells start "
                            "in a fresh simulation runtime"
                        )
                        return

            sim = todo[0].config.simulation
            run_simulation(
                server_app,
                num_clients=todo[0].config.data.partition.num_clients,
                num_cpus=sim.num_cpus,
                num_gpus=sim.num_gpus,
                ray_num_cpus=sim.ray_num_cpus,
                ray_address=sim.ray_address,
            )
            if len(todo) == before:
                raise FedwsError(
                    f"the simulation runtime ended before running cell {todo[0].id}: "
                    "see OUT/study.log"
                )


def _in_runtime(grid: Grid) -> Launcher:
    """A cell as ``fedws run`` runs it, on ``grid`` instead of a runtime of its own."""

    def launch(config: Path, out: Path, _ray_cpus: int | None) -> str | None:
        cfg = load_config(config)
        preflight(cfg, out, overwrite=True)  # a failed or stale cell's old files go
        run = RunDir(out)
        run_federation(grid, cfg, out)
        summary = rundir.read_summary(run)
        if summary is None:
            return f"the run ended without writing {run.summary}"
        attach_report(out, summary)
        return None

    return launch


def _troubled(run: RunDir) -> bool:
    """Whether a finished cell had a failed client (training or evaluation) or failed."""
    if rundir.run_status(run) not in rundir.FINISHED:
        return True
    rows = rundir.read_csv(run.metrics)
    return any(float(r["clients_failed"] or 0) or float(r["eval_failed"] or 0) for r in rows)


FINISHED_CELL, STALE, NEW = "finished", "stale", "new"


def cell_state(cell: Cell, folder: StudyDir) -> str:
    """``finished``: a result (completed or diverged) of this very config by this version of
    the code (``rundir.RESULTS_VERSION``), reused; ``stale``: a result of other settings, an
    earlier version or an unreadable config, run again; ``new``: anything else (never run,
    pending, failed), run. Settings no number depends on (logging, simulation resources but
    the device) are not compared."""
    run = folder.run(cell.id)
    summary = rundir.read_summary(run) or {}
    if summary.get("status") not in rundir.FINISHED:
        return NEW
    if summary.get("results_version") != rundir.RESULTS_VERSION:
        return STALE  # numbers from code that draws or computes differently
    try:
        saved = rundir.read_config(run.config)
    except (OSError, FedwsError, ValueError, yaml.YAMLError):
        return STALE
    same = rundir.result_settings(saved) == rundir.result_settings(cell.config)
    return FINISHED_CELL if same else STALE


def dry_run_text(study: Study, out: Path) -> str:
    """``fedws study --dry-run``: every cell with its settings and state; nothing runs."""
    folder = StudyDir(out)
    states = {c.id: cell_state(c, folder) for c in study.cells}
    counts = {s: sum(v == s for v in states.values()) for s in (FINISHED_CELL, STALE, NEW)}
    lines = [
        f"study {study.path} -> {out}/: {len(study.cells)} cells, {counts[FINISHED_CELL]} "
        f"finished, {counts[STALE]} stale (run with other settings: run again), "
        f"{counts[NEW]} new (nothing runs: --dry-run)"
    ]
    for c in study.cells:
        settings = ", ".join(f"{k}={_yaml_value(v)}" for k, v in c.axes.items())
        label = f" [{c.label}]" if c.label else ""
        lines.append(f"  {states[c.id]:8}  {c.id}{label}: {settings}")
    return "\n".join(lines)


def run_study(
    study: Study,
    out: Path,
    parallel: int = 1,
    echo: Callable[[str], Any] = print,
    launch: Launcher | None = None,
    progress: bool = False,
    isolated: bool = False,
) -> dict[str, str]:
    """Run every cell not yet finished; return each cell's status. One at a time (the
    default), the cells share one Flower simulation runtime (``run_shared``); with
    ``parallel`` > 1 or ``isolated``, each cell is ``fedws run`` in a process of its own
    (``launch``, ``parallel`` at once, each with its share of the cores).
    ``progress``: a bar over the cells on stderr, with the running cell(s) and an ETA."""
    folder = StudyDir(out)
    out.mkdir(parents=True, exist_ok=True)
    rundir.write_study(
        folder,
        {
            "source": str(study.path),
            "axes": list(study.axes),
            "target_accuracy": study.target_accuracy,
            "baseline": study.baseline,
            "cells": [
                {"id": c.id, "axes": c.axes, **({LABEL: c.label} if c.label else {})}
                for c in study.cells
            ],
        },
    )
    states = {c.id: cell_state(c, folder) for c in study.cells}
    statuses = {c.id: rundir.run_status(folder.run(c.id)) for c in study.cells}
    todo = [c for c in study.cells if states[c.id] != FINISHED_CELL]
    stale = sum(s == STALE for s in states.values())
    echo(
        f"study: {len(study.cells)} cells, {len(study.cells) - len(todo)} already finished, "
        f"{len(todo)} to run ({stale} stale: finished with other settings), "
        f"{parallel} at a time -> {out}/"
    )
    # With several cells at once, each cell's Ray gets its share of the cores.
    ray_cpus = max(1, (os.cpu_count() or 1) // parallel) if parallel > 1 else None
    start, done, running = time.time(), [0], []
    bar = tqdm(
        total=len(todo), desc="cells", unit="cell", disable=not progress, file=console_stream()
    )
    say = bar.write if progress else echo
    lock = threading.Lock()

    began: dict[str, float] = {}

    def started(cell: Cell) -> None:
        with lock:
            began[cell.id] = time.time()
            running.append(cell.id)
            bar.set_postfix_str(", ".join(running), refresh=True)

    def finished(cell: Cell, status: str) -> None:
        with lock:
            statuses[cell.id] = status
            done[0] += 1
            running.remove(cell.id)
            bar.set_postfix_str(", ".join(running), refresh=False)
            bar.update(1)
            now = time.time()
            say(
                f"[{done[0]}/{len(todo)}] {cell.id}: {status} in {now - began[cell.id]:.0f} s "
                f"(study {now - start:.0f} s)"
            )

    def work(cell: Cell) -> None:
        started(cell)
        finished(cell, run_cell(cell, folder.run(cell.id).path, ray_cpus, launch))

    try:
        if launch is None and parallel == 1 and not isolated and todo:
            run_shared(todo, folder, started, finished, echo=say)
        else:
            launch = launch or launch_subprocess
            with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
                list(pool.map(work, todo))
    finally:
        bar.close()
    return statuses
