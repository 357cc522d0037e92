"""The 7B preset, the cluster files, the Docker image and docs/scaling.md agree with each other and with the cost
model (``megl_ray.planning.cost_model``): the ZeRO stage the preset ships is the one the model finds faster at the
preset's shapes, the node the AWS config launches is the node the model assumes (GPUs, memory, fabric bandwidth),
the image carries what that fabric needs, and the scaling doc states what each deployment gives."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from megl_ray.config import load_config, packaged_config
from megl_ray.planning.cost_model import DOC_CONFIGS, H100_NODE, step_cost

REPO = Path(__file__).resolve().parents[2]
PRESET = "r50-llava-1.5-7b-lora"
GPU_MEMORY_GIB = 80  # H100-SXM
EFA_GBPS = {"p5.48xlarge": 32 * 100}  # network cards × Gb/s each (AWS's datasheet)


def _aws_gpu_node() -> dict:
    doc = yaml.safe_load((REPO / "cluster" / "aws-gpu.yaml").read_text())
    return next(t for t in doc["available_node_types"].values() if t.get("resources", {}).get("GPU"))


def test_the_7b_preset_ships_the_zero_stage_its_cost_model_finds_faster_and_the_doc_tables_use_it():
    cfg = load_config(packaged_config(PRESET))
    setup, accum = DOC_CONFIGS[PRESET]
    assert (cfg.train.zero_stage, cfg.data.batch_size, cfg.train.grad_accum) == (
        setup.zero_stage,
        setup.micro_batch,
        accum,
    )
    assert cfg.model.lora_r > 0 and cfg.train.num_workers == H100_NODE.gpus_per_node  # LoRA, one node
    costs = {stage: step_cost(PRESET, 1, replace(setup, zero_stage=stage), grad_accum=accum) for stage in (2, 3)}
    fits = {stage: cost for stage, cost in costs.items() if cost.memory_gib <= GPU_MEMORY_GIB}
    best = max(fits, key=lambda stage: fits[stage].samples_per_s_overlap)
    assert cfg.train.zero_stage == best, {s: (c.samples_per_s_overlap, c.memory_gib) for s, c in costs.items()}


def test_the_aws_gpu_node_is_the_cost_models_node_with_its_efa_fabric():
    node = _aws_gpu_node()
    config = node["node_config"]
    instance = config["InstanceType"]
    assert node["resources"]["GPU"] == H100_NODE.gpus_per_node
    assert "H100" in H100_NODE.name and instance == "p5.48xlarge"  # 8x H100 80 GB
    interfaces = config["NetworkInterfaces"]
    assert [i["NetworkCardIndex"] for i in interfaces] == list(range(32))
    assert {i["InterfaceType"] for i in interfaces} == {"efa"} and interfaces[0]["DeviceIndex"] == 0
    assert config["Placement"]["GroupName"]  # EFA needs the nodes in one cluster placement group
    per_gpu = EFA_GBPS[instance] / 8 * 1e9 / H100_NODE.gpus_per_node  # bytes/s of fabric per GPU
    # the model's inter-node bus bandwidth is this link derated (45 of 50 GB/s), not more than the link
    assert 0.8 * per_gpu <= H100_NODE.inter_node_busbw <= per_gpu
    options = " ".join(node["docker"]["worker_run_options"])
    for needed in ("--device=/dev/infiniband", "IPC_LOCK", "memlock=-1", "FI_PROVIDER=efa"):
        assert needed in options, needed


def test_the_image_carries_the_efa_user_space_and_the_deepspeed_the_package_requires():
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "efa_installer.sh" in dockerfile and "--skip-kmod" in dockerfile
    assert re.search(r"LD_LIBRARY_PATH=\S*/opt/amazon/ofi-nccl/lib", dockerfile)
    pinned = re.search(r"ARG DEEPSPEED_VERSION=(\S+)", dockerfile).group(1)
    pyproject = (REPO / "pyproject.toml").read_text()
    deepspeed = Requirement(re.search(r'"(deepspeed[^"]*)"', pyproject).group(1))
    assert deepspeed.specifier.contains(pinned) and not deepspeed.specifier.contains("0.19.7")


@pytest.mark.parametrize("deployment", ["cluster/aws-gpu.yaml", "cluster/gcp-gpu.yaml", "cluster/kuberay/"])
def test_the_scaling_doc_states_the_fabric_bandwidth_of_each_deployment(deployment):
    doc = (REPO / "docs" / "scaling.md").read_text()
    rows = [line for line in doc.splitlines() if line.startswith(f"| `{deployment}")]
    assert rows and all(re.search(r"\d[\d,]* Gb/s", row) for row in rows), rows
    node_gbs = round(EFA_GBPS["p5.48xlarge"] / 8)  # GB/s of the AWS node's fabric: the model's assumption
    assert f"**{node_gbs} GB/s of RDMA per node**" in doc
