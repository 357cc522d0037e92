"""Training progress, from rank 0 to the driver's console and trackers.

Rank 0 (:class:`Progress`) measures every ``run.log_every`` optimizer steps — each loss term, samples/s, tokens/s,
learning rate, peak memory — and at each epoch's end the validation metrics, and sends them to a small actor
(:class:`ProgressBoard`) instead of printing: a worker's output reaches the console only through Ray's log
forwarding, prefixed by ``(RayTrainWorker pid=…)`` and printed again by Ray Train's print-to-logger patch. The
driver (:class:`RunMonitor`) drains the board in a thread and shows one progress display — a ``tqdm`` bar on a
terminal, one plain line per ``log_every`` steps otherwise — plus one line per epoch, feeds the trackers, and
keeps the history for the run's ``curves.png``.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from tqdm import tqdm

from megl_ray.reporting.log_window import WindowStats

log = logging.getLogger("megl_ray.train")

SHOWN_TERMS = ("loss", "ce", "text", "visual", "dc")


class Progress:
    """Rank 0's measurements, sent to the driver's board (other ranks pass ``board=None`` and send nothing)."""

    def __init__(self, total_steps: int, log_every: int, board: Any | None, start_step: int = 0):
        self.total = total_steps
        self.log_every = log_every
        self.board = board
        self.start = time.monotonic()
        self.first_step = start_step  # a resumed run's ETA counts only the steps this run took
        self.logged = start_step  # the step of the previous log: the window's optimizer steps end here
        self.flops_per_sample: float | None = None
        self.world = 1
        self.peak_tflops: float | None = None

    def flops(self, per_sample: float, world: int, peak_tflops: float | None) -> None:
        """Model FLOPs of one sample (forward and backward), the workers sharing them, and one device's peak
        (None: unknown, no MFU): what turns samples/s into TFLOP/s per device and model FLOPs utilisation."""
        self.flops_per_sample, self.world, self.peak_tflops = per_sample, world, peak_tflops

    def is_log_step(self, step: int) -> bool:
        """Every ``log_every`` optimizer steps and the last: the same steps on every rank (``LogWindow.reduce``
        is a collective)."""
        return step % self.log_every == 0 or step == self.total

    def step(
        self, step: int, epoch: int, epochs: int, window: WindowStats, extra: dict[str, float]
    ) -> dict[str, float]:
        """The logging step's values from ``window`` (every micro-batch of every rank since the previous log) and
        ``extra`` (learning rates, gradient norm, skipped steps); sent to the board by rank 0, returned by all."""
        elapsed = max(window.elapsed_s, 1e-9)
        values = {
            **window.terms,
            "samples_per_s": window.samples / elapsed,
            "tokens_per_s": window.tokens / elapsed,
            "data_wait_frac": min(window.data_wait_s / elapsed, 1.0),
            "step_s": elapsed / max(step - self.logged, 1),
            "peak_mem_mib": window.mem_mib[0],
            "peak_mem_mib_min": window.mem_mib[1],
            "peak_reserved_mib": window.reserved_mib,
            **extra,
        }
        if self.flops_per_sample:
            values["tflops"] = self.flops_per_sample * values["samples_per_s"] / self.world / 1e12  # per device
            if self.peak_tflops:
                values["mfu"] = values["tflops"] / self.peak_tflops
                values["peak_tflops"] = self.peak_tflops
        now = time.monotonic()
        done = max(step - self.first_step, 1)
        eta = (now - self.start) / done * (self.total - step)
        self._send(
            {
                "kind": "step",
                "step": step,
                "total": self.total,
                "epoch": epoch + 1,
                "epochs": epochs,
                "values": values,
                "eta_s": eta,
            }
        )
        self.logged = step
        return values

    def epoch(self, epoch: int, epochs: int, step: int, values: dict[str, float]) -> None:
        """The validation metrics at the end of ``epoch`` (0-based)."""
        self._send(
            {
                "kind": "epoch",
                "step": step,
                "total": self.total,
                "epoch": epoch + 1,
                "epochs": epochs,
                "values": dict(values),
            }
        )

    def outcome(self, values: dict[str, Any]) -> None:
        """What the run ended with beyond its last checkpoint's metrics (the test split's metrics, or why it
        stopped), delivered before this returns. Ray Train's ``Result.metrics`` are those of the latest checkpoint:
        a report without one never reaches the driver."""
        if self.board is not None:
            ray.get(self.board.push.remote({"kind": "outcome", "values": dict(values)}), timeout=120)

    def _send(self, event: dict[str, Any]) -> None:
        if self.board is not None:
            self.board.push.remote(event)  # fire and forget: progress must never slow or stop training


class ProgressBoard:
    """The actor between rank 0 and the driver: a queue of events (it needs no CPU)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def push(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def drain(self) -> list[dict[str, Any]]:
        events, self.events = self.events, []
        return events


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def step_text(event: dict[str, Any]) -> str:
    """``loss=7.91 ce=2.5 text=5.26 dc=1.47 | 41.9 samples/s``: the loss terms and throughput of a step event."""
    values = event["values"]
    terms = " ".join(f"{k}={values[k]:.4g}" for k in SHOWN_TERMS if k in values)
    speed = f"{values.get('samples_per_s', 0.0):.1f} samples/s"
    if "mfu" in values:  # with the peak it is a fraction of, so that the figure can be judged
        speed = f"mfu {values['mfu']:.2f} of {values['peak_tflops']:.4g} TFLOP/s | {speed}"
    return f"{terms} | {speed}"


def epoch_text(event: dict[str, Any]) -> str:
    values = " ".join(f"{k}={v:.4f}" for k, v in event["values"].items())
    return f"[megl] epoch {event['epoch']}/{event['epochs']} (step {event['step']}/{event['total']}): {values}"


class ConsoleDisplay:
    """A tqdm bar (step/total, loss terms, samples/s, ETA) on a terminal; plain lines when stderr is not one."""

    def __init__(self, total: int, stream: Any = None) -> None:
        self.stream = stream or sys.stderr
        self.total = total
        self.bar = None
        if getattr(self.stream, "isatty", lambda: False)():
            self.bar = tqdm(
                total=total,
                unit="step",
                file=self.stream,
                dynamic_ncols=True,
                desc="[megl] train",
                bar_format="{desc} {n_fmt}/{total_fmt} |{bar}| {postfix} [{elapsed}]",
            )

    def step(self, event: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.update(event["step"] - self.bar.n)
            # rank 0's ETA: tqdm's own would count the start-up before the first step as training time
            self.bar.set_postfix_str(
                f"epoch {event['epoch']}/{event['epochs']} {step_text(event)} | eta {_duration(event['eta_s'])}"
            )
            return
        print(
            f"[megl] step {event['step']}/{event['total']} epoch {event['epoch']}/{event['epochs']} "
            f"{step_text(event)} | eta {_duration(event['eta_s'])}",
            file=self.stream,
            flush=True,
        )

    def epoch(self, event: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.write(epoch_text(event), file=self.stream)
        else:
            print(epoch_text(event), file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class RunMonitor:
    """The driver's side: a board actor for rank 0, a thread showing and tracking what arrives on it."""

    def __init__(self, total: int, tracker: Any | None, display: bool = True, interval_s: float = 0.5) -> None:
        # On the driver's node: the board must outlive any worker node (rank 0 waits on it for the run's outcome),
        # and a node lost mid-run must not take it along.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.board = ray.remote(num_cpus=0, scheduling_strategy=here)(ProgressBoard).remote()
        self.tracker = tracker
        self.display = ConsoleDisplay(total) if display else None
        self.interval_s = interval_s
        self.history: list[dict[str, Any]] = []
        self.outcome: dict[str, Any] = {}
        """Rank 0's ``Progress.outcome``: the test metrics, or the divergence that stopped the run."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="megl-progress", daemon=True)

    def __enter__(self) -> RunMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=120)
        self._poll()  # whatever rank 0 sent last
        if self.display is not None:
            self.display.close()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._poll()

    def _poll(self) -> None:
        try:
            events = ray.get(self.board.drain.remote(), timeout=30)
        except Exception as err:  # the display is a convenience: never fail training over it
            log.debug("progress board unavailable: %s", err)
            return
        for event in events:
            if event["kind"] == "outcome":
                self.outcome.update(event["values"])
                continue
            self.history.append(event)
            if self.display is not None:
                (self.display.step if event["kind"] == "step" else self.display.epoch)(event)
            if self.tracker is not None:
                prefix = "train/" if event["kind"] == "step" else "val/"
                values = {prefix + k.removeprefix("val_"): v for k, v in event["values"].items()}
                self.tracker.metrics(values, event["step"])
                if event["kind"] == "epoch":
                    self.tracker.epoch_done()
