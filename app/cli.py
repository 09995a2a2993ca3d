"""The ``fedws`` command line.

Errors a person can act on (bad config, missing data) are printed as one line on stderr with
exit code 2 (config) or 1 (anything else fedws can name); never a traceback.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from app.errors import ConfigError, FedwsError

DEFAULT_OUT = Path("runs")


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


def _format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def cmd_partitions(args: argparse.Namespace) -> int:
    import numpy as np

    from app.config import load_config
    from app.data import load_dataset
    from app.partition import (
        FeatureShift,
        label_counts,
        label_entropy,
        partition_indices,
        shard_seed,
        split_train_val,
    )
    from app.plots import label_heatmap

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out) if args.out else DEFAULT_OUT / f"partitions-{Path(args.config).stem}"
    data = cfg.data
    ds = load_dataset(data)
    labels = ds.y_train.numpy()
    parts = partition_indices(labels, data.partition)
    counts = label_counts(labels, parts, ds.num_classes)
    entropy = label_entropy(counts)
    p = data.partition

    tag = " [SYNTHETIC DATA]" if ds.synthetic else ""
    print(f"dataset: {ds.name}{tag} from {ds.source}")
    print(
        f"partition: {p.kind}, {p.num_clients} clients, partition seed {p.seed}, "
        f"{len(labels)} training samples, val fraction {data.val_fraction}"
    )
    header = ["client", "samples", "train", "val", "classes", "entropy_bits"]
    if p.kind == "feature":
        header += ["noise", "contrast", "rotation"]
    rows = []
    for client, idx in enumerate(parts):
        train_idx, val_idx = split_train_val(idx, data.val_fraction, shard_seed(p, client))
        row = [
            str(client),
            str(len(idx)),
            str(len(train_idx)),
            str(len(val_idx)),
            str(int((counts[client] > 0).sum())),
            f"{entropy[client]:.3f}",
        ]
        if p.kind == "feature":
            s = FeatureShift.for_client(client, p.num_clients, p.feature)
            row += [f"{s.noise_std:.3f}", f"{s.contrast:.3f}", f"{s.rotation:.1f}"]
        rows.append(row)
    print(_format_table(header, rows))
    print(
        f"mean label entropy {entropy.mean():.3f} bits (uniform: {np.log2(ds.num_classes):.3f}); "
        f"assigned {int(counts.sum())} of {len(labels)} samples"
    )

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "partitions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["client", "label", "count"])
        for client in range(counts.shape[0]):
            for label in range(counts.shape[1]):
                writer.writerow([client, label, int(counts[client, label])])
    title = f"{ds.name}{tag}: {p.kind}" + (f" alpha={p.alpha}" if p.kind == "dirichlet" else "")
    png = label_heatmap(counts, ds.classes, out / "label_distribution.png", title)
    print(f"wrote {out / 'partitions.csv'} and {png}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from app.models import MODELS, build_model, count_parameters, has_batchnorm
    from app.norms import NORMS

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
    from app.config import load_config
    from app.run import describe, run, summary_text

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out) if args.out else DEFAULT_OUT / Path(args.config).stem
    print(f"fedws run: {describe(cfg)} -> {out}/", flush=True)
    summary = run(cfg, out, verbose=args.verbose, progress=not args.no_progress, resume=args.resume)
    print(summary_text(cfg, out, summary))
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from app.report import write_report
    from app.study import load_study, run_study

    if args.parallel < 1:
        raise ConfigError("--parallel", f"must be >= 1, got {args.parallel}")
    study = load_study(args.study, args.overrides)
    out = Path(args.out) if args.out else DEFAULT_OUT / f"study-{Path(args.study).stem}"
    statuses = run_study(study, out, parallel=args.parallel, echo=lambda m: print(m, flush=True))
    report = write_report(out)
    failed = sorted(cid for cid, status in statuses.items() if status != "completed")
    print(f"wrote {out / 'results.csv'} and {report}")
    if failed:
        print(f"fedws: {len(failed)} cell(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from app.report import write_report

    out = Path(args.dir)
    if not (out / "study.yaml").is_file():
        raise ConfigError(
            str(out), "not a study folder (no study.yaml): give the -o of fedws study"
        )
    report = write_report(out)
    print(f"wrote {out / 'results.csv'} and {report}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors as one line (exit code 2) like every other fedws error."""

    def error(self, message: str):
        self.exit(2, f"fedws: usage error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fedws",
        description="Federated learning under non-IID data: BN vs WS+GN vs normalization-free.",
    )
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
    r.add_argument("-v", "--verbose", action="store_true", help="show Flower's and Ray's logs")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run in OUT after its last checkpointed round",
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
    st.set_defaults(func=cmd_study)

    rp = sub.add_parser(
        "report",
        help="rebuild results.csv and report.md of a study folder",
        description="Rebuild DIR/results.csv, DIR/report.md and DIR/figures/ from the runs.",
    )
    rp.add_argument("dir", help="a study folder written by fedws study")
    rp.set_defaults(func=cmd_report)

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
        kind = "config error" if isinstance(err, ConfigError) else "error"
        print(f"fedws: {kind}: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("fedws: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
