"""What do Ray Train + DeepSpeed cost per step? Measured side by side in one run on this machine:

  single_step_s     one plain PyTorch process (all cores) training the tiny MEGL model on a global batch
  ray_ds_step_s     2 Ray Train workers under DeepSpeed ZeRO (the generated config), each on half the batch
  ray_ds_vs_single  their ratio (target ≤ 1.5 on CPU)

Both use the same fixed batches of the bundled dataset and the same model, optimizer and schedule (the probe in
``megl_ray/probes/fixed_batch.py``); step times are medians after two warm-up steps. The last stdout line is one JSON
object.

    python bench/train_overhead.py [--steps 12] [--batch 32] [--zero-stage 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch", type=int, default=32, help="global batch (split over the workers)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--zero-stage", type=int, default=2)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import ray
    import torch

    from megl_ray.config import load_config, packaged_config
    from megl_ray.data.reader import bundled_dataset_uri, read_split
    from megl_ray.data.schema import load_dataset_info
    from megl_ray.model.vlm import load_tokenizer
    from megl_ray.probes.fixed_batch import run_distributed, run_steps

    uri = bundled_dataset_uri()
    info = load_dataset_info(uri)
    rows = read_split(uri, "train", info).to_pylist()
    base = ["optim.lr=0.003", f"train.zero_stage={args.zero_stage}"]
    single_cfg = load_config(packaged_config("tiny"), [*base, f"data.batch_size={args.batch}"])
    dist_cfg = load_config(
        packaged_config("tiny"),
        [*base, f"data.batch_size={args.batch // args.workers}", f"train.num_workers={args.workers}"],
    )
    tokenizer = load_tokenizer(single_cfg.model, [t for r in rows for t in r["rationales"]] + info.classes)

    torch.set_num_threads(os.cpu_count() or 1)
    single = run_steps(single_cfg, tokenizer, info.num_classes, rows, info.mask_size, args.steps)
    ray.init(
        num_cpus=os.cpu_count() or 2,
        include_dashboard=False,
        log_to_driver=False,
        _temp_dir=tempfile.mkdtemp(prefix="ray", dir="/tmp"),
    )
    try:
        threads = max(1, (os.cpu_count() or 1) // args.workers)
        dist = run_distributed(
            dist_cfg,
            tokenizer,
            info.num_classes,
            rows,
            info.mask_size,
            args.steps,
            tempfile.mkdtemp(prefix="megl-bench-"),
            "train-overhead",
            threads=threads,
        )
    finally:
        ray.shutdown()
    single_s = statistics.median(single["step_s"][2:])
    dist_s = statistics.median(dist["step_s"][2:])
    print(
        f"single process: {single_s:.3f}s/step; {args.workers} Ray+DeepSpeed workers: {dist_s:.3f}s/step",
        file=sys.stderr,
    )
    return {
        "single_step_s": round(single_s, 4),
        "ray_ds_step_s": round(dist_s, 4),
        "ray_ds_vs_single": round(dist_s / single_s, 3),
        "global_batch": args.batch,
        "workers": args.workers,
        "zero_stage": args.zero_stage,
        "steps": args.steps,
        "device": "cpu",
        "machine_cpus": os.cpu_count(),
        "max_loss_diff": round(max(abs(a - b) for a, b in zip(single["losses"], dist["losses"])), 8),
    }


if __name__ == "__main__":
    print(json.dumps(main()))
