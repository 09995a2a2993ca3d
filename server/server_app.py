"""The Flower ServerApp: strategy, Lightning evaluation of the global model, run directory.

Two entry points share ``run_federation``:

- ``app`` for ``flwr run .``: the run config (``[tool.flwr.app.config]`` in pyproject.toml,
  ``--run-config`` to override) names the YAML ``config``, optional ``set`` overrides
  (``"k=v; k2=v2"``) and the output folder ``out``;
- ``make_server_app(cfg, out)`` for ``fedws run``, which has already loaded the config.
"""

from __future__ import annotations

import logging
import math
import pickle
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
from app.data.domains import Domains
from app.errors import ConfigError, FedwsError
from app.learn import diagnostics
from app.learn.runtime import CONFIG_KEY, RUN_KEY, dataset, new_module
from app.learn.runtime import domains as runtime_domains
from app.learn.state import select, state_policy
from app.learn.trainer import quiet_lightning
from app.rundir import RunDir
from server.evaluation import GlobalEvaluator
from server.run_log import RunLog
from server.strategy import RoundReplies, build_strategy
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


class RunDiverged(FedwsError):
    """The global model's weights or test loss stopped being finite: a result, not a crash."""

    def __init__(self, server_round: int, what: str) -> None:
        super().__init__(f"diverged at round {server_round}: {what}")
        self.server_round = server_round


def read_checkpoint(out: Path) -> dict[str, Any] | None:
    """The last round's checkpoint of a run directory, loaded with ``weights_only=True``."""
    path = RunDir(out).last_checkpoint
    if not path.is_file():
        return None
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(str(path), f"not a checkpoint fedws can load safely: {first}") from None


def resume_point(cfg: Config, out: Path) -> dict[str, Any]:
    checkpoint = read_checkpoint(out)
    if checkpoint is None or not (checkpoint.get("fedws") or {}).get("resume"):
        raise ConfigError("--resume", f"{out} holds no checkpoint of a fedws run to resume")
    saved = load_config(RunDir(out).config)
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
    ds = dataset(cfg.data)
    module = new_module(cfg, ds)
    policy = state_policy(module.model, cfg.federation.strategy)
    strategy = build_strategy(cfg, module.model)
    if cfg.server.diagnostics:
        strategy.groups = diagnostics.layer_groups(module.model)
        strategy.bn_layers = tuple(diagnostics.bn_layers(module.model))
    done, elapsed, run_key, tracking = 0, 0.0, uuid.uuid4().hex, None
    run = RunDir(out)
    if resume:
        checkpoint = resume_point(cfg, out)
        done, point = checkpoint["fedws"]["round"], checkpoint["fedws"]["resume"]
        module.load_state_dict(checkpoint["state_dict"])
        strategy.restore(point["strategy"])
        strategy.round_offset, elapsed = done, point["elapsed_s"]
        run_key = point.get("run_key", run_key)
        tracking = point.get("tracking")
    doms = runtime_domains(cfg.data)
    evaluator = GlobalEvaluator(cfg, ds, module, policy, doms)
    run_log = RunLog(
        cfg,
        out,
        ds.synthetic,
        resume_round=done if resume else None,
        elapsed_s=elapsed,
        domains=doms is not None,
        tracking=tracking,
    )
    strategy.trained = run_log.trained_clients()
    rounds, eval_every = cfg.federation.rounds, cfg.server.eval_every
    clock = [time.perf_counter()]

    def evaluate_fn(step: int, arrays: ArrayRecord) -> MetricRecord | None:
        if resume and step == 0:  # round `done` was evaluated before the interruption
            return None
        server_round = step + done
        finite = _finite(arrays)
        evaluator.load(arrays)
        due = server_round % eval_every == 0 or server_round in (0, rounds)
        untested = {"test_accuracy": math.nan, "test_loss": math.nan}
        tested = evaluator.evaluate() if due and finite else (untested, [], [])
        test, evaluation_rows, domain_rows = tested
        if due and not math.isfinite(test["test_loss"]):
            test = untested  # not a score: the round is recorded as where the run diverged
        replies = strategy.rounds.get(server_round, RoundReplies())
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
            "round_s": round(now - clock[0], 4),
        }
        clock[0] = now
        diagnosed = [{"round": server_round, **r} for r in replies.diagnostics + evaluation_rows]
        if doms is not None and policy.personal:  # FedBN: each domain as its clients see it
            domain_rows = _domains_by_clients(doms, replies) if server_round else []
        domain_rows = [{"round": server_round, **r} for r in domain_rows]
        run_log.log_round(row, _client_rows(server_round, replies), diagnosed, domain_rows)
        if not finite or (due and test is untested):
            what = "non-finite global weights" if not finite else "non-finite test loss"
            raise RunDiverged(server_round, what)
        point = {
            "strategy": strategy.state(),
            "elapsed_s": run_log.elapsed_s,
            "run_key": run_key,
            "tracking": run_log.tracking_state(),
        }
        evaluator.save_checkpoint(run.last_checkpoint, server_round, resume=point)
        if run_log.best() is row:
            evaluator.save_checkpoint(run.best_checkpoint, server_round)
        if progress is not None:
            progress(row)
        return MetricRecord(test) if due else None

    if done >= rounds:
        return run_log.finish()
    state = {k: v.detach().cpu() for k, v in module.model.state_dict().items()}
    config = ConfigRecord({CONFIG_KEY: dump_config(cfg), RUN_KEY: run_key})
    try:
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(select(state, policy.travel)),
            num_rounds=rounds - done,
            train_config=config,
            evaluate_config=ConfigRecord(dict(config)),
            evaluate_fn=evaluate_fn,
        )
    except RunDiverged as err:
        log(WARNING, "fedws: %s", err)
        return run_log.finish(rundir.DIVERGED, str(err), diverged_round=err.server_round)
    except FedwsError as err:
        run_log.finish(rundir.FAILED, str(err))
        raise
    except BaseException as err:  # any other end: the trackers' runs are closed as failed too
        run_log.finish(rundir.FAILED, f"{type(err).__name__}: {err}")
        raise
    return run_log.finish()


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
    cfg = load_config(config, overrides)
    out = Path(str(run_config.get("out") or f"runs/flwr-{config.stem}")).expanduser()
    out = out if out.is_absolute() else Path.cwd() / out
    log(INFO, "fedws: config %s, run directory %s", config, out)
    run_federation(grid, cfg, out)
