"""``fedws run``: one federation in Flower's simulation runtime, with a progress bar over rounds
and a one-screen summary at the end."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from app import rundir
from app.config import Config
from app.data.datasets import resolve_clients
from app.errors import ConfigError, FedwsError
from app.learn import runtime
from app.rundir import RunDir
from app.tools.console import console_stream, flower_console_level
from app.tools.run_report import write_diagnostics
from app.tools.simulation import run_simulation
from server.server_app import make_server_app, resume_point
from server.tracking import check_installed


def describe(cfg: Config) -> str:
    p = cfg.data.partition
    kind = {
        "dirichlet": f"dirichlet(alpha={p.concentration})",
        "pathological": f"pathological({p.classes} classes)",
        "quantity": f"quantity(alpha={p.concentration})",
    }.get(p.kind, p.kind)
    return (
        f"{cfg.data.dataset}, {cfg.model.arch} + {cfg.model.norm}, {cfg.federation.strategy}, "
        f"{kind} over {p.num_clients} clients, {cfg.federation.rounds} rounds"
    )


def _fmt(value: float) -> str:
    return (
        "n/a"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else f"{value:.4f}"
    )


def run(
    cfg: Config,
    out: Path,
    verbose: bool = False,
    progress: bool = True,
    resume: bool = False,
    log_level: str | None = None,
) -> dict[str, Any]:
    """Run ``cfg`` with Flower's simulation runtime into ``out``; return ``summary.json``.
    ``resume`` continues an interrupted run in ``out`` after its last checkpointed round.
    ``log_level``: Flower's console output (default warning; ``verbose``: info, and Ray's
    workers' lines on the console too); ``OUT/run.log`` gets it all."""
    cfg = resolve_clients(cfg)  # the simulation needs its node count before it starts
    done = preflight(cfg, out, resume)
    flower_console_level(log_level or ("info" if verbose else "warning"))
    bar = tqdm(
        total=cfg.federation.rounds,
        initial=min(done, cfg.federation.rounds),
        desc="rounds",
        unit="round",
        disable=not progress,
        file=console_stream(),
        dynamic_ncols=True,
    )

    def on_round(row: dict[str, float]) -> None:
        if row["round"] > 0:
            bar.update(1)
        acc = row["test_accuracy"]
        if not math.isnan(acc):
            bar.set_postfix(test_acc=f"{acc:.4f}", refresh=True)

    server_app = make_server_app(cfg, out, progress=on_round, resume=resume)
    try:
        run_simulation(
            server_app,
            num_clients=cfg.data.partition.num_clients,
            num_cpus=cfg.simulation.num_cpus,
            num_gpus=cfg.simulation.num_gpus,
            ray_num_cpus=cfg.simulation.ray_num_cpus,
            ray_address=cfg.simulation.ray_address,
            verbose=verbose,
        )
    finally:
        bar.close()
    summary = rundir.read_summary(RunDir(out))
    if summary is None:
        raise FedwsError(f"the run ended without writing {RunDir(out).summary}: see the log above")
    attach_report(out, summary)
    return summary


def preflight(cfg: Config, out: Path, resume: bool = False, overwrite: bool = False) -> int:
    """Fail fast, before Ray starts and before anything is written: a folder that already
    holds a run (unless ``resume`` or ``overwrite``), a missing dataset, an impossible
    partition, a missing tracker package or nothing to resume is one line. Returns the round a
    resumed run continues after (0 for a new run); with ``overwrite`` the old run's files are
    removed. The ServerApp runs in this process and finds the data in the caches."""
    run = RunDir(out)
    if not resume and not overwrite and rundir.holds_run(run):
        status = rundir.run_status(run)
        raise ConfigError(
            str(out),
            f"holds a run ({status}): --resume continues it, --overwrite replaces it, or "
            "give another -o",
        )
    runtime.partitions(cfg.data)
    check_installed(cfg)
    point = resume_point(cfg, out)["fedws"]["round"] if resume else 0
    if overwrite:
        rundir.clear_run(run)
    return point


def attach_report(out: Path, summary: dict[str, Any]) -> None:
    """With MLflow on: the run's diagnostics report and figures as artifacts of its run."""
    tracking = summary.get("tracking") or {}
    run = RunDir(out)
    if "mlflow_run_id" not in tracking or not run.diagnostics.is_file():
        return
    import mlflow

    report = write_diagnostics(out)
    client = mlflow.MlflowClient(tracking_uri=tracking["mlflow_uri"])
    client.log_artifact(tracking["mlflow_run_id"], str(report))
    client.log_artifacts(tracking["mlflow_run_id"], str(run.figures), artifact_path="figures")


def summary_text(cfg: Config, out: Path, summary: dict[str, Any]) -> str:
    final, best = summary["final"] or {}, summary["best"] or {}
    tag = " [SYNTHETIC DATA]" if summary["synthetic_data"] else ""
    chosen = (
        f"; at the best round by validation ({best['round']}, {best['selected_by']} "
        f"{_fmt(best[best['selected_by']])}): {_fmt(best['test_accuracy'])}"
        if best
        else "; no validation data to choose a best round by"
    )
    lines = [
        f"fedws run: {describe(cfg)}{tag}",
        f"  rounds {summary['rounds']} | wall {summary['wall_s']:.1f} s | "
        f"mean round {summary['mean_round_s'] or 0:.2f} s",
        f"  global test accuracy: final {_fmt(final.get('test_accuracy'))} "
        f"(round {final.get('round', '-')}){chosen}",
        f"  final test loss {_fmt(final.get('test_loss'))}",
        f"  outputs: {out}/ (config.yaml, metrics.csv, clients.csv, diagnostics.csv, "
        "summary.json, checkpoints/)",
    ]
    if summary["status"] == rundir.DIVERGED:
        lines.insert(1, f"  DIVERGED at round {summary['diverged_round']}: {summary['error']}")
    if summary.get("diagnostics"):
        lines.append(f"  why: fedws diagnose {out}")
    return "\n".join(lines)
