"""The server's global test on CPU: fedws's Lightning test (batches of ``train.eval_batch_size``
run through the model in passes of ``CPU_EVAL_CHUNK`` samples) against the same test in one
pass per batch, and a plain PyTorch loop at several batch sizes; interleaved, in one process.

Workload: the federation benchmark's model (``cnn`` + ``ws_gn``, width 32) on the 10,000
Fashion-MNIST test images (synthetic images of the same shape without the Debian package),
all threads of this machine.

    python benchmarks/evaluation.py [--repeats 5] [--json PATH]

JSON keys: fedws_test_s (Lightning test, passes), one_pass_test_s (Lightning test, one pass per
batch), plain_s_by_batch ({batch: seconds}), speedup (one_pass / fedws), same_metrics (the two
Lightning tests' loss and accuracy, in every repeat, compared bit for bit); seconds are
medians with the spread.
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from federation import workload
from measure import summary, write_json

from app.learn import classifier
from app.learn.runtime import dataset, new_module, shard
from app.learn.trainer import make_trainer, quiet_lightning, tensor_loader

BATCHES = (32, 128, 256, 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="interleaved runs of each side")
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    quiet_lightning()
    warnings.filterwarnings("ignore")
    cfg = workload(rounds=1)
    ds = dataset(cfg.data)
    module = new_module(cfg, ds)
    s = shard(cfg.data, 0)  # one client's epoch: a model whose accuracy is not chance
    make_trainer(cfg, max_epochs=1).fit(module, tensor_loader(s.x_train, s.y_train, 32, True))
    model = module.model.eval()
    x, y = ds.normalize(ds.x_test), ds.y_test
    batch = cfg.train.eval_batch_size
    chunk = classifier.CPU_EVAL_CHUNK
    print(
        f"test: {len(y)} images ({cfg.data.dataset}), cnn + ws_gn, eval batch {batch}, passes of "
        f"{chunk}; torch {torch.__version__}, {torch.get_num_threads()} threads",
        flush=True,
    )

    def lightning(passes: int) -> dict:
        classifier.CPU_EVAL_CHUNK = passes
        try:
            (metrics,) = make_trainer(cfg).test(module, tensor_loader(x, y, batch), verbose=False)
        finally:
            classifier.CPU_EVAL_CHUNK = chunk
        return metrics

    def plain(size: int) -> None:
        with torch.inference_mode():
            for xb, yb in zip(x.split(size), y.split(size), strict=True):
                (model(xb).argmax(1) == yb).sum().item()

    seconds: dict[str, list[float]] = defaultdict(list)
    metrics = {}
    sides = [("fedws", lambda: lightning(chunk)), ("one_pass", lambda: lightning(batch))]
    sides += [(f"plain_{b}", lambda b=b: plain(b)) for b in BATCHES]
    for repeat in range(args.repeats):
        for name, run in sides if repeat % 2 == 0 else sides[::-1]:  # each side first in turn
            start = time.perf_counter()
            out = run()
            seconds[name].append(time.perf_counter() - start)
            if out is not None:
                metrics.setdefault(name, []).append(out)
        print(
            f"[{repeat + 1}/{args.repeats}] "
            + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in seconds.items()),
            flush=True,
        )
    stats = {k: summary(v) for k, v in seconds.items()}
    for name, s in stats.items():
        print(f"{name:<12} {s['median']:7.3f} s ({s['min']:.3f}-{s['max']:.3f})")
    same = metrics["fedws"] == metrics["one_pass"] and len(set(map(str, metrics["fedws"]))) == 1
    speedup = stats["one_pass"]["median"] / stats["fedws"]["median"]
    print(f"one pass / passes = {speedup:.2f}; same loss and accuracy bit for bit: {same}")
    write_json(
        args.json,
        {
            "fedws_test_s": stats["fedws"],
            "one_pass_test_s": stats["one_pass"],
            "plain_s_by_batch": {b: stats[f"plain_{b}"] for b in BATCHES},
            "speedup": speedup,
            "same_metrics": same,
            "metrics": metrics["fedws"][0],
            "eval_batch_size": batch,
            "chunk": chunk,
            "dataset": cfg.data.dataset,
            "threads": torch.get_num_threads(),
            "repeats": args.repeats,
        },
    )


if __name__ == "__main__":
    main()
