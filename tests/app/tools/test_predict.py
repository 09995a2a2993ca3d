"""``fedws predict``: a run's checkpoint on PNG files gives the run's own model's predictions
with the dataset's class names, without the dataset; a checkpoint without that metadata gets it
from the run's config; every error is one line."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import InProcessGrid, set_task_identity, small_config
from PIL import Image

from app.learn.classifier import FedwsClassifier
from app.learn.runtime import dataset
from app.tools.cli import main
from clients.client_app import app as client_app
from server.server_app import run_federation

METADATA = ("class_names", "input_mean", "input_std", "input_size")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A one-round federation of two clients, in this process."""
    cfg = small_config("federation.rounds=1", "data.partition.num_clients=2")
    out = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDWS_CACHE", str(tmp_path_factory.mktemp("fedws-cache")))
        set_task_identity(mp)
        run_federation(InProcessGrid(client_app, 2), cfg, out)
    return cfg, out


@pytest.fixture(scope="module")
def pngs(run, tmp_path_factory):
    """The first test images as PNG files (lossless), one of them in a subfolder."""
    cfg, _ = run
    ds = dataset(cfg.data)
    folder = tmp_path_factory.mktemp("images")
    (folder / "sub").mkdir()
    files = [folder / f"test_{i}.png" for i in range(5)] + [folder / "sub" / "test_5.png"]
    for i, path in enumerate(files):
        Image.fromarray(ds.x_test[i, 0].numpy(), mode="L").save(path)
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.png").write_text("not an image either")
    return files


def expected(checkpoint, cfg, n: int) -> torch.Tensor:
    """Class probabilities of the checkpoint's model on the dataset's own normalized tensors."""
    module = FedwsClassifier.load_from_checkpoint(checkpoint, weights_only=True).eval()
    ds = dataset(cfg.data)
    with torch.no_grad():
        return torch.softmax(module(ds.normalize(ds.x_test[:n])), dim=1)


def test_predict_gives_the_runs_own_predictions_with_the_class_names(run, pngs, capsys):
    cfg, out = run
    assert main(["predict", str(out), *map(str, pngs), "--json"]) == 0
    captured = capsys.readouterr()
    rows = json.loads(captured.out)
    assert captured.err == ""  # best.ckpt exists: no notice
    probs = expected(out / "checkpoints" / "best.ckpt", cfg, len(pngs))
    assert [r["image"] for r in rows] == [str(p) for p in pngs]
    assert [r["class_index"] for r in rows] == probs.argmax(dim=1).tolist()
    classes = dataset(cfg.data).classes
    assert [r["class"] for r in rows] == [classes[r["class_index"]] for r in rows]
    assert [r["probability"] for r in rows] == pytest.approx(
        probs.max(dim=1).values.tolist(), abs=1e-6
    )


def test_a_folder_is_read_recursively_and_sorted_with_the_last_checkpoint(run, pngs, capsys):
    cfg, out = run
    folder = pngs[0].parent
    assert main(["predict", str(out), str(folder), "--checkpoint", "last"]) == 0
    lines = capsys.readouterr().out.splitlines()
    order = sorted(pngs)  # notes.txt and .hidden.png are left out
    probs = expected(out / "checkpoints" / "last.ckpt", cfg, len(pngs))
    classes = dataset(cfg.data).classes
    want = {
        str(p): (classes[int(probs[i].argmax())], float(probs[i].max())) for i, p in enumerate(pngs)
    }
    assert [line.split(": ")[0] for line in lines] == [str(p) for p in order]
    for line in lines:
        image, rest = line.split(": ")
        name, probability = rest.rsplit(" (", 1)
        assert name == want[image][0]
        assert float(probability.rstrip(")")) == pytest.approx(want[image][1], abs=1e-4)


def test_an_older_checkpoint_without_the_metadata_takes_it_from_the_runs_config(
    run, pngs, tmp_path, capsys
):
    cfg, out = run
    older = tmp_path / "older"
    (older / "checkpoints").mkdir(parents=True)
    shutil.copy(out / "config.yaml", older / "config.yaml")
    checkpoint = torch.load(out / "checkpoints" / "best.ckpt", weights_only=True)
    for key in METADATA:
        del checkpoint["hyper_parameters"][key]
    torch.save(checkpoint, older / "checkpoints" / "last.ckpt")  # and no best.ckpt

    loaded = FedwsClassifier.load_from_checkpoint(
        older / "checkpoints" / "last.ckpt", weights_only=True
    )
    assert all(loaded.hparams[key] is None for key in METADATA)  # it loads, as before
    assert main(["predict", str(older), *map(str, pngs), "--json"]) == 0
    captured = capsys.readouterr()
    assert "has no checkpoints/best.ckpt" in captured.err and "last.ckpt" in captured.err
    probs = expected(out / "checkpoints" / "best.ckpt", cfg, len(pngs))
    rows = json.loads(captured.out)
    assert [r["class_index"] for r in rows] == probs.argmax(dim=1).tolist()
    assert [r["probability"] for r in rows] == pytest.approx(
        probs.max(dim=1).values.tolist(), abs=1e-6
    )


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no run", "no such run directory"),
        ("no checkpoint", "holds no checkpoints/best.ckpt or last.ckpt"),
        ("best asked, missing", "best.ckpt does not exist (a run with data.val_fraction: 0"),
        ("no image", "no such image file or folder"),
        ("not an image", "not an image Pillow can read"),
        ("empty folder", "a folder with no .png, .jpg or .jpeg image in it"),
    ],
)
def test_errors_are_one_line(run, pngs, tmp_path, capsys, case, message):
    _, out = run
    only_last = tmp_path / "only-last"
    (only_last / "checkpoints").mkdir(parents=True)
    shutil.copy(out / "checkpoints" / "last.ckpt", only_last / "checkpoints")
    (tmp_path / "empty").mkdir()
    (tmp_path / "text.png").write_text("not a PNG")
    image = str(pngs[0])
    argv = {
        "no run": [str(tmp_path / "missing"), image],
        "no checkpoint": [str(tmp_path / "empty"), image],
        "best asked, missing": [str(only_last), image, "--checkpoint", "best"],
        "no image": [str(out), str(tmp_path / "missing.png")],
        "not an image": [str(out), image, str(tmp_path / "text.png")],
        "empty folder": [str(out), str(tmp_path / "empty")],
    }[case]
    assert main(["predict", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("fedws: ") and captured.err.count("\n") == 1
    assert message in captured.err
