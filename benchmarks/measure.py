"""What the benchmarks share: robust summaries of repeated timings, and the memory of a
process tree (a run's driver, Ray's processes, its client actors)."""

from __future__ import annotations

import statistics
import subprocess
import threading
import time
from pathlib import Path


def summary(values: list[float]) -> dict[str, float]:
    """Median, spread (min, max) and count of repeated measurements."""
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def spread_pct(values: list[float]) -> float:
    """(max - min) / median, in percent."""
    return 100 * (max(values) - min(values)) / statistics.median(values)


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def tree_rss_mb(root: int) -> float:
    """RSS of ``root`` and all its descendants (Ray's raylet, GCS and workers included)."""
    kids, total, todo = _children(), 0.0, [root]
    while todo:
        pid = todo.pop()
        total += rss_mb(pid)
        todo += kids.get(pid, [])
    return total


def run_with_peak_rss(command: list[str], cwd: Path, log: Path, poll_s: float = 0.5):
    """Run ``command``; return (exit code, wall seconds, peak RSS of its process tree in MB)."""
    peak = [0.0]
    with open(log, "w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], tree_rss_mb(proc.pid))
                done.wait(poll_s)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        code = proc.wait()
        wall = time.perf_counter() - start
        done.set()
        watcher.join()
    return code, wall, peak[0]
