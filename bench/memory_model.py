"""Does the per-GPU memory model (``megl_ray.planning.memory_model``) match what DeepSpeed really allocates?

Each configuration builds a real architecture from config at reduced size (a Qwen2-shaped causal LM, random init,
with the project's LoRA injection and precision preparation), hands it to ``deepspeed.initialize`` in this process
(one rank, gloo, DeepSpeed's CPU accelerator, the ``ds_config`` the trainer generates) and runs one training step.
The memory is measured by inspecting what exists, term by term, never by re-running the formula:

  params        unique storages of the engine's parameters (ZeRO-3: their ``ds_tensor`` partitions, plus any
                gathered copy live at a module's forward)
  grads         gradient storages the ZeRO optimizer holds (partitioned gradients, the fp32 partition's ``.grad``)
                and its reduction buckets, together, at their peak: caught at every parameter's post-accumulate
                hook, just before ZeRO-2 frees its buckets, and at the inner optimizer's step pre-hook
  optimizer     the fp32 master partitions and AdamW's state, unless they share a parameter's storage
  activations   the peak of tensors saved for the backward (``saved_tensors_hooks``: unique storages, not
                parameters, released when autograd drops them), plus autocast's 16-bit copies of trainable weights
                still alive when the last module runs (a dispatch mode sees each ``_to_copy`` of a trainable
                parameter; the copies' storages are then watched). Under non-reentrant checkpointing the layers'
                saves are invisible to outer hooks: their kept inputs are read by forward pre-hooks and the
                recomputed layer is one layer's saves in a forward without checkpointing

Each is compared with the model's prediction for the same shape and setup (``predict``: ``memory_per_gpu`` on the
same LM shape); the model's transient logits gradient and fixed overhead are not part of either total. Runs in
~1.5 min on 2 cores. The last stdout line is one JSON object (``--out`` also writes it, ``--markdown`` a table).

    python bench/memory_model.py [--out bench/results/memory_model_cpu.json] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

for _key, _value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533", "RANK": "0", "LOCAL_RANK": "0"}.items():
    os.environ.setdefault(_key, _value)
os.environ.setdefault("WORLD_SIZE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is imported

import deepspeed  # noqa: E402
import torch  # noqa: E402
from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses  # noqa: E402
from peft import LoraConfig, inject_adapter_in_model  # noqa: E402
from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is no package: its measuring module sits here
import memory_probe as probe  # noqa: E402

from megl_ray.config import load_config, packaged_config  # noqa: E402
from megl_ray.model.precision import prepare_model  # noqa: E402
from megl_ray.planning import memory_model as mm  # noqa: E402
from megl_ray.training.ds_config import deepspeed_config, trainable_parameters  # noqa: E402
from megl_ray.training.optim import build_optimizer  # noqa: E402

OVERLAP_BF16 = {"overlap_comm": True, "grad_reduce_dtype": "autocast"}
CONFIGS = [
    # name, zero stage, LoRA rank (0: full fine-tune), gradient checkpointing, departures from the CPU defaults
    ("qwen2-lora-z2", 2, 8, False, {}),
    ("qwen2-lora-z2-ckpt", 2, 8, True, {}),
    ("qwen2-lora-z3", 3, 8, False, {}),
    ("qwen2-lora-z3-ckpt", 3, 8, True, {}),
    ("qwen2-full-z3", 3, 0, False, {}),
    ("qwen2-full-z2-ckpt", 2, 0, True, {}),
    # the GPU default overlap_comm (two buffers per bucket) and 16-bit reduction (a bucket per dtype)
    ("qwen2-full-z2-ckpt-overlap-bf16reduce", 2, 0, True, OVERLAP_BF16),
    ("qwen2-full-z3-bf16reduce", 3, 0, False, {"grad_reduce_dtype": "autocast"}),
]
TERMS = ("params", "grads", "optimizer", "activations")


@dataclass(frozen=True)
class Shape:
    layers: int = 8
    hidden: int = 512
    intermediate: int = 1408
    heads: int = 8
    kv_heads: int = 2
    vocab: int = 32000
    seq: int = 256
    batch: int = 2


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="*", default=[c[0] for c in CONFIGS])
    p.add_argument("--layers", type=int, default=Shape.layers)
    p.add_argument("--hidden", type=int, default=Shape.hidden)
    p.add_argument("--seq", type=int, default=Shape.seq)
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--markdown", help="also write a Markdown table here")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    shape = Shape(layers=args.layers, hidden=args.hidden, seq=args.seq)
    started = time.time()
    results = []
    for name, stage, lora_r, ckpt, extra in CONFIGS:
        if name not in args.configs:
            continue
        t0 = time.time()
        row = measure_config(name, shape, stage, lora_r, ckpt, extra)
        row["seconds"] = round(time.time() - t0, 1)
        print(_line(row), flush=True)
        results.append(row)
    out = {
        "bench": "memory_model",
        "device": "cpu",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "loadavg_1m": os.getloadavg()[0]},
        "shape": shape.__dict__,
        "max_total_error": max(abs(r["total_error"]) for r in results),
        "seconds": round(time.time() - started, 1),
        "configs": results,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(out))
    print(json.dumps(out))
    return out


class LMLoss(torch.nn.Module):
    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids):
        return self.lm(input_ids=input_ids, labels=input_ids).loss


def build(shape: Shape, lora_r: int, ckpt: bool) -> LMLoss:
    torch.manual_seed(0)
    lm = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=shape.vocab,
            hidden_size=shape.hidden,
            intermediate_size=shape.intermediate,
            num_hidden_layers=shape.layers,
            num_attention_heads=shape.heads,
            num_key_value_heads=shape.kv_heads,
            max_position_embeddings=shape.seq,
            tie_word_embeddings=False,
            attn_implementation="sdpa",
        )
    )
    if lora_r:  # as megl_ray.model.vlm.apply_training_mode does
        lm.requires_grad_(False)
        inject_adapter_in_model(LoraConfig(r=lora_r, lora_alpha=16, lora_dropout=0.05, target_modules=list(LORA)), lm)
        for name, param in lm.named_parameters():
            param.requires_grad_("lora_" in name)
    prepare_model(lm, "bf16")
    if ckpt:
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return LMLoss(lm)


LORA = ("q_proj", "k_proj", "v_proj", "o_proj")


def predict(shape: Shape, stage: int, lora_r: int, ckpt: bool, extra: dict) -> dict[str, float]:
    """The memory model's four terms for this configuration (its transient logits gradient left out)."""
    lm = mm.TransformerShape(
        layers=shape.layers,
        hidden=shape.hidden,
        intermediate=shape.intermediate,
        heads=shape.heads,
        kv_heads=shape.kv_heads,
        vocab=shape.vocab,
    )
    model = mm.ModelShape(
        "bench",
        0,
        0.0,
        None,
        lm,
        image_tokens=0,
        text_tokens=shape.seq,
        rationale_tokens=shape.seq,
        lora_r=lora_r,
        lora_targets=LORA,
        lora_dropout=0.05,
    )
    setup = mm.Setup(
        world=1,
        zero_stage=stage,
        micro_batch=shape.batch,
        gradient_checkpointing=ckpt,
        overlap_comm=extra.get("overlap_comm", False),
        grad_reduce_dtype=extra.get("grad_reduce_dtype", "fp32"),
        rationale_only_logits=False,
        dropout_mask_bytes=4,  # CPU dropout keeps its mask in the input's dtype (fp32 in a LoRA adapter)
    )
    est = mm.memory_per_gpu(model, setup)
    saved_logits = mm.logits_bytes(shape.batch, shape.seq, shape.vocab, "bf16")[0]
    return {
        "params": est.params,
        "grads": est.grads,
        "optimizer": est.optimizer,
        "activations": est.activations + saved_logits,
    }


def measure_config(name: str, shape: Shape, stage: int, lora_r: int, ckpt: bool, extra: dict) -> dict:
    overrides = [f"train.zero_stage={stage}", "train.precision=bf16", "train.num_workers=1"]
    overrides += [f"data.batch_size={shape.batch}", f"train.grad_reduce_dtype={extra.get('grad_reduce_dtype', 'fp32')}"]
    cfg = load_config(packaged_config("tiny"), overrides)
    model = build(shape, lora_r, ckpt)
    ds = deepspeed_config(cfg, use_gpu=False, trainable=trainable_parameters(model))
    if "overlap_comm" in extra:  # what ds_config sets on GPUs, forced here (DeepSpeed's CPU accelerator runs it)
        ds["zero_optimization"]["overlap_comm"] = extra["overlap_comm"]
    engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, cfg.optim), config=ds)
    params = {k for p in engine.module.parameters() if (k := probe.key(getattr(p, "ds_tensor", p)))}
    peaks = {"backward": 0, "step": 0, "buckets": 0, "gathered": 0}
    phase = ["backward"]

    def snapshot(*_):  # gradients and buckets together: they need not peak at the same moment
        parts = probe.optimizer_parts(opt, params)
        peaks[phase[0]] = max(peaks[phase[0]], probe.nbytes(parts["grads"] | parts["buckets"]))
        peaks["buckets"] = max(peaks["buckets"], probe.nbytes(parts["buckets"]))

    gathered_keys: set = set()  # every storage a ZeRO-3 parameter was gathered into

    def gathered(*_):  # ZeRO-3: full parameters gathered beside their partitions, live at this module's forward
        live = probe.storages((p.data for p in engine.module.parameters() if hasattr(p, "ds_tensor")), params)
        gathered_keys.clear()  # only what is gathered now: a freed address may come back as an activation
        gathered_keys.update(live)
        peaks["gathered"] = max(peaks["gathered"], probe.nbytes(live))

    hooks = [p.register_post_accumulate_grad_hook(snapshot) for p in engine.module.parameters() if p.requires_grad]
    if hasattr(opt, "_release_ipg_buffers"):  # ZeRO-2 frees its buckets after the last reduction: look just before

        def release(original=opt._release_ipg_buffers):
            snapshot()
            original()

        opt._release_ipg_buffers = release
    hooks.append(opt.optimizer.register_step_pre_hook(snapshot))
    hooks += [m.register_forward_pre_hook(gathered) for m in engine.module.modules()] if stage == 3 else []
    layers = engine.module.lm.model.layers
    kept: set = set()  # checkpointed layers keep their inputs alive (non-reentrant: in the recompute closure)
    if ckpt:
        hooks += [
            m.register_forward_pre_hook(
                lambda m, a, kw: (
                    kept.update(probe.storages([*a, *kw.values(), *kw.get("position_embeddings", ())]))
                    if torch.is_grad_enabled()
                    else None
                ),
                with_kwargs=True,
            )
            for m in layers
        ]
    watch = probe.CastWatch(engine.module)
    tracker = probe.SavedTracker(params, gathered_keys, watch)
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=torch.Generator().manual_seed(0))
    hooks.append(engine.module.lm.lm_head.register_forward_hook(watch.end_of_forward))
    with torch.autograd.graph.saved_tensors_hooks(tracker.pack, tracker.unpack):
        with watch:
            loss = engine(ids)
        engine.backward(loss)
    phase[0] = "step"
    engine.step()
    for h in hooks:
        h.remove()
    parts = probe.optimizer_parts(opt, params)
    measured = {
        # gathered: those live at a module's forward, or those saved views kept alive longer, whichever is larger
        "params": probe.nbytes(params) + max(peaks["gathered"], tracker.peak["gathered"]),
        "grads": max(peaks["backward"], peaks["step"]),
        "optimizer": probe.nbytes(parts["optimizer"]),
        "activations": tracker.peak["activations"] + watch.alive_at_end,
    }
    detail = {
        "buckets": peaks["buckets"],
        "grads_and_buckets_at_backward": peaks["backward"],
        "grads_at_step": peaks["step"],
        "zero3_gathered_live": peaks["gathered"],
        "zero3_gathered_kept_by_saved_views": tracker.peak["gathered"],
        "saved": tracker.peak["activations"],
        "autocast_weight_copies": watch.alive_at_end,
    }
    if ckpt:  # + the layer inputs kept + one layer recomputed in the backward, measured without checkpointing
        kept -= params | tracker.seen  # unique storages: some inputs are saved outside the layers too
        engine.module.lm.activation_checkpointing_disable()
        layer_watch = probe.CastWatch(engine.module)
        layer_tracker = probe.SavedTracker(params, gathered_keys, layer_watch)
        pre = [
            m.register_forward_pre_hook(lambda m, a, i=i: setattr(layer_tracker, "layer", i))
            for i, m in enumerate(layers)
        ]
        post = [m.register_forward_hook(lambda m, a, o: setattr(layer_tracker, "layer", None)) for m in layers]
        with torch.autograd.graph.saved_tensors_hooks(layer_tracker.pack, layer_tracker.unpack), layer_watch:
            engine(ids)
        for h in pre + post:
            h.remove()
        detail.update(
            kept_layer_inputs=probe.nbytes(kept),
            recomputed_layer=max(layer_tracker.per_layer.values()),
        )
        measured["activations"] += detail["kept_layer_inputs"] + detail["recomputed_layer"]
    # ZeRO-3 replaced torch.nn.functional.linear for good (zero.Init's memory-efficient linear): a Ray worker runs
    # one engine, this process runs several, so the next configuration must start from torch's own
    torch.nn.functional.linear = getattr(
        InsertPostInitMethodToModuleSubClasses, "linear_bk", torch.nn.functional.linear
    )
    predicted = predict(shape, stage, lora_r, ckpt, extra)
    m_total, p_total = sum(measured.values()), sum(predicted.values())
    return {
        "name": name,
        "zero_stage": stage,
        "lora_r": lora_r,
        "checkpointing": ckpt,
        "departures": extra,
        "trainable_params": trainable_parameters(engine.module),
        "ds_zero_config": {k: v for k, v in ds["zero_optimization"].items() if "bucket" in k},
        "measured": measured,
        "predicted": predicted,
        "measured_detail": detail,
        "measured_total_bytes": m_total,
        "predicted_total_bytes": p_total,
        "total_error": round(p_total / m_total - 1, 4),
        "term_error": {t: round(predicted[t] / measured[t] - 1, 4) if measured[t] else None for t in TERMS},
    }


def _line(row: dict) -> str:
    parts = [f"{t} {row['measured'][t] / 2**20:.1f}/{row['predicted'][t] / 2**20:.1f}" for t in TERMS]
    return f"{row['name']}: measured/predicted MiB " + ", ".join(parts) + f"; total {row['total_error']:+.1%}"


def markdown(out: dict) -> str:
    mib = 2**20
    s = out["shape"]
    lines = [
        "# Memory model vs DeepSpeed's real allocations (CPU)",
        "",
        f"Generated by `python bench/memory_model.py --markdown ...` ({out['machine']['platform']}, "
        f"{out['machine']['cpus']} CPUs, load {out['machine']['loadavg_1m']:.1f}). Qwen2-shaped LM, "
        f"{s['layers']} layers, hidden {s['hidden']}, intermediate {s['intermediate']}, {s['heads']} heads "
        f"({s['kv_heads']} KV), vocab {s['vocab']}, {s['batch']}×{s['seq']} tokens; bf16 (torch_autocast), one "
        "rank, the trainer's generated DeepSpeed config (overlap_comm off on CPU). MiB measured / predicted.",
        "",
        "| config | ZeRO | LoRA r | ckpt | " + " | ".join(TERMS) + " | total | error |",
        "|---|---|---|---|" + "---|" * len(TERMS) + "---|---|",
    ]
    for r in out["configs"]:
        cells = [f"{r['measured'][t] / mib:.1f} / {r['predicted'][t] / mib:.1f}" for t in TERMS]
        lines.append(
            f"| {r['name']} | {r['zero_stage']} | {r['lora_r'] or 'full'} | {'on' if r['checkpointing'] else 'off'} "
            f"| " + " | ".join(cells) + f" | {r['measured_total_bytes'] / mib:.1f} / "
            f"{r['predicted_total_bytes'] / mib:.1f} | {r['total_error']:+.1%} |"
        )
    buckets = ", ".join(f"{r['name']} {r['measured_detail']['buckets'] / mib:.1f}" for r in out["configs"])
    copies = ", ".join(
        f"{r['name']} {r['measured_detail']['autocast_weight_copies'] / mib:.1f}" for r in out["configs"]
    )
    lines += [
        "",
        "grads = gradient partitions + DeepSpeed's reduction buckets at their common peak (the backward, or the step's",
        "flattened copy); activations = peak of tensors saved for the backward + autocast's 16-bit weight copies alive",
        "at the end of the forward (the loss's saved fp32 log-softmax included; its transient gradient is not).",
        "`-overlap` forces `overlap_comm` (the GPU setting), `-bf16reduce` sets `train.grad_reduce_dtype=autocast`.",
        "",
        f"Buckets measured (MiB): {buckets}.",
        "",
        f"Autocast weight copies alive at the end of the forward (MiB): {copies}.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
