"""The memory model's terms by hand on small shapes — DeepSpeed's reduction buckets, ZeRO's step-time gradient
copies, peft's fp32 LoRA input, the fp32 norm inputs, ZeRO-3's linear, autocast's weight copies — and the DeepSpeed
config that decides them (bucket sizes from the trainable count, fp32 gradient reduction)."""

import pytest

from megl_ray.config import load_config
from megl_ray.planning.memory_model import (
    DEFAULT_BUCKET,
    MIN_BUCKET,
    ModelShape,
    Setup,
    bucket_bytes,
    bucket_elements,
    logits_bytes,
    memory_per_gpu,
    model_states,
)
from megl_ray.planning.shapes import NO_LORA, Acts, Lora, TransformerShape
from megl_ray.training.ds_config import deepspeed_config, trainable_parameters

# 2 layers, hidden 8, SwiGLU 16, 2 heads of 4 (1 KV head), vocab 10; 3 tokens × 2 sequences: n = 6
LM = TransformerShape(layers=2, hidden=8, intermediate=16, heads=2, kv_heads=1, vocab=10)
N, H, FF, KV, LSE = 6, 8, 16, 4, 4 * 2 * 2 * 3  # tokens, hidden, intermediate, KV width, fp32 logsumexp (b·a·s)


def test_buckets_follow_the_stage_the_communication_dtypes_and_overlap():
    assert bucket_elements(None) == DEFAULT_BUCKET == 500_000_000
    assert bucket_elements(10) == MIN_BUCKET and bucket_elements(3_000_000) == 3_000_000
    assert bucket_elements(7 * 10**9) == DEFAULT_BUCKET
    t = 3_000_000
    # ZeRO-2: fp32 buffers (the masters' dtype), one per communication dtype, doubled under overlap_comm
    assert bucket_bytes(t, Setup(zero_stage=2, overlap_comm=False)) == 4 * t
    assert bucket_bytes(t, Setup(zero_stage=2)) == 2 * 4 * t
    assert bucket_bytes(t, Setup(zero_stage=2, grad_reduce_dtype="autocast")) == 2 * 2 * 4 * t
    # ZeRO-3: one bucket per dtype, in that dtype, overlap or not
    assert bucket_bytes(t, Setup(zero_stage=3)) == 4 * t
    assert bucket_bytes(t, Setup(zero_stage=3, grad_reduce_dtype="autocast")) == (4 + 2) * t
    assert bucket_bytes(t, Setup(zero_stage=3, precision="fp32", grad_reduce_dtype="autocast")) == 4 * t
    assert bucket_bytes(t, Setup(zero_stage=1)) == bucket_bytes(t, Setup(zero_stage=0)) == 0
    # DeepSpeed's default bucket under ZeRO-2 with 16-bit reduction: the 7.45 GiB the review found
    assert 2 * 2 * 4 * DEFAULT_BUCKET / 2**30 == pytest.approx(7.45, abs=0.01)


def test_gradients_optimizer_and_parameters_per_stage():
    t, f = 4_000_000, 10_000_000
    p2, g2, o2 = model_states(t, f, Setup(world=4, zero_stage=2, overlap_comm=False))
    assert p2 == 4 * t + 2 * f and o2 == 12 * t / 4
    assert g2 == 4 * t / 4 + max(4 * t, 4 * t / 4)  # partition + the larger of the bucket and the step's flat copy
    p3, g3, o3 = model_states(t, f, Setup(world=4, zero_stage=3))
    assert p3 == (4 * t + 2 * f) / 4 and o3 == 12 * t / 4  # the fp32 master is a clone under ZeRO-3 too
    assert g3 == 4 * t / 4 + 4 * t + 4 * t / 4  # partition + bucket (kept) + the step's flattened sub-group
    _, g1, o1 = model_states(t, f, Setup(world=4, zero_stage=1))
    assert g1 == 4 * t and o1 == 12 * t / 4


def test_layer_activations_by_hand():
    frozen_lora = Acts(lora=Lora(r=2, targets=("q_proj", "o_proj"), dropout=0.1), mask_bytes=1)
    # fp32 norm inputs (2 × 4nh); q, k, v, out (2nh + 2·2n·kv + 2nh) + lse; SwiGLU 3 × 2nI; frozen linears save
    # nothing; per adapter: mask (1 B) + 16-bit cast of peft's fp32 input + A's output (2nr)
    base = 2 * 4 * N * H + (4 * N * H + 4 * N * KV) + LSE + 6 * N * FF
    adapters = 2 * (N * H + 2 * N * H + 2 * N * 2)
    assert LM.layer_activation_bytes(3, 2, frozen_lora) == base + adapters
    # ZeRO-3's linear saves every input as given: the shared 16-bit q/k/v and gate/up inputs, down's, and the
    # adapters' fp32 input instead of its cast
    z3 = Acts(lora=frozen_lora.lora, zero3=True)
    z3_adapters = 2 * (N * H + 4 * N * H + 2 * N * 2)
    assert LM.layer_activation_bytes(3, 2, z3) == base + 2 * N * H + 2 * N * H + 2 * N * FF + z3_adapters
    # a training stack: fp32 stream, fp32 normalised inputs, and a 16-bit cast per consumer of it (q, k, v; gate, up)
    trains = Acts(trains=True)
    expected = 2 * 8 * N * H + 3 * 2 * N * H + (4 * N * H + 4 * N * KV) + LSE + 2 * 2 * N * H + 6 * N * FF + 2 * N * FF
    assert LM.layer_activation_bytes(3, 2, trains) == expected
    no_dropout = Acts(lora=Lora(r=2, targets=("q_proj",), dropout=0.0))
    assert LM.layer_activation_bytes(3, 2, no_dropout) == base + 2 * N * H + 2 * N * 2
    eager = Acts(flash=False)
    assert LM.layer_activation_bytes(3, 2, eager) - LM.layer_activation_bytes(3, 2, Acts()) == 5 * 2 * 3 * 3 * 2


def test_checkpointing_keeps_layer_inputs_plus_one_layer_and_the_head():
    layer = LM.layer_activation_bytes(3, 2, Acts(lora=NO_LORA))
    head = 4 * N * H  # the final norm's fp32 input (the frozen head saves no input)
    assert LM.activation_bytes(3, 2, False, Acts()) == 2 * layer + head
    assert LM.activation_bytes(3, 2, True, Acts()) == 2 * 2 * N * H + layer + head
    trained = Acts(trains=True)
    ckpt = LM.activation_bytes(3, 2, True, trained)
    assert ckpt == 2 * 4 * N * H + LM.layer_activation_bytes(3, 2, trained) + 8 * N * H + 2 * N * H


def test_autocast_weight_copies_and_logits():
    full = ModelShape("lm", 0, 0.0, None, LM, image_tokens=0, text_tokens=3, rationale_tokens=3)
    trainable, _ = full.trainable_frozen()
    setup = Setup(micro_batch=2, zero_stage=2, rationale_only_logits=False)
    z2 = memory_per_gpu(full, setup)
    assert z2.autocast_weights == 2 * (trainable - LM.vocab * LM.hidden)  # the embedding table is looked up
    z3 = memory_per_gpu(full, Setup(micro_batch=2, zero_stage=3, rationale_only_logits=False))
    assert z3.autocast_weights == 0  # ZeRO-3's linear casts a transposed view: autocast does not cache it
    fp32 = memory_per_gpu(full, Setup(micro_batch=2, precision="fp32", rationale_only_logits=False))
    assert fp32.autocast_weights == 0
    assert logits_bytes(2, 3, 10, "bf16") == (4 * 60, 6 * 60) and logits_bytes(2, 3, 10, "fp32") == (240, 240)
    assert z2.logits == sum(logits_bytes(2, 3, 10, "bf16"))


def test_deepspeed_config_sizes_buckets_and_reduces_in_fp32():
    cfg = load_config(None, ["train.zero_stage=2", "train.precision=bf16"])
    zero = deepspeed_config(cfg, use_gpu=True, trainable=2_000_000)["zero_optimization"]
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == 2_000_000 and zero["overlap_comm"]
    assert deepspeed_config(cfg, True, 10)["zero_optimization"]["reduce_bucket_size"] == MIN_BUCKET
    assert deepspeed_config(cfg, True)["zero_optimization"]["reduce_bucket_size"] == DEFAULT_BUCKET
    assert deepspeed_config(cfg, True)["torch_autocast"]["lower_precision_safe_modules"] == []
    bf16_reduce = load_config(None, ["train.precision=bf16", "train.grad_reduce_dtype=autocast"])
    assert "lower_precision_safe_modules" not in deepspeed_config(bf16_reduce, True)["torch_autocast"]
    z3 = load_config(None, ["train.zero_stage=3"])
    zero3 = deepspeed_config(z3, use_gpu=False, trainable=10**10)["zero_optimization"]
    assert zero3["reduce_bucket_size"] == DEFAULT_BUCKET and "allgather_bucket_size" not in zero3
    assert zero3["stage3_prefetch_bucket_size"] == 50_000_000
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model[1].requires_grad_(False)
    assert trainable_parameters(model) == 3 * 4 + 4
