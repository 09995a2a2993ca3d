"""A client's cost per optimizer step against a plain PyTorch loop doing the same steps.

``python benchmarks/step.py [--json PATH] [--repeats 7] [--agc LAMBDA] [--device cpu|cuda]``

The same model (built and seeded as a fedws client builds it), shard, batches (the client's
seeded sampler), optimizer and precision on the same device, fitted four ways, interleaved
within every repeat:

- ``plain``: the floor, a ``for x, y in batches`` loop over batches gathered beforehand;
- ``plain+loader``: the same loop over fedws's ``tensor_loader`` (batch preparation);
- ``fedws``: ``Trainer.fit`` of the ``FedwsClassifier`` with fedws's Trainer settings (the
  Lightning loop, its hooks, the module's per-step work, its own optimizer step);
- ``fedws automatic``: the same module with Lightning's automatic optimization taking the step
  (its closure and the precision plugin's wrapping; the module's other per-step savings stay):
  ``step_ratio_automatic``;
- with ``--agc``, adaptive gradient clipping on both sides.

Each is timed at two step counts; a line through them splits its time into a fixed cost per fit
(Trainer set-up, the loop's start and end) and a cost per step. ``cpu_step_ratio`` is fedws's
per-step cost over the plain loop's on the CPU with a model so small (``cnn`` width 4, batch 16)
that the arithmetic is negligible and the ratio shows the host's overhead. What a client pays
once per round beyond its steps (``cpu_client_fixed_s``): the config read from the message, the
model built, its global arrays loaded, the Trainer built, the fit's own start and end (a
one-step fit less the plain loop's one step), the reply's state copied back; each part's median
over the repeats (the lines' intercepts, ``fixed_per_fit_s``, are too noisy for this). On a
GPU (``--device cuda``) the quickstart model at batch 32 gives ``gpu_step_ratio``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import measure

from app.config import build, dump_config
from app.learn import agc
from app.learn.classifier import FedwsClassifier
from app.learn.runtime import config_from_text, dataset, new_module, shard
from app.learn.state import load_partial, select, state_policy
from app.learn.trainer import make_trainer, quiet_lightning, tensor_loader

SHORT, LONG = 40, 160  # steps of the two fits a line is drawn through


def settings(device: str, agc_clip: float | None, image_size: int | None = None) -> dict:
    """CPU: a tiny model (the host's cost shows); GPU: the quickstart model at batch 32.
    ``image_size``: the synthetic images' side instead (smaller: less arithmetic a step)."""
    tiny = device == "cpu"
    raw = {
        "seed": 0,
        "data": {
            "dataset": "synthetic",
            "synthetic": {
                "train_size": 4000,
                "test_size": 100,
                "image_size": image_size or (28 if not tiny else 14),
            },
            "partition": {"kind": "iid", "num_clients": 1},
            "val_fraction": 0.0,
        },
        "model": {"arch": "cnn", "norm": "ws_gn", "width": 4 if tiny else 16},
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "agc_clip": agc_clip},
        "train": {"batch_size": 16 if tiny else 32},
    }
    return raw


class AutomaticStep(FedwsClassifier):
    """fedws's module with Lightning's automatic optimization (its closure, the precision
    plugin's wrapping, the clipping hook) taking the step, as fedws did before 0.2; the rest
    of the module is today's."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.automatic_optimization = True

    def training_step(self, batch, batch_idx):
        return self.training_loss(batch)


def automatic(module: FedwsClassifier) -> AutomaticStep:
    twin = AutomaticStep(**module.hparams)
    twin.load_state_dict(module.state_dict())
    return twin


def fit_fedws(cfg, module, loader, steps: int) -> float:
    trainer = make_trainer(cfg, max_steps=steps, max_epochs=-1)
    start = time.perf_counter()
    trainer.fit(module, loader)
    _sync(module.device)
    return time.perf_counter() - start


def fit_plain(module, batches, steps: int, clip: float | None, device) -> float:
    """The floor: the same steps in a plain loop (the module's own optimizer settings)."""
    model = module.model.to(device).train()
    opt = module.configure_optimizers()
    start = time.perf_counter()
    done = 0
    while done < steps:
        for x, y in batches:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            if clip:
                agc.clip_gradients(agc.clipped_parameters(model), clip)
            opt.step()
            done += 1
            if done == steps:
                break
    _sync(device)
    return time.perf_counter() - start


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def line(short: list[float], long: list[float]) -> tuple[float, float]:
    """(fixed seconds per fit, seconds per step) from the medians at SHORT and LONG steps."""
    a = measure.summary(short)["median"]
    b = measure.summary(long)["median"]
    per_step = (b - a) / (LONG - SHORT)
    return a - SHORT * per_step, per_step


def client_fixed(cfg, text: str, device, loader, batches) -> dict[str, float]:
    """What one client pays per round besides its steps, each part timed once per repeat."""
    parts = {}
    start = time.perf_counter()
    config_from_text.cache_clear()
    config_from_text(text)
    parts["config"] = time.perf_counter() - start
    ds = dataset(cfg.data)
    start = time.perf_counter()
    module = new_module(cfg, ds)
    parts["model"] = time.perf_counter() - start
    policy = state_policy(module.model, cfg.federation.strategy)
    arrays = select(module.model.state_dict(), policy.travel)
    start = time.perf_counter()
    load_partial(module.model, arrays, policy.travel)
    module.to(device)
    parts["arrays_in"] = time.perf_counter() - start
    start = time.perf_counter()
    make_trainer(cfg, max_steps=1, max_epochs=-1)
    parts["trainer"] = time.perf_counter() - start
    start = time.perf_counter()
    {k: v.detach().cpu() for k, v in module.model.state_dict().items()}
    parts["arrays_out"] = time.perf_counter() - start
    # the fit's own start and end: a one-step fit, less the plain loop's one step
    parts["fit_start_end"] = fit_fedws(cfg, module, loader, 1) - fit_plain(
        new_module(cfg, ds).to(device), batches, 1, cfg.optim.agc_clip, device
    )
    return parts


def measure_device(
    device: str, repeats: int, agc_clip: float | None, image_size: int | None = None
) -> dict:
    quiet_lightning()
    torch.set_num_threads(1)  # a simulated client's process
    cfg = build(settings(device, agc_clip, image_size))
    text = dump_config(cfg)
    local = shard(cfg.data, 0)
    x, y = local.x_train.to(device), local.y_train.to(device)
    loader = tensor_loader(x, y, cfg.train.batch_size, shuffle=True, seed=1)
    batches = [(bx, by) for bx, by in loader]
    times: dict[str, dict[int, list[float]]] = {
        k: {SHORT: [], LONG: []} for k in ("plain", "plain+loader", "fedws automatic", "fedws")
    }
    fixed: dict[str, list[float]] = {}
    clip = cfg.optim.agc_clip
    for r in range(repeats + 1):  # the first round warms up (allocator, Lightning's imports)
        order = (SHORT, LONG) if r % 2 == 0 else (LONG, SHORT)
        for steps in order:
            module = new_module(cfg, dataset(cfg.data)).to(device)
            t_plain = fit_plain(module, batches, steps, clip, device)
            module = new_module(cfg, dataset(cfg.data)).to(device)
            t_loader = fit_plain(module, loader, steps, clip, device)
            module = new_module(cfg, dataset(cfg.data))
            twin = automatic(module)
            if r % 2 == 0:  # either goes first in turn
                t_auto = fit_fedws(cfg, twin, loader, steps)
                t_fedws = fit_fedws(cfg, module, loader, steps)
            else:
                t_fedws = fit_fedws(cfg, module, loader, steps)
                t_auto = fit_fedws(cfg, twin, loader, steps)
            if r:
                times["plain"][steps].append(t_plain)
                times["plain+loader"][steps].append(t_loader)
                times["fedws automatic"][steps].append(t_auto)
                times["fedws"][steps].append(t_fedws)
        if r:
            for k, v in client_fixed(cfg, text, device, loader, batches).items():
                fixed.setdefault(k, []).append(v)
    fits = {k: line(v[SHORT], v[LONG]) for k, v in times.items()}
    plain_step, fedws_step = fits["plain"][1], fits["fedws"][1]

    prep = {k: measure.summary(v)["median"] for k, v in fixed.items()}
    return {
        "device": device,
        "settings": {
            "model": f"cnn width {cfg.model.width} + {cfg.model.norm}",
            "image_size": cfg.data.synthetic.image_size,
            "batch": cfg.train.batch_size,
            "agc_clip": clip,
            "steps": [SHORT, LONG],
            "repeats": repeats,
            "threads": torch.get_num_threads(),
        },
        "per_step_ms": {k: 1e3 * step for k, (_, step) in fits.items()},
        "fixed_per_fit_s": {k: fixed_s for k, (fixed_s, _) in fits.items()},
        "medians_s": {
            k: {str(s): measure.summary(v)["median"] for s, v in by_steps.items()}
            for k, by_steps in times.items()
        },
        "spread_pct": {
            k: {str(s): measure.spread_pct(v) for s, v in by_steps.items()}
            for k, by_steps in times.items()
        },
        "step_ratio": fedws_step / plain_step,
        "step_ratio_automatic": fits["fedws automatic"][1] / plain_step,
        "parts_ms_per_step": {
            "batch preparation (tensor_loader over pre-gathered batches)": 1e3
            * (fits["plain+loader"][1] - plain_step),
            "Lightning's loop, hooks and the module's step (beyond plain+loader)": 1e3
            * (fedws_step - fits["plain+loader"][1]),
            "Lightning's automatic optimization (closure, precision wrapping, clipping hook)": 1e3
            * (fits["fedws automatic"][1] - fedws_step),
        },
        "client_prep_s": prep,
        "client_fixed_s": sum(prep.values()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--agc", type=float, default=None, help="AGC lambda on both sides")
    parser.add_argument(
        "--image-size", type=int, default=None, help="image side (default: CPU 14, GPU 28)"
    )
    parser.add_argument("--device", choices=("cpu", "cuda", "both"), default="both")
    args = parser.parse_args(argv)
    results: dict = {}
    devices = ["cpu", "cuda"] if args.device == "both" else [args.device]
    for device in devices:
        if device == "cuda" and not torch.cuda.is_available():
            print("no GPU here: the GPU step ratio is not measured", flush=True)
            continue
        got = measure_device(device, args.repeats, args.agc, args.image_size)
        results[device] = got
        print(json.dumps(got, indent=2), flush=True)
    if "cpu" in results:
        results["cpu_step_ratio"] = results["cpu"]["step_ratio"]
        results["cpu_step_ratio_automatic"] = results["cpu"]["step_ratio_automatic"]
        results["cpu_client_fixed_s"] = results["cpu"]["client_fixed_s"]
    if "cuda" in results:
        results["gpu_step_ratio"] = results["cuda"]["step_ratio"]
        results["gpu_client_fixed_s"] = results["cuda"]["client_fixed_s"]
    summary = {k: v for k, v in results.items() if not isinstance(v, dict)}
    print(json.dumps(summary, indent=2))
    measure.write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
