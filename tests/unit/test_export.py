import json

import pytest
import torch

from megl_ray.config import load_config, packaged_config
from megl_ray.errors import UserError
from megl_ray.model import build_megl_model
from megl_ray.model.export_io import load_export, save_export
from tests.support.toy import CLASS_NAMES, corpus, make_batch


def test_export_round_trip_gives_the_same_predictions_and_rationales(tmp_path):
    torch.manual_seed(0)
    cfg = load_config(packaged_config("tiny"), ["model.lora_r=2"])
    prior = torch.rand(8, 8)
    model = build_megl_model(cfg, 4, corpus=corpus(), prior=prior).eval()
    save_export(model, cfg, CLASS_NAMES, str(tmp_path / "export"))
    loaded = load_export(str(tmp_path / "export"))
    assert loaded.classes == CLASS_NAMES and loaded.config == cfg
    assert torch.equal(loaded.model.prior, prior)
    batch = make_batch(model, cfg, n=4)
    p1, s1 = model.predict(batch["pixels"])
    p2, s2 = loaded.model.predict(batch["pixels"])
    assert torch.equal(p1, p2) and torch.equal(s1, s2)
    assert model.generate(batch["pixels"], CLASS_NAMES, max_new_tokens=6) == loaded.model.generate(
        batch["pixels"], CLASS_NAMES, max_new_tokens=6
    )


def test_loading_a_foreign_or_missing_export_gives_one_clear_line(tmp_path):
    with pytest.raises(UserError, match="model directory not found"):
        load_export(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="is not a megl_ray export"):
        load_export(str(tmp_path / "empty"))
    torch.manual_seed(0)
    cfg = load_config(packaged_config("tiny"))
    model = build_megl_model(cfg, 4, corpus=corpus())
    save_export(model, cfg, CLASS_NAMES, str(tmp_path / "e"))
    meta = json.loads((tmp_path / "e" / "meta.json").read_text())
    meta["num_classes"], meta["classes"] = 7, [f"c{i}" for i in range(7)]  # a 4-class head under 7 classes
    (tmp_path / "e" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="weights do not fit"):
        load_export(str(tmp_path / "e"))


def test_an_export_trained_with_flash_attention_loads_with_sdpa_where_flash_attn_is_missing(tmp_path, monkeypatch):
    """A run on GPUs with ``flash_attention_2`` leaves an export a CPU machine must still read (same weights, the
    SDPA kernel): it used to stop at the missing package."""
    import megl_ray.model.export_io as export_io

    torch.manual_seed(0)
    cfg = load_config(packaged_config("tiny"))
    model = build_megl_model(cfg, 4, corpus=corpus()).eval()
    trained = load_config(packaged_config("tiny"), ["model.attn_implementation=flash_attention_2"])
    save_export(model, trained, CLASS_NAMES, str(tmp_path / "export"))
    real = export_io.importlib.util.find_spec
    monkeypatch.setattr(
        export_io.importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real(name, *a)
    )
    loaded = load_export(str(tmp_path / "export"))
    assert loaded.config.model.attn_implementation == "flash_attention_2"  # what it was trained with, still said
    assert loaded.model.vlm.config._attn_implementation == "sdpa"
    batch = make_batch(model, cfg, n=2)
    assert torch.equal(loaded.model.predict(batch["pixels"])[0], model.predict(batch["pixels"])[0])


def test_tensors_taken_inside_a_zero3_gather_are_copies_that_outlive_it():
    """Under ZeRO-3 a gathered parameter's memory is released (or reused) when its module's gather ends: the export
    keeps a copy; outside a gather a host tensor is taken as it is (no second model in RAM)."""
    import contextlib

    from megl_ray.model.export_io import exported_state

    torch.manual_seed(0)
    cfg = load_config(packaged_config("tiny"))
    model = build_megl_model(cfg, 4, corpus=corpus())
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @contextlib.contextmanager
    def gather(params):
        yield
        with torch.no_grad():
            for p in params:  # what a released gather buffer may hold next
                p.zero_()

    shared = exported_state(model, cfg)  # no gather: the parameters' own memory
    weight = model.classifier.head.weight
    assert shared["classifier.head.weight"].data_ptr() == weight.data_ptr()
    state = exported_state(model, cfg, gather=gather)
    assert state and all(torch.equal(state[k], before[k]) for k in state)  # the values seen inside the gathers
    assert weight.abs().sum() == 0  # and the gathers did end by wiping them
