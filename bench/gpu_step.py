"""One MEGL training step at the large model's shapes: Ray Train + DeepSpeed versus plain PyTorch, in one run.

  megl_step_ms   one Ray Train worker, DeepSpeed ZeRO-2, bf16 (the generated config: torch_autocast over fp32
                 master weights), median of the measured steps
  plain_step_ms  the same model, batch and optimizer in this process: torch.autocast(bf16) forward, backward,
                 AdamW step, no Ray, no DeepSpeed
  ds_vs_plain    their ratio (goal on one H100/H200: <= 1.2)
  tokens_per_s   sequence tokens (image + prompt + rationale) per second of the MEGL step
  peak_mem_gib   the MEGL worker's peak memory (CUDA allocator; process RSS on CPU)
  gpu            the card, or "none (cpu)"

Shapes, random init from config (no downloads): ResNet-50 at 224², CLIP ViT-L/14-336 (576 image tokens, LLaVA's
feature layer -2), Qwen2-0.5B (vocab 151,936, tied embeddings), batch 8 × ~640 tokens (576 image + prompt + 48
rationale tokens), all MEGL terms, vision tower frozen as in the paper. 3 warm-up steps, then 20 measured.
``--device cpu --tiny`` runs the same code at tiny shapes (CI smoke test).

On a fresh GPU machine with torch, transformers and torchvision: ``pip install ray[train] deepspeed`` from the wheels
you bring, then ``python bench/gpu_step.py`` (about 3 minutes on an H100: two model builds, 46 steps). The last stdout
line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (smoke test)")
    p.add_argument("--steps", type=int, default=20, help="measured steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rationale-tokens", type=int, default=48)
    return p.parse_args(argv)


def _config(tiny: bool, batch: int, rationale_tokens: int):
    from megl_ray.config import load_config, packaged_config

    overrides = [
        f"data.batch_size={batch}",
        "train.num_workers=1",
        "train.zero_stage=2",
        "train.precision=bf16",
        "model.freeze_vision=true",
        f"model.max_text_tokens={rationale_tokens}",
        "loss.dc_weight=0.5",
    ]
    if not tiny:
        overrides += ["model.classifier=resnet50", "model.image_size=224"]
    return load_config(packaged_config("tiny"), overrides)


def _vlm(cfg, tiny: bool):
    """A VLMBundle at the benchmark's shapes: CLIP-L/14-336 + Qwen2-0.5B, or the tiny preset's."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, Qwen2Config

    from megl_ray.model.vlm import (
        VLMBundle,
        _num_image_tokens,
        apply_training_mode,
        set_memory_options,
        tiny_llava_config,
        train_tokenizer,
    )

    words = [f"word{i} shape{i % 7} colour{i % 5}" for i in range(200)]
    tokenizer = train_tokenizer(words, 512)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    if tiny:
        config = tiny_llava_config(cfg.model, len(tokenizer), image_id, tokenizer.pad_token_id)
    else:
        vision = CLIPVisionConfig(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
            projection_dim=768,
        )
        text = Qwen2Config(
            vocab_size=151936,
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            tie_word_embeddings=True,
            pad_token_id=tokenizer.pad_token_id,
        )
        config = LlavaConfig(
            vision_config=vision.to_dict(),
            text_config=text.to_dict(),
            image_token_id=image_id,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            tie_word_embeddings=True,
        )
    bundle = VLMBundle(
        LlavaForConditionalGeneration(config),
        tokenizer,
        image_id,
        _num_image_tokens(config),
        config.vision_config.image_size,
    )
    apply_training_mode(bundle, cfg.model)
    set_memory_options(bundle.model, cfg.model)
    return bundle


def build(tiny: bool, batch: int, rationale_tokens: int, seed: int = 0):
    """(cfg, model, batch): the model built from config with ``seed``, and one fixed random batch."""
    import torch

    from megl_ray.model import build_megl_model

    cfg = _config(tiny, batch, rationale_tokens)
    torch.manual_seed(seed)
    model = build_megl_model(cfg, 10, vlm=_vlm(cfg, tiny))
    g = torch.Generator().manual_seed(seed)
    size = model.pixel_size  # what the data pipeline decodes at: CLIP-L/336's side, above ResNet-50's 224
    vocab = model.vlm.config.text_config.vocab_size
    prompt = [model.tokenizer.bos_token_id] + [model.image_token_id] * model.num_image_tokens
    text = torch.randint(10, vocab, (batch, 12 + rationale_tokens), generator=g)
    text[text == model.image_token_id] = 11
    ids = torch.cat([torch.tensor(prompt).expand(batch, -1), text], dim=1)
    labels = torch.full_like(ids, -100)
    labels[:, -rationale_tokens:] = ids[:, -rationale_tokens:]
    masks = torch.zeros(batch, 64, 64)
    masks[:, 16:48, 16:48] = 1.0
    data = {
        "pixels": torch.rand(batch, 3, size, size, generator=g),
        "labels": torch.arange(batch) % 10,
        "masks": masks,
        "has_mask": torch.arange(batch) % 2 == 0,
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "text_labels": labels,
        "sample_weight": torch.ones(batch),
    }
    return cfg, model, data


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _peak_gib(device: str) -> float:
    import resource

    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30


def megl_worker(config: dict) -> None:
    """The Ray Train worker: DeepSpeed ZeRO-2 bf16 from the generated config, warm-up then measured steps."""
    os.environ.update(config["env"])
    import deepspeed
    import ray.train

    from megl_ray.training.ds_config import deepspeed_config, trainable_parameters
    from megl_ray.training.optim import build_optimizer, build_scheduler

    device = config["device"]
    cfg, model, batch = build(config["tiny"], config["batch"], config["rationale_tokens"])
    optimizer = build_optimizer(model, cfg.optim)
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=build_scheduler(optimizer, cfg.optim, 1000),
        config=deepspeed_config(cfg, device == "cuda", trainable_parameters(model)),
        dist_init_required=False,
    )
    batch = {k: v.to(engine.device) for k, v in batch.items()}
    times, losses = [], []
    for i in range(config["warmup"] + config["steps"]):
        _sync(device)
        start = time.perf_counter()
        out = engine(**batch)
        engine.backward(out.loss)
        engine.step()
        _sync(device)
        losses.append(out.loss.item())
        if i >= config["warmup"]:
            times.append(time.perf_counter() - start)
    Path(config["out"]).write_text(json.dumps({"step_s": times, "losses": losses, "peak_gib": _peak_gib(device)}))
    ray.train.report({"done": 1})


def run_megl(args, tmp: str) -> dict:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    gpu = args.device == "cuda"
    env = {k: os.environ[k] for k in ("TORCH_EXTENSIONS_DIR",) if k in os.environ}
    if not gpu:
        env["DS_ACCELERATOR"] = "cpu"
    ray.init(
        num_cpus=os.cpu_count() or 2,
        include_dashboard=False,
        log_to_driver=False,
        _temp_dir=tempfile.mkdtemp(prefix="ray", dir="/tmp"),
    )
    try:
        out = str(Path(tmp) / "megl.json")
        trainer = TorchTrainer(
            megl_worker,
            train_loop_config={
                "env": env,
                "device": args.device,
                "tiny": args.tiny,
                "batch": args.batch,
                "rationale_tokens": args.rationale_tokens,
                "warmup": args.warmup,
                "steps": args.steps,
                "out": out,
            },
            scaling_config=ScalingConfig(num_workers=1, use_gpu=gpu, resources_per_worker=None if gpu else {"CPU": 1}),
            run_config=RunConfig(name="gpu_step", storage_path=tmp),
        )
        result = trainer.fit()
        if result.error is not None:
            raise result.error
        return json.loads(Path(out).read_text())
    finally:
        ray.shutdown()


def run_plain(args) -> dict:
    """The same model and batch: torch.autocast bf16 over fp32 weights, AdamW, no Ray, no DeepSpeed."""
    import torch

    from megl_ray.training.optim import build_optimizer, build_scheduler, plain_step

    device = args.device
    cfg, model, batch = build(args.tiny, args.batch, args.rationale_tokens)
    model.to(device).train()
    batch = {k: v.to(device) for k, v in batch.items()}
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, 1000)
    times = []
    for i in range(args.warmup + args.steps):
        _sync(device)
        start = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16):
            plain_step(model, optimizer, scheduler, batch, cfg.optim.grad_clip)
        _sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    return {"step_s": times}


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_step: --device cuda but no CUDA device is visible (use --device cpu --tiny)", file=sys.stderr)
        return {"error": "no CUDA device"}
    with tempfile.TemporaryDirectory(prefix="megl-gpu-step-") as tmp:
        megl = run_megl(args, tmp)
    plain = run_plain(args)
    megl_s, plain_s = statistics.median(megl["step_s"]), statistics.median(plain["step_s"])
    tokens = args.batch * build_tokens(args)
    return {
        "megl_step_ms": round(megl_s * 1000, 2),
        "plain_step_ms": round(plain_s * 1000, 2),
        "ds_vs_plain": round(megl_s / plain_s, 3),
        "tokens_per_s": round(tokens / megl_s, 1),
        "peak_mem_gib": round(megl["peak_gib"], 2),
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else "none (cpu)",
        "final_loss": round(megl["losses"][-1], 4),
        "tiny": args.tiny,
        "batch": args.batch,
        "steps": args.steps,
        "device": args.device,
    }


def build_tokens(args) -> int:
    """Sequence length of the benchmark batch: BOS + image tokens + 12 prompt tokens + the rationale."""
    image_tokens = 16 if args.tiny else 576
    return 1 + image_tokens + 12 + args.rationale_tokens


if __name__ == "__main__":
    result = main()
    print(json.dumps(result), flush=True)
    sys.exit(0 if "error" not in result else 2)
