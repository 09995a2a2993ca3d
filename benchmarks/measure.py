"""What the benchmarks share: robust summaries of repeated timings, the processes running
(the one walk of /proc, which the tests use too), stopping a process group, free ports on
127.0.0.1 and waiting for one to listen (the tests' too), the memory of a process tree (a run's
driver, Ray's processes, its client actors), and writing the results as JSON."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


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


def memory_mb(pid: int | str) -> tuple[float, float]:
    """(RSS, PSS) of one process in MB; PSS counts a page shared by n processes as 1/n, so
    the PSS of a process tree adds up to the memory it really holds."""
    rss = pss = 0.0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1]) / 1024
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1]) / 1024
    except OSError:
        pass
    return rss, pss


@dataclass(frozen=True)
class Process:
    pid: int
    ppid: int  # its parent
    pgid: int  # its process group
    state: str  # R running, S sleeping, ..., Z a zombie (ended, its parent has not reaped it)


def processes() -> list[Process]:
    """The processes of this machine now, from /proc (one that ends meanwhile is left out)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # after the command name in parentheses (which may hold spaces): state, ppid, pgid
        state, ppid, pgid = stat.rsplit(")", 1)[1].split()[:3]
        found.append(Process(int(entry.name), int(ppid), int(pgid), state))
    return found


def command_line(pid: int) -> bytes:
    """The command line of ``pid``, its arguments NUL-separated; empty for a zombie or a
    process that has ended."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def pids_with(*markers: str) -> list[int]:
    """PIDs of the processes whose command line contains every one of ``markers``."""
    wanted = [m.encode() for m in markers]
    return [p.pid for p in processes() if all(m in command_line(p.pid) for m in wanted)]


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs (zombies waiting for a reaper do not)."""
    return any(p.pgid == pgid and p.state != "Z" for p in processes())


def stop_process_group(pgid: int, grace_s: float = 15) -> None:
    """SIGTERM every process of group ``pgid``; SIGKILL what still runs after ``grace_s``."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and _group_alive(pgid):
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def start_logged(
    command: list[str], log: Path, cwd: Path, env: dict[str, str] | None = None, append=False
) -> subprocess.Popen:
    """Start ``command`` in a session of its own (its process group is its pid, so
    ``stop_process_group(proc.pid)`` reaches every process it starts), its stdout and stderr
    written to ``log`` (appended to with ``append``)."""
    with open(log, "a" if append else "w") as out:
        return subprocess.Popen(
            command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def free_port(count: int = 1) -> int:
    """A free port on 127.0.0.1 such that the ``count - 1`` ports after it are free too."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + count <= 65535 and all(_free(base + i) for i in range(1, count)):
            return base


def _free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def wait_for_port(port: int, timeout: float = 60) -> None:
    """Return once something listens on 127.0.0.1:``port``; ``TimeoutError`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _free(port):
            return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for p in processes():
        kids.setdefault(p.ppid, []).append(p.pid)
    return kids


def tree_memory_mb(root: int) -> tuple[float, float]:
    """(RSS, PSS) of ``root`` and all its descendants (Ray's raylet, GCS and workers
    included): the RSS sum counts shared pages (torch's libraries, Ray's object store) once
    per process, the PSS sum once."""
    kids, rss, pss, todo = _children(), 0.0, 0.0, [root]
    while todo:
        pid = todo.pop()
        r, p = memory_mb(pid)
        rss, pss = rss + r, pss + p
        todo += kids.get(pid, [])
    return rss, pss


def run_with_peak_memory(command: list[str], cwd: Path, log: Path, poll_s: float = 0.5):
    """Run ``command``; return (exit code, wall seconds, peak RSS sum, peak PSS sum of its
    process tree in MB)."""
    peak = [0.0, 0.0]
    with open(log, "w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                rss, pss = tree_memory_mb(proc.pid)
                peak[0], peak[1] = max(peak[0], rss), max(peak[1], pss)
                done.wait(poll_s)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        code = proc.wait()
        wall = time.perf_counter() - start
        done.set()
        watcher.join()
    return code, wall, peak[0], peak[1]


def write_json(path: Path | None, result: Any) -> None:
    """Write a benchmark's ``result`` as indented JSON to ``path`` (its ``--json``), if given."""
    if path is not None:
        path.write_text(json.dumps(result, indent=2))
