"""The cost of one optimizer step of a MEGL model on N nodes: compute, ZeRO communication, data loading.

No Ray, no torch: arithmetic on the architecture shapes of ``megl_ray.planning.memory_model`` (which also gives the
memory per GPU: there is one memory model in the project), so ``docs/scaling.md`` is generated from code
(``python -m megl_ray.planning.cost_model`` prints its tables) and ``bench/scaling.py`` checks the same formulas
against measured CPU workers.

What the numbers follow:
- Compute. A transformer's forward is 2·P·s FLOPs for P matrix parameters over s tokens, plus 4·s²·h per layer for
  attention scores and their weighted sum; the LM head costs 2·h·V per position whose logits are computed. The
  backward is 2× the forward for trainable weights (activation and weight gradients) and 1× for frozen ones
  (activation gradients only): in MEGL every frozen part still carries gradients through it — the text loss reaches
  the classifier's saliency Â through the LM *and* the CLIP tower (V = W_A·CLIP(I ⊙ Â) + W_I·Z_I). Gradient
  checkpointing adds one forward. Step time = FLOPs / (peak × MFU), MFU an assumption stated with the hardware.
- Communication, per GPU per optimizer step, of ring collectives over N GPUs (each moves (N−1)/N of the tensor):
  ZeRO-1/2 reduce-scatter the trainable gradients (fp32, 4 B; ZeRO-2 at every micro-batch, ZeRO-1 once) and
  all-gather the updated trainable parameters (4 B) after the step; frozen parameters never move. ZeRO-3 also
  partitions every parameter (trainable 4 B, frozen 2 B in 16-bit precisions): each micro-batch all-gathers them in
  the forward and again in the backward (once more when checkpointing recomputes the forward), then reduce-scatters
  the gradients. Time = bytes / bus bandwidth of the slowest link the ring crosses (NVLink inside one node, the
  NICs across nodes) + a latency per collective.
- Data loading, per node per step: bytes read from S3 / the node's S3 bandwidth, or CPU decode + resize + tokenise
  time / the node's data cores, whichever is slower. Ray Data streams ahead of the trainer, so only what exceeds the
  compute time is exposed.
- Step time is given two ways: ``serial`` (compute + communication + exposed data: no overlap, as DeepSpeed runs on
  CPUs) and ``overlap`` (communication hidden behind compute up to the compute time, as ``overlap_comm`` does on
  GPUs). The truth lies between; the CPU bench measures the serial case.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, replace

from megl_ray.planning.memory_model import (
    PRESETS,
    ModelShape,
    Setup,
    TransformerShape,
    bucket_elements,
    memory_per_gpu,
)

GIB = 2**30


@dataclass(frozen=True)
class Hardware:
    """One kind of node, and what the model assumes of it (datasheet figures derated; none measured here)."""

    name: str
    gpus_per_node: int
    peak_flops: float
    """Dense bf16 FLOP/s of one GPU."""
    mfu: float
    """Fraction of the peak a MEGL step reaches (an assumption: 0.3-0.45 is typical of well-fed LLM training)."""
    intra_node_busbw: float
    """Collective bus bandwidth per GPU inside a node (bytes/s)."""
    inter_node_busbw: float
    """Collective bus bandwidth per GPU when the ring crosses nodes (one NIC per GPU), bytes/s."""
    collective_latency_s: float
    """Fixed cost of one collective call (launch + ring start-up)."""
    data_cores_per_node: int
    """CPU cores a node gives Ray Data (decode, resize, tokenise)."""
    s3_bytes_per_s: float
    """S3 read bandwidth of one node."""
    decode_s_per_sample: float
    """CPU seconds to decode, resize and tokenise one sample at 224 px."""
    bytes_per_sample: float
    """Stored bytes of one sample (encoded image, mask, rationales)."""


H100_NODE = Hardware(
    name="8× H100-SXM 80 GB per node; NVLink 4 inside a node (450 GB/s per GPU and direction, 360 GB/s bus "
    "bandwidth assumed); 8× 400 Gb/s InfiniBand NDR between nodes (one NIC per GPU: 50 GB/s, 45 GB/s "
    "assumed); 96 data cores and 3 GB/s of S3 per node",
    gpus_per_node=8,
    peak_flops=989e12,
    mfu=0.35,
    intra_node_busbw=360e9,
    inter_node_busbw=45e9,
    collective_latency_s=50e-6,
    data_cores_per_node=96,
    s3_bytes_per_s=3e9,
    decode_s_per_sample=0.004,
    bytes_per_sample=150e3,
)

# Forward FLOPs of one 224² image through the classifier trunk (2 × torchvision's multiply-accumulates).
CLASSIFIER_FWD_FLOPS = {"r18": 2 * 1.82e9, "r50": 2 * 4.09e9}


def _stack_fwd_flops(t: TransformerShape, tokens: int, logit_positions: int = 0) -> float:
    matrices = t.layers * t.layer_params()
    attention = t.layers * 4.0 * tokens * tokens * t.hidden
    return 2.0 * matrices * tokens + attention + 2.0 * t.hidden * t.vocab * logit_positions


def step_flops(model: ModelShape, setup: Setup, grad_accum: int = 1) -> float:
    """FLOPs of one optimizer step on one GPU: ``micro_batch × grad_accum`` samples forward and backward."""
    classifier = CLASSIFIER_FWD_FLOPS[model.name.split("-")[0]]
    seq = model.image_tokens + model.text_tokens
    positions = model.rationale_tokens if setup.rationale_only_logits else seq
    vision = _stack_fwd_flops(model.vision, model.image_tokens + 1)
    lm = _stack_fwd_flops(model.lm, seq, positions)
    lm_trains_whole = not (model.lora_r > 0 or model.freeze_lm)
    # backward: 2× forward where weights train, 1× where only activation gradients pass through (frozen/LoRA base)
    backward = (
        2.0 * classifier + (2.0 if not model.freeze_vision else 1.0) * vision + (2.0 if lm_trains_whole else 1.0) * lm
    )
    recompute = (vision + lm) if setup.gradient_checkpointing else 0.0
    per_sample = classifier + vision + lm + backward + recompute
    return per_sample * setup.micro_batch * grad_accum


def comm_bytes_per_gpu(model: ModelShape, setup: Setup, grad_accum: int = 1) -> tuple[float, int]:
    """(bytes each GPU sends in collectives per optimizer step, number of collective calls) for ``setup.world`` GPUs."""
    n = setup.world
    if n <= 1:
        return 0.0, 0
    trainable, frozen = model.trainable_frozen()
    share = (n - 1) / n
    grads = 4.0 * trainable
    half = setup.precision in ("bf16", "fp16")
    params_all = 4.0 * trainable + (2.0 if half else 4.0) * frozen
    # ds_config's reduce/all-gather bucket (elements): one collective per bucket of trainable parameters
    buckets = math.ceil(trainable / bucket_elements(trainable))
    if setup.zero_stage == 0:  # plain data parallel: one all-reduce (= reduce-scatter + all-gather) of the gradients
        return 2.0 * share * grads, buckets
    if setup.zero_stage <= 2:
        reductions = grad_accum if setup.zero_stage == 2 else 1
        volume = share * (grads * reductions + 4.0 * trainable)
        calls = reductions * buckets + buckets
        return volume, calls
    gathers = 2 + (1 if setup.gradient_checkpointing else 0)
    volume = share * grad_accum * (gathers * params_all + grads)
    layers = model.lm.layers + (model.vision.layers if model.vision else 0)
    calls = grad_accum * (gathers * layers + buckets)
    return volume, calls


@dataclass
class StepCost:
    nodes: int
    gpus: int
    compute_s: float
    comm_gb_per_gpu: float
    comm_s: float
    data_s: float
    step_s_serial: float
    step_s_overlap: float
    samples_per_s_serial: float
    samples_per_s_overlap: float
    memory_gib: float


def step_cost(preset: str, nodes: int, setup: Setup, hw: Hardware = H100_NODE, grad_accum: int = 1) -> StepCost:
    """Compute, communication and data time of one optimizer step of ``preset`` on ``nodes`` nodes of ``hw``."""
    model = PRESETS[preset]
    gpus = nodes * hw.gpus_per_node
    setup = replace(setup, world=gpus)
    compute = step_flops(model, setup, grad_accum) / (hw.peak_flops * hw.mfu)
    volume, calls = comm_bytes_per_gpu(model, setup, grad_accum)
    busbw = hw.intra_node_busbw if nodes == 1 else hw.inter_node_busbw
    comm = volume / busbw + calls * hw.collective_latency_s if gpus > 1 else 0.0
    samples_node = setup.micro_batch * grad_accum * hw.gpus_per_node
    data = max(
        samples_node * hw.bytes_per_sample / hw.s3_bytes_per_s,
        samples_node * hw.decode_s_per_sample / hw.data_cores_per_node,
    )
    exposed = max(0.0, data - compute)
    serial = compute + comm + exposed
    overlap = max(compute, comm) + exposed
    samples = setup.micro_batch * grad_accum * gpus
    return StepCost(
        nodes=nodes,
        gpus=gpus,
        compute_s=compute,
        comm_gb_per_gpu=volume / 1e9,
        comm_s=comm,
        data_s=data,
        step_s_serial=serial,
        step_s_overlap=overlap,
        samples_per_s_serial=samples / serial,
        samples_per_s_overlap=samples / overlap,
        memory_gib=memory_per_gpu(model, setup).total / GIB,
    )


# ------------------------------------------------------------------------------------ CPU workers (bench/scaling.py)


@dataclass(frozen=True)
class CpuCalibration:
    """What ``bench/scaling.py`` measures to predict N CPU workers: ONE worker's step, gloo collectives between two
    plain processes, and how much compute the machine gives two CPU-bound processes at once (a kernel with no Ray,
    DeepSpeed or model in it: a property of the cores and of whatever else runs on them, not of the training job)."""

    step_1w_s: float
    """Median step time of one worker (its micro-batch, DeepSpeed ZeRO, no peers)."""
    allreduce_s: float
    """Measured gloo all-reduce of the gradient bytes between two processes."""
    allgather_s: float
    """Measured gloo all-gather of the trainable parameter bytes between two processes."""
    latency_s: float
    """Measured gloo all-reduce of one number (the per-step scalar collectives of the loop)."""
    cores: int
    """CPU cores of the machine (stated: ``os.cpu_count()``)."""
    kernel_1_s: float = 1.0
    """A fixed single-threaded compute kernel (``bench/scaling.py``: float32 matmuls), one copy running alone."""
    kernel_2_s: float = 1.0
    """The same kernel with two copies running at once, the slower copy's time: 1× ``kernel_1_s`` on two free cores,
    2× on one core (or two hyperthreads of one), in between when other processes take part of a core."""
    scalar_collectives_per_step: int = 1


def cpu_compute_slowdown(cal: CpuCalibration, workers: int) -> float:
    """How much longer each worker's compute takes when ``workers`` single-threaded workers run at once than when
    one runs alone: the measured two-copy kernel slowdown for 2; for more, at least ``workers / cores`` (the cores
    are shared out), and never less than what two copies already cost."""
    if workers <= 1:
        return 1.0
    measured = cal.kernel_2_s / cal.kernel_1_s
    return measured if workers == 2 else max(measured, workers / cal.cores)


def cpu_step_prediction(cal: CpuCalibration, workers: int) -> float:
    """Predicted step time of ``workers`` CPU workers (same micro-batch each): one worker's compute slowed by sharing
    the cores (``cpu_compute_slowdown``), plus ZeRO-2's gradient reduction and parameter gather (scaled from the
    two-process measurement by the ring factor (N−1)/N relative to N=2), plus the loop's scalar collectives. No
    overlap: gloo collectives on CPUs run between the compute, not beside it."""
    compute = cal.step_1w_s * cpu_compute_slowdown(cal, workers)
    if workers == 1:
        return compute
    ring = ((workers - 1) / workers) / 0.5
    comm = ring * (cal.allreduce_s + cal.allgather_s) + cal.scalar_collectives_per_step * cal.latency_s
    return compute + comm


def cpu_throughput_ratio(cal: CpuCalibration, workers: int = 2) -> float:
    """Predicted samples/s of ``workers`` workers ÷ samples/s of one."""
    return workers * cal.step_1w_s / cpu_step_prediction(cal, workers)


# ------------------------------------------------------------------------------------------------ docs tables

DOC_CONFIGS = {
    # preset: (setup on the GPUs, gradient accumulation) as in megl_ray/config/presets/*.yaml
    "r18-qwen2-0.5b": (Setup(zero_stage=2, precision="bf16", micro_batch=8), 1),
    "r50-llava-1.5-7b-lora": (Setup(zero_stage=2, precision="bf16", micro_batch=4), 4),
}
NODE_COUNTS = (1, 2, 4, 8)


def scaling_table(hw: Hardware = H100_NODE) -> list[dict[str, object]]:
    """Per preset, ZeRO stage and node count: the step's parts and throughput (both bounds)."""
    rows = []
    for preset, (setup, accum) in DOC_CONFIGS.items():
        for stage in (2, 3):
            base = None
            for nodes in NODE_COUNTS:
                cost = step_cost(preset, nodes, replace(setup, zero_stage=stage), hw, accum)
                base = base or cost
                rows.append(
                    {
                        "model": preset,
                        "zero_stage": stage,
                        "micro_batch": setup.micro_batch,
                        "grad_accum": accum,
                        **{k: _r(v) for k, v in asdict(cost).items()},
                        "efficiency_overlap": _r(cost.samples_per_s_overlap / (base.samples_per_s_overlap * nodes)),
                        "efficiency_serial": _r(cost.samples_per_s_serial / (base.samples_per_s_serial * nodes)),
                    }
                )
    return rows


def memory_table(nodes: int = 1, hw: Hardware = H100_NODE) -> list[dict[str, object]]:
    """Per-GPU memory (GiB, ``memory_model``) for each ZeRO stage × precision × checkpointing × offload."""
    rows = []
    for preset, (setup, _) in DOC_CONFIGS.items():
        for stage in (2, 3):
            for precision in ("bf16", "fp32"):
                for ckpt in (False, True):
                    for offload in ("none", "cpu"):
                        s = replace(
                            setup,
                            world=nodes * hw.gpus_per_node,
                            zero_stage=stage,
                            precision=precision,
                            gradient_checkpointing=ckpt,
                            offload=offload,
                        )
                        est = memory_per_gpu(PRESETS[preset], s).gib()
                        rows.append(
                            {
                                "model": preset,
                                "gpus": s.world,
                                "zero_stage": stage,
                                "precision": precision,
                                "checkpointing": ckpt,
                                "offload": offload,
                                **est,
                                "fits_80gb": est["total"] <= 80,
                            }
                        )
    return rows


def _r(value: object) -> object:
    if isinstance(value, float):
        return float(f"{value:.4g}")
    return value


def markdown(rows: list[dict[str, object]], keys: list[str]) -> str:
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(prog="python -m megl_ray.planning.cost_model", description=__doc__.split("\n\n")[0])
    p.add_argument("--markdown", action="store_true", help="print the docs/scaling.md tables to stderr")
    args = p.parse_args(argv)
    scaling, memory = scaling_table(), memory_table()
    if args.markdown:
        print(
            markdown(
                scaling,
                [
                    "model",
                    "zero_stage",
                    "nodes",
                    "gpus",
                    "compute_s",
                    "comm_gb_per_gpu",
                    "comm_s",
                    "data_s",
                    "step_s_serial",
                    "step_s_overlap",
                    "samples_per_s_overlap",
                    "efficiency_overlap",
                    "efficiency_serial",
                    "memory_gib",
                ],
            ),
            file=sys.stderr,
        )
        print(file=sys.stderr)
        print(
            markdown(
                memory,
                [
                    "model",
                    "gpus",
                    "zero_stage",
                    "precision",
                    "checkpointing",
                    "offload",
                    "params",
                    "grads",
                    "optimizer",
                    "activations",
                    "logits",
                    "host_offload",
                    "total",
                    "fits_80gb",
                ],
            ),
            file=sys.stderr,
        )
    return {"hardware": H100_NODE.name, "scaling": scaling, "memory": memory}


if __name__ == "__main__":
    print(json.dumps(main()))
