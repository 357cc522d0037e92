"""Memory options of the model: gradient checkpointing (same losses and gradients, layers really recomputed),
rationale-only logits (same L_text, the LM head sees only rationale positions), the attention kernel choice, and
frozen BatchNorm."""

import pytest
import torch

from megl_ray.config import load_config, packaged_config
from megl_ray.errors import ConfigError
from megl_ray.model import build_megl_model
from tests.support.toy import corpus, make_batch


def _model(*overrides):
    torch.manual_seed(0)
    cfg = load_config(packaged_config("tiny"), ["loss.dc_weight=0.5", *overrides])
    return cfg, build_megl_model(cfg, 4, corpus=corpus()).train()


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _count_calls(modules):
    """Forward calls of each module, recomputations included (checkpoint recomputation skips module hooks, so the
    instance's forward is wrapped)."""
    calls = {i: 0 for i in range(len(modules))}
    for i, m in enumerate(modules):

        def counted(*args, _forward=m.forward, _i=i, **kwargs):
            calls[_i] += 1
            return _forward(*args, **kwargs)

        m.forward = counted
    return calls


def _assert_all_close(got: dict, want: dict, rel: float) -> None:
    """Per tensor, relative to its norm (single elements near zero differ by the rounding of summation order), with
    an absolute floor of ``rel`` times the whole gradient's norm for gradients that are zero in exact arithmetic
    (attention key biases; conv biases followed by a per-channel GroupNorm), whose float values are rounding noise."""
    assert got.keys() == want.keys()
    floor = rel * float(torch.stack([g.norm() for g in want.values()]).norm())
    for name in want:
        err = float((got[name] - want[name]).norm())
        assert err <= rel * float(want[name].norm()) + floor, (name, err, float(want[name].norm()), floor)


@pytest.mark.parametrize("classifier", ["tiny", "resnet18"])
def test_gradient_checkpointing_gives_the_same_losses_and_gradients(classifier):
    extra = [f"model.classifier={classifier}", "model.freeze_vision=true"]
    cfg, plain = _model(*extra)
    _, ckpt = _model(*extra, "model.gradient_checkpointing=true")
    batch = make_batch(plain, cfg, n=4, mask_every=2)  # masked and unmasked samples: every term on
    layers = [
        ckpt.vlm.model.language_model.layers[0].mlp,
        ckpt.vlm.model.vision_tower.encoder.layers[0].mlp,
        ckpt.classifier.backbone.body[0] if classifier == "tiny" else ckpt.classifier.backbone.stages[0],
    ]
    calls = _count_calls(layers)
    a, b = plain(**batch), ckpt(**batch)
    assert set(a.terms) == {"loss", "ce", "text", "visual", "dc"}
    assert b.loss.item() == pytest.approx(a.loss.item(), rel=1e-5)
    a.loss.backward()
    b.loss.backward()
    assert calls == {0: 2, 1: 2, 2: 2}  # LM layer, frozen vision layer, classifier stage: recomputed in backward
    ga, gb = _grads(plain), _grads(ckpt)
    assert ga.keys() == gb.keys() and len(ga) > 10
    _assert_all_close(gb, ga, 1e-5)


def test_rationale_only_logits_give_the_same_text_loss_and_gradients():
    cfg, model = _model("model.lora_r=2", "model.lora_dropout=0")  # no dropout: both forwards see one mask
    batch = make_batch(model, cfg, n=4)
    shapes = []
    model.vlm.lm_head.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    fast = model(**batch)
    full = model(**batch, full_logits=True)
    labelled = int((batch["text_labels"][:, 1:] != -100).sum())
    assert shapes[0] == (labelled, model.vlm.lm_head.out_features)  # only rationale positions reach the head
    assert shapes[1][:2] == tuple(batch["input_ids"].shape)
    torch.testing.assert_close(fast.text, full.text, rtol=1e-6, atol=0)
    fast.loss.backward()
    g_fast = _grads(model)
    model.zero_grad()
    full.loss.backward()
    _assert_all_close(g_fast, _grads(model), 1e-5)


def test_attention_kernels_agree_and_a_missing_flash_attention_is_one_line():
    cfg, sdpa = _model()
    _, eager = _model("model.attn_implementation=eager")
    assert eager.vlm.config.text_config._attn_implementation == "eager"
    batch = make_batch(sdpa, cfg, n=2)
    assert eager(**batch).loss.item() == pytest.approx(sdpa(**batch).loss.item(), rel=1e-5)
    import importlib.util

    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(ConfigError, match="flash_attention_2 needs the flash-attn package") as err:
            _model("model.attn_implementation=flash_attention_2")
        assert "\n" not in str(err.value)


def test_frozen_batchnorm_stays_in_eval_mode_and_keeps_its_statistics():
    cfg, model = _model("model.classifier=resnet18", "model.freeze_norm=true")
    bns = [m for m in model.classifier.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = bns[0].running_mean.clone()
    model.train()
    assert bns and all(not m.training and not m.weight.requires_grad for m in bns)
    model(**make_batch(model, cfg, n=2)).loss.backward()
    assert torch.equal(bns[0].running_mean, before) and bns[0].weight.grad is None
    with pytest.raises(ConfigError, match="model.sync_bn"):
        load_config(None, ["model.sync_bn=true", "model.freeze_norm=true"])
