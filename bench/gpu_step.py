"""One MEGL training step on one device: DeepSpeed (in-process, single rank) versus plain PyTorch, per shipped preset.

Cases (``bench/gpu_step_models.py``), each in its own process so that peak memory is its own:
  7b-lora           the shipped r50-llava-1.5-7b-lora preset at its real shapes: ResNet-50, LLaVA-1.5-7B's LM
                    (Llama, hidden 4096, 32 layers, vocab 32,064) with LoRA r16 on q/k/v/o, frozen CLIP-L/14-336,
                    ZeRO-2, bf16, micro-batch 4, 64 rationale tokens, checkpointing as the preset has it (off)
  7b-lora-ckpt-on   the same with gradient checkpointing flipped (``--cases 7b-lora-ckpt-flip``)
  0.5b-full         the shipped r18-qwen2-0.5b preset: ResNet-18, Qwen2-0.5B fine-tuned in full, frozen CLIP-L/336,
                    ZeRO-2, bf16, micro-batch 8
Random init from config, no downloads; the big models are built on the device in bf16. Each case runs the plain
loop first (``torch.autocast`` bf16 forward over fp32 trainable weights, backward, clip, the project's AdamW and
schedule from ``megl_ray.training.optim``), then hands the same model to ``deepspeed.initialize`` with the config
training generates (``megl_ray.training.ds_config``). A step is one micro-batch: forward, backward, optimizer step.
Non-finite steps: DeepSpeed skips them (``engine.skipped_steps``); the plain loop detects them the same way (a
non-finite loss or gradient norm) and skips and counts them instead of applying them.

Last stdout line, one JSON object: the headline case (7b-lora) as ``megl_step_ms`` (DeepSpeed step, median),
``plain_step_ms``, ``ds_vs_plain`` (their quotient; goal on one H100/H200 <= 1.2), ``tokens_per_s`` (sequence
tokens of the DeepSpeed step), ``peak_mem_gib`` (DeepSpeed phase: CUDA allocator peak; process RSS peak on CPU),
``predicted_mem_gib`` (``megl_ray.planning.memory_model.memory_per_gpu``), skipped steps, and ``cases``: every case
in full. ``--device cpu --tiny`` runs the same code at tiny shapes, a few small steps (CI smoke test). Needs torch,
transformers, torchvision, peft, deepspeed and megl_ray on the path; no Ray, pyarrow or boto3 (bench/README.md).
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import importlib.util
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # megl_ray from this checkout when it is not installed
sys.path.insert(0, str(HERE))

INSTALL_HINT = (
    "gpu_step: DeepSpeed is not installed; install the wheels bench/README.md lists: "
    "pip install --no-index --find-links wheels/ deepspeed peft"
)


@dataclass(frozen=True)
class Case:
    """One measured configuration: a shipped preset, its LM's shapes, and whether checkpointing is flipped."""

    name: str
    preset: str
    lm: str
    flip_checkpointing: bool = False


CASES = (
    Case("7b-lora", "r50-llava-1.5-7b-lora", "llama-7b"),  # the headline: the 7B preset as it ships
    Case("7b-lora-ckpt-flip", "r50-llava-1.5-7b-lora", "llama-7b", flip_checkpointing=True),
    Case("0.5b-full", "r18-qwen2-0.5b", "qwen2-0.5b"),
)
HEADLINE = CASES[0].name


def case_config(case: Case, tiny: bool, batch: int | None, rationale_tokens: int | None):
    """The preset's config for one process on one device: one worker, one micro-batch per optimizer step (the
    step measured is forward + backward + update), bf16 (what the presets resolve to on a GPU; forced so that
    the CPU smoke test runs the same autocast path), random-init classifier (no torchvision download)."""
    from megl_ray.config import load_config

    preset = load_config(case.preset)
    overrides = [
        "train.num_workers=1",
        "train.grad_accum=1",
        "train.precision=bf16",
        "model.classifier_weights=null",
    ]
    if case.flip_checkpointing:
        overrides.append(f"model.gradient_checkpointing={str(not preset.model.gradient_checkpointing).lower()}")
    if tiny:  # the tiny preset's CNN and image side: a ResNet at 224² would dominate a 2-core CPU's step
        overrides += ["model.classifier=tiny", "model.image_size=64"]
    if batch:
        overrides.append(f"data.batch_size={batch}")
    if rationale_tokens:
        overrides.append(f"model.max_text_tokens={rationale_tokens}")
    return load_config(case.preset, overrides)


def case_name(case: Case, cfg) -> str:
    """``7b-lora-ckpt-on`` (or ``-off``) for the flipped case; the case's own name otherwise."""
    if not case.flip_checkpointing:
        return case.name
    return case.name.replace("flip", "on" if cfg.model.gradient_checkpointing else "off")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (smoke test)")
    p.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    p.add_argument("--steps", type=int, default=None, help="measured steps (default 20; 2 with --tiny)")
    p.add_argument("--warmup", type=int, default=None, help="default 3; 1 with --tiny")
    p.add_argument("--batch", type=int, default=None, help="micro-batch (default: each preset's; 2 with --tiny)")
    p.add_argument("--rationale-tokens", type=int, default=None, help="default: the preset's; 8 with --tiny")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # one case, in this process
    args = p.parse_args(argv)
    # --tiny is the CI smoke test: a few small steps, so that three processes finish well within a minute
    for key, full, tiny in (("steps", 20, 2), ("warmup", 3, 1), ("batch", None, 2), ("rationale_tokens", None, 8)):
        if getattr(args, key) is None:
            setattr(args, key, tiny if args.tiny else full)
    return args


# ------------------------------------------------------------------------------------------------ one case, one process


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device: str) -> None:
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: str) -> float:
    """CUDA allocator peak since the last reset; on CPU the process's peak RSS (since it started: it covers the
    plain phase too, which runs first)."""
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30


def _timed(device: str, step) -> float:
    _sync(device)
    start = time.perf_counter()
    step()
    _sync(device)
    return time.perf_counter() - start


def plain_loop(model, cfg, batch: dict, device: str, warmup: int, steps: int) -> dict:
    """The update rule DeepSpeed runs, by hand: autocast forward, backward, clip, AdamW, schedule, with a step whose
    loss or gradient norm is not finite skipped (gradients dropped, schedule held) and counted, as DeepSpeed does."""
    import torch

    from megl_ray.model.precision import autocast_dtype
    from megl_ray.training.optim import build_optimizer, build_scheduler

    half = autocast_dtype(cfg.train.precision)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, 1000)
    params = [p for p in model.parameters() if p.requires_grad]
    clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")  # inf: the norm without clipping
    state = {"skipped": 0, "loss": float("nan")}

    def step():
        with torch.autocast(device, dtype=half or torch.float32, enabled=half is not None):
            out = model(**batch)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
        # one host sync, as DeepSpeed's own overflow check makes
        if bool(torch.isfinite(norm) & torch.isfinite(out.loss.detach())):
            optimizer.step()
            scheduler.step()
        else:
            optimizer.zero_grad(set_to_none=True)
            state["skipped"] += 1
        state["loss"] = out.loss.item()

    _reset_peak(device)
    times = [_timed(device, step) for _ in range(warmup + steps)][warmup:]
    result = {"step_s": times, "skipped": state["skipped"], "loss": state["loss"], "peak_gib": _peak_gib(device)}
    optimizer.zero_grad(set_to_none=True)  # the gradients go; the optimizer's state goes with this frame
    return result


def init_single_rank(device: str) -> None:
    """torch.distributed as one rank of one (what DeepSpeed needs), on a free local port: nccl on CUDA, gloo on CPU."""
    import deepspeed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo", auto_mpi_discovery=False)


def deepspeed_loop(model, cfg, batch: dict, device: str, warmup: int, steps: int) -> dict:
    """The training worker's step: ``deepspeed.initialize`` with the generated config and the project's optimizer
    and schedule, then engine forward, backward, step."""
    import deepspeed

    from megl_ray.training.ds_config import deepspeed_config, trainable_parameters
    from megl_ray.training.optim import build_optimizer, build_scheduler

    _reset_peak(device)
    optimizer = build_optimizer(model, cfg.optim)
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=build_scheduler(optimizer, cfg.optim, 1000),
        config=deepspeed_config(cfg, device == "cuda", trainable_parameters(model)),
        dist_init_required=False,
    )
    batch = {k: v.to(engine.device) for k, v in batch.items()}
    state = {"loss": float("nan")}

    def step():
        out = engine(**batch)
        engine.backward(out.loss)
        engine.step()
        state["loss"] = out.loss.item()

    times = [_timed(device, step) for _ in range(warmup + steps)][warmup:]
    return {"step_s": times, "skipped": engine.skipped_steps, "loss": state["loss"], "peak_gib": _peak_gib(device)}


def run_case(name: str, args) -> dict:
    """Build the case's model and batch, time the plain loop then DeepSpeed on it, and set the memory model's
    prediction beside the measured peak."""
    import gpu_step_models as models
    import torch

    case = next(c for c in CASES if c.name == name)
    cfg = case_config(case, args.tiny, args.batch, args.rationale_tokens)
    device = args.device
    if device == "cuda":
        torch.cuda.set_device(0)
    init_single_rank(device)
    model, batch = models.build(case.lm, cfg, args.tiny, device)
    trainable, frozen = models.param_counts(model)
    try:
        predicted = models.predicted_memory(model, cfg, batch, device == "cuda")
    except Exception as err:  # the memory model changes under another hand: a mismatch must not cost the timing
        predicted = {"error": f"{type(err).__name__}: {err}"}
    model.to(device).train()
    on_device = {k: v.to(device) for k, v in batch.items()}
    plain = plain_loop(model, cfg, on_device, device, args.warmup, args.steps)
    ds = deepspeed_loop(model, cfg, on_device, device, args.warmup, args.steps)
    ds_s, plain_s = statistics.median(ds["step_s"]), statistics.median(plain["step_s"])
    batch_size, seq = batch["input_ids"].shape
    return {
        "name": case_name(case, cfg),
        "preset": case.preset,
        "lm": case.lm,
        "lora_r": cfg.model.lora_r,
        "gradient_checkpointing": cfg.model.gradient_checkpointing,
        "zero_stage": cfg.train.zero_stage,
        "precision": cfg.train.precision,
        "batch": batch_size,
        "seq_tokens": seq,
        "trainable_params": trainable,
        "frozen_params": frozen,
        "megl_step_ms": round(ds_s * 1000, 2),
        "plain_step_ms": round(plain_s * 1000, 2),
        "ds_vs_plain": round(ds_s / plain_s, 3),
        "tokens_per_s": round(batch_size * seq / ds_s, 1),
        "plain_tokens_per_s": round(batch_size * seq / plain_s, 1),
        "peak_mem_gib": round(ds["peak_gib"], 2),
        "plain_peak_mem_gib": round(plain["peak_gib"], 2),
        "predicted_mem_gib": predicted.get("total"),
        "predicted": predicted,
        "ds_skipped_steps": ds["skipped"],
        "plain_skipped_steps": plain["skipped"],
        "ds_final_loss": round(ds["loss"], 4),
        "plain_final_loss": round(plain["loss"], 4),
    }


def child_main(args) -> int:
    try:
        print(json.dumps(run_case(args.child, args)), flush=True)
        return 0
    except Exception as err:  # one line in the summary; the traceback stays on stderr
        traceback.print_exc()
        print(json.dumps({"name": args.child, "error": f"{type(err).__name__}: {str(err).splitlines()[0]}"}))
        return 1


# ------------------------------------------------------------------------------------------------ the driver


def run_child(name: str, argv: list[str], device: str) -> dict:
    """One case in a fresh interpreter (its own CUDA context, allocator peak and RSS); stderr passes through."""
    env = {**os.environ, "DS_ACCELERATOR": device}  # DeepSpeed picks its accelerator when first imported
    run = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), *argv, "--child", name],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    lines = run.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        return {"name": name, "error": f"exited {run.returncode} without a result"}


def _cuda_visible() -> bool:
    import torch

    return torch.cuda.is_available()


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name()


def summary(cases: list[dict], args) -> dict:
    head = next((c for c in cases if c.get("name") == HEADLINE and "error" not in c), {})
    keys = ("megl_step_ms", "plain_step_ms", "ds_vs_plain", "tokens_per_s", "peak_mem_gib", "predicted_mem_gib")
    return {
        **{k: head.get(k) for k in keys},
        "ds_skipped_steps": head.get("ds_skipped_steps"),
        "plain_skipped_steps": head.get("plain_skipped_steps"),
        "headline": HEADLINE,
        "gpu": _gpu_name() if args.device == "cuda" else "none (cpu)",
        "device": args.device,
        "tiny": args.tiny,
        "steps": args.steps,
        "warmup": args.warmup,
        "torch": importlib.metadata.version("torch"),
        "deepspeed": importlib.metadata.version("deepspeed"),
        "cases": cases,
    }


def main(argv=None) -> tuple[dict | None, int]:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if importlib.util.find_spec("deepspeed") is None:
        print(INSTALL_HINT, file=sys.stderr)
        return {"error": "deepspeed not installed"}, 2
    if args.child:
        return None, child_main(args)
    if args.device == "cuda" and not _cuda_visible():
        print("gpu_step: --device cuda but no CUDA device is visible (use --device cpu --tiny)", file=sys.stderr)
        return {"error": "no CUDA device"}, 2
    names = [c.name for c in CASES] if not args.cases else args.cases.split(",")
    unknown = set(names) - {c.name for c in CASES}
    if unknown:
        print(f"gpu_step: unknown case(s) {sorted(unknown)}; known: {[c.name for c in CASES]}", file=sys.stderr)
        return {"error": "unknown case"}, 2
    cases = []
    for name in names:
        print(f"gpu_step: {name} ...", file=sys.stderr, flush=True)
        cases.append(run_child(name, argv, args.device))
    return summary(cases, args), 1 if any("error" in c for c in cases) else 0


if __name__ == "__main__":
    result, code = main()
    if result is not None:  # a child prints its own case
        print(json.dumps(result), flush=True)
    sys.exit(code)
