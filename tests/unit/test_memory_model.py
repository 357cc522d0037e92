"""The per-GPU memory model: its parameter counts against the real transformers architectures (built on the meta
device, no weights) and the accounting rules of ZeRO stages, precision, checkpointing and offload."""

import pytest
import torch

from megl_ray.planning.memory_model import (
    CLIP_L_336,
    GIB,
    PRESETS,
    QWEN2_0_5B,
    VICUNA_7B,
    Setup,
    TransformerShape,
    bucket_elements,
    memory_per_gpu,
    table,
)


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts_match_the_real_architectures():
    from transformers import (
        CLIPVisionConfig,
        CLIPVisionModel,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    with torch.device("meta"):
        qwen = Qwen2ForCausalLM(
            Qwen2Config(
                hidden_size=896,
                intermediate_size=4864,
                num_hidden_layers=24,
                num_attention_heads=14,
                num_key_value_heads=2,
                vocab_size=151936,
                tie_word_embeddings=True,
            )
        )
        llama = LlamaForCausalLM(
            LlamaConfig(
                hidden_size=4096,
                intermediate_size=11008,
                num_hidden_layers=32,
                num_attention_heads=32,
                vocab_size=32064,
            )
        )
        clip = CLIPVisionModel(
            CLIPVisionConfig(
                hidden_size=1024,
                intermediate_size=4096,
                num_hidden_layers=23,
                num_attention_heads=16,
                image_size=336,
                patch_size=14,
            )
        )
    assert QWEN2_0_5B.params() == pytest.approx(_count(qwen), rel=1e-3)
    assert VICUNA_7B.params() == pytest.approx(_count(llama), rel=1e-3)
    assert CLIP_L_336.params() == pytest.approx(_count(clip), rel=1e-2)


def test_zero_stages_precision_checkpointing_and_offload_account_as_documented():
    model = PRESETS["r50-llava-1.5-7b-full"]
    trainable, frozen = model.trainable_frozen()
    z2 = memory_per_gpu(model, Setup(world=8, zero_stage=2))
    z3 = memory_per_gpu(model, Setup(world=8, zero_stage=3))
    assert z2.params == pytest.approx(4 * trainable + 2 * frozen)  # bf16 autocast: fp32 trainable, 16-bit frozen
    gathered = 2 * 4 * max(model.lm.layer_params(), model.vision.layer_params())  # two fp32 layers of the LM
    assert z3.params == pytest.approx((4 * trainable + 2 * frozen) / 8 + gathered) and z3.params < z2.params / 5
    bucket = bucket_elements(trainable)
    assert z2.buckets == 2 * 4 * bucket and z3.buckets == 4 * bucket  # overlap_comm doubles ZeRO-2's only
    assert z2.grads == pytest.approx(4 * trainable / 8 + max(z2.buckets, 4 * trainable / 8))
    assert z3.grads == pytest.approx(2 * 4 * trainable / 8 + z3.buckets)  # + the step's flattened copy
    assert z2.optimizer == z3.optimizer == pytest.approx(12 * trainable / 8)
    assert memory_per_gpu(model, Setup(world=8, zero_stage=1)).grads == pytest.approx(4 * trainable)
    fp32 = memory_per_gpu(model, Setup(world=8, zero_stage=2, precision="fp32"))
    assert fp32.params == pytest.approx(4 * (trainable + frozen)) and fp32.activations > z2.activations
    ckpt = memory_per_gpu(model, Setup(world=8, zero_stage=3, gradient_checkpointing=True))
    assert ckpt.activations < z3.activations / 5
    off = memory_per_gpu(model, Setup(world=8, zero_stage=3, offload="cpu"))
    host = z3.optimizer + (z3.params - off.params) + 4 * trainable / 8  # + the gradient partition
    assert off.optimizer == 0 and off.grads == z3.buckets and off.host_offload == pytest.approx(host)
    full_logits = memory_per_gpu(model, Setup(world=8, rationale_only_logits=False))
    assert full_logits.logits / z2.logits == pytest.approx((576 + 96) / 64)
    lora = memory_per_gpu(PRESETS["r50-llava-1.5-7b-lora"], Setup(world=1, zero_stage=2))
    assert lora.trainable_params < 0.02 * lora.frozen_params and lora.total < 80 * GIB
    rows = table([("1x80GB", "r50-llava-1.5-7b-lora", Setup(world=1))])
    assert rows[0]["total"] == round(memory_per_gpu(PRESETS["r50-llava-1.5-7b-lora"], Setup(world=1)).total / GIB, 2)
    with pytest.raises(ValueError):
        memory_per_gpu(model, Setup(zero_stage=4))


def test_lora_parameter_count_matches_peft():
    from peft import LoraConfig, inject_adapter_in_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    shape = TransformerShape(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=100)
    model = Qwen2ForCausalLM(
        Qwen2Config(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=100,
            tie_word_embeddings=False,
        )
    )
    before = _count(model)
    inject_adapter_in_model(LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]), model)
    assert _count(model) - before == shape.lora_params(4, ("q_proj", "k_proj", "v_proj", "o_proj"))


def test_readme_7b_table_is_the_one_the_model_computes():
    from pathlib import Path

    from megl_ray.planning.memory_model import markdown_7b

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert markdown_7b() in readme
