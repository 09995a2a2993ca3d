"""The Flower ServerApp: strategy, Lightning evaluation of the global model, run directory.

Two entry points share ``run_federation``:

- ``app`` for ``flwr run .``: the run config (``[tool.flwr.app.config]`` in pyproject.toml,
  ``--run-config`` to override) names the YAML ``config``, optional ``set`` overrides
  (``"k=v; k2=v2"``) and the output folder ``out``;
- ``make_server_app(cfg, out)`` for ``fedws run``, which has already loaded the config.
"""

from __future__ import annotations

import math
import pickle
import random
import shutil
import time
from collections.abc import Callable
from logging import INFO
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from app import rundir
from app.config import Config, dump_config, load_config
from app.errors import ConfigError, FedwsError
from app.learn import diagnostics
from app.learn.runtime import CONFIG_KEY, STATE_DIR_KEY, dataset, new_module
from app.learn.state import select, state_policy
from app.learn.trainer import quiet_lightning
from app.rundir import RunDir
from server.evaluation import GlobalEvaluator
from server.run_log import RunLog
from server.strategy import RoundReplies, build_strategy

ProgressFn = Callable[[dict[str, float]], None]


def _weighted_mean(per_client: dict[int, dict[str, float]], key: str) -> float:
    pairs = [(m[key], m["num-examples"]) for m in per_client.values() if not math.isnan(m[key])]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else math.nan


def _client_rows(server_round: int, replies: RoundReplies) -> list[dict[str, Any]]:
    rows = []
    for client in sorted(set(replies.train) | set(replies.evaluate)):
        fit, ev = replies.train.get(client, {}), replies.evaluate.get(client, {})
        rows.append(
            {
                "round": server_round,
                "client": client,
                "num_examples": int(fit["num-examples"]) if fit else "",
                "train_loss": fit.get("train_loss", ""),
                "val_accuracy": fit.get("val_accuracy", ""),
                "val_loss": fit.get("val_loss", ""),
                "fit_s": round(fit["fit_s"], 4) if fit else "",
                "global_val_accuracy": ev.get("val_accuracy", ""),
                "global_val_loss": ev.get("val_loss", ""),
            }
        )
    return rows


def _random_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    return {"version": version, "internal": list(internal), "gauss": gauss}


def _set_random_state(state: dict[str, Any]) -> None:
    random.setstate((state["version"], tuple(state["internal"]), state["gauss"]))


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
    checkpointed round, with the global weights, the server optimizer's state and the node
    sampler's random state of that round: the rest of the run is what it would have been.
    """
    quiet_lightning()
    random.seed(cfg.seed)  # Flower's strategies sample nodes with the random module
    ds = dataset(cfg.data)
    module = new_module(cfg, ds)
    policy = state_policy(module.model, cfg.federation.strategy)
    strategy = build_strategy(cfg)
    if cfg.server.diagnostics:
        strategy.groups = diagnostics.layer_groups(module.model)
        strategy.bn_layers = tuple(diagnostics.bn_layers(module.model))
    done, elapsed = 0, 0.0
    run = RunDir(out)
    client_state = run.client_state
    if resume:
        checkpoint = resume_point(cfg, out)
        done, point = checkpoint["fedws"]["round"], checkpoint["fedws"]["resume"]
        module.load_state_dict(checkpoint["state_dict"])
        _set_random_state(point["random_state"])
        strategy.restore(point["strategy"])
        strategy.round_offset, elapsed = done, point["elapsed_s"]
    elif client_state.is_dir():
        shutil.rmtree(client_state)  # an earlier run's client state must not leak into this one
    evaluator = GlobalEvaluator(cfg, ds, module, policy)
    log = RunLog(cfg, out, ds.synthetic, resume_round=done if resume else None, elapsed_s=elapsed)
    rounds, eval_every = cfg.federation.rounds, cfg.server.eval_every
    clock = [time.perf_counter()]

    def evaluate_fn(step: int, arrays: ArrayRecord) -> MetricRecord | None:
        if resume and step == 0:  # round `done` was evaluated before the interruption
            return None
        server_round = step + done
        evaluator.load(arrays)
        due = server_round % eval_every == 0 or server_round in (0, rounds)
        if due:
            test, evaluation_rows = evaluator.evaluate()
        else:
            test, evaluation_rows = {"test_accuracy": math.nan, "test_loss": math.nan}, []
        replies = strategy.rounds.get(server_round, RoundReplies())
        now = time.perf_counter()
        row = {
            "round": server_round,
            **test,
            "train_loss": _weighted_mean(replies.train, "train_loss"),
            "val_accuracy": _weighted_mean(replies.train, "val_accuracy"),
            "clients_ok": replies.ok,
            "clients_failed": replies.failed,
            "clients_rejected": replies.rejected,
            "round_s": round(now - clock[0], 4) if step else 0.0,
        }
        clock[0] = now
        diagnosed = [{"round": server_round, **r} for r in replies.diagnostics + evaluation_rows]
        log.log_round(row, _client_rows(server_round, replies), diagnosed)
        point = {
            "random_state": _random_state(),
            "strategy": strategy.state(),
            "elapsed_s": log.elapsed_s,
        }
        evaluator.save_checkpoint(run.last_checkpoint, server_round, resume=point)
        if due and log.best() is row:
            evaluator.save_checkpoint(run.best_checkpoint, server_round)
        if progress is not None:
            progress(row)
        return MetricRecord(test) if due else None

    if done >= rounds:
        return log.finish()
    state = {k: v.detach().cpu() for k, v in module.model.state_dict().items()}
    config = ConfigRecord(
        {CONFIG_KEY: dump_config(cfg), STATE_DIR_KEY: str(client_state.resolve())}
    )
    try:
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(select(state, policy.travel)),
            num_rounds=rounds - done,
            train_config=config,
            evaluate_config=ConfigRecord(dict(config)),
            evaluate_fn=evaluate_fn,
        )
    except FedwsError as err:
        log.finish(rundir.FAILED, str(err))
        raise
    return log.finish()


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
