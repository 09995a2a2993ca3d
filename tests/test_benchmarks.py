"""The benchmark scripts' own logic: robust summaries, the GPU script's detection, settings,
nvidia-smi parsing and its fit-only federation (run on the CPU here), the federation floor."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu  # noqa: E402
import measure  # noqa: E402

from app.config import build  # noqa: E402
from app.learn.runtime import dataset, new_module, round_seed, shard  # noqa: E402
from app.learn.trainer import make_trainer, tensor_loader  # noqa: E402


def test_summary_is_median_and_spread():
    s = measure.summary([3.0, 1.0, 2.0, 10.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (2.5, 1.0, 10.0, 4)
    assert measure.spread_pct([9.0, 10.0, 11.0]) == pytest.approx(20.0)


def test_the_process_walk_finds_a_child_by_command_line_parent_and_group():
    marker = f"fedws-walk-{time.monotonic_ns()}"  # in the child's command line only
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", marker], start_new_session=True
    )
    try:
        deadline = time.monotonic() + 10
        while not measure.pids_with(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert measure.pids_with(marker, "time.sleep") == [child.pid]
        assert measure.pids_with(marker, "not in it") == []
        (me,) = [p for p in measure.processes() if p.pid == child.pid]
        assert (me.ppid, me.pgid) == (os.getpid(), child.pid) and me.state != "Z"
        assert measure.command_line(child.pid).split(b"\0")[-2] == marker.encode()
        assert measure.tree_memory_mb(os.getpid())[0] > measure.memory_mb(os.getpid())[0]
    finally:
        child.kill()
        child.wait()
    assert measure.pids_with(marker) == [] and measure.command_line(child.pid) == b""


def test_results_go_to_json_only_when_asked(tmp_path):
    measure.write_json(None, {"a": 1})  # no --json: nothing written, no error
    measure.write_json(tmp_path / "r.json", {"a": 1, "b": [0.5]})
    assert (tmp_path / "r.json").read_text() == '{\n  "a": 1,\n  "b": [\n    0.5\n  ]\n}'


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
@pytest.mark.slow  # runs the script in a process of its own
def test_gpu_script_says_there_is_no_gpu(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--json", str(out)],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    assert "no GPU" in proc.stdout and "nothing measured" in proc.stdout
    assert '"gpu": null' in out.read_text()


def test_parse_smi():
    assert gpu.parse_smi("1234, 56") == (1234.0, 56.0)
    assert gpu.parse_smi("[N/A], 3") is None
    assert gpu.parse_smi("") is None


def test_settings_cover_clients_per_gpu_and_precision():
    runs, data = gpu.settings(3, [1, 4, 8], ["32-true", "bf16-mixed"], None)
    quick = [r for r in runs if r.name.startswith("quickstart")]
    assert [(r.per_gpu, r.precision) for r in quick] == [
        (k, p) for p in ("32-true", "bf16-mixed") for k in (1, 4, 8)
    ]
    for r in quick:
        assert r.config["simulation"]["num_gpus"] == pytest.approx(1 / r.per_gpu)
        assert r.config["train"]["precision"] == r.precision
        assert r.config["federation"]["rounds"] == 3
        assert r.config["model"] == {"arch": "cnn", "norm": "ws_gn", "width": 16}
    resnet = runs[-1]
    assert resnet.config["model"]["arch"] == "resnet20" and resnet.per_gpu == 4
    assert resnet.config["train"]["precision"] == "bf16-mixed"
    if "synthetic" in data["resnet20"]:  # CIFAR-10 absent: its shape, augmented like it
        synth = resnet.config["data"]["synthetic"]
        assert (synth["train_size"], synth["image_size"], synth["channels"]) == (50000, 32, 3)
        assert resnet.config["data"]["augment"] is True


@pytest.mark.slow  # starts the fit-only benchmark's worker processes
def test_fit_only_federation_is_fedavg_of_the_clients_fits():
    """Its K worker processes train each client as a fedws client does (shard, seed, Trainer)
    and the server averages them: the same global model as an in-process FedAvg."""
    config = {
        "seed": 0,
        "data": {
            "dataset": "synthetic",
            "val_fraction": 0.0,
            "synthetic": {"train_size": 400, "test_size": 200, "image_size": 16},
            "partition": {"kind": "dirichlet", "alpha": 0.5, "num_clients": 4},
        },
        "model": {"arch": "cnn", "norm": "ws_gn", "width": 8},
        "train": {"batch_size": 32},
        "federation": {"rounds": 2},
    }
    r = gpu.run_fit_only(gpu.Setting("tiny", config, per_gpu=2, precision="32-true"), "cpu")
    assert r["s_per_round"] > 0 and r["fit_s_sum_per_round"] > 0
    assert r["gpu_mem_peak_mib"] is None  # no nvidia-smi here: nothing claimed

    cfg = build(config)
    ds = dataset(cfg.data)
    server = new_module(cfg, ds)
    state = server.model.state_dict()
    for rnd in (1, 2):
        replies = []
        for c in range(4):
            module = new_module(cfg, ds)
            module.model.load_state_dict(state)
            s, seed = shard(cfg.data, c), round_seed(cfg, rnd, c)
            torch.manual_seed(seed)
            loader = tensor_loader(s.x_train, s.y_train, 32, True, seed)
            make_trainer(cfg, max_epochs=1).fit(module, loader)
            replies.append((s.num_train, module.model.state_dict()))
        total = sum(n for n, _ in replies)
        state = {k: sum(w[k].float() * (n / total) for n, w in replies) for k in state}
    server.model.load_state_dict(state)
    loader = tensor_loader(ds.normalize(ds.x_test), ds.y_test, 256)
    (metrics,) = make_trainer(cfg).test(server, loader, verbose=False)
    assert r["final_loss"] == pytest.approx(metrics["test_loss"], rel=1e-5)
    assert r["final_accuracy"] == pytest.approx(metrics["test_acc"])


@pytest.mark.slow  # starts the floor's worker processes
def test_the_federation_floor_averages_what_its_workers_trained():
    """The floor's worker processes send each client's weights back as they were after that
    client's fit (not as the worker's model is later): the same global model as the floor run
    in one process, up to the float sums of a different thread count."""
    import federation

    cfg = build(
        {
            "seed": 0,
            "data": {
                "dataset": "synthetic",
                "val_fraction": 0.0,
                "synthetic": {"train_size": 600, "test_size": 200, "image_size": 16},
                "partition": {"kind": "iid", "num_clients": federation.CLIENTS},
            },
            "model": {"arch": "cnn", "norm": "ws_gn", "width": 8},
            "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
            "train": {"batch_size": 16},
            "federation": {"rounds": 2},
        }
    )
    models = []
    for processes in (2, 0):
        floor = federation.Floor(cfg, processes)
        try:
            floor.run()
        finally:
            floor.close()
        models.append(floor.model.state_dict())
    for key, value in models[0].items():
        torch.testing.assert_close(value, models[1][key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("before", [None, "3"])
def test_the_federation_benchmarks_niceness_side_sets_rays_setting_and_restores_it(
    monkeypatch, before
):
    import federation

    if before is None:
        monkeypatch.delenv(federation.WORKER_NICENESS, raising=False)
    else:
        monkeypatch.setenv(federation.WORKER_NICENESS, before)
    with pytest.raises(KeyboardInterrupt), federation.ray_niceness(15):
        assert os.environ[federation.WORKER_NICENESS] == "15"
        raise KeyboardInterrupt  # an interrupted run restores it too
    assert os.environ.get(federation.WORKER_NICENESS) == before
    with federation.ray_niceness(None):  # Ray's own default, whatever was exported
        assert federation.WORKER_NICENESS not in os.environ
    assert os.environ.get(federation.WORKER_NICENESS) == before


def test_the_step_benchmarks_automatic_twin_takes_the_same_steps():
    """benchmarks/step.py compares like with like: the twin stepped by Lightning's automatic
    optimization starts from the module's weights and ends where fedws's own step ends."""
    import step

    from app.config import build
    from app.learn.runtime import dataset, new_module, shard
    from app.learn.trainer import make_trainer, tensor_loader

    cfg = build(step.settings("cpu", None))
    local = shard(cfg.data, 0)
    module = new_module(cfg, dataset(cfg.data))
    twin = step.automatic(module)
    assert type(twin) is step.AutomaticStep and twin.automatic_optimization
    assert not module.automatic_optimization
    for m in (module, twin):
        loader = tensor_loader(local.x_train, local.y_train, 16, shuffle=True, seed=1)
        make_trainer(cfg, max_steps=12, max_epochs=-1).fit(m, loader)
    after, twin_after = module.model.state_dict(), twin.model.state_dict()
    assert all(torch.equal(v, twin_after[k]) for k, v in after.items())
    start = new_module(cfg, dataset(cfg.data)).model.state_dict()
    assert not torch.equal(start["classifier.weight"], after["classifier.weight"])


@pytest.mark.parametrize(
    ("after", "timeout", "grace", "code", "exit_range"),
    [
        ("time.sleep(1)", 60, 60, 0, (0.8, 2.3)),  # completes, exits a second later
        ("sys.exit(3)", 60, 60, 3, (0.0, 1.3)),  # completes, its exit fails
        ("time.sleep(60)", 3, 5, None, (4.8, 9)),  # completes, never exits: killed after grace
        (None, 1, 60, None, None),  # never completes: killed at the timeout
    ],
)
def test_the_gpu_benchmark_times_a_completed_runs_exit_and_kills_a_hung_one(
    tmp_path, after, timeout, grace, code, exit_range
):
    """A run that completed may run until the timeout or ``grace`` seconds after completing,
    whichever is later; the seconds from its completion (the marker's mtime, 1.5 s after the
    start: not the start) to its exit or kill are reported; a kill stops its whole group."""
    marker, child = tmp_path / "completed", f"fedws-grandchild-{time.monotonic_ns()}"
    body = "import pathlib, subprocess, sys, time; "
    body += f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', {child!r}]); "
    body += "time.sleep(1.5); "
    body += f"pathlib.Path({str(marker)!r}).touch(); {after}" if after else "time.sleep(60)"
    proc = measure.start_logged([sys.executable, "-c", body], tmp_path / "log", tmp_path)
    start = time.monotonic()
    try:
        got, exit_s = gpu.wait_for_exit(
            proc, timeout, lambda: marker.stat().st_mtime if marker.exists() else None, grace
        )
        assert got == code and proc.returncode is not None  # ended either way
        if exit_range is None:
            assert exit_s is None and timeout <= time.monotonic() - start < timeout + 5
        else:
            assert exit_range[0] < exit_s < exit_range[1]
        if code is None:  # killed: the process it started went with it
            deadline = time.monotonic() + 5
            while measure.pids_with(child) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert measure.pids_with(child) == []
    finally:
        measure.stop_process_group(proc.pid, grace_s=1)


@pytest.mark.parametrize(
    ("result", "note"),
    [
        ({"exit_s": 3.04, "exit_code": 0}, "  (exited 3.0 s after completing)"),
        ({"exit_s": 0.5, "exit_code": 1}, "  (exited with code 1 0.5 s after completing)"),
        (
            {"exit_s": 121.2, "exit_code": None},
            "  (completed; the process had not exited 121 s later: killed)",
        ),
        ({"s_per_round": 1.0}, ""),  # --fit-only: no process of its own to exit
    ],
)
def test_the_gpu_benchmarks_table_says_how_a_completed_run_ended(result, note):
    assert gpu.exit_note(result) == note


def test_gpu_utilisation_is_the_mean_over_rounds_2_to_r_not_the_start_or_the_exit():
    sampler = gpu.GpuSampler(lambda: 0)
    # (rounds done when sampled, MiB, %): round 1 and the exit after round 3 are left out
    sampler.samples = [(0, 100.0, 90.0), (1, 300.0, 40.0), (2, 200.0, 60.0), (3, 50.0, 0.0)]
    assert sampler.summary(rounds=3) == {
        "gpu_mem_peak_mib": 300.0,
        "gpu_util_mean_pct": 50.0,
        "gpu_samples": 4,
    }
