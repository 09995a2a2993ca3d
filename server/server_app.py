"""The Flower ServerApp: strategy, Lightning evaluation of the global model, run directory.

Two entry points share ``run_federation``:

- ``app`` for ``flwr run .``: the run config (``[tool.flwr.app.config]`` in pyproject.toml,
  ``--run-config`` to override) names the YAML ``config``, optional ``set`` overrides
  (``"k=v; k2=v2"``) and the output folder ``out``;
- ``make_server_app(cfg, out)`` for ``fedws run``, which has already loaded the config.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from app.config import Config, dump_config, load_config
from app.errors import FedwsError
from app.module import quiet_lightning
from app.runtime import CONFIG_KEY, dataset, new_module
from app.state import select, state_policy
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


def run_federation(
    grid: Grid, cfg: Config, out: Path, progress: ProgressFn | None = None
) -> dict[str, Any]:
    """Run every round of ``cfg`` on ``grid``; write the run directory; return the summary."""
    quiet_lightning()
    random.seed(cfg.seed)  # Flower's strategies sample nodes with the random module
    ds = dataset(cfg.data)
    module = new_module(cfg, ds)
    policy = state_policy(module.model, cfg.federation.strategy)
    evaluator = GlobalEvaluator(cfg, ds, module, policy)
    log = RunLog(cfg, out, ds.synthetic)
    strategy = build_strategy(cfg)
    rounds, eval_every = cfg.federation.rounds, cfg.server.eval_every
    checkpoints = out / "checkpoints"
    clock = [time.perf_counter()]

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        evaluator.load(arrays)
        due = server_round % eval_every == 0 or server_round in (0, rounds)
        test = evaluator.test() if due else {"test_accuracy": math.nan, "test_loss": math.nan}
        replies = strategy.rounds.get(server_round, RoundReplies())
        now = time.perf_counter()
        row = {
            "round": server_round,
            **test,
            "train_loss": _weighted_mean(replies.train, "train_loss"),
            "val_accuracy": _weighted_mean(replies.train, "val_accuracy"),
            "clients_ok": replies.ok,
            "clients_failed": replies.failed,
            "round_s": round(now - clock[0], 4) if server_round else 0.0,
        }
        clock[0] = now
        log.log_round(row, _client_rows(server_round, replies))
        evaluator.save_checkpoint(checkpoints / "last.ckpt", server_round)
        if due and log.best() is row:
            evaluator.save_checkpoint(checkpoints / "best.ckpt", server_round)
        if progress is not None:
            progress(row)
        return MetricRecord(test) if due else None

    state = {k: v.detach().cpu() for k, v in module.model.state_dict().items()}
    config = ConfigRecord({CONFIG_KEY: dump_config(cfg)})
    try:
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(select(state, policy.travel)),
            num_rounds=rounds,
            train_config=config,
            evaluate_config=ConfigRecord(dict(config)),
            evaluate_fn=evaluate_fn,
        )
    except FedwsError as err:
        log.finish("failed", str(err))
        raise
    return log.finish()


def make_server_app(cfg: Config, out: Path, progress: ProgressFn | None = None) -> ServerApp:
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, cfg, out, progress)

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
