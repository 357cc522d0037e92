"""megl_ray.reporting.console: which of Ray's forwarded lines are dropped (routine ones only) and that the filter wraps
Ray's printer without losing anything else. Lines below were printed by a real 2-worker run of the tiny preset."""

from __future__ import annotations

import pytest

from megl_ray.reporting import console

ROUTINE = [
    "Checkpoint successfully created at: Checkpoint(filesystem=s3, path=megl/runs/base1/checkpoint_2026-12-01)",
    "Starting execution of Dataset train_0357LsSaCFKDWbUbw3WUyF_0. Full logs are in /tmp/ray/session/logs/ray-data",
    "Execution plan of Dataset train_0357: InputDataBuffer[Input] -> AllToAllOperator[RandomizeBlockOrder]",
    "✔️  Dataset train_0357LsSaCFKDWbUbw3WUyF_0 execution finished in 1.58 seconds",
    "Progress bars disabled. To enable, set `ray.data.DataContext.get_current().enable_progress_bars = True`.",
    "[mutex.cc : 452] RAW: Lock blocking 0x559cc5a17630   @ 0x7f54dd22b1a2 0x7f54dc2fb23c",
    "WARNING: 10 PYTHON worker processes have been started on node: 0a2f4b with address: 192.0.2.2, which is 5x",
    "Requesting resources: {'CPU': 0.5} * 2",
    "Started training worker group of size 2: ",
    "- (ip=192.0.2.2, pid=12297) world_rank=0, local_rank=0, node_rank=0",
    "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully",
]
KEPT = [
    "Traceback (most recent call last):",
    "ray.exceptions.GetTimeoutError: Get timed out: some object(s) not ready.",
    "(raylet) node_manager.cc:3517: 3 Workers (tasks / actors) killed due to memory pressure (OOM)",
    "2026-12-01 21:45:25,214 rank0 WARNING megl_ray.train: test hook: killing rank 1 at step 11",
    "/work/megl_ray/data/transforms.py:159: UserWarning: The given NumPy array is not writable",
    "[megl] step 3/9 epoch 1/1 loss=8.439 ce=2.394 | 10.0 samples/s | eta 19s",
]


@pytest.mark.parametrize("line", ROUTINE)
def test_routine_lines_are_recognised(line):
    assert console.ROUTINE_LINES.search(line)


@pytest.mark.parametrize("line", KEPT)
def test_warnings_errors_and_our_lines_are_kept(line):
    assert not console.ROUTINE_LINES.search(line)


def test_a_routine_error_goes_with_its_traceback_and_nothing_else():
    lines = [
        "Failed to send resource request for train-88a9. If this only happens transiently during network "
        "partition or CPU being overloaded, it's safe to ignore this error.",
        "Traceback (most recent call last):",
        '  File "/ray/train/v2/_internal/execution/scaling_policy/autoscaling_coordinator_client.py", line 58',
        "    ray.get(",
        "ray.exceptions.GetTimeoutError: Get timed out: some object(s) not ready.",
        KEPT[3],
        ROUTINE[0],
        *KEPT[:2],
    ]
    # a traceback after any other routine line is kept whole: it is a real error
    assert console.drop_routine(lines) == [KEPT[3], *KEPT[:2]]


def test_the_filter_wraps_rays_printer_and_passes_everything_else(monkeypatch):
    from ray._private import worker

    printed = []
    monkeypatch.setattr(worker, "print_to_stdstream", lambda data, **kw: printed.append((data["lines"], kw)))
    assert not console.filter_forwarded_logs(verbose=True)  # --verbose: nothing filtered
    assert console.filter_forwarded_logs(verbose=False)
    assert console.filter_forwarded_logs(verbose=False)  # idempotent: wrapped once
    worker.print_to_stdstream({"lines": ROUTINE + KEPT, "pid": 1, "is_err": True}, ignore_prefix=True)
    worker.print_to_stdstream({"lines": ROUTINE[:2], "pid": 1, "is_err": True}, ignore_prefix=True)
    assert printed == [(KEPT, {"ignore_prefix": True})]  # in order, and a batch of only routine lines is dropped


def test_quiet_env_and_ray_options():
    assert console.quiet_env(True) == {}
    assert "ignore::DeprecationWarning" in console.quiet_env(False)["PYTHONWARNINGS"]
    assert console.ray_init_options(False)["logging_config"].log_level == "WARNING"
    assert console.ray_init_options(True)["logging_config"].log_level == "INFO"
    assert console.train_logging_config(False).log_level == "WARNING"
