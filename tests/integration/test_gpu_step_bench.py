"""``bench/gpu_step.py`` on a Python without Ray, pyarrow and boto3 (what a bare GPU machine has): the tiny CPU run
end to end, its non-finite-step accounting, and its one-line answer where DeepSpeed is missing."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SITE = ROOT / "tests" / "support" / "no_ray_site"
ABSENT = "ray,pyarrow,boto3,botocore"


def _bare(*args: str, block: str = ABSENT, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": f"{SITE}{os.pathsep}{ROOT}",
        "MEGL_BLOCK_IMPORTS": block,
        "DS_ACCELERATOR": "cpu",
    }
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout)


def test_the_blocker_is_the_sitecustomize_python_loads():
    probe = "import importlib.util, sitecustomize; print(sitecustomize.__file__, importlib.util.find_spec('ray'))"
    run = _bare("-c", probe)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == [str(SITE / "sitecustomize.py"), "None"]
    for module in ("ray.train", "pyarrow.fs", "boto3", "botocore.exceptions"):
        assert "ModuleNotFoundError" in _bare("-c", f"import {module}").stderr, module


def test_tiny_cpu_run_reports_every_case():
    bench = str(ROOT / "bench" / "gpu_step.py")
    run = _bare(bench, "--device", "cpu", "--tiny")  # --tiny's defaults: 1 + 2 steps, batch 2, 8 rationale tokens
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["gpu"] == "none (cpu)" and result["tiny"] and result["headline"] == "7b-lora"
    assert (result["steps"], result["warmup"]) == (2, 1)
    names = [c["name"] for c in result["cases"]]
    assert names == ["7b-lora", "7b-lora-ckpt-on", "0.5b-full"], result["cases"]
    for case in result["cases"]:
        assert case["megl_step_ms"] > 0 and case["plain_step_ms"] > 0
        assert case["ds_vs_plain"] == pytest.approx(case["megl_step_ms"] / case["plain_step_ms"], rel=0.02)
        assert case["batch"] == 2 and case["seq_tokens"] == 1 + 16 + 12 + 8  # BOS, 4x4 patches, prompt, rationale
        tokens = case["batch"] * case["seq_tokens"]
        assert case["tokens_per_s"] == pytest.approx(tokens / (case["megl_step_ms"] / 1000), rel=0.02)
        assert case["ds_skipped_steps"] == 0 and case["plain_skipped_steps"] == 0
        assert case["peak_mem_gib"] > 0 and case["predicted_mem_gib"] > 0, case["predicted"]
        # DeepSpeed continues from the plain loop's weights, three small steps on: same objective, nearly the same loss
        assert case["ds_final_loss"] == pytest.approx(case["plain_final_loss"], rel=0.1)
    lora, ckpt, full = result["cases"]
    assert lora["lora_r"] == 16 and not lora["gradient_checkpointing"] and ckpt["gradient_checkpointing"]
    assert full["lora_r"] == 0 and full["trainable_params"] > lora["trainable_params"]
    head = {k: lora[k] for k in ("megl_step_ms", "plain_step_ms", "ds_vs_plain", "tokens_per_s", "peak_mem_gib")}
    assert {k: result[k] for k in head} == head


def test_the_real_shapes_are_the_presets_and_the_memory_model_counts_the_same_parameters():
    """The GPU run's models, built on the meta device: the 7B preset's LM with LoRA r16 on q/k/v/o (32 layers x
    r16 x (4 x 8192) = 16.8 M LoRA parameters), 16-bit frozen weights under fp32 trainable ones, the preset's batch."""
    run = _bare(str(ROOT / "tests" / "support" / "gpu_step_shapes.py"))
    assert run.returncode == 0, run.stderr[-3000:]
    cases = json.loads(run.stdout.strip().splitlines()[-1])
    assert list(cases) == ["7b-lora", "7b-lora-ckpt-on", "0.5b-full"]
    lora, ckpt, full = cases.values()
    assert lora["input_ids"] == [4, 1 + 576 + 12 + 64] and lora["pixels"] == [4, 3, 336, 336]
    assert lora["lora_params"] == 32 * 16 * 4 * (4096 + 4096) and not lora["checkpointing"] and ckpt["checkpointing"]
    assert 6.9e9 < lora["frozen"] < 7.1e9 and full["input_ids"] == [8, 653] and full["lora_params"] == 0
    for case in cases.values():
        assert case["trainable_dtypes"] == ["torch.float32"] and "torch.bfloat16" in case["frozen_dtypes"]
        assert case["predicted"]["trainable_params"] == pytest.approx(case["trainable"], rel=0.01)
        assert case["predicted"]["frozen_params"] == pytest.approx(case["frozen"], rel=0.05)
    assert ckpt["predicted"]["activations"] < lora["predicted"]["activations"]


def test_both_loops_skip_and_count_a_non_finite_step():
    run = _bare(str(ROOT / "tests" / "support" / "gpu_step_nonfinite.py"))
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result == {"plain": {"skipped": 1, "finite": True}, "ds": {"skipped": 1, "finite": True}}


def test_without_deepspeed_it_says_how_to_install_it_in_one_line():
    run = _bare(str(ROOT / "bench" / "gpu_step.py"), "--device", "cpu", "--tiny", block=f"{ABSENT},deepspeed")
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and "Traceback" not in run.stderr
    assert "pip install --no-index --find-links wheels/ deepspeed" in run.stderr
