"""megl_ray.reporting.progress: rank 0's events (what, when) and the driver's display of them, without Ray."""

from __future__ import annotations

import io

import pytest
import torch

from megl_ray.reporting.log_window import LogWindow, WindowStats, peak_memory_mib
from megl_ray.reporting.progress import ConsoleDisplay, Progress, ProgressBoard


class _Remote:
    """Stands in for an actor handle: ``board.push.remote(event)`` calls the board directly."""

    def __init__(self, board):
        self.push = type("M", (), {"remote": staticmethod(board.push)})()


def _terms(step):
    return {"loss": 10.0 / step, "ce": 2.0, "text": 5.0, "visual": 0.1, "dc": 1.5}


def _window(loss: float, samples: int = 32, tokens: int = 100) -> WindowStats:
    return WindowStats(
        terms={"loss": loss, "ce": 2.0, "text": 5.0, "visual": 0.1, "dc": 1.5},
        micro_batches=2,
        samples=samples,
        tokens=tokens,
        elapsed_s=0.5,
        data_wait_s=0.1,
        mem_mib=(300.0, 250.0),
    )


def test_rank0_sends_a_step_event_at_each_logging_step_with_the_windows_rates():
    board = ProgressBoard()
    progress = Progress(total_steps=7, log_every=3, board=_Remote(board))
    assert [s for s in range(1, 8) if progress.is_log_step(s)] == [3, 6, 7]
    extra = {"lr": 0.1, "lr/decay": 0.1, "grad_norm": 2.5, "skipped_steps": 0.0}
    for step in (3, 6, 7):
        progress.step(step, epoch=0, epochs=1, window=_window(10.0 / step), extra=extra)
    progress.epoch(0, 1, 7, {"val_accuracy": 0.5, "val_miou": 0.25})
    events = board.drain()
    assert [e["step"] for e in events if e["kind"] == "step"] == [3, 6, 7]
    values = events[0]["values"]
    assert values["loss"] == 10.0 / 3 and values["samples_per_s"] == 64.0 and values["tokens_per_s"] == 200.0
    assert values["data_wait_frac"] == pytest.approx(0.2) and values["peak_mem_mib"] == 300.0
    assert values["peak_mem_mib_min"] == 250.0 and values["grad_norm"] == 2.5 and values["lr/decay"] == 0.1
    assert values["step_s"] == pytest.approx(0.5 / 3) and events[2]["values"]["step_s"] == pytest.approx(0.5)
    assert events[0]["total"] == 7 and events[0]["eta_s"] >= 0
    assert events[-1] == {
        "kind": "epoch",
        "step": 7,
        "total": 7,
        "epoch": 1,
        "epochs": 1,
        "values": {"val_accuracy": 0.5, "val_miou": 0.25},
    }
    assert board.drain() == []  # drained once


def test_counted_flops_give_tflops_per_device_and_mfu_against_the_stated_peak():
    board = ProgressBoard()
    progress = Progress(total_steps=2, log_every=1, board=_Remote(board))
    assert "tflops" not in progress.step(1, 0, 1, _window(1.0), {})  # nothing counted yet: no figure made up
    progress.flops(per_sample=3e12, world=2, peak_tflops=40.0)
    values = progress.step(2, 0, 1, _window(1.0), {})  # 64 samples/s over 2 devices, 3 TFLOP each
    assert values["tflops"] == pytest.approx(96.0) and values["mfu"] == pytest.approx(2.4)
    assert values["peak_tflops"] == 40.0
    progress.flops(per_sample=3e12, world=2, peak_tflops=None)  # a CPU, no peak given: TFLOP/s without an MFU
    assert "mfu" not in progress.step(2, 0, 1, _window(1.0), {})


def test_the_peak_is_looked_up_by_gpu_name_and_unknown_devices_have_none():
    from megl_ray.reporting.log_window import device_peak_tflops

    assert device_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert device_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert device_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert device_peak_tflops("NVIDIA A10G") == 70.0
    assert device_peak_tflops("Some accelerator") is None


def test_other_ranks_send_nothing_but_get_the_values():
    progress = Progress(total_steps=3, log_every=1, board=None)
    assert progress.step(1, 0, 1, _window(1.0), {"lr": 0.1})["loss"] == 1.0
    progress.epoch(0, 1, 1, {"val_accuracy": 1.0})


def test_the_window_averages_every_micro_batch_and_each_term_where_present():
    window = LogWindow(torch.device("cpu"))
    window.add({"loss": torch.tensor(4.0), "ce": torch.tensor(1.0), "visual": torch.tensor(0.5)}, 3, 30)
    window.add({"loss": torch.tensor(2.0), "ce": torch.tensor(3.0)}, 4, 40)  # no mask in this micro-batch
    window.waited(0.01)
    peek = window.reduce(peak_memory_mib(), reset=False)
    stats = window.reduce((123.0, 456.0))
    assert peek.terms == stats.terms == {"loss": 3.0, "ce": 2.0, "visual": 0.5}
    assert (stats.micro_batches, stats.samples, stats.tokens) == (2, 7, 70)
    assert stats.data_wait_s == 0.01 and stats.mem_mib == (123.0, 123.0) and peek.mem_mib[0] > 0
    assert stats.reserved_mib == 456.0
    empty = window.reduce((1.0, 1.0))  # a new window began
    assert empty.terms == {} and empty.micro_batches == 0 and empty.data_wait_s == 0.0


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
