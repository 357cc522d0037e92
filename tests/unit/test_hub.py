"""Models named by Hugging Face Hub id (``megl_ray.model.hub``), offline: tiny CLIP, Qwen2 and LLaVA checkpoints
written by the test into an HF cache layout (``models--org--name/snapshots/<rev>/``, ``refs/<branch>``) and used by
id, as ``from_pretrained`` would take them, with ``HF_HUB_OFFLINE=1``."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from megl_ray.cluster.credentials import is_credential, public_env
from megl_ray.config import load_config, packaged_config
from megl_ray.driver.fit import TrainOptions, run
from megl_ray.errors import UserError
from megl_ray.model import hub
from megl_ray.model.checkpoint_io import local_dir
from megl_ray.model.vlm import build_tiny, check_model_sources, load_llava, load_tokenizer, pixel_size
from megl_ray.training.local import train
from tests.support.base_models import make_clip_qwen2_base
from tests.support.hf_cache import SHA1, SHA2
from tests.support.hf_cache import place_in_cache as _cache


@pytest.fixture
def clip_qwen2(tmp_path, offline_cache):
    vision, lm = make_clip_qwen2_base(tmp_path / "base", ["a round digit", "a straight stroke", "zero", "one"])
    _cache(offline_cache, "tiny-org/clip", Path(vision), SHA1)
    _cache(offline_cache, "tiny-org/qwen2", Path(lm), SHA1)
    return offline_cache


def test_an_id_resolves_to_its_snapshot_and_a_revision_selects_another(tmp_path, offline_cache):
    for sha, size in ((SHA1, 32), (SHA2, 96)):
        folder = tmp_path / sha[:4]
        folder.mkdir()
        (folder / "config.json").write_text(f'{{"image_size": {size}}}')
        _cache(offline_cache, "tiny-org/clip", folder, sha, "main" if sha == SHA1 else "v2")
    entry = offline_cache / "models--tiny-org--clip" / "snapshots"
    assert local_dir("tiny-org/clip") == entry / SHA1
    assert local_dir("tiny-org/clip@v2") == entry / SHA2  # a branch
    assert local_dir(f"tiny-org/clip@{SHA2}") == entry / SHA2  # a commit
    cfg = load_config(None, ["model.preset=clip-qwen2", "model.vision_path=tiny-org/clip@v2", "model.lm_path=x/y"])
    assert (
        pixel_size(cfg.model) == 96
    )  # the larger of 64 and the tower's: read from the selected snapshot's config.json


def test_an_unknown_id_or_revision_is_one_line_naming_the_cache(offline_cache):
    with pytest.raises(UserError, match=f"not in the HF cache at {offline_cache}"):
        local_dir("tiny-org/nope")
    cfg = load_config(None, ["model.preset=llava", "model.vlm_path=tiny-org/nope@v9"])
    with pytest.raises(UserError, match=r"^model.vlm_path: tiny-org/nope@v9: not in the HF cache .* at revision v9"):
        check_model_sources(cfg.model)
    assert not hub.is_hub_id("./a/b") and not hub.is_hub_id("/abs/path") and hub.is_hub_id("org/name@main")


def test_a_wrong_id_stops_train_before_the_store_the_data_or_ray(offline_cache, monkeypatch, tmp_path):
    monkeypatch.setenv("MEGL_HOME", str(tmp_path / "home"))
    overrides = ("model.preset=clip-qwen2", "model.vision_path=tiny-org/gone", f"model.lm_path={tmp_path}")
    options = TrainOptions(overrides=overrides)
    with pytest.raises(UserError, match="model.vision_path: tiny-org/gone: not in the HF cache"):
        run(options)
    assert not (tmp_path / "home").exists()  # no embedded store was started, no dataset converted


def test_clip_and_qwen2_by_id_train_in_the_one_process_trainer(clip_qwen2, data_uri):
    cfg = load_config(
        packaged_config("tiny"),
        [
            "model.preset=clip-qwen2",
            "model.vision_path=tiny-org/clip",
            f"model.lm_path=tiny-org/qwen2@{SHA1}",
            "model.max_text_tokens=16",
            f"data.uri={data_uri}",
        ],
    )
    result = train(cfg, max_steps=2)
    assert result["steps"] == 2 and math.isfinite(result["final"]["loss"])


def test_a_llava_checkpoint_by_id_loads_with_its_tokenizer(tmp_path, offline_cache):
    cfg = load_config()
    bundle = build_tiny(cfg.model, ["a round digit", "a straight stroke"])
    bundle.model.save_pretrained(tmp_path / "llava")
    bundle.tokenizer.save_pretrained(tmp_path / "llava")
    _cache(offline_cache, "tiny-org/llava", tmp_path / "llava", SHA1)
    llava = load_config(None, ["model.preset=llava", "model.vlm_path=tiny-org/llava"]).model
    loaded = load_llava(llava)
    assert loaded.num_image_tokens == bundle.num_image_tokens
    assert load_tokenizer(llava).get_vocab() == loaded.tokenizer.get_vocab()


def test_workers_get_the_hf_settings_and_the_token_only_by_credentials_file():
    env = {"HF_HOME": "/data/hf", "HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_secret", "PATH": "/bin"}
    assert public_env(env) == {"HF_HOME": "/data/hf", "HF_HUB_OFFLINE": "1"}
    assert is_credential("HF_TOKEN")
