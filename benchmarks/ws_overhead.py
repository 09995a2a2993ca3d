"""What Weight Standardization costs: ``WSConv2d`` against ``nn.Conv2d`` with the same weights.

Train mode: forward + backward (the standardization is recomputed and differentiated every
step). Eval mode: forward under ``torch.inference_mode`` (the standardized weight is cached).
Both layers are timed side by side in this one process: a sample gives each layer about 0.3 s
of calls, in blocks of about 20 ms that alternate between the layers (ABBA order), so a change
in machine load within the sample hits both alike; a shape's ratio is the median over the
samples of WS time / conv time within each sample, with its spread (min, max).

    python benchmarks/ws_overhead.py [--json PATH] [--repeats N]

JSON keys: ``train_ratio`` and ``eval_ratio`` (the worst shape's median ratio), ``rows`` (every
shape: medians of the times, the ratio's median, min and max). Targets on 2 CPU cores: train
<= 1.10, eval <= 1.02; three runs agree within 2%.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
from measure import write_json
from torch import nn

from app.nn.layers import WSConv2d

SAMPLE_S = 0.3  # seconds of each side per sample
BLOCK_S = 0.02  # the sides alternate at this grain within a sample

# (in channels, out channels, spatial size, batch)
SHAPES = [
    (16, 32, 28, 32),
    (16, 32, 28, 128),
    (64, 64, 32, 32),
    (64, 64, 32, 128),
]


def _time(fn, iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


def measure(cin: int, cout: int, size: int, batch: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    ws = WSConv2d(cin, cout, 3, padding=1, bias=False)
    ws.load_state_dict(conv.state_dict())
    x = torch.randn(batch, cin, size, size)
    x_grad = x.clone().requires_grad_(True)

    def train_step(layer: nn.Module):
        def step():
            layer.zero_grad(set_to_none=True)
            layer(x_grad).sum().backward()

        return step

    def eval_step(layer: nn.Module):
        def step():
            with torch.inference_mode():
                layer(x)

        return step

    results = {}
    for mode, make in (("train", train_step), ("eval", eval_step)):
        conv.train(mode == "train"), ws.train(mode == "train")
        steps = {"conv": make(conv), "ws": make(ws)}
        for step in steps.values():  # warm-up (and the eval cache)
            _time(step, 3)
        per_call = _time(steps["conv"], 5)
        block = max(1, round(BLOCK_S / per_call))  # calls per block
        blocks = max(2, 2 * round(SAMPLE_S / (2 * block * per_call)))  # blocks per sample
        base, std, ratios = [], [], []
        for r in range(repeats):
            spent = {"conv": 0.0, "ws": 0.0}
            for j in range(blocks):  # the sides alternate block by block, in ABBA order
                for side in ("conv", "ws") if (j + r) % 2 == 0 else ("ws", "conv"):
                    spent[side] += _time(steps[side], block) * block
            base.append(spent["conv"] / (blocks * block))
            std.append(spent["ws"] / (blocks * block))
            ratios.append(spent["ws"] / spent["conv"])
        results[f"{mode}_conv_ms"] = 1000 * statistics.median(base)
        results[f"{mode}_ws_ms"] = 1000 * statistics.median(std)
        results[f"{mode}_ratio"] = statistics.median(ratios)
        results[f"{mode}_ratio_min"], results[f"{mode}_ratio_max"] = min(ratios), max(ratios)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()

    rows = []
    header = f"{'shape':>26}  {'train conv':>10} {'train WS':>9} {'ratio (min-max)':>21}"
    header += f"  {'eval conv':>9} {'eval WS':>8} {'ratio (min-max)':>21}"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}")
    print(header)
    for cin, cout, size, batch in SHAPES:
        r = measure(cin, cout, size, batch, args.repeats)
        shape = f"{cin}->{cout} @{size}x{size} b{batch}"
        rows.append({"shape": shape, **r})
        print(
            f"{shape:>26}  {r['train_conv_ms']:>8.3f}ms {r['train_ws_ms']:>7.3f}ms "
            f"{r['train_ratio']:>6.3f} ({r['train_ratio_min']:.3f}-{r['train_ratio_max']:.3f})"
            f"  {r['eval_conv_ms']:>7.3f}ms {r['eval_ws_ms']:>6.3f}ms "
            f"{r['eval_ratio']:>6.3f} ({r['eval_ratio_min']:.3f}-{r['eval_ratio_max']:.3f})",
            flush=True,
        )
    summary = {
        "train_ratio": max(r["train_ratio"] for r in rows),
        "eval_ratio": max(r["eval_ratio"] for r in rows),
        "rows": rows,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    print(
        f"worst shape: train ratio {summary['train_ratio']:.3f} (target <= 1.10), "
        f"eval ratio {summary['eval_ratio']:.3f} (target <= 1.02)"
    )
    write_json(args.json, summary)


if __name__ == "__main__":
    main()
