"""OUT/run.log: what the console showed, and Ray workers' lines kept out of the console."""

from __future__ import annotations

import io
import logging
import sys

import pytest

from app.tools import console
from app.tools.console import _Tee

WORKER = "\x1b[36m(ClientAppActor pid=1234)\x1b[0m Fatal Python error: Aborted"
LOGGED = "(ClientAppActor pid=1234) Fatal Python error: Aborted"  # in the file: no colour codes


@pytest.mark.parametrize("workers", [False, True])
def test_worker_lines_go_to_the_log_and_only_there_unless_asked(workers):
    screen, log = io.StringIO(), io.StringIO()
    tee = _Tee(screen, log, workers)
    tee.write("fedws run: something\n")
    print(WORKER, file=tee)  # print writes the text, then the newline
    tee.write("(not a worker) parentheses in fedws's own text\n")
    tee.write("rounds: 10%\rrounds: 50%\rrounds: 100%")
    tee.write("\n")
    assert log.getvalue().splitlines() == [
        "fedws run: something",
        LOGGED,
        "(not a worker) parentheses in fedws's own text",
        "rounds: 100%",  # a progress bar's last state
    ]
    shown = screen.getvalue()
    assert ("Fatal Python error" in shown) == workers
    assert "fedws run: something\n" in shown and "rounds: 10%\rrounds: 50%" in shown
    assert "(not a worker) parentheses" in shown


def test_teed_writes_the_file_and_restores_the_streams(tmp_path, capsys):
    path = tmp_path / "out" / "run.log"
    with console.teed(path):
        print("hello")
        print(WORKER)
    print("after")
    assert path.read_text().splitlines() == ["hello", LOGGED]
    out = capsys.readouterr().out
    assert "hello" in out and "after" in out and "Fatal" not in out
    assert not isinstance(sys.stdout, _Tee)


def test_a_worker_line_after_a_progress_bar_redraw_stays_off_the_console(tmp_path, capsys):
    # the bar draws on the terminal itself, past the tee; a worker's line still starts a line
    path = tmp_path / "run.log"
    with console.teed(path):
        bar = console.console_stream()
        bar.write("\rrounds:  10%|#")
        bar.write("\rrounds:  50%|#####")
        print(WORKER, file=sys.stderr)
    err = capsys.readouterr().err
    assert "rounds:  50%" in err and "Fatal Python error" not in err
    assert path.read_text().splitlines() == [LOGGED]


def test_an_exception_leaves_its_traceback_in_the_log(tmp_path):
    path = tmp_path / "run.log"
    with pytest.raises(RuntimeError), console.teed(path):
        print("before")
        raise RuntimeError("the reason")
    text = path.read_text()
    assert text.startswith("before\n") and "RuntimeError: the reason" in text


@pytest.mark.parametrize("append", [False, True])
def test_another_writer_of_the_log_is_never_overwritten(tmp_path, append):
    # the server's logging handler appends Flower's log to the same file while the tee writes
    path = tmp_path / "run.log"
    path.write_text("an earlier run\n")
    with console.teed(path, append=append):
        print("first")
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("flwr: %(message)s"))
        flwr = logging.getLogger("fedws.test.other_writer")
        flwr.addHandler(handler)
        flwr.warning("Starting FedAvg strategy")
        flwr.removeHandler(handler)
        handler.close()
        print("last")
    lines = path.read_text().splitlines()
    earlier = ["an earlier run"] if append else []
    assert lines == [*earlier, "first", "flwr: Starting FedAvg strategy", "last"]


def test_the_log_file_gets_no_terminal_colour_codes():
    screen, log = io.StringIO(), io.StringIO()
    tee = _Tee(screen, log, workers=False)
    tee.write("\x1b[92mINFO \x1b[0m:      Starting\n")
    assert log.getvalue() == "INFO :      Starting\n"
    assert "\x1b[92m" in screen.getvalue()  # the console keeps its colours


def test_flowers_warning_about_a_setting_fedws_chose_stays_off_the_console(tmp_path):
    from flwr.common.logger import log as flwr_log

    flwr = logging.getLogger("flwr")
    handler = next(
        h
        for h in flwr.handlers
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
    )
    screen, kept = io.StringIO(), tmp_path / "run.log"
    stream, level, filters = handler.stream, flwr.level, list(handler.filters)
    file_handler = logging.FileHandler(kept)  # as the server's run.log handler
    flwr.addHandler(file_handler)
    handler.setStream(screen)
    try:
        console.flower_console_level("warning")
        console.flower_console_level("warning")  # twice: still one filter
        flwr_log(logging.WARNING, "fraction_evaluate is set to 0.0. Federated evaluation ...")
        flwr_log(logging.WARNING, "another warning")
    finally:
        handler.setStream(stream)
        handler.filters[:] = filters
        flwr.removeHandler(file_handler)
        file_handler.close()
        flwr.setLevel(level)
    assert "another warning" in screen.getvalue()
    assert "fraction_evaluate" not in screen.getvalue()
    assert "fraction_evaluate" in kept.read_text()  # run.log keeps it
