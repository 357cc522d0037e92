"""The end-of-run gallery drawn with the model a training worker holds (``training.gallery``): in the training
precision (bf16 frozen weights beside fp32 trainable ones, under autocast), from the split the run validates on."""

import pytest
import torch

from megl_ray.config import config_from_dict
from megl_ray.data.reader import bundled_dataset_uri, read_split
from megl_ray.data.schema import load_dataset_info
from megl_ray.model import build_megl_model
from megl_ray.training.gallery import GallerySource, draw_gallery, gallery_source


@pytest.fixture(scope="module")
def data():
    uri = bundled_dataset_uri()
    return uri, load_dataset_info(uri)


def _model(uri, info, precision):
    torch.manual_seed(0)
    cfg = config_from_dict({}, [f"data.uri={uri}", f"train.precision={precision}", "model.max_text_tokens=6"])
    corpus = [*info.classes, "a round digit", "a straight stroke"]
    return cfg, build_megl_model(cfg, len(info.classes), corpus=corpus)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_training_model_draws_its_gallery_in_the_training_precision(data, precision):
    uri, info = data
    cfg, model = _model(uri, info, precision)
    if precision == "bf16":  # as trained: frozen matmul weights 16-bit, trainable ones fp32 (autocast runs both)
        assert {p.dtype for p in model.parameters()} == {torch.float32, torch.bfloat16}
    drawn = draw_gallery(model, cfg, list(info.classes), GallerySource("val"), "s3://b/runs/x/export", True, False)
    assert drawn is not None and len(drawn["examples"]) == len(info.classes)  # one per class
    assert "index.html" in drawn["files"] and all(drawn["files"][e["overlay"]] for e in drawn["examples"])
    assert model.generate_defaults == {}  # synced_gpus was not left behind


def test_a_carved_validation_is_drawn_from_its_ids_and_other_ranks_keep_nothing(data):
    uri, info = data
    cfg, model = _model(uri, info, "fp32")
    ids = tuple(read_split(uri, "train", info).column("id").to_pylist()[:12])
    source = gallery_source("carved", ids, has_test=True)
    assert source == GallerySource("train", ids, "carved val")
    drawn = draw_gallery(model, cfg, list(info.classes), source, "x", True, False)
    assert drawn is not None and {e["id"] for e in drawn["examples"]} <= set(ids)
    assert draw_gallery(model, cfg, list(info.classes), source, "x", False, False) is None  # not rank 0


def test_where_the_examples_come_from():
    assert gallery_source("split", None, has_test=True) == GallerySource("val")
    assert gallery_source("none", None, has_test=True) == GallerySource("test", label="test")
    assert gallery_source("none", None, has_test=False) is None
