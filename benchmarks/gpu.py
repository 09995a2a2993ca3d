"""fedws on one GPU: the quickstart with 1, 4 and 8 clients sharing the GPU
(``simulation.num_gpus`` 1, 0.25, 0.125), in fp32 (``32-true``) and bf16 (``bf16-mixed``), and
the CIFAR-10 ResNet-20 study config (4 clients per GPU, bf16, the server test every 5 rounds).

    python benchmarks/gpu.py [--json PATH] [--rounds 4] [--fit-only] [--check-deterministic]

Each setting is a ``fedws run`` of its own (Flower's simulation on Ray); ``nvidia-smi`` is read
every 0.5 s meanwhile. Reported per setting: s/round (mean ``round_s`` of rounds 2..R: round 1
pays the first CUDA and cuDNN touches), the peak GPU memory in use (every process's, CUDA
contexts included) and the mean GPU utilisation during rounds 2..R. A run is killed at
``--timeout`` seconds unless it has completed (its ``summary.json`` says so); a completed run's
process may run until ``--timeout`` or ``EXIT_GRACE_S`` after completing, whichever is later,
and the seconds from its completion to its exit or kill (``exit_s``) are reported with its exit
code: a slow exit and a hung one look apart, and a completed run keeps its numbers either way.

``--fit-only`` needs neither Flower nor Ray: K worker processes share the GPU and run exactly
the clients' local Lightning fits of each round (same shards, seeds and Trainer), the server
aggregates and tests on the GPU; the difference from a full run is Flower and Ray's share.
``--check-deterministic`` fits one client twice with ``train.deterministic: true`` (and twice
without) on the GPU and says whether the weights came out bit-identical.

Data: Fashion-MNIST and CIFAR-10 when present (``FEDWS_DATA`` / ``--cifar10 PATH``), else
synthetic images of the same shape and count (timing does not depend on pixel values; the
output says which). Without a GPU it says so and measures nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml
from measure import start_logged, write_json

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
CIFAR_STUDY = REPO / "configs" / "studies" / "bn_vs_ws_cifar10.yaml"
SHAPES = {  # synthetic stand-ins: (train, test, size, channels)
    "fashion_mnist": (60000, 10000, 28, 1),
    "cifar10": (50000, 10000, 32, 3),
}


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    config: dict  # a full config (YAML mapping)
    per_gpu: int
    precision: str


def no_gpu_reason() -> str | None:
    """Why nothing can be measured here, or None when a CUDA GPU is usable."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        build = "a CPU build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
        return f"no GPU: torch {torch.__version__} ({build}) sees no CUDA device"
    return None


def merge(base: dict, dotted: dict) -> dict:
    """``base`` with ``a.b.c: value`` overrides applied (mappings replace mappings)."""
    out = json.loads(json.dumps(base))
    for key, value in dotted.items():
        node, *path, leaf = [out, *key.split(".")]
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def with_data(config: dict, data_root: str | None) -> tuple[dict, str]:
    """``config`` on its real dataset when that loads here, else on synthetic images of its
    shape; returns (config, what the data is)."""
    from app.config import AUGMENTED_BY_DEFAULT, build
    from app.errors import FedwsError
    from app.learn.runtime import dataset

    name = config["data"]["dataset"]
    if data_root:
        config = merge(config, {"data.root": data_root})
    try:
        dataset(build(config).data)
        return config, name
    except (FedwsError, OSError):
        train, test, size, channels = SHAPES[name]
        synthetic = {"train_size": train, "test_size": test, "image_size": size}
        synthetic |= {"channels": channels, "num_classes": 10}
        over = {"data.dataset": "synthetic", "data.synthetic": synthetic, "data.root": None}
        if name in AUGMENTED_BY_DEFAULT and config["data"].get("augment") is None:
            over["data.augment"] = True  # as the real dataset would be
        return merge(config, over), f"synthetic ({name} shape: {train} x {channels}x{size}x{size})"


def settings(rounds: int, per_gpu: list[int], precisions: list[str], cifar10: str | None):
    """The quickstart at each (clients per GPU, precision), then the ResNet-20 study config."""
    quick = yaml.safe_load(QUICKSTART.read_text())
    quick, quick_data = with_data(quick, None)
    out = []
    for precision in precisions:
        for k in per_gpu:
            over = {
                "simulation.num_gpus": 1 / k,
                "train.precision": precision,
                "federation.rounds": rounds,
            }
            name = f"quickstart {k}/GPU {precision}"
            out.append(Setting(name, merge(quick, over), k, precision))
    study = yaml.safe_load(CIFAR_STUDY.read_text())
    resnet = merge(yaml.safe_load(QUICKSTART.read_text()), study["overrides"])
    resnet = merge(resnet, {"model.norm": "ws_gn", "federation.rounds": max(rounds, 5)})
    resnet, resnet_data = with_data(resnet, cifar10 or os.environ.get("FEDWS_DATA"))
    sim = resnet["simulation"]
    k = round(1 / sim["num_gpus"])
    precision = resnet["train"]["precision"]
    out.append(Setting(f"cifar10 resnet20 {k}/GPU {precision}", resnet, k, precision))
    return out, {"quickstart": quick_data, "resnet20": resnet_data}


# --- the GPU's memory and utilisation -------------------------------------------------------


def parse_smi(line: str) -> tuple[float, float] | None:
    """(memory used MiB, utilisation %) from one ``nvidia-smi --query-gpu=memory.used,
    utilization.gpu --format=csv,noheader,nounits`` line, or None when it is not one."""
    parts = [p.strip() for p in line.split(",")]
    try:
        return float(parts[0]), float(parts[1])
    except (ValueError, IndexError):
        return None


class GpuSampler:
    """Reads the first GPU's memory in use and utilisation every ``period`` seconds, each
    sample tagged with ``phase()`` at that moment (the rounds done so far)."""

    def __init__(self, phase, period: float = 0.5) -> None:
        self.phase, self.period = phase, period
        self.samples: list[tuple[int, float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.available = shutil.which("nvidia-smi") is not None

    def _loop(self) -> None:
        query = ["nvidia-smi", "--query-gpu=memory.used,utilization.gpu", "--id=0"]
        query += ["--format=csv,noheader,nounits"]
        while not self._stop.is_set():
            out = subprocess.run(query, capture_output=True, text=True, check=False).stdout
            sample = parse_smi(out.strip().splitlines()[0] if out.strip() else "")
            if sample is not None:
                self.samples.append((self.phase(), *sample))
            self._stop.wait(self.period)

    def __enter__(self) -> GpuSampler:
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.available:
            self._thread.join()

    def summary(self, rounds: int) -> dict[str, float | None]:
        """Peak memory over the whole run; mean utilisation during rounds 2..``rounds`` (once
        round 1 is done, until the last round is: not the exit after it)."""
        later = [u for phase, _, u in self.samples if 1 <= phase < rounds]
        return {
            "gpu_mem_peak_mib": max((m for _, m, _ in self.samples), default=None),
            "gpu_util_mean_pct": statistics.mean(later) if later else None,
            "gpu_samples": len(self.samples),
        }


# --- full runs: fedws run ---------------------------------------------------------------------


def rounds_done(metrics: Path) -> int:
    """The last round in a (running) run's metrics.csv; 0 before round 1 ends."""
    from app import rundir

    try:
        return max((int(r["round"]) for r in rundir.read_csv(metrics)), default=0)
    except (OSError, ValueError, KeyError, TypeError):
        return 0  # not there yet, or a row half written


def s_per_round(metrics: Path) -> tuple[float, float]:
    """(mean round_s of rounds 2.., round 1's round_s) from a run's metrics.csv."""
    from app import rundir

    rows = [r for r in rundir.read_csv(metrics) if int(r["round"]) >= 1]
    later = [float(r["round_s"]) for r in rows if int(r["round"]) >= 2]
    return statistics.mean(later), float(rows[0]["round_s"])


EXIT_GRACE_S = 120  # how long a run that completed may take to exit before it counts as hung


def wait_for_exit(
    proc: subprocess.Popen, timeout: float, completed_at, grace: float = EXIT_GRACE_S
) -> tuple[int | None, float | None]:
    """Wait for ``proc`` (started in a session of its own); ``completed_at()`` is the wall-clock
    time its run completed, or None before. A run that has not completed is killed with its
    processes at ``timeout`` seconds; one that has gets ``grace`` seconds more to exit.
    Returns (its exit code, None if killed; seconds from the run's completion to the exit or
    the kill, None if it never completed)."""
    deadline = time.time() + timeout
    while True:
        code, done = proc.poll(), completed_at()
        limit = deadline if done is None else max(deadline, done + grace)
        if code is None and time.time() > limit:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        elif code is None:
            time.sleep(0.2)
            continue
        return code, None if done is None else time.time() - done


def run_full(setting: Setting, root: Path, timeout: float) -> dict[str, float | None]:
    from app import rundir

    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(setting.config))
    out = root / "run"
    metrics = out / "metrics.csv"
    command = [sys.executable, "-m", "app.tools.cli", "run", str(config), "-o", str(out)]

    def completed_at() -> float | None:
        run = rundir.RunDir(out)
        if (rundir.read_summary(run) or {}).get("status") != rundir.COMPLETED:
            return None
        return run.summary.stat().st_mtime

    start = time.perf_counter()
    log = root / "log.txt"
    with GpuSampler(lambda: rounds_done(metrics)) as gpu:
        # a session of its own: a kill stops Ray's processes too
        proc = start_logged([*command, "--no-progress"], log, REPO)
        code, exit_s = wait_for_exit(proc, timeout, completed_at)
    wall = time.perf_counter() - start
    summary = rundir.read_summary(rundir.RunDir(out)) or {}
    # a run that completed measured its rounds, however its process ended (exit_note says how)
    if exit_s is None and code != 0:
        why = f"killed after {timeout:.0f} s" if code is None else f"exit code {code}"
        raise RuntimeError(f"{setting.name}: fedws run failed ({why}):\n{log.read_text()[-3000:]}")
    later, first = s_per_round(metrics)
    rounds = setting.config["federation"]["rounds"]
    return {
        "s_per_round": later,
        "first_round_s": first,
        "wall_s": None if code is None else wall,
        "exit_s": exit_s,  # from summary.json's completed status to the process's exit (or kill)
        "exit_code": code,  # None: killed
        "exit_hang": exit_s is not None and code is None,
        "final_accuracy": (summary.get("final") or {}).get("test_accuracy"),
        **gpu.summary(rounds),
    }


def exit_note(r: dict) -> str:
    """How a completed run's process ended, for the table's line."""
    if r.get("exit_s") is None:
        return ""
    if r.get("exit_code") is None:
        return f"  (completed; the process had not exited {r['exit_s']:.0f} s later: killed)"
    code = "" if r["exit_code"] == 0 else f" with code {r['exit_code']}"
    return f"  (exited{code} {r['exit_s']:.1f} s after completing)"


# --- fit only: the clients' Lightning fits in K processes, no Flower or Ray -------------------


def _worker(tasks, results, device: str) -> None:
    import torch

    from app.config import build
    from app.learn.runtime import dataset, new_module, round_seed, shard_on
    from app.learn.trainer import make_trainer, quiet_lightning, tensor_loader

    quiet_lightning()
    while (task := tasks.get()) is not None:
        config, server_round, client, state = task
        cfg = build(config)
        local = shard_on(cfg.data, client, torch.device(device))
        module = new_module(cfg, dataset(cfg.data))
        module.model.load_state_dict(state)
        seed = round_seed(cfg, server_round, client)
        torch.manual_seed(seed)
        loader = tensor_loader(local.x_train, local.y_train, cfg.train.batch_size, True, seed)
        start = time.perf_counter()
        make_trainer(cfg, max_epochs=cfg.train.local_epochs).fit(module, loader)
        fit_s = time.perf_counter() - start
        weights = {k: v.detach().cpu() for k, v in module.model.state_dict().items()}
        results.put((client, local.num_train, weights, fit_s))


def run_fit_only(setting: Setting, device: str = "cuda") -> dict[str, float | None]:
    import torch
    import torch.multiprocessing as mp

    from app.config import build
    from app.learn.runtime import dataset, new_module
    from app.learn.trainer import make_trainer, quiet_lightning, tensor_loader

    quiet_lightning()
    cfg = build(setting.config)
    ds = dataset(cfg.data)
    server = new_module(cfg, ds).to(device)
    x_test, y_test = ds.normalize(ds.x_test).to(device), ds.y_test.to(device)
    state = {k: v.cpu() for k, v in server.model.state_dict().items()}
    ctx = mp.get_context("spawn")
    tasks, results = ctx.Queue(), ctx.Queue()
    workers = [
        ctx.Process(target=_worker, args=(tasks, results, device)) for _ in range(setting.per_gpu)
    ]
    for w in workers:
        w.start()
    done = [0]
    times, fits, acc, loss = [], [], None, None
    try:
        with GpuSampler(lambda: done[0]) as gpu:
            for server_round in range(1, cfg.federation.rounds + 1):
                start = time.perf_counter()
                clients = range(cfg.data.partition.num_clients)
                for client in clients:
                    tasks.put((setting.config, server_round, client, state))
                replies = sorted(results.get() for _ in clients)
                total = sum(n for _, n, _, _ in replies)
                state = {
                    k: sum(w[k].float() * (n / total) for _, n, w, _ in replies).to(v.dtype)
                    for k, v in state.items()
                }
                server.model.load_state_dict(state)
                last = server_round == cfg.federation.rounds
                if server_round % cfg.server.eval_every == 0 or last:
                    loader = tensor_loader(x_test, y_test, cfg.train.eval_batch_size)
                    (metrics,) = make_trainer(cfg).test(server, loader, verbose=False)
                    acc, loss = float(metrics["test_acc"]), float(metrics["test_loss"])
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
                fits.append(sum(f for _, _, _, f in replies))
                done[0] = server_round
    finally:
        for _ in workers:
            tasks.put(None)
        for w in workers:
            w.join(timeout=60)
    return {
        "s_per_round": statistics.mean(times[1:]),
        "first_round_s": times[0],
        "fit_s_sum_per_round": statistics.mean(fits[1:]),
        "final_accuracy": acc,
        "final_loss": loss,
        **gpu.summary(cfg.federation.rounds),
    }


# --- determinism on the GPU ------------------------------------------------------------------


def _fit_once(config: dict, results) -> None:
    import torch

    from app.config import build
    from app.learn.runtime import dataset, new_module, round_seed, shard_on
    from app.learn.trainer import make_trainer, quiet_lightning, tensor_loader

    quiet_lightning()
    cfg = build(config)
    local = shard_on(cfg.data, 0, torch.device("cuda"))
    module = new_module(cfg, dataset(cfg.data))
    seed = round_seed(cfg, 1, 0)
    torch.manual_seed(seed)
    loader = tensor_loader(local.x_train, local.y_train, cfg.train.batch_size, True, seed)
    make_trainer(cfg, max_epochs=1).fit(module, loader)
    results.put({k: v.detach().cpu() for k, v in module.model.state_dict().items()})


def check_deterministic(config: dict) -> dict[str, bool]:
    """Whether two fits (each in a fresh process) give bit-identical weights, with and without
    ``train.deterministic``."""
    import torch
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = {}
    for deterministic in (True, False):
        cfg = merge(config, {"train.deterministic": deterministic})
        weights = []
        for _ in range(2):
            results = ctx.Queue()
            proc = ctx.Process(target=_fit_once, args=(cfg, results))
            proc.start()
            weights.append(results.get())
            proc.join()
        same = all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
        out[f"bit_identical_deterministic_{str(deterministic).lower()}"] = same
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    parser.add_argument("--rounds", type=int, default=4, help="rounds per run (>= 2)")
    parser.add_argument("--clients-per-gpu", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--precision", nargs="+", default=["32-true", "bf16-mixed"])
    parser.add_argument("--cifar10", help="CIFAR-10 folder (else FEDWS_DATA, else synthetic)")
    parser.add_argument("--fit-only", action="store_true", help="no Flower or Ray: see above")
    parser.add_argument("--check-deterministic", action="store_true")
    parser.add_argument(
        "--timeout",
        type=float,
        default=600,
        help="seconds a fedws run may take to complete (a completed run's process gets "
        f"{EXIT_GRACE_S} s more to exit)",
    )
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be >= 2 (round 1 is not counted)")
    reason = no_gpu_reason()
    if reason is not None:
        print(f"{reason}; nothing measured (this benchmark needs a CUDA GPU)")
        write_json(args.json, {"gpu": None, "reason": reason})
        return
    import torch

    sys.path.insert(0, str(REPO))
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    runs, data = settings(args.rounds, args.clients_per_gpu, args.precision, args.cifar10)
    gpu = torch.cuda.get_device_name(0)
    mode = "fit only (no Flower or Ray)" if args.fit_only else "fedws run (Flower simulation)"
    print(f"{gpu}, torch {torch.__version__}, {os.cpu_count()} CPUs; {mode}; data: {data}")
    result: dict = {"gpu": gpu, "torch": torch.__version__, "mode": mode, "data": data}
    result["cpus"], result["rounds"], result["settings"] = os.cpu_count(), args.rounds, {}
    head = f"{'setting':<34} {'s/round':>8} {'round 1 s':>9} {'GPU MiB':>8} {'util %':>6}"
    print(head, flush=True)
    for setting in runs:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                if args.fit_only:
                    r = run_fit_only(setting)
                else:
                    r = run_full(setting, Path(tmp), args.timeout)
            except RuntimeError as err:
                print(err, flush=True)
                result["settings"][setting.name] = {"error": str(err)[-2000:]}
                continue
        result["settings"][setting.name] = r
        mem, util = r["gpu_mem_peak_mib"], r["gpu_util_mean_pct"]
        print(
            f"{setting.name:<34} {r['s_per_round']:>8.2f} {r['first_round_s']:>9.2f} "
            f"{mem if mem is not None else float('nan'):>8.0f} "
            f"{util if util is not None else float('nan'):>6.0f}" + exit_note(r),
            flush=True,
        )
    if args.check_deterministic:
        result["determinism"] = check_deterministic(runs[0].config)
        print(f"determinism on the GPU: {result['determinism']}")
    write_json(args.json, result)


if __name__ == "__main__":
    main()
