"""``python -m megl_ray.evaluate --efficiency``: the paper's efficiency table (Table 5) for an export — parameters,
per-image latency and images/s of (a) the classifier with its saliency Â and (b) classifier + saliency + rationale
generation, at batch 1 and at a throughput batch (``--batch-size``).

Each figure is the median of ``--repeats`` timed calls after ``--warmup`` untimed ones (CUDA synchronised around
each call). Inputs are random pixels of the model's image size: latency does not depend on what the image shows,
and generation is held at exactly ``max_new_tokens`` tokens (``min_new_tokens``), so a model that happens to stop
early does not look fast. The device and precision are resolved as for evaluation (``megl_ray.evaluation.inference``).
"""

from __future__ import annotations

import logging
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from megl_ray.errors import UserError
from megl_ray.evaluation.inference import load_for_inference
from megl_ray.evaluation.options import EvaluateOptions
from megl_ray.evaluation.scoring import write_json

log = logging.getLogger("megl_ray.evaluation.efficiency")

PIPELINES = ("classifier+saliency", "classifier+saliency+rationale")


def count_parameters(model: Any) -> dict[str, int]:
    """Parameters per part of a MEGLModel. LoRA factors are left out of the VLM counts (after merging they are
    folded into the base weights); ``lora`` counts them."""

    def total(module: Any, lora: bool = False) -> int:
        if module is None:
            return 0
        return sum(p.numel() for n, p in module.named_parameters() if ("lora_" in n) == lora)

    vlm = model.vlm
    counts = {
        "classifier": total(model.classifier),
        "vision_tower": total(vlm.model.vision_tower),
        "projector": total(vlm.model.multi_modal_projector) + total(model.fusion),
        "language_model": total(vlm.model.language_model) + total(vlm.lm_head),
        "lora": total(vlm, lora=True),
    }
    counts["total"] = counts["classifier"] + counts["vision_tower"] + counts["projector"] + counts["language_model"]
    return counts


def median_seconds(fn: Callable[[], Any], warmup: int, repeats: int, device: str) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` calls."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(
    exported: Any,
    device: str,
    batch_sizes: list[int],
    warmup: int,
    repeats: int,
    max_new_tokens: int,
    num_beams: int = 1,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """One row per (pipeline, batch size): batch, median batch latency, per-image latency, images/s, params."""
    model = exported.model
    size = model.pixel_size  # what the data pipeline decodes at
    params = count_parameters(model)
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for batch in batch_sizes:
        pixels = torch.rand(batch, 3, size, size, generator=generator).to(device)

        def classify(pixels: torch.Tensor = pixels) -> Any:
            return model.predict(pixels)

        def explain(pixels: torch.Tensor = pixels) -> Any:
            probs, _ = model.predict(pixels)
            names = [exported.classes[i] for i in probs.argmax(dim=1).tolist()]
            return model.generate(
                pixels, names, max_new_tokens=max_new_tokens, num_beams=num_beams, min_new_tokens=max_new_tokens
            )

        for pipeline, fn, n_params in (
            (PIPELINES[0], classify, params["classifier"]),
            (PIPELINES[1], explain, params["total"]),
        ):
            seconds = median_seconds(fn, warmup, repeats, device)
            rows.append(
                {
                    "pipeline": pipeline,
                    "batch": batch,
                    "params": n_params,
                    "batch_latency_ms": round(seconds * 1e3, 3),
                    "latency_ms_per_image": round(seconds * 1e3 / batch, 3),
                    "images_per_s": round(batch / seconds, 3),
                }
            )
            log.info("%s, batch %d: %.1f ms/image", pipeline, batch, seconds * 1e3 / batch)
    return rows


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


def format_efficiency(result: dict[str, Any]) -> str:
    """A table like the paper's Table 5 (one line per pipeline and batch size)."""
    r = result
    lines = [
        f"MEGL efficiency of {r['checkpoint']} on {r['device']} ({r['dtype']}): median of {r['repeats']} "
        f"after {r['warmup']} warm-up calls, rationales of {r['max_new_tokens']} tokens, beams {r['num_beams']}",
        f"  {'pipeline':<34}{'params':>10}{'batch':>7}{'ms/image':>11}{'images/s':>11}",
    ]
    for row in r["rows"]:
        lines.append(
            f"  {row['pipeline']:<34}{_millions(row['params']):>10}{row['batch']:>7}"
            f"{row['latency_ms_per_image']:>11.2f}{row['images_per_s']:>11.2f}"
        )
    lines.append(
        "  with a rationale, an image takes "
        + ", ".join(f"{x}× (batch {b})" for b, x in r["rationale_slowdown"].items())
        + " the time of classifier+saliency"
    )
    return "\n".join(lines)


def report(
    exported: Any,
    placement: Any,
    name: str,
    batch_size: int,
    warmup: int,
    repeats: int,
    max_new_tokens: int,
    num_beams: int = 1,
) -> dict[str, Any]:
    """The efficiency JSON of a model ready for inference (``inference.prepare_for_inference``); ``name`` says
    which model it is (the checkpoint, or a bench's shapes)."""
    batch_sizes = sorted({1, batch_size})
    rows = measure(exported, placement.device, batch_sizes, warmup, repeats, max_new_tokens, num_beams)
    gpu = torch.cuda.get_device_name() if placement.device == "cuda" else None
    # the paper's "n× faster" reading: what explaining in words costs over classifying with Â, per batch size
    per_image = {(r["pipeline"], r["batch"]): r["latency_ms_per_image"] for r in rows}
    slowdown = {str(b): round(per_image[(PIPELINES[1], b)] / per_image[(PIPELINES[0], b)], 2) for b in batch_sizes}
    return {
        "checkpoint": name,
        "device": placement.device,
        "gpu": gpu,
        "dtype": placement.dtype,
        "torch_threads": torch.get_num_threads(),
        "warmup": warmup,
        "repeats": repeats,
        "max_new_tokens": max_new_tokens,
        "num_beams": num_beams,
        "batch_sizes": batch_sizes,
        "params": count_parameters(exported.model),
        "rows": rows,
        "rationale_slowdown": slowdown,
        "placement": [placement.as_dict()],
    }


def check_arguments(args: EvaluateOptions) -> None:
    for name, low in (("batch_size", 1), ("repeats", 1), ("warmup", 0), ("num_beams", 1)):
        if getattr(args, name) < low:
            raise UserError(f"--{name.replace('_', '-')} must be at least {low}")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")


def run_efficiency(args: EvaluateOptions) -> dict[str, Any]:
    """The ``--efficiency`` mode of ``python -m megl_ray.evaluate``."""
    check_arguments(args)
    exported, placement = load_for_inference(args.checkpoint, args.device, args.precision, args.base_path)
    result = report(
        exported,
        placement,
        args.checkpoint,
        args.batch_size,
        args.warmup,
        args.repeats,
        args.max_new_tokens or exported.config.model.max_text_tokens,
        args.num_beams,
    )
    print(format_efficiency(result), file=sys.stderr, flush=True)
    if args.out:
        write_json(args.out, result)
    return result
