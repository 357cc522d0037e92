"""Does the step cost model (``megl_ray/planning/cost_model.py``) predict what a second worker brings? Measured here:

  1. calibration, no two-worker training in it: the median step time of ONE Ray Train + DeepSpeed worker (tiny
     MEGL model, its micro-batch), the gloo all-reduce of the model's gradient bytes and all-gather of its parameter
     bytes between two plain processes, and what the cores give CPU-bound processes: a fixed single-threaded
     matmul kernel timed alone (before the 1-worker run) and as two concurrent copies (before each 2-worker run,
     under the load of that moment: other programs share this machine, and their load moves);
  2. the prediction of the model for 2 workers (``cost_model.cpu_throughput_ratio``): one worker's step slowed by
     the kernel's two-copy slowdown (1 on two free cores, 2 on one), plus the collectives;
  3. the measurement: 2 workers on one node, and 2 workers on two Ray nodes (``STRICT_SPREAD`` over a local
     two-node cluster, ``megl_ray.cluster.local_cluster``), the same micro-batch each.

``measured_2w_vs_1w`` is samples/s of 2 workers ÷ samples/s of 1 (2 × t₁ / t₂); ``predicted_2w_vs_1w`` the model's.
The last stdout line is one JSON object, with the model's per-node-count predictions for the GPU configurations of
docs/scaling.md beside it. Two Ray nodes on one machine talk over loopback, as one node does: the model predicts the
same ratio for both, and the measurement says whether Ray's placement across nodes costs anything beyond it.

    python bench/scaling.py [--steps 14] [--batch 16] [--kernel-reps 3000]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=14)
    p.add_argument("--batch", type=int, default=16, help="micro-batch of each worker")
    p.add_argument("--repeats", type=int, default=20, help="timed repetitions of each collective")
    p.add_argument("--kernel-reps", type=int, default=3000, help="matmuls of the core-sharing kernel (~2 s alone)")
    return p.parse_args(argv)


def _collective_worker(rank: int, port: int, grad_numel: int, param_numel: int, repeats: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)

    def timed(fn) -> float:
        fn()  # warm-up
        dist.barrier()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    grads, one = torch.ones(grad_numel), torch.ones(1)
    part = torch.ones(param_numel // 2)
    gathered = [torch.empty_like(part) for _ in range(2)]
    result = {
        "allreduce_s": timed(lambda: dist.all_reduce(grads)),
        "allgather_s": timed(lambda: dist.all_gather(gathered, part)),
        "latency_s": timed(lambda: dist.all_reduce(one)),
    }
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


def measure_collectives(grad_numel: int, param_numel: int, repeats: int) -> dict[str, float]:
    """gloo collectives of the model's sizes between two processes on this machine (one thread each)."""
    import torch.multiprocessing as mp

    from megl_ray.cluster.local_cluster import free_port

    out = tempfile.mktemp(suffix=".json")
    mp.spawn(_collective_worker, args=(free_port(), grad_numel, param_numel, repeats, out), nprocs=2, join=True)
    return json.loads(Path(out).read_text())


def _kernel_worker(rank: int, reps: int, start_at: float, out: str) -> None:
    """A fixed single-threaded compute kernel (float32 matmuls, as in a step's layers), started at ``start_at``
    so that concurrent copies overlap; writes its own wall time."""
    import torch

    torch.set_num_threads(1)
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    for _ in range(20):  # warm-up: page in, caches, the allocator
        a @ b
    while time.time() < start_at:
        time.sleep(0.005)
    chunks = []  # timed in chunks, like the steps of a run: a burst of other load moves the median little
    for _ in range(KERNEL_CHUNKS):
        start = time.perf_counter()
        for _ in range(max(1, reps // KERNEL_CHUNKS)):
            c = a @ b
            a = c / c.norm()
        chunks.append(time.perf_counter() - start)
    Path(f"{out}.{rank}").write_text(json.dumps(chunks))


KERNEL_CHUNKS = 20


def measure_kernel(copies: int, reps: int) -> float:
    """Time of the kernel with ``copies`` copies running at once: the median chunk of the slowest copy (the
    workers of a step wait for the slowest) × the chunks, as the bench takes the median step of a run. With one
    copy: what one core gives; with two: what the cores give two processes."""
    import torch.multiprocessing as mp

    out = tempfile.mktemp(prefix="megl-kernel-")
    mp.spawn(_kernel_worker, args=(reps, time.time() + 3.0, out), nprocs=copies, join=True)
    medians = [statistics.median(json.loads(Path(f"{out}.{r}").read_text())) for r in range(copies)]
    for r in range(copies):
        Path(f"{out}.{r}").unlink()
    return max(medians) * KERNEL_CHUNKS


class RunnableSampler:
    """Mean number of runnable processes (``procs_running`` of /proc/stat) while it runs, this sampler excluded."""

    def __init__(self, period: float = 0.1):
        self.period, self.samples, self._stop = period, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for line in Path("/proc/stat").read_text().splitlines():
                if line.startswith("procs_running"):
                    self.samples.append(int(line.split()[1]) - 1)
            time.sleep(self.period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def mean(self) -> float:
        return statistics.mean(self.samples) if self.samples else 0.0


def main(argv=None) -> dict:
    args = parse_args(argv)
    load_start = os.getloadavg()
    import ray

    from megl_ray.cluster.local_cluster import LocalCluster
    from megl_ray.config import load_config, packaged_config
    from megl_ray.data.reader import bundled_dataset_uri, read_split
    from megl_ray.data.schema import load_dataset_info
    from megl_ray.model import build_megl_model
    from megl_ray.model.vlm import load_tokenizer
    from megl_ray.planning import cost_model
    from megl_ray.probes.fixed_batch import run_distributed

    uri = bundled_dataset_uri()
    info = load_dataset_info(uri)
    rows = read_split(uri, "train", info).to_pylist()

    def cfg(workers: int, placement: str = "PACK"):
        return load_config(
            packaged_config("tiny"),
            [
                "optim.lr=0.003",
                "train.zero_stage=2",
                f"data.batch_size={args.batch}",
                f"train.num_workers={workers}",
                f"train.placement_strategy={placement}",
            ],
        )

    tokenizer = load_tokenizer(cfg(1).model, [t for r in rows for t in r["rationales"]] + info.classes)
    model = build_megl_model(cfg(1), info.num_classes, tokenizer=tokenizer)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    del model
    collectives = measure_collectives(trainable, trainable, args.repeats)
    print(f"gloo, {trainable} fp32 values: {collectives}", file=sys.stderr)

    storage = tempfile.mkdtemp(prefix="megl-scaling-")
    env = {"DS_ACCELERATOR": "cpu", "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}"}
    step, kernel = {}, {}
    with LocalCluster(Path(storage) / "cluster", env=env) as cluster:
        cluster.add_node(num_cpus=2, resources={"node_a": 1}, attempts=6)
        ray.init(address=cluster.address, log_to_driver=False)
        try:
            on_head = {"node_a": 0.01}  # both one-node runs on the head
            runs = [
                ("1w", cfg(1), on_head),
                ("2w_one_node", cfg(2), on_head),
                ("2w_two_nodes", cfg(2, "STRICT_SPREAD"), None),
            ]
            for name, c, extra in runs:
                if name == "2w_two_nodes":  # the second node only now: it would idle through the one-node runs
                    cluster.add_node(num_cpus=1, resources={"node_b": 1}, attempts=6)
                # What the cores give one (before the 1-worker run) or two CPU-bound processes (before each
                # 2-worker run), under the load of that moment: the load of a shared machine moves between runs.
                kernel[name] = measure_kernel(1 if name == "1w" else 2, args.kernel_reps)
                print(
                    f"kernel before {name}: {kernel[name]:.3f} s ({1 if name == '1w' else 2} copies)", file=sys.stderr
                )
                with RunnableSampler() as sampler:
                    result = run_distributed(
                        c,
                        tokenizer,
                        info.num_classes,
                        rows,
                        info.mask_size,
                        args.steps,
                        storage,
                        f"scaling-{name}",
                        threads=1,
                        extra_resources=extra,
                    )
                step[name] = statistics.median(result["step_s"][2:])
                step[f"{name}_busy"] = sampler.mean
                print(
                    f"{name}: {step[name]:.4f} s/step (runnable processes besides: {sampler.mean:.1f})", file=sys.stderr
                )
        finally:
            ray.shutdown()

    def calibration(two: str) -> cost_model.CpuCalibration:
        return cost_model.CpuCalibration(
            step_1w_s=step["1w"],
            allreduce_s=collectives["allreduce_s"],
            allgather_s=collectives["allgather_s"],
            latency_s=collectives["latency_s"],
            cores=os.cpu_count() or 1,
            kernel_1_s=kernel["1w"],
            kernel_2_s=kernel[two],
        )

    cal, cal_nodes = calibration("2w_one_node"), calibration("2w_two_nodes")
    predicted, predicted_nodes = cost_model.cpu_throughput_ratio(cal, 2), cost_model.cpu_throughput_ratio(cal_nodes, 2)
    measured = 2 * step["1w"] / step["2w_one_node"]
    measured_nodes = 2 * step["1w"] / step["2w_two_nodes"]
    per_node = {}
    for row in cost_model.scaling_table():
        key = f"{row['model']}/zero{row['zero_stage']}"
        per_node.setdefault(key, {})[str(row["nodes"])] = {
            "samples_per_s": [row["samples_per_s_serial"], row["samples_per_s_overlap"]],
            "step_s": [row["step_s_serial"], row["step_s_overlap"]],
            "memory_gib": row["memory_gib"],
        }
    return {
        "measured_2w_vs_1w": round(measured, 3),
        "measured_2w_vs_1w_two_nodes": round(measured_nodes, 3),
        "predicted_2w_vs_1w": round(predicted, 3),
        "predicted_2w_vs_1w_two_nodes": round(predicted_nodes, 3),
        "relative_error": round(abs(predicted - measured) / measured, 3),
        "relative_error_two_nodes": round(abs(predicted_nodes - measured_nodes) / measured_nodes, 3),
        "predicted_step_2w_s": round(cost_model.cpu_step_prediction(cal, 2), 4),
        "kernel_s": {k: round(v, 4) for k, v in kernel.items()},
        "compute_slowdown_2w": round(cost_model.cpu_compute_slowdown(cal, 2), 3),
        "compute_slowdown_2w_two_nodes": round(cost_model.cpu_compute_slowdown(cal_nodes, 2), 3),
        "runnable_besides": {k[:-5]: round(v, 2) for k, v in step.items() if k.endswith("_busy")},
        "load_average_start": [round(x, 2) for x in load_start],
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "step_1w_s": round(step["1w"], 4),
        "step_2w_one_node_s": round(step["2w_one_node"], 4),
        "step_2w_two_nodes_s": round(step["2w_two_nodes"], 4),
        "gloo": {k: round(v, 5) for k, v in collectives.items()},
        "trainable_params": trainable,
        "machine_cpus": os.cpu_count(),
        "micro_batch": args.batch,
        "steps": args.steps,
        "predicted_per_node_count": per_node,
        "per_node_count_note": f"[serial, overlap] bounds on {cost_model.H100_NODE.name}",
    }


if __name__ == "__main__":
    print(json.dumps(main()))
