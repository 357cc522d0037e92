"""Per-rank state: reseeding by (seed, rank), RNG files, and checkpoints that drop every name of a frozen (tied)
parameter."""

import os

import pytest
import torch

from megl_ray.training.rank_state import exclude_tied_frozen, load_rng, rank_seed, reseed_rank, save_rng


def test_ranks_reseed_differently_and_reproducibly():
    assert rank_seed(0, 0) != rank_seed(0, 1) and rank_seed(0, 1) == rank_seed(0, 1) != rank_seed(1, 1)
    reseed_rank(3, 0)
    a = torch.rand(4)
    reseed_rank(3, 1)
    b = torch.rand(4)
    reseed_rank(3, 0)
    assert torch.equal(a, torch.rand(4)) and not torch.equal(a, b)  # different dropout masks per rank


def test_rng_state_round_trips(tmp_path):
    torch.manual_seed(5)
    save_rng(tmp_path / "rng.pt")
    want = torch.rand(3)
    torch.manual_seed(6)
    load_rng(tmp_path / "rng.pt")
    assert torch.equal(torch.rand(3), want)


def test_checkpoint_state_drops_both_names_of_a_frozen_tied_embedding():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    engine_cls = pytest.importorskip("deepspeed.runtime.engine").DeepSpeedEngine
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            tie_word_embeddings=True,
        )
    )
    model.requires_grad_(False)
    model.model.norm.weight.requires_grad_(True)

    class Engine:  # DeepSpeed's own module_state_dict on a stand-in engine
        module_state_dict = engine_cls.module_state_dict

        def __init__(self, module):
            self.module = module

        def random_ltd_enabled(self):
            return False

    engine = Engine(model)
    plain = engine.module_state_dict(exclude_frozen_parameters=True)
    assert "lm_head.weight" in plain  # DeepSpeed names the tied weight once and keeps its second name
    exclude_tied_frozen(engine)
    fixed = engine.module_state_dict(exclude_frozen_parameters=True)
    assert set(fixed) == {"model.norm.weight"} | {k for k in plain if "rotary" in k}
    assert "lm_head.weight" in engine.module_state_dict()  # without the option nothing is dropped
