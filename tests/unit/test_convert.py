"""``python -m megl_ray.data.convert``: every bad-input kind is caught, counted and explained; good data round-trips."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from megl_ray.cli import run_cli
from megl_ray.data import convert, schema
from megl_ray.errors import UserError
from tests.support.sources import rec, run, save_image, write_source


def read_rows(dst: Path) -> dict[str, dict]:
    info = json.loads((dst / "dataset.json").read_text())
    rows = {}
    for paths in info["shards"].values():
        for relative in paths:
            for row in pq.read_table(dst / relative).to_pylist():
                rows[row["id"]] = row
    return rows


def rejected(dst: Path) -> list[dict]:
    return [json.loads(line) for line in (dst / "rejected.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------- the bad corpus

# id -> (what, reason) expected in rejected.jsonl
EXPECTED = {
    "not_object": ("record", "not_an_object"),
    "missing": ("record", "missing_field"),
    "wrong_type": ("record", "wrong_type"),
    "dup_field": ("record", "duplicate_field"),
    "good1": ("record", "duplicate_id"),  # the second "good1" entry
    "bad_split": ("record", "bad_split"),
    "escape_dotdot": ("record", "path_escape"),
    "escape_abs": ("record", "path_escape"),
    "escape_link": ("record", "path_escape"),
    "img_missing": ("record", "image_missing"),
    "img_dir": ("record", "image_not_regular_file"),
    "img_text": ("record", "not_an_image"),
    "img_truncated": ("record", "image_corrupt"),
    "img_bomb": ("record", "decompression_bomb"),
    "cls_unknown": ("record", "unknown_class_id"),
    "cls_name_unknown": ("record", "unknown_class_name"),
    "cls_mismatch": ("record", "class_name_mismatch"),
    "no_rationale": ("record", "no_usable_rationale"),
    "m_escape": ("mask", "mask_path_escape"),
    "m_missing": ("mask", "mask_missing"),
    "m_unreadable": ("mask", "mask_unreadable"),
    "m_rank": ("mask", "mask_wrong_rank"),
    "m_dtype": ("mask", "mask_bad_dtype"),
    "m_nan": ("mask", "mask_not_finite"),
    "m_negative": ("mask", "mask_negative"),
    "m_range": ("mask", "mask_out_of_range"),
    "m_zero": ("mask", "mask_all_zero"),
    "m_shape": ("mask", "mask_shape_mismatch"),
    "r_blank": ("rationale", "rationale_blank"),
    "r_number": ("rationale", "rationale_not_text"),
}
GOOD = [
    "good1",
    "good2",
    "good3",
    "m_escape",
    "m_missing",
    "m_unreadable",
    "m_rank",
    "m_dtype",
    "m_nan",
    "m_negative",
    "m_range",
    "m_zero",
    "m_shape",
    "r_blank",
    "r_number",
]


def test_every_bad_input_is_rejected_with_its_reason(bad_corpus: Path, tmp_path: Path):
    dst = tmp_path / "out"
    summary = run(bad_corpus, dst, "--mask-size", "4")
    lines = rejected(dst)
    assert all({"id", "what", "reason", "detail"} <= line.keys() and line["detail"] for line in lines)
    got = {line["id"]: (line["what"], line["reason"]) for line in lines}
    assert got == EXPECTED
    assert len(lines) == len(EXPECTED)  # one line per problem, nothing extra

    record_rejects = sum(1 for what, _ in EXPECTED.values() if what == "record")
    assert summary["rows_in"] == 33  # every entry of the file, the duplicate id included
    assert summary["rows_rejected"] == record_rejects
    assert summary["rows_written"] == len(GOOD)
    assert summary["rows_in"] == summary["rows_written"] + summary["rows_rejected"]
    assert summary["rejected_by_reason"] == dict(Counter(line["reason"] for line in lines))
    assert summary["masks_rejected"] == 10 and summary["rationales_dropped"] == 2
    assert summary["with_mask"] == 2
    assert sum(summary["splits"].values()) == summary["rows_written"]

    rows = read_rows(dst)
    assert sorted(rows) == sorted(GOOD)
    for rid in GOOD:
        if rid.startswith("m_"):
            assert rows[rid]["has_mask"] is False and rows[rid]["mask"] is None
    assert rows["good1"]["has_mask"] and rows["good1"]["class_name"] == "cat"  # the first good1 was kept
    assert rows["r_blank"]["rationales"] == ["a cat"]
    assert rows["r_number"]["rationales"] == ["a cat"]
    info = schema.load_dataset_info(str(dst))
    assert info.splits == summary["splits"]


def test_strict_stops_at_the_first_problem(bad_corpus: Path, tmp_path: Path, capsys):
    code = run_cli("convert", convert.main, [str(bad_corpus), str(tmp_path / "out"), "--strict"])
    out, err = capsys.readouterr()
    assert code == 2
    # records are visited in the converter's seeded order: it stops at the first problem met, reported once
    assert err.count("\n") == 1 and "rejected" in err
    assert json.loads(out.strip().splitlines()[-1])["error"]
    assert not (tmp_path / "out").exists()  # a failed conversion leaves nothing behind, not even its staging


def test_strict_stops_on_a_mask_problem_too(tmp_path: Path, capsys):
    src = tmp_path / "src"
    save_image(src / "images" / "a.png", 8, 8, 0)
    (src / "masks").mkdir()
    np.save(src / "masks" / "a.npy", np.full((8, 8), 3.0, np.float32))
    write_source(src, [("a", rec("images/a.png", mask="masks/a.npy"))])
    assert run_cli("convert", convert.main, [str(src), str(tmp_path / "out"), "--strict"]) == 2
    err = capsys.readouterr().err
    assert "'a'" in err and "mask_out_of_range" in err
    assert run_cli("convert", convert.main, [str(src), str(tmp_path / "out2")]) == 0  # without --strict it goes on


def test_missing_inputs_are_clear_user_errors(tmp_path: Path):
    with pytest.raises(UserError, match="does not exist"):
        run(tmp_path / "nowhere", tmp_path / "out")
    src = tmp_path / "src"
    src.mkdir()
    (src / "exp_annotation.json").write_text("{}")
    with pytest.raises(UserError, match="label_class_id_mapping.json: file not found"):
        run(src, tmp_path / "out")
    (src / "label_class_id_mapping.json").write_text('{"cat": 0, "dog": 2}')
    with pytest.raises(UserError, match="exactly 0..1"):
        run(src, tmp_path / "out")
    (src / "label_class_id_mapping.json").write_text('{"cat": 0, "cat": 1}')
    with pytest.raises(UserError, match="more than once"):
        run(src, tmp_path / "out")
    (src / "label_class_id_mapping.json").write_text('{"cat": 0}')
    (src / "exp_annotation.json").write_text("[]")
    with pytest.raises(UserError, match="must be a JSON object"):
        run(src, tmp_path / "out")
    with pytest.raises(UserError, match="must not exceed 1"):
        run(src, tmp_path / "out", "--val-fraction", "0.6", "--test-fraction", "0.6")
    with pytest.raises(UserError, match="invalid int"):
        run(src, tmp_path / "out", "--mask-size", "big")


def test_existing_destination_needs_overwrite(tmp_path: Path):
    src = tmp_path / "src"
    save_image(src / "images" / "a.png", 8, 8, 0)
    write_source(src, [("a", rec("images/a.png"))])
    dst = tmp_path / "out"
    run(src, dst)
    with pytest.raises(UserError, match="already holds a dataset"):
        run(src, dst)
    assert run(src, dst, "--overwrite")["rows_written"] == 1
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(UserError, match="cannot write to"):
        run(src, tmp_path / "a_file")


# ------------------------------------------------------------------------------------------------ splits & content


def test_split_is_deterministic_by_image_and_respects_given_splits(tmp_path: Path):
    src = tmp_path / "src"
    entries = []
    for i in range(60):
        save_image(src / "images" / f"{i}.png", 4, 4, i)
        extra = {"split": "val"} if i < 5 else {}
        entries.append((f"img{i}", rec(f"images/{i}.png", exp=[f"rationale {k} of {i}" for k in range(3)], **extra)))
    write_source(src, entries)
    first = read_rows_after(run, src, tmp_path / "a")
    second = read_rows_after(run, src, tmp_path / "b")
    other_seed = read_rows_after(run, src, tmp_path / "c", "--seed", "1")
    split_of = {rid: row["split"] for rid, row in first.items()}
    assert split_of == {rid: row["split"] for rid, row in second.items()}
    assert split_of != {rid: row["split"] for rid, row in other_seed.items()}
    assert all(first[f"img{i}"]["split"] == "val" for i in range(5))
    assert all(other_seed[f"img{i}"]["split"] == "val" for i in range(5))
    for i in range(60):  # one row per image: all its rationales stay together in one split
        assert first[f"img{i}"]["rationales"] == [f"rationale {k} of {i}" for k in range(3)]
        assert first[f"img{i}"]["split"] == convert.assign_split(f"img{i}", 0, 0.1, 0.2) or i < 5


def read_rows_after(runner, src: Path, dst: Path, *flags: str) -> dict[str, dict]:
    runner(src, dst, *flags)
    return read_rows(dst)


def test_assign_split_fractions():
    splits = Counter(convert.assign_split(f"id-{i}", 3, 0.1, 0.2) for i in range(4000))
    assert abs(splits["test"] / 4000 - 0.2) < 0.03 and abs(splits["val"] / 4000 - 0.1) < 0.03
    assert convert.assign_split("x", 0, 0.0, 0.0) == "train"
    assert convert.assign_split("x", 0, 0.0, 1.0) == "test"


def test_images_and_masks_read_back_equal_the_source(tmp_path: Path):
    src = tmp_path / "src"
    rng = np.random.default_rng(7)
    source_bytes, source_masks = {}, {}
    entries = []
    (src / "masks").mkdir(parents=True)
    for i in range(5):
        source_bytes[f"r{i}"] = save_image(src / "images" / f"{i}.png", 32, 24, i, "PNG" if i % 2 else "JPEG")
        mask = rng.random((24, 32)).astype(np.float32)
        if i == 3:
            mask = (mask * 255).astype(np.uint8)
        np.save(src / "masks" / f"{i}.npy", mask)
        source_masks[f"r{i}"] = mask.astype(np.float64) / (255.0 if mask.dtype == np.uint8 else 1.0)
        entries.append((f"r{i}", rec(f"images/{i}.png", mask=f"masks/{i}.npy")))
    write_source(src, entries)
    dst = tmp_path / "out"
    run(src, dst, "--mask-size", "8", "--rows-per-shard", "2")
    assert (
        len(
            list((dst / "train").glob("*.parquet"))
            + list((dst / "val").glob("*.parquet"))
            + list((dst / "test").glob("*.parquet"))
        )
        >= 3
    )
    rows = read_rows(dst)
    for rid, row in rows.items():
        assert row["image"] == source_bytes[rid]
        assert (row["width"], row["height"]) == (32, 24)
        assert row["image_format"] == ("png" if int(rid[1:]) % 2 else "jpeg")
        stored = schema.mask_from_bytes(row["mask"], 8) / 255.0
        by_hand = source_masks[rid].reshape(8, 3, 8, 4).mean(axis=(1, 3))  # 24x32 -> 8x8: 3x4 blocks
        assert np.abs(stored - by_hand).max() <= 1 / 255 + 1e-9
    table = pq.read_table(next((dst / "train").glob("*.parquet")))
    assert table.schema.metadata[b"megl_ray.mask_size"] == b"8"
    assert table.schema.remove_metadata().equals(schema.PARQUET_SCHEMA)


def test_prior_equals_a_hand_computation(tmp_path: Path):
    src = tmp_path / "src"
    (src / "masks").mkdir(parents=True)
    m1 = np.zeros((4, 4), np.float32)
    m1[0, 0] = 1.0  # all weight in the top-left quarter
    m2 = np.zeros((4, 4), np.float32)
    m2[:2, :] = 0.5  # spread over the top half
    m2[3, 3] = 1.0
    m3 = np.ones((4, 4), np.float32)  # a val mask: must not count
    for i, m in enumerate((m1, m2, m3)):
        save_image(src / "images" / f"{i}.png", 4, 4, i)
        np.save(src / "masks" / f"{i}.npy", m)
    write_source(
        src,
        [
            (f"m{i}", rec(f"images/{i}.png", mask=f"masks/{i}.npy", split=s))
            for i, s in enumerate(("train", "train", "val"))
        ],
    )
    dst = tmp_path / "out"
    run(src, dst, "--prior-size", "2")
    info = json.loads((dst / "dataset.json").read_text())
    prior = np.array(info["prior"])
    # m1 -> quarters [[1,0],[0,0]]; m2 quarter sums [[2,2],[0,1]] / 5; prior = mean of the two.
    expected = (np.array([[1, 0], [0, 0]]) + np.array([[2, 2], [0, 1]]) / 5) / 2
    assert prior.shape == (2, 2) and np.isclose(prior.sum(), 1.0)
    assert np.allclose(prior, expected)
    assert info["mask_coverage"] == {"train": 1.0, "val": 1.0, "test": 0.0}
    assert info["prior_size"] == 2 and info["num_classes"] == 3 and info["classes"] == ["cat", "dog", "bird"]


def test_default_prior_is_uniform_and_sums_to_one(tmp_path: Path):
    src = tmp_path / "src"
    save_image(src / "images" / "a.png", 8, 8, 0)
    write_source(src, [("a", rec("images/a.png"))])
    run(src, tmp_path / "out")
    info = schema.load_dataset_info(str(tmp_path / "out"))
    assert info.prior_array().shape == (8, 8) and np.allclose(info.prior_array(), 1 / 64)


def test_records_are_written_in_a_seeded_random_order_and_a_repeated_id_keeps_its_first_entry():
    pairs = [(f"c{c}-{i}", {"class": c}) for c in range(10) for i in range(30)] + [("c0-0", {"class": "copy"})]
    order = convert.shuffled_records(pairs, seed=0)
    assert order == convert.shuffled_records(pairs, seed=0) != convert.shuffled_records(pairs, seed=1)
    assert order[-1] == ("c0-0", {"class": "copy"}) and ("c0-0", {"class": 0}) in order[:-1]
    first_shard = [raw["class"] for _, raw in order[:32]]
    assert len(set(first_shard)) >= 6  # a class-sorted file gives mixed shards
