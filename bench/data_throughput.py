"""Is the data pipeline fast enough to keep training fed? Measured side by side in one run on this machine:

  convert_rows_per_s   the converter: a generated 4,000-image dataset → Parquet shards on the embedded S3 server
  pipeline_images_per_s  Ray Data from that S3 server as training uses it for a split that fits in the object
                       store: read, decode, resize and tokenise once (the first epoch, counted), then cached
  streaming_images_per_s the same pipeline re-reading S3 and re-decoding every epoch (splits too big to cache);
                       Ray Data's start-up of about 1 s per epoch weighs on a 2,800-image epoch here
  step_images_per_s    a training step of the tiny MEGL model (forward + backward + AdamW) at the same batch size
  pipeline_vs_step     pipeline / step (target ≥ 3: the pipeline is never what the trainer waits on);
  streaming_vs_step    streaming / step

The last stdout line is one JSON object with those keys.

    python bench/data_throughput.py [--epochs 3] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=3, help="timed pipeline epochs (after one warm-up epoch)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=10, help="timed training steps (after two warm-up steps)")
    p.add_argument(
        "--n-per-class",
        type=int,
        default=400,
        help="images per class of the generated dataset (400: 4,000 images, Object-ME's size)",
    )
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import os

    import ray

    from megl_ray import storage
    from megl_ray.config import load_config, packaged_config
    from megl_ray.data import convert, make_sample
    from megl_ray.data.pipeline import build_dataset, iter_model_batches
    from megl_ray.data.reader import iter_row_batches, read_split
    from megl_ray.data.schema import load_dataset_info
    from megl_ray.model import build_megl_model
    from megl_ray.training.local import make_batch

    work = Path(tempfile.mkdtemp(prefix="megl-bench-"))
    with storage.EmbeddedS3(work / "s3") as server:
        os.environ.update(server.env())
        uri = "s3://bench/digits"
        storage.ensure_bucket(uri)
        # The bundled sample (400 images) is too small to see a streaming rate past Ray Data's per-epoch start-up;
        # the same generator makes a dataset of the paper's size.
        make_sample.main([str(work / "src"), "--n-per-class", str(args.n_per_class)])
        summary = convert.main([str(work / "src"), uri, "--rows-per-shard", "1024"])
        convert_rows_per_s = summary["rows_in"] / summary["seconds"]
        print(f"convert: {summary['rows_in']} rows in {summary['seconds']:.2f}s", file=sys.stderr)

        cfg = load_config(packaged_config("tiny"))
        info = load_dataset_info(uri)
        train = read_split(uri, "train", info)
        corpus = [r for rs in train.column("rationales").to_pylist() for r in rs] + info.classes
        torch.manual_seed(0)
        model = build_megl_model(cfg, info.num_classes, corpus=corpus, prior=torch.as_tensor(info.prior_array()))

        ray.init(
            num_cpus=2,
            include_dashboard=False,
            _temp_dir=tempfile.mkdtemp(prefix="ray", dir="/tmp"),
            log_to_driver=False,
            runtime_env={"env_vars": server.env()},
        )
        try:
            rates = {}
            for mode in ("streaming", "cached"):
                built = time.perf_counter()  # a cached split is read and preprocessed here: its time counts
                ds = build_dataset(
                    uri,
                    "train",
                    tokenizer=model.tokenizer,
                    image_size=model.pixel_size,
                    image_aspect=cfg.model.image_aspect,
                    max_rationales=cfg.data.max_rationales,
                    max_text_tokens=cfg.model.max_text_tokens,
                    info=info,
                    cache=mode == "cached",
                )
                rows, seconds = 0, 0.0
                for epoch in range(args.epochs + 1):
                    start = built if epoch == 0 else time.perf_counter()
                    n = sum(
                        b["labels"].shape[0]
                        for b in iter_model_batches(
                            ds,
                            tokenizer=model.tokenizer,
                            template=cfg.model.prompt_template,
                            num_image_tokens=model.num_image_tokens,
                            epoch=epoch,
                            batch_size=args.batch_size,
                            seed=0,
                        )
                    )
                    elapsed = time.perf_counter() - start
                    print(f"{mode} pipeline epoch {epoch}: {n} images in {elapsed:.2f}s", file=sys.stderr)
                    if epoch > 0 or mode == "cached":  # streaming epoch 0 starts Ray's worker processes
                        rows, seconds = rows + n, seconds + elapsed
                rates[mode] = rows / seconds
        finally:
            ray.shutdown()

        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        batches = [
            make_batch(r, model, cfg, info.mask_size, 0)
            for r in iter_row_batches(train, args.batch_size, epoch=0, seed=0, drop_last=True)
        ]
        model.train()
        times = []
        for i in range(args.steps + 2):
            batch = batches[i % len(batches)]
            start = time.perf_counter()
            out = model(**batch)
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
            if i >= 2:
                times.append(time.perf_counter() - start)
        step_images_per_s = args.batch_size / (sum(times) / len(times))
    return {
        "convert_rows_per_s": round(convert_rows_per_s, 2),
        "pipeline_images_per_s": round(rates["cached"], 2),
        "streaming_images_per_s": round(rates["streaming"], 2),
        "step_images_per_s": round(step_images_per_s, 2),
        "pipeline_vs_step": round(rates["cached"] / step_images_per_s, 3),
        "streaming_vs_step": round(rates["streaming"] / step_images_per_s, 3),
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "machine_cpus": os.cpu_count(),
        "train_images": train.num_rows,
    }


if __name__ == "__main__":
    print(json.dumps(main()))
