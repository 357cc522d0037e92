"""Record checks, mask resizing and dataset.json of ``megl_ray.data.schema``."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from megl_ray.data import schema
from megl_ray.data.schema import DatasetInfo, Invalid
from megl_ray.errors import UserError


def png_bytes(width: int = 6, height: int = 4) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def png_claiming_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a huge size (a decompression bomb that must never be decoded)."""
    data = bytearray(png_bytes(1, 1))
    ihdr = bytearray(data[16:29])  # IHDR payload: width, height, depth, colour type, ...
    ihdr[0:8] = struct.pack(">II", width, height)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    return bytes(data)


def reason_of(fn, *args) -> str:
    with pytest.raises(Invalid) as err:
        fn(*args)
    return err.value.reason


# ------------------------------------------------------------------------------------------------- record fields


def good_fields(**changes):
    fields = {"image_path": "images/a.png", "class_id": 1, "ans": "one", "exp": ["x"], "visual_exp": ""}
    fields.update(changes)
    return fields


def test_record_fields_accepts_good_record_and_reports_each_problem():
    assert schema.check_record_fields(good_fields())["class_id"] == 1
    assert reason_of(schema.check_record_fields, [1, 2]) == "not_an_object"
    assert reason_of(schema.check_record_fields, "text") == "not_an_object"
    missing = good_fields()
    del missing["exp"]
    assert reason_of(schema.check_record_fields, missing) == "missing_field"
    assert reason_of(schema.check_record_fields, good_fields(class_id="1")) == "wrong_type"
    assert reason_of(schema.check_record_fields, good_fields(class_id=True)) == "wrong_type"
    assert reason_of(schema.check_record_fields, good_fields(exp="just text")) == "wrong_type"
    assert reason_of(schema.check_record_fields, good_fields(visual_exp=3)) == "wrong_type"
    assert reason_of(schema.check_record_fields, good_fields(image_path=" ")) == "wrong_type"
    assert reason_of(schema.check_record_fields, good_fields(split="training")) == "bad_split"


def test_parse_json_keeps_duplicate_keys_visible():
    parsed = schema.parse_json('{"a": {"class_id": 1, "class_id": 2}, "a": 3}')
    assert [key for key, _ in parsed] == ["a", "a"]
    assert reason_of(schema.check_record_fields, parsed[0][1]) == "duplicate_field"


def test_check_class():
    classes = ["zero", "one"]
    schema.check_class(1, "one", classes)
    assert reason_of(schema.check_class, 2, "one", classes) == "unknown_class_id"
    assert reason_of(schema.check_class, -1, "zero", classes) == "unknown_class_id"
    assert reason_of(schema.check_class, 0, "dragon", classes) == "unknown_class_name"
    assert reason_of(schema.check_class, 0, "one", classes) == "class_name_mismatch"


def test_clean_rationales_drops_blank_and_non_text():
    kept, dropped = schema.clean_rationales([" a loop ", "  ", 4, None, "stem"])
    assert kept == ["a loop", "stem"]
    assert [p.reason for p in dropped] == ["rationale_blank", "rationale_not_text", "rationale_not_text"]
    assert all(p.what == "rationale" for p in dropped)


def test_resolve_inside_refuses_escapes(tmp_path):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "images" / "a.png").write_bytes(b"x")
    (tmp_path / "secret.png").write_bytes(b"x")
    (root / "images" / "link.png").symlink_to(tmp_path / "secret.png")
    assert schema.resolve_inside(str(root), "images/../images/a.png") == str((root / "images" / "a.png").resolve())
    for bad in ("../secret.png", "images/../../secret.png", str(tmp_path / "secret.png"), "images/link.png"):
        assert reason_of(schema.resolve_inside, str(root), bad) == "path_escape"


# ---------------------------------------------------------------------------------------------------------- images


def test_check_image_bytes_good_and_bad():
    assert schema.check_image_bytes(png_bytes(6, 4), 10_000) == ("png", 6, 4)
    assert reason_of(schema.check_image_bytes, b"hello, not an image", 10_000) == "not_an_image"
    assert reason_of(schema.check_image_bytes, png_bytes(40, 40)[:-30], 10_000) == "image_corrupt"


def test_decompression_bomb_is_caught_from_the_header_and_pil_limit_restored():
    limit_before = Image.MAX_IMAGE_PIXELS
    # Far above the limit: PIL's own guard fires while opening; mapped to the same reason.
    assert reason_of(schema.check_image_bytes, png_claiming_size(100_000, 100_000), 64 * 2**20) == "decompression_bomb"
    # Just above the limit: PIL only warns; the warning and our header check both map to decompression_bomb.
    assert reason_of(schema.check_image_bytes, png_bytes(10, 10), 60) == "decompression_bomb"
    assert reason_of(schema.check_image_bytes, png_bytes(10, 10), 99) == "decompression_bomb"
    assert Image.MAX_IMAGE_PIXELS == limit_before


# ----------------------------------------------------------------------------------------------------------- masks


def test_check_mask_accepts_float_uint8_bool_and_channels():
    mask = np.zeros((4, 6), np.float32)
    mask[1, 2] = 0.5
    assert np.allclose(schema.check_mask(mask, 4, 6), mask)
    as_uint8 = (mask * 255).astype(np.uint8)
    assert np.allclose(schema.check_mask(as_uint8, 4, 6), as_uint8 / 255.0)
    assert schema.check_mask(mask > 0, 4, 6).max() == 1.0
    three = np.stack([mask, mask, np.zeros_like(mask)])
    assert np.allclose(schema.check_mask(three, 4, 6), mask * 2 / 3)


@pytest.mark.parametrize(
    "array, reason",
    [
        (np.ones((2, 3, 4, 6), np.float32), "mask_wrong_rank"),
        (np.ones(24, np.float32), "mask_wrong_rank"),
        (np.ones((2, 4, 6), np.float32), "mask_wrong_rank"),
        (np.ones((4, 6), np.int64), "mask_bad_dtype"),
        (np.full((4, 6), np.nan, np.float32), "mask_not_finite"),
        (np.full((4, 6), np.inf, np.float64), "mask_not_finite"),
        (np.full((4, 6), -0.1, np.float32), "mask_negative"),
        (np.full((4, 6), 1.5, np.float32), "mask_out_of_range"),
        (np.zeros((4, 6), np.float32), "mask_all_zero"),
        (np.ones((6, 4), np.float32), "mask_shape_mismatch"),
    ],
)
def test_check_mask_reasons(array, reason):
    with pytest.raises(Invalid) as err:
        schema.check_mask(array, 4, 6)
    assert (err.value.what, err.value.reason) == ("mask", reason)


def test_area_resize_is_block_mean_and_keeps_the_mean():
    rng = np.random.default_rng(0)
    mask = rng.random((8, 12))
    blocks = mask.reshape(4, 2, 4, 3).mean(axis=(1, 3))
    assert np.allclose(schema.area_resize(mask, 4)[:, :], blocks)
    odd = rng.random((7, 5))
    for size in (3, 5, 9):
        assert np.isclose(schema.area_resize(odd, size).mean(), odd.mean())
    assert np.allclose(schema.area_resize(odd[:5, :5], 5), odd[:5, :5])


def test_mask_bytes_round_trip_and_faint_mask_rejected():
    mask = np.zeros((8, 8))
    mask[:4, :4] = 1.0
    stored = schema.mask_from_bytes(schema.mask_to_bytes(mask, 2), 2)
    assert stored.dtype == np.uint8 and stored.tolist() == [[255, 0], [0, 0]]
    faint = np.full((8, 8), 1e-4)
    assert reason_of(schema.mask_to_bytes, faint, 2) == "mask_all_zero"


def test_prior_term_sums_to_one():
    mask = np.zeros((4, 4))
    mask[0, 0] = 1.0
    mask[3, 3] = 0.5
    assert np.allclose(schema.prior_term(mask, 2), [[2 / 3, 0], [0, 1 / 3]])


# ---------------------------------------------------------------------------------------------------- dataset.json


def make_info(**changes) -> DatasetInfo:
    fields = dict(
        classes=["zero", "one"],
        counts={"train": {"zero": 1, "one": 1}},
        mask_coverage={"train": 0.5},
        splits={"train": 2, "val": 0, "test": 0},
        mask_size=4,
        prior_size=2,
        prior=[[0.25, 0.25], [0.25, 0.25]],
        shards={"train": ["train/part-00000.parquet"], "val": [], "test": []},
        source="/data",
    )
    fields.update(changes)
    return DatasetInfo(**fields)


def test_dataset_info_round_trip_and_validation():
    info = make_info()
    assert info.num_classes == 2 and info.format_version == schema.FORMAT_VERSION
    again = DatasetInfo.from_json(info.to_json())
    assert again == info
    assert again.prior_array().shape == (2, 2)
    with pytest.raises(UserError, match="prior"):
        DatasetInfo.from_json(make_info(prior=[[0.5, 0.5], [0.5, 0.5]]).to_json())
    with pytest.raises(UserError, match="prior"):
        DatasetInfo.from_json(make_info(prior=[[1.0]]).to_json())
    with pytest.raises(UserError, match="format_version"):
        DatasetInfo.from_json(make_info(format_version=99).to_json())
    with pytest.raises(UserError, match=r"dataset.json:1:2"):
        DatasetInfo.from_json("{,")
    with pytest.raises(UserError, match="lacks"):
        DatasetInfo.from_json('{"classes": []}')


def test_load_dataset_info_from_a_folder(tmp_path):
    (tmp_path / "dataset.json").write_text(make_info().to_json())
    assert schema.load_dataset_info(str(tmp_path)) == make_info()
    assert schema.load_dataset_info(str(tmp_path / "dataset.json")) == make_info()
    with pytest.raises(UserError, match="no dataset.json"):
        schema.load_dataset_info(str(tmp_path / "elsewhere"))


def test_parquet_schema_names_and_metadata():
    arrow_schema = schema.parquet_schema(64)
    assert arrow_schema.names == [
        "id",
        "image",
        "image_format",
        "width",
        "height",
        "class_id",
        "class_name",
        "has_mask",
        "mask",
        "rationales",
        "split",
    ]
    assert arrow_schema.metadata[b"megl_ray.mask_size"] == b"64"
    assert arrow_schema.field("mask").nullable and not arrow_schema.field("image").nullable
