"""The ``fedws`` command line.

argparse and one short adapter per command; the work is done in the modules each adapter
imports when its command runs (so ``fedws --help`` and ``fedws deploy`` start without loading
torch, Lightning or Ray). Errors a person can act on (bad config, missing data) are printed as
one line on stderr with exit code 2 (config) or 1 (anything else fedws can name); never a
traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from app.config import Config, dump_config, load_config
from app.errors import ConfigError, FedwsError
from app.rundir import FINISHED, RunDir, StudyDir

DEFAULT_OUT = Path("runs")
LOG_LEVELS = ("debug", "info", "warning", "error")


def _add_set(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a config value (YAML syntax), e.g. --set data.partition.alpha=0.1; "
        "repeatable",
    )


def error_line(err: FedwsError) -> str:
    kind = "config error" if isinstance(err, ConfigError) else "error"
    return f"fedws: {kind}: {err}"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedws")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"


def _format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def _print_partitions(cfg: Config):
    """The partition summary (dataset, seeds, a row per client); returns its view."""
    import numpy as np

    from app.tools.partitions import partition_view

    view = partition_view(cfg.data)
    ds, p = view.dataset, cfg.data.partition
    num_samples = len(ds.y_train)
    tag = " [SYNTHETIC DATA]" if ds.synthetic else ""
    drawn = "the run's seed" if p.seed == cfg.seed else "pinned"
    print(f"dataset: {ds.name}{tag} from {ds.source}")
    print(
        f"partition: {p.kind}, {p.num_clients} clients, data seed {p.seed} ({drawn}), "
        f"{num_samples} training samples, val fraction {cfg.data.val_fraction}"
    )
    print(_format_table(*view.table()))
    uniform = np.log2(ds.num_classes)
    print(
        f"mean label entropy {view.entropy.mean():.3f} bits (uniform: {uniform:.3f}); "
        f"assigned {int(view.counts.sum())} of {num_samples} samples"
    )
    return view


def _print_dry_run(cfg: Config, out: Path) -> None:
    """``fedws run --dry-run``: the resolved config and the partition; nothing is written."""
    print(f"# fedws run --dry-run: the resolved config (nothing runs; OUT would be {out}/)")
    print(dump_config(cfg), end="")
    print("# the partition")
    _print_partitions(cfg)


def _run_config(args: argparse.Namespace) -> Config:
    """``args.config`` with its overrides, validated, a natural partition's client count
    counted from the data when the config leaves it out. Resuming from the run folder's own
    ``config.yaml``, it is read as fedws wrote it (``load_config``'s ``saved``)."""
    from app.data.datasets import resolve_clients

    out = getattr(args, "out", None)
    saved = bool(getattr(args, "resume", False) and out) and (
        Path(args.config).resolve() == RunDir(Path(out)).config.resolve()
    )
    return resolve_clients(load_config(args.config, args.overrides, saved=saved))


def cmd_partitions(args: argparse.Namespace) -> int:
    cfg = _run_config(args)
    out = Path(args.out) if args.out else DEFAULT_OUT / f"partitions-{Path(args.config).stem}"
    view = _print_partitions(cfg)
    *files, png = view.write(out)
    print(f"wrote {', '.join(map(str, files))} and {png}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from app.nn.models import MODELS, build_model, count_parameters, has_batchnorm
    from app.nn.norms import NORMS

    rows = []
    for arch in MODELS:
        for norm in NORMS:
            model = build_model(arch, norm, args.in_channels, args.num_classes)
            rows.append(
                [
                    arch,
                    norm,
                    f"{count_parameters(model):,}",
                    "yes" if has_batchnorm(model) else "no",
                ]
            )
    print(
        f"parameters for {args.in_channels} input channel(s), {args.num_classes} classes "
        "(default widths)"
    )
    print(_format_table(["arch", "norm", "params", "batchnorm"], rows))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from app.tools.console import teed
    from app.tools.run import describe, preflight, run, summary_text

    cfg = _run_config(args)
    out = Path(args.out) if args.out else DEFAULT_OUT / Path(args.config).stem
    level = args.log_level or ("info" if args.verbose else "warning")
    if args.resume and args.overwrite:
        raise ConfigError("--overwrite", "starts OUT anew; --resume continues it: choose one")
    if args.dry_run:
        _print_dry_run(cfg, out)
        return 0
    # one-line errors before OUT is written to
    preflight(cfg, out, args.resume, overwrite=args.overwrite)
    with teed(RunDir(out).run_log, level, workers=args.verbose, append=args.resume):
        print(f"fedws run: {describe(cfg)} -> {out}/", flush=True)
        try:
            summary = run(
                cfg,
                out,
                verbose=args.verbose,
                progress=not args.no_progress,
                resume=args.resume,
                log_level=level,
            )
        except FedwsError as err:  # said here, inside the tee: run.log says why it stopped
            print(error_line(err), file=sys.stderr)
            return err.exit_code
        print(summary_text(cfg, out, summary))
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from app.tools.console import teed
    from app.tools.study import dry_run_text, load_study, run_study
    from app.tools.study_report import write_report

    if args.parallel < 1:
        raise ConfigError("--parallel", f"must be >= 1, got {args.parallel}")
    study = load_study(args.study, args.overrides)
    out = Path(args.out) if args.out else DEFAULT_OUT / f"study-{Path(args.study).stem}"
    if args.dry_run:
        print(dry_run_text(study, out))
        return 0
    with teed(StudyDir(out).log, append=True):  # Ray workers' lines: in study.log only
        statuses = run_study(
            study,
            out,
            parallel=args.parallel,
            echo=lambda m: print(m, flush=True),
            progress=not args.no_progress,
            isolated=args.isolated,
        )
    print(f"writing the study report: {StudyDir(out).report} with its tables and figures")
    report = write_report(out)
    failed = sorted(cid for cid, status in statuses.items() if status not in FINISHED)
    print(f"wrote {StudyDir(out).results} and {report}")
    if failed:
        print(f"fedws: {len(failed)} cell(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from app.tools.study_report import write_report

    out = Path(args.dir)
    if not StudyDir(out).study.is_file():
        raise ConfigError(
            str(out), "not a study folder (no study.yaml): give the -o of fedws study"
        )
    report = write_report(out)
    print(f"wrote {StudyDir(out).results} and {report}")
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    from app.tools.run_report import write_diagnostics

    run = Path(args.dir)
    if not RunDir(run).config.is_file():
        raise ConfigError(
            str(run), "not a run directory (no config.yaml): give the -o of fedws run"
        )
    print(f"wrote {write_diagnostics(run, Path(args.out) if args.out else None)}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from app.tools import compare

    runs = compare.load([Path(d) for d in args.dirs])
    out = Path(args.out) if args.out else DEFAULT_OUT / "compare"
    header, rows = compare.table(runs)
    print(_format_table(header, rows))
    md, table, png = compare.write(runs, out)
    print(f"wrote {md}, {table} and {png}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import json

    from app.tools.predict import predict_run

    predictions = predict_run(
        Path(args.dir),
        args.images,
        args.checkpoint,
        notice=lambda message: print(f"fedws: {message}", file=sys.stderr),
    )
    if args.json:
        print(json.dumps([p.to_json() for p in predictions], indent=2))
    else:
        print("\n".join(p.line() for p in predictions))
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors as one line (exit code 2) like every other fedws error."""

    def error(self, message: str):
        self.exit(2, f"fedws: usage error: {message} (see {self.prog} --help)\n")


def cmd_deploy_certs(args: argparse.Namespace) -> int:
    from app.tools.deploy import connection_toml, make_certs

    out = Path(args.out)
    written = make_certs(out, args.host or ["127.0.0.1", "localhost"], args.nodes)
    print(
        f"wrote {len(written)} files to {out}/: CA, SuperLink certificate and key, "
        f"{args.nodes} SuperNode key pairs (supernode-<i>, supernode-<i>.pub)"
    )
    print("register each SuperNode's public key with the SuperLink once it runs:")
    print(f"  flwr supernode register {out}/supernode-0.pub <connection>")
    print("and give flwr the connection in ~/.flwr/config.toml:")
    host = (args.host or ["127.0.0.1"])[0]
    print(connection_toml("fedws", f"{host}:9093", out), end="")
    return 0


def cmd_deploy_superlink(args: argparse.Namespace) -> int:
    from app.tools import deploy

    certs = None if args.insecure else Path(args.certs)
    if certs is None:
        print("fedws: warning: --insecure: no TLS and no SuperNode authentication", file=sys.stderr)
    elif not (certs / deploy.SUPERLINK_CERT).is_file():
        raise ConfigError(
            "--certs", f"{certs} has no {deploy.SUPERLINK_CERT}: run fedws deploy certs first"
        )
    if (warning := deploy.exposure_warning(args.host, args.port)) is not None:
        print(warning, file=sys.stderr)
    db = deploy.superlink_database(args.database, certs)
    command = deploy.superlink_command(certs, args.host, args.port, db)
    deploy.create_database(db)
    print("fedws: " + " ".join(command), flush=True)
    return deploy.supervise([deploy.start_flower(command)])


def cmd_deploy_stop_local(args: argparse.Namespace) -> int:
    from app.tools.deploy import local_superlinks, stop_pids

    pids = local_superlinks()
    if not pids:
        print("fedws: no local SuperLink of flwr run is running")
        return 0
    stop_pids(pids)
    print(f"fedws: stopped flwr run's local SuperLink (pid {', '.join(map(str, pids))})")
    return 0


def cmd_deploy_supernodes(args: argparse.Namespace) -> int:
    from app.tools.deploy import (
        connection_hint,
        relayed,
        start_watched,
        supernode_command,
        supernode_key,
        supervise,
    )

    if args.count is not None and args.count < 1:
        raise ConfigError("--count", f"must be >= 1, got {args.count}")
    devices = [g.strip() for g in args.gpus.split(",")] if args.gpus is not None else []
    if args.gpus is not None and not all(d.isdigit() for d in devices):
        raise ConfigError("--gpus", f"expected GPU ids like 0,1,2, got {args.gpus!r}")
    devices = devices or [""] * args.count
    certs = None if args.insecure else Path(args.certs)
    total = args.num_partitions or len(devices)
    commands = []
    for i, device in enumerate(devices):
        partition = args.first_partition + i
        if certs is not None and not supernode_key(certs, partition).is_file():
            raise ConfigError("--certs", f"no key {supernode_key(certs, partition)}")
        command = supernode_command(
            args.superlink,
            certs,
            partition,
            partition,
            total,
            args.base_port + i,
            args.data_path,
            Path(args.state_dir).expanduser().resolve(),
        )
        where = f"GPU {device}" if device else "CPU"
        print(f"fedws: SuperNode {partition}/{total} on {where}: " + " ".join(command), flush=True)
        commands.append((command, device, connection_hint(partition, args.superlink, certs)))
    procs = [
        start_watched(command, hint, CUDA_VISIBLE_DEVICES=device, PL_DISABLE_FORK="1")
        for command, device, hint in commands
    ]
    code = supervise(procs)
    relayed()
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fedws",
        description="Federated learning under non-IID data: BN vs WS+GN vs normalization-free.",
    )
    parser.add_argument("--version", action="version", version=f"fedws {_version()}")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )

    r = sub.add_parser(
        "run",
        help="run one federation (Flower simulation, Lightning clients) into a run directory",
        description="Run CONFIG with Flower's simulation runtime. OUT gets config.yaml, "
        "metrics.csv, clients.csv, summary.json and checkpoints/.",
    )
    r.add_argument("config", help="YAML config, e.g. configs/quickstart.yaml")
    r.add_argument("-o", "--out", help=f"run directory (default: {DEFAULT_OUT}/<config name>)")
    _add_set(r)
    r.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show Flower's log (info) and Ray's worker processes' lines on the console",
    )
    r.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        help="Flower's console output (default warning; OUT/run.log always has info)",
    )
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run in OUT after its last checkpointed round",
    )
    r.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run OUT holds (without it, a folder holding a run is refused)",
    )
    r.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved config and the partition summary, run nothing",
    )
    r.set_defaults(func=cmd_run)

    st = sub.add_parser(
        "study",
        help="run a grid of federations (resumable) and write results.csv + report.md",
        description="Run every cell of STUDY into OUT/runs/<cell>/, skipping completed cells, "
        "then write OUT/results.csv and OUT/report.md.",
    )
    st.add_argument("study", help="study YAML, e.g. configs/studies/bn_vs_ws_quick.yaml")
    st.add_argument("-o", "--out", help=f"study folder (default: {DEFAULT_OUT}/study-<name>)")
    _add_set(st)
    st.add_argument(
        "--parallel", type=int, default=1, help="cells run at once (default 1); cores are shared"
    )
    st.add_argument("--no-progress", action="store_true", help="no progress bar over cells")
    st.add_argument(
        "--isolated",
        action="store_true",
        help="each cell in a process of its own (default: one after the other in one shared "
        "Flower simulation runtime; --parallel implies it)",
    )
    st.add_argument(
        "--dry-run",
        action="store_true",
        help="list the cells with their settings and whether each is finished, stale or new",
    )
    st.set_defaults(func=cmd_study)

    rp = sub.add_parser(
        "report",
        help="rebuild results.csv and report.md of a study folder",
        description="Rebuild DIR/results.csv, DIR/report.md and DIR/figures/ from the runs.",
    )
    rp.add_argument("dir", help="a study folder written by fedws study")
    rp.set_defaults(func=cmd_report)

    dg = sub.add_parser(
        "diagnose",
        help="explain a run: client drift, BN-statistics divergence, recalibration",
        description="Write RUN_DIR/diagnostics.md and RUN_DIR/figures/diag_*.png from the "
        "run's diagnostics.csv and metrics.csv.",
    )
    dg.add_argument("dir", metavar="RUN_DIR", help="a run directory written by fedws run")
    dg.add_argument(
        "-o", "--out", help="folder for diagnostics.md and its figures (default: RUN_DIR)"
    )
    dg.set_defaults(func=cmd_diagnose)

    cp = sub.add_parser(
        "compare",
        help="any runs side by side: accuracy, wall time, the config keys that differ, a figure",
        description="Compare run directories: a table (final and validation-chosen test "
        "accuracy, wall time, the config keys whose values differ) and one accuracy-vs-round "
        "figure, printed and written to OUT/compare.md, compare.csv, accuracy_vs_round.png.",
    )
    cp.add_argument("dirs", nargs="+", metavar="RUN_DIR", help="run directories of fedws run")
    cp.add_argument("-o", "--out", help=f"output folder (default: {DEFAULT_OUT}/compare)")
    cp.set_defaults(func=cmd_compare)

    pr = sub.add_parser(
        "predict",
        help="classify image files with a run's checkpoint: class name and probability",
        description="Classify IMAGES (files, or folders: every .png/.jpg/.jpeg inside) with "
        "RUN_DIR's global model; one line per image with the class name and its probability. "
        "The checkpoint holds the class names, the input size and normalization.",
    )
    pr.add_argument("dir", metavar="RUN_DIR", help="a run directory written by fedws run")
    pr.add_argument("images", nargs="+", metavar="IMAGES", help="image files or folders")
    pr.add_argument(
        "--checkpoint",
        choices=("best", "last"),
        help="best.ckpt (the round chosen on validation data; the default when the run has "
        "one) or last.ckpt (the final round; the default otherwise)",
    )
    pr.add_argument(
        "--json",
        action="store_true",
        help="a JSON list of {image, class, class_index, probability} instead",
    )
    pr.set_defaults(func=cmd_predict)

    dep = sub.add_parser(
        "deploy",
        help="a secured Flower deployment: certificates, a SuperLink, SuperNodes",
        description="Run fedws on real Flower processes: `certs`, then `superlink`, then "
        "`supernodes` on each machine, then `flwr run . <connection>` (see README).",
    )
    dsub = dep.add_subparsers(dest="deploy", required=True, metavar="STEP", parser_class=_Parser)
    c = dsub.add_parser("certs", help="CA, SuperLink certificate, SuperNode key pairs")
    c.add_argument("out", help="folder for the files")
    c.add_argument(
        "--host",
        action="append",
        help="a host name or IP the SuperLink is reached at (repeatable; the certificate's "
        "SANs; default 127.0.0.1 and localhost)",
    )
    c.add_argument("--nodes", type=int, default=2, help="SuperNode key pairs (default 2)")
    c.set_defaults(func=cmd_deploy_certs)
    sl = dsub.add_parser("superlink", help="start a SuperLink (TLS + SuperNode auth)")
    sl.add_argument("--certs", default="certs", help="folder written by `deploy certs`")
    sl.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only; SuperNodes on other "
        "machines need e.g. 0.0.0.0, which exposes run submission too: see README)",
    )
    sl.add_argument("--port", type=int, default=9093, help="HTTPS port of its APIs (9093)")
    sl.add_argument(
        "--database",
        help="state database file: registered keys, nodes and runs survive a restart (default: "
        "superlink.db in --certs, ./fedws-superlink.db with --insecure; :memory: for none)",
    )
    sl.add_argument("--insecure", action="store_true", help="no TLS, no SuperNode auth")
    sl.set_defaults(func=cmd_deploy_superlink)
    sl_stop = dsub.add_parser(
        "stop-local",
        help="stop the local SuperLink that `flwr run .` started (by its pid)",
        description="Stop the local simulation SuperLink that `flwr run .` starts and leaves "
        "running (found by its --simulation flag and local Control API port); a deployed "
        "SuperLink is left alone.",
    )
    sl_stop.set_defaults(func=cmd_deploy_stop_local)
    sn = dsub.add_parser("supernodes", help="start SuperNodes: one per GPU, or N on CPU")
    sn.add_argument("--superlink", default="127.0.0.1:9093", help="SuperLink host:port")
    sn.add_argument("--certs", default="certs", help="folder written by `deploy certs`")
    where = sn.add_mutually_exclusive_group(required=True)
    where.add_argument("--gpus", help="comma-separated GPU ids: one SuperNode pinned to each")
    where.add_argument("--count", type=int, help="N SuperNodes on the CPU")
    sn.add_argument(
        "--first-partition", type=int, default=0, help="partition-id of the first node here"
    )
    sn.add_argument(
        "--num-partitions", type=int, help="nodes in the whole federation (default: these)"
    )
    sn.add_argument("--data-path", help="node-local dataset folder (sets data.root per node)")
    sn.add_argument(
        "--state-dir",
        default="fedws-state",
        help="folder on this machine where the nodes keep their clients' local state (FedBN "
        "layers) between rounds and across restarts (default: ./fedws-state)",
    )
    sn.add_argument("--base-port", type=int, default=9100, help="first local ClientApp port")
    sn.add_argument("--insecure", action="store_true", help="no TLS, no SuperNode auth")
    sn.set_defaults(func=cmd_deploy_supernodes)

    p = sub.add_parser(
        "partitions",
        help="show how a config splits the data over clients (table, CSV, heatmap)",
        description="Partition the training split as CONFIG says; print a per-client table, "
        "write OUT/partitions.csv (client,label,count) and OUT/label_distribution.png.",
    )
    p.add_argument("config", help="YAML config, e.g. configs/quickstart.yaml")
    p.add_argument(
        "-o", "--out", help=f"output folder (default: {DEFAULT_OUT}/partitions-<config name>)"
    )
    _add_set(p)
    p.set_defaults(func=cmd_partitions)

    m = sub.add_parser(
        "models",
        help="table of every arch x norm with parameter count and BN presence",
        description="Build every arch x norm of the registries and list their parameter counts.",
    )
    m.add_argument("--in-channels", type=int, default=1, help="input channels (default 1)")
    m.add_argument("--num-classes", type=int, default=10, help="classes (default 10)")
    m.set_defaults(func=cmd_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # fedws works offline: no usage telemetry from Flower (read when flwr is first imported)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FedwsError as err:
        print(error_line(err), file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("fedws: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
