"""The Flower ServerApp: strategy, Lightning evaluation of the global model, run directory.

Two entry points share ``run_federation``:

- ``app`` for ``flwr run .``: the run config (``[tool.flwr.app.config]`` in pyproject.toml,
  ``--run-config`` to override) names the YAML ``config``, optional ``set`` overrides
  (``"k=v; k2=v2"``), the output folder ``out``, and ``resume`` / ``overwrite`` for an ``out``
  that already holds a run (refused without one of them);
- ``make_server_app(cfg, out)`` for ``fedws run``, which has already loaded the config.
"""

from __future__ import annotations

import logging
import math
import re
import time
import uuid
from collections.abc import Callable
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from app import rundir
from app.config import Config, dump_config, load_config
from app.data.datasets import resolve_clients
from app.data.domains import Domains
from app.errors import ConfigError, FedwsError
from app.learn.runtime import CONFIG_KEY, RUN_KEY, dataset, new_module
from app.learn.runtime import domains as runtime_domains
from app.learn.state import select, state_policy
from app.learn.trainer import quiet_lightning
from app.rundir import RunDir
from server.evaluation import GlobalEvaluator
from server.run_log import RunLog
from server.sampling import AnsweringGrid
from server.strategy import RoundReplies, RunDiverged, build_strategy
from server.tracking import chatter_to

ProgressFn = Callable[[dict[str, float]], None]
CLIENT_MODELS = "clients"  # domains.csv scored_by: the domain's clients, their own BN layers


def _weighted_mean(per_client: dict[int, dict[str, float]], key: str) -> float:
    """Sample-weighted mean of ``key`` over the clients that measured it (NaN: not measured)."""
    pairs = [(m[key], m["num-examples"]) for m in per_client.values() if math.isfinite(m[key])]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else math.nan


def _client_rows(server_round: int, replies: RoundReplies) -> list[dict[str, Any]]:
    rows = []
    for client in sorted(set(replies.train) | set(replies.evaluate)):
        fit, ev = replies.train.get(client, {}), replies.evaluate.get(client, {})
        state_round = int(ev.get("local-state-round", -1))
        rows.append(
            {
                "round": server_round,
                "client": client,
                "num_examples": int(fit["num-examples"]) if fit else "",
                "train_loss": fit.get("train_loss", ""),
                "val_accuracy": fit.get("val_accuracy", ""),
                "val_loss": fit.get("val_loss", ""),
                "fit_s": round(fit["fit_s"], 4) if fit else "",
                "global_val_accuracy": _measured(ev.get("val_accuracy")),
                "global_val_loss": _measured(ev.get("val_loss")),
                "local_state_round": state_round if state_round >= 0 else "",
            }
        )
    return rows


def _domains_by_clients(doms: Domains, replies: RoundReplies) -> list[dict[str, Any]]:
    """Per domain, the mean over its evaluated clients (each with its own BN layers, equal
    weights: each scored the whole test split of the domain); clients without layers of their
    own yet (never trained) are left out."""
    rows = []
    for d, name in enumerate(doms.names):
        scores = [
            (m["domain-test-accuracy"], m["domain-test-loss"])
            for m in replies.evaluate.values()
            if int(m.get("domain", -1)) == d and math.isfinite(m["domain-test-accuracy"])
        ]
        rows.append(
            {
                "domain": name,
                "test_accuracy": sum(a for a, _ in scores) / len(scores) if scores else math.nan,
                "test_loss": sum(v for _, v in scores) / len(scores) if scores else math.nan,
                "scored_by": CLIENT_MODELS,
                "clients": len(scores),
            }
        )
    return rows


def _measured(value: float | None) -> float | str:
    """A metric for the CSV: empty when it was not measured (absent or NaN)."""
    return value if value is not None and math.isfinite(value) else ""


def _finite(arrays: ArrayRecord) -> bool:
    return all(torch.isfinite(a).all() for a in arrays.to_torch_state_dict().values())


def read_checkpoint(out: Path) -> dict[str, Any] | None:
    """The last round's checkpoint of a run directory, loaded with ``weights_only=True``."""
    path = RunDir(out).last_checkpoint
    if not path.is_file():
        return None
    try:
        checkpoint = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # a damaged file fails in many ways (a truncated zip: OSError
        # EINVAL; junk: KeyError; a pickle: UnpicklingError): each is one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        why = f"{type(err).__name__}: {first}" if first else type(err).__name__
        raise ConfigError(
            str(path), f"not a checkpoint fedws can load safely (damaged?): {why}"
        ) from None
    if not isinstance(checkpoint, dict):
        raise ConfigError(str(path), "not a checkpoint of fedws (no dict inside)")
    return checkpoint


def resume_point(cfg: Config, out: Path) -> dict[str, Any]:
    checkpoint = read_checkpoint(out)
    if checkpoint is None or not (checkpoint.get("fedws") or {}).get("resume"):
        raise ConfigError("--resume", f"{out} holds no checkpoint of a fedws run to resume")
    saved = rundir.read_config(RunDir(out).config)  # also one written by an earlier fedws
    if saved != cfg:
        raise ConfigError(
            "--resume", f"the config differs from the one of the run in {out}; resume with it"
        )
    return checkpoint


def run_federation(
    grid: Grid,
    cfg: Config,
    out: Path,
    progress: ProgressFn | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Run every round of ``cfg`` on ``grid``; write the run directory; return the summary.

    ``resume``: continue an interrupted run of the same config in ``out`` after its last
    checkpointed round, with the global weights, the server optimizer's state and the run key
    under which the nodes keep their clients' state: clients are drawn from (seed, round), so
    the rest of the run is what it would have been.
    """
    quiet_lightning()
    run = RunDir(out)
    with rundir.writing(out):
        out.mkdir(parents=True, exist_ok=True)
        flower_log = logging.FileHandler(run.run_log)  # Flower's log of this run, at INFO
    flower_log.setLevel(logging.INFO)
    flower_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s flwr: %(message)s"))
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.addHandler(flower_log)
    short = ShortConfigRecords()
    flwr_logger.addFilter(short)
    try:
        with chatter_to(run.run_log, cfg):  # the trackers' start-up chatter: run.log only
            return _federate(grid, cfg, out, progress, resume)
    finally:
        flwr_logger.removeFilter(short)
        flwr_logger.removeHandler(flower_log)
        flower_log.close()


class ShortConfigRecords(logging.Filter):
    """Flower logs the strategy's train and evaluate ConfigRecords in full: the resolved config
    YAML, twice, in the middle of the log. It is in ``config.yaml``; the log names it."""

    CONFIG = re.compile(rf"('{CONFIG_KEY}': )seed: .*?(?=, '{RUN_KEY}')", re.S)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if CONFIG_KEY in message:
            record.msg, record.args = self.CONFIG.sub(r"\1<config.yaml>", message), ()
        return True


def _federate(
    grid: Grid, cfg: Config, out: Path, progress: ProgressFn | None, resume: bool
) -> dict[str, Any]:
    return Federation(cfg, out, progress, resume).run(grid)


class Federation:
    """One run of ``cfg`` into ``out``: the global model, the strategy, the server-side
    evaluation and the run log, built once; ``run`` drives Flower's strategy, and each round's
    server step is ``evaluate`` (Flower's ``evaluate_fn``), one method per job: test the
    global model, make the round's metrics row, log it, stop a diverged run, checkpoint,
    report progress."""

    def __init__(
        self, cfg: Config, out: Path, progress: ProgressFn | None = None, resume: bool = False
    ) -> None:
        self.cfg, self.out, self.progress, self.resume = cfg, out, progress, resume
        self.run_dir = RunDir(out)
        ds = dataset(cfg.data)
        self.module = new_module(cfg, ds)
        self.policy = state_policy(self.module.model, cfg.federation.strategy)
        self.strategy = build_strategy(cfg, self.module.model)
        self.done, elapsed, self.run_key, tracking = 0, 0.0, uuid.uuid4().hex, None
        point: dict[str, Any] = {}
        if resume:
            checkpoint = resume_point(cfg, out)
            self.done, point = checkpoint["fedws"]["round"], checkpoint["fedws"]["resume"]
            self.module.load_state_dict(checkpoint["state_dict"])
            self.strategy.restore(point["strategy"])  # before the run's files are touched
            elapsed, tracking = point["elapsed_s"], point.get("tracking")
            self.run_key = point.get("run_key", self.run_key)
        self.domains = runtime_domains(cfg.data)
        self.evaluator = GlobalEvaluator(cfg, ds, self.module, self.policy, self.domains)
        self.run_log = RunLog(
            cfg,
            out,
            ds.synthetic,
            resume_round=self.done if resume else None,
            elapsed_s=elapsed,
            domains=self.domains is not None,
            tracking=tracking,
        )
        if resume:
            self.strategy.resume(self.done, self.run_log.trained_clients())
        self.clock = time.perf_counter()

    def run(self, grid: Grid) -> dict[str, Any]:
        """Every round left; the summary. A diverged run is a result; any other end closes the
        trackers' runs as failed and goes on up."""
        cfg, run_log = self.cfg, self.run_log
        if self.done >= cfg.federation.rounds:
            return run_log.finish()
        state = {k: v.detach().cpu() for k, v in self.module.model.state_dict().items()}
        config = ConfigRecord({CONFIG_KEY: dump_config(cfg), RUN_KEY: self.run_key})
        try:
            self.strategy.start(
                grid=AnsweringGrid(grid, self.strategy.clients.map),  # a lost node's: failed
                initial_arrays=ArrayRecord(select(state, self.policy.travel)),
                num_rounds=cfg.federation.rounds - self.done,
                train_config=config,
                evaluate_config=ConfigRecord(dict(config)),
                evaluate_fn=self.evaluate,
            )
        except RunDiverged as err:
            log(WARNING, "fedws: %s", err)
            if not run_log.rows or run_log.rows[-1]["round"] < err.server_round:
                self._log_untested(err.server_round)  # the round's replies stopped it
            return run_log.finish(rundir.DIVERGED, str(err), diverged_round=err.server_round)
        except FedwsError as err:
            run_log.finish(rundir.FAILED, str(err))
            raise
        except BaseException as err:  # any other end: the trackers' runs closed as failed too
            run_log.finish(rundir.FAILED, f"{type(err).__name__}: {err}")
            raise
        return run_log.finish()

    def evaluate(self, step: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Flower's ``evaluate_fn``: after round ``step`` of this process (0: the start)."""
        if self.resume and step == 0:  # round `done` was evaluated before the interruption
            return None
        server_round = step + self.done
        finite = _finite(arrays)
        due = self._due(server_round)
        test, evaluation_rows, domain_rows = self._test(arrays, due and finite)
        replies = self.strategy.rounds.get(server_round, RoundReplies())
        row = self._row(server_round, test, replies)
        self._log(server_round, row, replies, evaluation_rows, domain_rows)
        if not finite or (due and not math.isfinite(row["test_loss"])):
            what = "non-finite global weights" if not finite else "non-finite test loss"
            raise RunDiverged(server_round, what)
        self._checkpoint(server_round, row)
        if self.progress is not None:
            self.progress(row)
        return MetricRecord(test) if due else None

    def _log_untested(self, server_round: int) -> None:
        """The row of a round that ended before its test: its replies' counts, no scores."""
        replies = self.strategy.rounds.get(server_round, RoundReplies())
        untested = {"test_accuracy": math.nan, "test_loss": math.nan}
        self._log(server_round, self._row(server_round, untested, replies), replies, [], [])

    def _due(self, server_round: int) -> bool:
        """Whether the global model is tested after this round (every ``eval_every``, and the
        first and last)."""
        rounds, every = self.cfg.federation.rounds, self.cfg.server.eval_every
        return server_round % every == 0 or server_round in (0, rounds)

    def _test(self, arrays: ArrayRecord, due: bool) -> tuple[dict[str, float], list, list]:
        """The global model on the test split (and diagnostics, domains) when ``due``; a
        non-finite loss is not a score: NaN, the round is where the run diverged."""
        untested = {"test_accuracy": math.nan, "test_loss": math.nan}
        self.evaluator.load(arrays)
        if not due:
            return untested, [], []
        test, evaluation_rows, domain_rows = self.evaluator.evaluate()
        if not math.isfinite(test["test_loss"]):
            test = untested
        return test, evaluation_rows, domain_rows

    def _row(self, server_round: int, test: dict[str, float], replies: RoundReplies) -> dict:
        """The round's ``metrics.csv`` row."""
        now = time.perf_counter()
        row = {
            "round": server_round,
            **test,
            "train_loss": _weighted_mean(replies.train, "train_loss"),
            "val_accuracy": _weighted_mean(replies.train, "val_accuracy"),
            "global_val_accuracy": _weighted_mean(replies.evaluate, "val_accuracy"),
            "global_val_loss": _weighted_mean(replies.evaluate, "val_loss"),
            "clients_ok": replies.ok,
            "clients_failed": replies.failed,
            "clients_rejected": replies.rejected,
            "eval_ok": len(replies.evaluate),
            "eval_failed": replies.eval_failed,
            # seconds since the previous row; round 0: the initial model's evaluation
            "round_s": round(now - self.clock, 4),
        }
        self.clock = now
        return row

    def _log(
        self,
        server_round: int,
        row: dict,
        replies: RoundReplies,
        evaluation_rows: list,
        domain_rows: list,
    ) -> None:
        """The round into the run directory and the trackers."""
        diagnosed = [{"round": server_round, **r} for r in replies.diagnostics + evaluation_rows]
        if self.domains is not None and self.policy.personal:  # FedBN: as its clients see it
            domain_rows = _domains_by_clients(self.domains, replies) if server_round else []
        domain_rows = [{"round": server_round, **r} for r in domain_rows]
        clients = _client_rows(server_round, replies)
        self.run_log.log_round(row, clients, diagnosed, domain_rows)

    def _checkpoint(self, server_round: int, row: dict) -> None:
        """``last.ckpt`` with what a resume needs; ``best.ckpt`` when this round is the best."""
        point = {
            "strategy": self.strategy.state(),
            "elapsed_s": self.run_log.elapsed_s,
            "run_key": self.run_key,
            "tracking": self.run_log.tracking_state(),
        }
        self.evaluator.save_checkpoint(self.run_dir.last_checkpoint, server_round, resume=point)
        if self.run_log.best() is row:
            self.evaluator.save_checkpoint(self.run_dir.best_checkpoint, server_round)


def make_server_app(
    cfg: Config, out: Path, progress: ProgressFn | None = None, resume: bool = False
) -> ServerApp:
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, cfg, out, progress, resume=resume)

    return server_app


app = ServerApp()
APP_ROOT = Path(__file__).resolve().parent.parent  # the folder holding pyproject.toml


@app.main()
def main(grid: Grid, context: Context) -> None:
    """``flwr run .``: the YAML config and overrides come from the run config."""
    run_config = context.run_config
    config = Path(str(run_config["config"])).expanduser()
    config = config if config.is_absolute() else APP_ROOT / config
    overrides = [s.strip() for s in str(run_config.get("set", "")).split(";") if s.strip()]
    cfg = resolve_clients(load_config(config, overrides))  # a natural partition's count
    out = Path(str(run_config.get("out") or f"runs/flwr-{config.stem}")).expanduser()
    out = out if out.is_absolute() else Path.cwd() / out
    resume, overwrite = _switch(run_config, "resume"), _switch(run_config, "overwrite")
    claim_run_dir(out, resume, overwrite)
    log(INFO, "fedws: config %s, run directory %s", config, out)
    run_federation(grid, cfg, out, resume=resume)


def _switch(run_config, key: str) -> bool:
    """A true/false run-config key (TOML gives a bool; a quoted "true" is accepted too)."""
    value = run_config.get(key, False)
    if isinstance(value, bool):
        return value
    if str(value).strip().lower() in ("true", "false"):
        return str(value).strip().lower() == "true"
    raise ConfigError(key, f"run-config key must be true or false, got {value!r}")


def claim_run_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """What ``fedws run``'s preflight does for ``-o OUT``, for ``flwr run``'s ``out``: a folder
    that holds a run is refused, before a file of it is touched (a new run would otherwise
    truncate its metrics.csv and clients.csv and overwrite its checkpoints), unless ``resume``
    (continue it) or ``overwrite`` (remove its files, then start anew)."""
    if resume and overwrite:
        raise ConfigError("overwrite", "starts out anew; resume continues it: choose one")
    run = RunDir(out)
    if resume or not rundir.holds_run(run):
        return
    if not overwrite:
        raise ConfigError(
            str(out),
            f"holds a run ({rundir.run_status(run)}): run-config resume=true continues it, "
            "overwrite=true replaces it, or give another out",
        )
    with rundir.writing(out):
        rundir.clear_run(run)
