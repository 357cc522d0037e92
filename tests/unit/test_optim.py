import math

import pytest
import torch

from megl_ray.config import OptimConfig, load_config
from megl_ray.training.ds_config import deepspeed_config, global_batch_size
from megl_ray.training.optim import build_optimizer, build_scheduler, lr_factor, param_groups, plain_step


def test_lr_warms_up_linearly_then_decays_by_cosine_to_a_tenth():
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(100, 100, 10) == pytest.approx(0.1)


def test_biases_and_norms_do_not_decay_and_frozen_parameters_are_left_out():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    model[2].requires_grad_(False)
    decay, no_decay = param_groups(model, 0.1)
    assert [p.shape for p in decay["params"]] == [(4, 3)]
    assert sorted(tuple(p.shape) for p in no_decay["params"]) == [(4,), (4,), (4,)]
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def test_the_classifier_gets_its_own_rate_under_the_same_schedule():
    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.classifier = torch.nn.Linear(3, 2)
            self.vlm = torch.nn.Linear(2, 2)

    model = Two()
    opt = build_optimizer(model, OptimConfig(lr=0.001, classifier_lr=0.01, warmup_steps=2))
    rates = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert rates[id(model.classifier.weight)] == rates[id(model.classifier.bias)] == 0.01
    assert rates[id(model.vlm.weight)] == rates[id(model.vlm.bias)] == 0.001
    sched = build_scheduler(opt, OptimConfig(lr=0.001, classifier_lr=0.01, warmup_steps=2), total_steps=10)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.0005, 0.0005, 0.005, 0.005])  # warm-up: half
    opt.step()
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.001, 0.001, 0.01, 0.01])
    assert len(param_groups(model, 0.0, 0.001, None)) == 2  # no classifier rate: the two usual groups


def test_plain_step_updates_and_schedules():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(2, 2))

        def forward(self, x):
            return type("Out", (), {"loss": (self.w * x).sum() ** 2})()

    model, cfg = Tiny(), OptimConfig(lr=0.1, warmup_steps=2, grad_clip=1.0)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, total_steps=10)
    before = model.w.detach().clone()
    out = plain_step(model, opt, sched, {"x": torch.ones(2, 2)}, cfg.grad_clip)
    assert out.loss.item() == 16.0 and not torch.equal(model.w, before)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)  # second warm-up step: factor 2/2


def test_deepspeed_config_derives_the_global_batch_and_precision():
    cfg = load_config(None, ["data.batch_size=4", "train.grad_accum=3", "train.num_workers=5", "train.zero_stage=3"])
    ds = deepspeed_config(cfg, use_gpu=False)
    assert ds["train_batch_size"] == global_batch_size(cfg) == 60
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 3
    assert ds["zero_optimization"]["stage"] == 3 and "bf16" not in ds
    assert ds["gradient_clipping"] == cfg.optim.grad_clip
    assert "torch_autocast" not in ds  # fp32 on CPUs by default
    gpu = deepspeed_config(cfg, use_gpu=True)
    # every gradient averaged in fp32 (DeepSpeed would tag nn.Linear/Conv gradients for 16-bit reduction)
    assert gpu["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    assert "bf16" not in gpu
    fp16 = load_config(None, ["train.precision=fp16", "train.offload=cpu", "train.zero_stage=3"])
    ds16 = deepspeed_config(fp16, use_gpu=False)
    assert ds16["torch_autocast"]["dtype"] == "float16"
    assert ds16["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds16["zero_optimization"]["offload_param"]["device"] == "cpu"
