import pytest
import torch

from megl_ray.config import load_config
from megl_ray.data.transforms import IMAGE_TOKEN
from megl_ray.errors import UserError
from megl_ray.model import build_megl_model
from megl_ray.model.vlm import build_tiny, build_vlm, train_tokenizer
from tests.support.toy import corpus, make_batch


def test_tokenizer_is_trained_on_the_corpus_with_special_tokens():
    tok = train_tokenizer(corpus(), vocab_size=300)
    assert tok.convert_tokens_to_ids(IMAGE_TOKEN) != tok.unk_token_id
    assert tok.pad_token_id is not None and tok.eos_token_id is not None and tok.bos_token_id is not None
    ids = tok.encode("a bright square", add_special_tokens=False)
    assert tok.decode(ids) == "a bright square"


def test_tiny_preset_shapes():
    cfg = load_config(None, ["model.preset=tiny"]).model
    bundle = build_tiny(cfg, corpus())
    assert bundle.num_image_tokens == (cfg.tiny_vision_image_size // 8) ** 2
    assert bundle.model.config.text_config.model_type == "qwen2"
    assert bundle.model.config.vision_config.model_type == "clip_vision_model"


def test_freeze_vision_and_lora_train_only_what_they_should():
    cfg = load_config(None, ["model.lora_r=4", "model.freeze_vision=true"]).model
    bundle = build_vlm(cfg, corpus())
    trainable = {n for n, p in bundle.model.named_parameters() if p.requires_grad}
    assert trainable, "nothing would train"
    assert not any("vision_tower" in n for n in trainable)
    lm_trainable = [n for n in trainable if "language_model" in n]
    assert lm_trainable and all("lora_" in n for n in lm_trainable)
    assert any("multi_modal_projector" in n for n in trainable)


def test_bad_lora_targets_give_a_config_error():
    cfg = load_config(None, ["model.lora_r=2", "model.lora_target_modules=[nope]"]).model
    with pytest.raises(UserError, match="model.lora_target_modules"):
        build_vlm(cfg, corpus())


def _save_tiny_llava(path):
    cfg = load_config().model
    bundle = build_tiny(cfg, corpus())
    bundle.model.save_pretrained(path)
    bundle.tokenizer.save_pretrained(path)
    return bundle


def test_llava_preset_loads_a_llava_hf_layout_directory(tmp_path):
    saved = _save_tiny_llava(tmp_path / "llava")
    cfg = load_config(None, ["model.preset=llava", f"model.vlm_path={tmp_path / 'llava'}", "model.classifier=tiny"])
    torch.manual_seed(0)
    model = build_megl_model(cfg, num_classes=4)
    assert model.num_image_tokens == saved.num_image_tokens
    for (name, a), (_, b) in zip(model.vlm.state_dict().items(), saved.model.state_dict().items()):
        assert torch.equal(a, b), name
    batch = make_batch(model, cfg, n=2)
    out = model(**batch)
    assert torch.isfinite(out.loss)


def test_clip_qwen2_preset_assembles_llava_from_two_checkpoints(tmp_path):
    saved = build_tiny(load_config().model, corpus())
    vision_dir, lm_dir = tmp_path / "clip", tmp_path / "qwen2"
    saved.model.model.vision_tower.save_pretrained(vision_dir)
    from transformers import Qwen2ForCausalLM

    lm = Qwen2ForCausalLM(saved.model.config.text_config)
    lm.save_pretrained(lm_dir)
    tok = train_tokenizer(corpus(), 300)
    tok.save_pretrained(lm_dir)
    cfg = load_config(None, ["model.preset=clip-qwen2", f"model.vision_path={vision_dir}", f"model.lm_path={lm_dir}"])
    model = build_megl_model(cfg, num_classes=4)
    vt = model.vlm.model.vision_tower.state_dict()
    for name, value in saved.model.model.vision_tower.state_dict().items():
        assert torch.equal(vt[name], value), name
    assert torch.equal(
        model.vlm.model.language_model.layers[0].self_attn.q_proj.weight, lm.model.layers[0].self_attn.q_proj.weight
    )
    assert model.vlm.config.vision_feature_layer == -2
    out = model(**make_batch(model, cfg, n=2))
    assert torch.isfinite(out.loss)


def test_missing_checkpoint_directories_give_one_clear_line(tmp_path):
    cfg = load_config(None, ["model.preset=llava", f"model.vlm_path={tmp_path / 'nope'}"]).model
    with pytest.raises(UserError, match="model directory not found"):
        build_vlm(cfg)
    (tmp_path / "empty").mkdir()
    cfg = load_config(None, ["model.preset=llava", f"model.vlm_path={tmp_path / 'empty'}"]).model
    with pytest.raises(UserError, match="model.vlm_path: cannot load"):
        build_vlm(cfg)
