"""The paper's efficiency table (Table 5) at MEGL-R18's shapes, random init from config (no downloads):
ResNet-18 at 224², CLIP ViT-L/14-336 (576 image tokens) and Qwen2-0.5B (``bench/gpu_step_models.py``'s shapes),
LoRA-free.

Rows as ``python -m megl_ray.evaluate --efficiency`` prints them for an export
(``megl_ray.evaluation.efficiency``): parameters,
per-image latency and images/s of classifier + saliency, and of classifier + saliency + a rationale of exactly
``--max-new-tokens`` tokens, at batch 1 and ``--batch``; warm-up calls, then the median of ``--repeats``. bf16 VLM on
CUDA, fp32 on CPU (``--precision`` to change). ``--device cpu --tiny`` runs the same code at tiny shapes (CI smoke).

On a GPU machine: ``python bench/efficiency.py`` (a few minutes); commit the last stdout line as
``bench/results/efficiency_<card>.json``. The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (smoke test)")
    p.add_argument("--batch", type=int, default=32, help="throughput batch")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--max-new-tokens", type=int, default=48, help="rationale length (training's 48-64)")
    p.add_argument("--num-beams", type=int, default=1)
    return p.parse_args(argv)


def build(tiny: bool):
    """An ``Exported`` at the benchmark's shapes (10 classes)."""
    import torch
    from gpu_step_models import vlm_bundle  # the large-model shapes, one definition for both GPU benches

    from megl_ray.config import load_config, packaged_config
    from megl_ray.model import build_megl_model
    from megl_ray.model.export_io import Exported

    overrides = ["model.freeze_vision=true"]
    if not tiny:
        overrides += ["model.classifier=resnet18", "model.image_size=224"]
    cfg = load_config(packaged_config("tiny"), overrides)
    torch.manual_seed(0)
    model = build_megl_model(cfg, 10, vlm=vlm_bundle(cfg.model, "qwen2-0.5b", tiny))
    return Exported(model=model, config=cfg, classes=[f"class{i}" for i in range(10)], meta={})


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    from megl_ray.evaluation.efficiency import format_efficiency, report
    from megl_ray.evaluation.inference import prepare_for_inference

    if args.device == "cuda" and not torch.cuda.is_available():
        print("efficiency: --device cuda but no CUDA device is visible (use --device cpu --tiny)", file=sys.stderr)
        return {"error": "no CUDA device"}
    exported = build(args.tiny)
    placement = prepare_for_inference(exported, args.device, args.precision)
    name = "tiny shapes" if args.tiny else "MEGL-R18 shapes: ResNet-18 224², CLIP ViT-L/14-336, Qwen2-0.5B"
    result = report(
        exported, placement, name, args.batch, args.warmup, args.repeats, args.max_new_tokens, args.num_beams
    )
    result["tiny"] = args.tiny
    print(format_efficiency(result), file=sys.stderr, flush=True)
    return result


if __name__ == "__main__":
    print(json.dumps(main()), flush=True)
