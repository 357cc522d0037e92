"""The step cost model (``megl_ray.planning.cost_model``): its arithmetic by hand, and docs/scaling.md = its output."""

import re
from dataclasses import replace
from pathlib import Path

import pytest

from megl_ray.planning import cost_model
from megl_ray.planning.cost_model import (
    CpuCalibration,
    Hardware,
    comm_bytes_per_gpu,
    cpu_compute_slowdown,
    cpu_step_prediction,
    cpu_throughput_ratio,
    step_cost,
    step_flops,
)
from megl_ray.planning.memory_model import PRESETS, ModelShape, Setup, TransformerShape, memory_per_gpu

DOC = Path(__file__).resolve().parents[2] / "docs" / "scaling.md"
VISION = TransformerShape(layers=2, hidden=8, intermediate=16, heads=2, gated_mlp=False)
LM = TransformerShape(layers=3, hidden=8, intermediate=16, heads=2, vocab=100)
TOY = ModelShape(
    "r18-toy",
    classifier_params=1000,
    classifier_act_bytes=0.0,
    vision=VISION,
    lm=LM,
    image_tokens=4,
    text_tokens=6,
    rationale_tokens=2,
)


def test_step_flops_follow_the_formula_by_hand():
    setup = Setup(micro_batch=3)
    s_v, s_l = 5, 10
    vision = 2 * 2 * VISION.layer_params() * s_v + 2 * 4 * s_v * s_v * 8
    lm = 2 * 3 * LM.layer_params() * s_l + 3 * 4 * s_l * s_l * 8 + 2 * 8 * 100 * 2  # logits at 2 rationale positions
    cls = cost_model.CLASSIFIER_FWD_FLOPS["r18"]
    # frozen vision: activation gradients only (1×); trained LM and classifier: 2×
    expected = 3 * (cls + vision + lm + 2 * cls + vision + 2 * lm)
    assert step_flops(TOY, setup) == pytest.approx(expected)
    assert step_flops(TOY, setup, grad_accum=2) == pytest.approx(2 * expected)
    assert step_flops(TOY, replace(setup, gradient_checkpointing=True)) == pytest.approx(expected + 3 * (vision + lm))
    lora = replace(TOY, lora_r=4)
    assert step_flops(lora, setup) == pytest.approx(expected - 3 * lm)  # the LM's base weights get no gradient


def test_zero_communication_volumes_by_hand():
    trainable, frozen = TOY.trainable_frozen()
    assert comm_bytes_per_gpu(TOY, Setup(world=1, zero_stage=3))[0] == 0.0
    z2, _ = comm_bytes_per_gpu(TOY, Setup(world=4, zero_stage=2), grad_accum=2)
    assert z2 == pytest.approx(0.75 * (4 * trainable * 2 + 4 * trainable))  # grads every micro-batch, params once
    z1, _ = comm_bytes_per_gpu(TOY, Setup(world=4, zero_stage=1), grad_accum=2)
    assert z1 == pytest.approx(0.75 * (4 * trainable + 4 * trainable))
    z3, _ = comm_bytes_per_gpu(TOY, Setup(world=4, zero_stage=3, precision="bf16"), grad_accum=2)
    assert z3 == pytest.approx(0.75 * 2 * (2 * (4 * trainable + 2 * frozen) + 4 * trainable))
    z3c, _ = comm_bytes_per_gpu(TOY, Setup(world=4, zero_stage=3, gradient_checkpointing=True))
    assert z3c == pytest.approx(0.75 * (3 * (4 * trainable + 2 * frozen) + 4 * trainable))
    for preset in PRESETS:  # ZeRO-3 always moves more than ZeRO-2: it gathers every parameter, frozen ones too
        assert (
            comm_bytes_per_gpu(PRESETS[preset], Setup(world=16, zero_stage=3))[0]
            > comm_bytes_per_gpu(PRESETS[preset], Setup(world=16, zero_stage=2))[0]
        )


def test_step_cost_parts_add_up_and_use_the_memory_model():
    hw = replace(cost_model.H100_NODE, data_cores_per_node=1, decode_s_per_sample=1.0)  # data-bound on purpose
    cost = step_cost("r18-qwen2-0.5b", 2, Setup(micro_batch=8), hw)
    assert cost.gpus == 16
    assert cost.data_s == pytest.approx(64 * 1.0)  # 8 samples × 8 GPUs of one node, one core
    exposed = cost.data_s - cost.compute_s
    assert cost.step_s_serial == pytest.approx(cost.compute_s + cost.comm_s + exposed)
    assert cost.step_s_overlap == pytest.approx(max(cost.compute_s, cost.comm_s) + exposed)
    assert cost.samples_per_s_serial == pytest.approx(128 / cost.step_s_serial)
    expected_gib = memory_per_gpu(PRESETS["r18-qwen2-0.5b"], Setup(micro_batch=8, world=16)).total / 2**30
    assert cost.memory_gib == pytest.approx(expected_gib)
    one_node = step_cost("r18-qwen2-0.5b", 1, Setup(micro_batch=8), cost_model.H100_NODE)
    two = step_cost("r18-qwen2-0.5b", 2, Setup(micro_batch=8), cost_model.H100_NODE)
    assert two.comm_s > one_node.comm_s  # the ring now crosses the NICs, 8× slower than NVLink here
    slow = Hardware(**{**cost_model.H100_NODE.__dict__, "inter_node_busbw": 1e9})
    assert step_cost("r18-qwen2-0.5b", 2, Setup(micro_batch=8), slow).comm_s > two.comm_s


def test_cpu_prediction_from_single_worker_measurements():
    # two free cores: two copies of the kernel run as fast as one, so compute is not slowed
    cal = CpuCalibration(
        step_1w_s=1.0, allreduce_s=0.1, allgather_s=0.05, latency_s=0.01, cores=2, kernel_1_s=2.0, kernel_2_s=2.0
    )
    assert cpu_step_prediction(cal, 1) == pytest.approx(1.0)
    assert cpu_step_prediction(cal, 2) == pytest.approx(1.0 + 0.15 + 0.01)
    assert cpu_throughput_ratio(cal) == pytest.approx(2 / 1.16)
    # the cores give two processes only 1.5 cores' worth (other load, shared caches): compute 1.33× slower each
    shared = replace(cal, kernel_2_s=2.0 * 2 / 1.5)
    assert cpu_compute_slowdown(shared, 2) == pytest.approx(4 / 3)
    assert cpu_step_prediction(shared, 2) == pytest.approx(4 / 3 + 0.16)
    one_core = replace(cal, kernel_2_s=4.0)  # two copies on what amounts to one core: no gain from a 2nd worker
    assert cpu_throughput_ratio(one_core) == pytest.approx(2 / (2.0 + 0.16))
    # 4 workers on 2 cores: each gets half a core at best; ring factor 3/4 relative to 2 workers' 1/2
    assert cpu_step_prediction(cal, 4) == pytest.approx(2.0 + 1.5 * 0.15 + 0.01)


def _doc_table(header_start: str) -> list[dict[str, str]]:
    lines = DOC.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    keys = [k.strip() for k in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(keys, [v.strip() for v in line.strip("|").split("|")])))
    return rows


def test_docs_scaling_tables_are_the_code_output():
    """Every number of docs/scaling.md's step-time and memory tables is what the cost model computes now."""
    scaling = _doc_table("| model | zero_stage | nodes |")
    memory = _doc_table("| model | gpus | zero_stage | precision |")
    computed = {(r["model"], str(r["zero_stage"]), str(r["nodes"])): r for r in cost_model.scaling_table()}
    assert len(scaling) == len(computed) == 16
    for row in scaling:
        code = computed[(row["model"], row["zero_stage"], row["nodes"])]
        for key, value in row.items():
            assert value == str(code[key]), (row["model"], row["nodes"], key)
    mem = {
        (r["model"], str(r["zero_stage"]), r["precision"], str(r["checkpointing"]), r["offload"]): r
        for r in cost_model.memory_table()
    }
    assert len(memory) == len(mem) == 32
    for row in memory:
        code = mem[(row["model"], row["zero_stage"], row["precision"], row["checkpointing"], row["offload"])]
        for key, value in row.items():
            assert value == str(code[key]), (row["model"], key)
    assert re.search(r"H100", DOC.read_text()) and cost_model.H100_NODE.name in DOC.read_text()
