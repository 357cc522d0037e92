"""megl_ray.reporting.progress: rank 0's events (what, when) and the driver's display of them, without Ray."""

from __future__ import annotations

import io

from megl_ray.reporting.progress import ConsoleDisplay, Progress, ProgressBoard


class _Remote:
    """Stands in for an actor handle: ``board.push.remote(event)`` calls the board directly."""

    def __init__(self, board):
        self.push = type("M", (), {"remote": staticmethod(board.push)})()


def _terms(step):
    return {"loss": 10.0 / step, "ce": 2.0, "text": 5.0, "visual": 0.1, "dc": 1.5}


def test_rank0_sends_a_step_event_every_log_every_steps_and_at_the_end():
    board = ProgressBoard()
    progress = Progress(total_steps=7, log_every=3, board=_Remote(board))
    returned = [
        progress.step(s, epoch=0, epochs=1, terms=_terms(s), samples=32, tokens=100, lr=0.1) for s in range(1, 8)
    ]
    progress.epoch(0, 1, 7, {"val_accuracy": 0.5, "val_miou": 0.25})
    events = board.drain()
    assert [e["step"] for e in events if e["kind"] == "step"] == [3, 6, 7]
    assert [bool(r) for r in returned] == [False, False, True, False, False, True, True]
    step = events[0]
    assert step["values"]["loss"] == 10.0 / 3 and step["values"]["samples_per_s"] > 0 and step["total"] == 7
    assert {"tokens_per_s", "lr", "peak_mem_mib"} <= set(step["values"]) and step["eta_s"] >= 0
    assert events[-1] == {
        "kind": "epoch",
        "step": 7,
        "total": 7,
        "epoch": 1,
        "epochs": 1,
        "values": {"val_accuracy": 0.5, "val_miou": 0.25},
    }
    assert board.drain() == []  # drained once


def test_other_ranks_send_nothing():
    progress = Progress(total_steps=3, log_every=1, board=None)
    assert progress.step(1, 0, 1, _terms(1), 8, 8, 0.1)  # still measured (the loop keeps the last values)
    progress.epoch(0, 1, 1, {"val_accuracy": 1.0})


def test_display_prints_each_event_once_as_one_line_when_not_a_terminal():
    stream = io.StringIO()
    display = ConsoleDisplay(total=180, stream=stream)
    display.step(
        {
            "kind": "step",
            "step": 10,
            "total": 180,
            "epoch": 2,
            "epochs": 20,
            "values": {**_terms(10), "samples_per_s": 41.9},
            "eta_s": 125,
        }
    )
    display.epoch(
        {
            "kind": "epoch",
            "step": 18,
            "total": 180,
            "epoch": 2,
            "epochs": 20,
            "values": {"val_accuracy": 0.3, "val_miou": 0.2},
        }
    )
    display.close()
    assert stream.getvalue().splitlines() == [
        "[megl] step 10/180 epoch 2/20 loss=1 ce=2 text=5 visual=0.1 dc=1.5 | 41.9 samples/s | eta 2m05s",
        "[megl] epoch 2/20 (step 18/180): val_accuracy=0.3000 val_miou=0.2000",
    ]


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_on_a_terminal_one_tqdm_bar_shows_step_total_terms_throughput_and_eta():
    stream = _Terminal()
    display = ConsoleDisplay(total=180, stream=stream)
    for step in (10, 20):
        display.step(
            {
                "kind": "step",
                "step": step,
                "total": 180,
                "epoch": 2,
                "epochs": 20,
                "values": {**_terms(step), "samples_per_s": 41.9},
                "eta_s": 90,
            }
        )
    display.epoch(
        {"kind": "epoch", "step": 18, "total": 180, "epoch": 2, "epochs": 20, "values": {"val_accuracy": 0.3}}
    )
    display.close()
    text = stream.getvalue()
    assert display.bar.n == 20 and "20/180" in text and "loss=0.5" in text and "41.9 samples/s" in text
    assert "eta 1m30s" in text
    # the epoch line is printed above the bar, whole, on its own line
    assert "\n[megl] epoch 2/20 (step 18/180): val_accuracy=0.3000\n" in "\n" + text.replace("\r", "\n")
