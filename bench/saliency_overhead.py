"""Step-time cost of MEGL's saliency supervision, measured side by side in one run.

Three training steps of the same classifier on the same batch, interleaved round by round so that machine noise
hits all three alike:
  ce         cross-entropy only (the plain classifier)
  saliency   cross-entropy + Grad-CAM saliency losses (L1 on samples with a mask, KL to the prior on the rest),
             batched closed-form CAM, one backward (what megl_ray trains with)
  per_image  the MEGL authors' approach: a Python loop computing Grad-CAM per image by autograd
             (create_graph=True so it can be trained), then the same losses

Prints the median step times and their ratios; the last stdout line is one JSON object with ``saliency_vs_ce``
and ``per_image_vs_ce``. Targets: saliency_vs_ce ≤ 1.3 on CPU (ResNet-18, batch 32), ≤ 1.05 on a GPU (ResNet-50,
batch 64, bf16).

    python bench/saliency_overhead.py                                   # CPU defaults
    python bench/saliency_overhead.py --arch resnet50 --batch 64 --bf16 --device cuda
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import nullcontext

import torch

from megl_ray.model import losses
from megl_ray.model.classifier import build_classifier
from megl_ray.model.saliency import closed_form_cam, per_image_gradcam


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet18", choices=["tiny", "resnet18", "resnet50", "vit_b_16"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (each runs all three variants once)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    p.add_argument("--skip-per-image", action="store_true", help="skip the slow per-image baseline")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = build_classifier(args.arch, num_classes=40, image_size=args.image_size).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    pixels = torch.rand(args.batch, 3, args.image_size, args.image_size, device=device)
    labels = torch.randint(0, 40, (args.batch,), device=device)
    masks = (torch.rand(args.batch, args.image_size, args.image_size, device=device) > 0.7).float()
    has_mask = torch.arange(args.batch, device=device) % 10 == 0  # ~10 % of samples carry a mask, as in MEGL
    prior = torch.rand(8, 8, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else nullcontext()

    def saliency_terms(sal, logits):
        ce = losses.classification_loss(logits, labels)
        vis = losses.visual_loss(sal.float(), masks)
        dc = losses.distribution_consistency_loss(sal.float(), prior)
        return ce + torch.where(has_mask, vis, 0.1 * dc)

    def step_ce():
        with autocast:
            out = model(pixels)
            loss = losses.classification_loss(out.logits, labels).mean()
        return loss

    def step_saliency():
        with autocast:
            out = model(pixels)
            sal = closed_form_cam(out.features, model.cam_weight, labels)
            return saliency_terms(sal, out.logits).mean()

    def step_per_image():
        with autocast:

            def forward(x):
                out = model(x)
                return out.logits, out.features

            sal = per_image_gradcam(forward, pixels, labels)
            logits = model(pixels).logits  # the authors' classifier forward on the batch, beside the loop
            return saliency_terms(sal, logits).mean()

    variants = {"ce": step_ce, "saliency": step_saliency}
    if not args.skip_per_image:
        variants["per_image"] = step_per_image

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for fn in variants.values():  # warm-up: allocator, kernels, autotuning
        timed(fn)
    times = {name: [] for name in variants}
    for r in range(args.rounds):
        for name, fn in variants.items():
            times[name].append(timed(fn))
        print(
            f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {t[-1]:.3f}s" for n, t in times.items()),
            file=sys.stderr,
            flush=True,
        )
    median = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "arch": args.arch,
        "batch": args.batch,
        "image_size": args.image_size,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "bf16": args.bf16,
        "rounds": args.rounds,
        "torch": torch.__version__,
        "step_s": {k: round(v, 5) for k, v in median.items()},
        "saliency_vs_ce": round(median["saliency"] / median["ce"], 4),
        "per_image_vs_ce": round(median["per_image"] / median["ce"], 4) if "per_image" in median else None,
    }
    return result


if __name__ == "__main__":
    result = main()
    for key in ("saliency_vs_ce", "per_image_vs_ce"):
        print(f"{key}: {result[key]}", file=sys.stderr)
    print(json.dumps(result))
