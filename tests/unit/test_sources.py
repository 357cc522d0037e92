"""``convert`` on every input form (``megl_ray.data.sources``): the same 30 samples written as the authors' layout,
CSV and JSONL manifests, a Hugging Face dataset (``save_to_disk`` and Parquet) and WebDataset shards, with masks as
``.npy``, PNG, COCO RLE and COCO polygons, convert to identical rows (image bytes, labels, rationales, splits, masks
to the byte, prior); the same bad samples are rejected with the same reason codes; ``--dry-run`` writes nothing and
reports."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from megl_ray.cli import run_cli
from megl_ray.data import convert
from megl_ray.data.conversion import ordered_records, shuffled_records
from megl_ray.data.reader import read_split
from megl_ray.data.schema import SPLITS, load_dataset_info, mask_from_bytes
from megl_ray.data.sources import ColumnMap, detect_format
from megl_ray.errors import UserError
from tests.support import forms

CSV_MAP = ["--map", "id=sample", "image=file", "label=digit", "rationale=why0,why1,why2"]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Every form of the same samples: {name: (SRC, extra convert arguments, mask form)}."""
    root = tmp_path_factory.mktemp("forms")
    classes, items = forms.samples()
    mapping = root / "classes.json"
    mapping.write_text(json.dumps({c: i for i, c in enumerate(classes)}))
    cls = ["--classes", str(mapping)]
    hf = forms.hf_dataset(classes, items)
    hf.save_to_disk(str(root / "hf_disk"))
    (root / "hf_parquet").mkdir()
    hf.to_parquet(str(root / "hf_parquet" / "data-00000-of-00001.parquet"))
    return {
        "authors_npy": (forms.write_authors(root / "authors_npy", classes, items, "npy"), [], "npy"),
        "authors_png": (forms.write_authors(root / "authors_png", classes, items, "png"), [], "png"),
        "authors_polygons": (forms.write_authors(root / "authors_poly", classes, items, "polygons"), [], "polygons"),
        "csv_png": (forms.write_manifest(root / "csv_png", items, ".csv", "png"), CSV_MAP + cls, "png"),
        "csv_rle": (forms.write_manifest(root / "csv_rle", items, ".csv", "rle"), CSV_MAP + cls, "rle"),
        "jsonl_rle": (forms.write_manifest(root / "jsonl_rle", items, ".jsonl", "rle"), cls, "rle"),
        "jsonl_polygons": (forms.write_manifest(root / "jsonl_poly", items, ".jsonl", "polygons"), cls, "polygons"),
        "hf_disk": (root / "hf_disk", cls, "png"),
        "hf_parquet": (root / "hf_parquet", cls, "png"),
        "webdataset_png": (forms.write_webdataset(root / "wds_png", items, 2, "png"), cls, "png"),
        "webdataset_polygons": (forms.write_webdataset(root / "wds_poly", items, 3, "polygons"), cls, "polygons"),
    }


@pytest.fixture(scope="module")
def converted(written, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted")
    results = {}
    for name, (src, extra, _) in written.items():
        dst = out / name
        summary = convert.main([str(src), str(dst), *extra])
        results[name] = (summary, dst)
    return results


def _rows(dst: Path) -> dict[str, dict]:
    info = load_dataset_info(str(dst))
    rows = {}
    for split in SPLITS:
        if info.splits[split]:
            for row in read_split(str(dst), split, info).to_pylist():
                rows[row["id"]] = row
    return rows


def _rejected(dst: Path) -> dict[str, set[str]]:
    reasons: dict[str, set[str]] = {}
    for line in (dst / "rejected.jsonl").read_text().splitlines():
        entry = json.loads(line)
        reasons.setdefault(entry["id"], set()).add(entry["reason"])
    return reasons


def test_every_form_gives_the_same_rows_masks_splits_and_prior(written, converted):
    reference_summary, reference = converted["authors_npy"]
    expected = _rows(reference)
    # the 30 good samples, and the one whose mask has the wrong size (kept without its mask)
    assert len(expected) == 31 and reference_summary["rows_written"] == 31 and not expected["bad_mask_size"]["has_mask"]
    assert sum(r["has_mask"] for r in expected.values()) == 10
    prior = np.asarray(load_dataset_info(str(reference)).prior)
    for name, (summary, dst) in converted.items():
        rows = _rows(dst)
        assert set(rows) == set(expected), name
        assert summary["format"] == name.split("_")[0].replace("csv", "manifest").replace("jsonl", "manifest"), name
        for rid, want in expected.items():
            got = rows[rid]
            if rid == "bad_mask_size" and written[name][2] == "polygons":
                continue  # polygons have no size of their own: that mask fits (the next test)
            for key in ("image", "image_format", "width", "height", "class_id", "class_name", "rationales", "split"):
                assert got[key] == want[key], (name, rid, key)
            assert got["has_mask"] == want["has_mask"], (name, rid)
            # the stored masks are equal to the byte: the rectangles' .npy, PNG and RLE are lossless, and pycocotools
            # rasterises a box polygon [x0, y0, x1, y0, x1, y1, x0, y1] to exactly the pixels x0..x1-1, y0..y1-1
            if want["has_mask"]:
                assert got["mask"] == want["mask"], (name, rid)
        got_prior = np.asarray(load_dataset_info(str(dst)).prior)
        assert np.allclose(got_prior, prior, rtol=0, atol=1e-12), name


def test_every_form_rejects_the_same_bad_samples_with_the_same_reasons(written, converted):
    for name, (summary, dst) in converted.items():
        rejected = _rejected(dst)
        want = dict(forms.BAD_REASONS)
        if written[name][2] == "polygons":
            # polygons are coordinates rasterised at the image's own size: a polygon mask cannot have a wrong size
            del want["bad_mask_size"]
        for rid, reason in want.items():
            assert reason in rejected.get(rid, set()), (name, rid, rejected.get(rid))
        blank = [json.loads(x) for x in (dst / "rejected.jsonl").read_text().splitlines() if "bad_blank" in x]
        assert len(blank) == 1 and "rationale_blank" in blank[0]["detail"], name  # the dropped rationale, named
        assert summary["rows_rejected"] == 3 and summary["rows_in"] == 34, (name, summary)
        assert summary["masks_rejected"] == (0 if written[name][2] == "polygons" else 1), name


def test_dry_run_writes_nothing_and_reports_as_the_last_json_line(written, tmp_path, capsys):
    for name, (src, extra, _) in written.items():
        dst = tmp_path / name
        before = sorted(os.listdir(Path(src) if Path(src).is_dir() else Path(src).parent))
        code = run_cli("convert", convert.main, [str(src), str(dst), "--dry-run", *extra])
        out = capsys.readouterr().out
        assert code == 0 and not dst.exists(), name
        assert sorted(os.listdir(Path(src) if Path(src).is_dir() else Path(src).parent)) == before
        report = json.loads(out.strip().splitlines()[-1])
        assert report["dry_run"] is True and report["rows_written"] == 31 and report["rows_rejected"] == 3, name
        assert sum(report["splits"].values()) == 31 and set(report["rejected_by_reason"]) >= {"image_missing"}
        assert sum(sum(c.values()) for c in report["class_counts"].values()) == 31
        assert 0 < report["mask_coverage"]["train"] <= 1
    # without DST too
    src, extra, _ = written["jsonl_rle"]
    assert run_cli("convert", convert.main, [str(src), "--dry-run", *extra]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["dst"] is None


def test_the_form_is_detected_and_an_ambiguous_folder_asks_for_format(written, tmp_path):
    assert detect_format(str(written["authors_npy"][0]))[0] == "authors"
    assert detect_format(str(written["csv_png"][0].parent)) == ("manifest", str(written["csv_png"][0]))
    assert detect_format(str(written["hf_disk"][0]))[0] == "hf"
    assert detect_format(str(written["hf_parquet"][0]))[0] == "hf"
    assert detect_format(str(written["webdataset_png"][0]))[0] == "webdataset"
    both = tmp_path / "both"
    both.mkdir()
    (both / "a.csv").write_text("image,label,rationale\n")
    (both / "b.tar").write_bytes(b"")
    with pytest.raises(UserError, match="--format"):
        detect_format(str(both))


def test_hf_class_label_names_are_the_classes_and_columns_are_found_by_feature(tmp_path):
    classes, items = forms.samples(6, with_bad=False)
    names = sorted({s.label for s in items})
    ds = datasets.Dataset.from_dict(
        {
            "img": [{"bytes": s.image, "path": None} for s in items],
            "digit": [names.index(s.label) for s in items],
            "caption": [s.rationales[0] for s in items],
        },
        features=datasets.Features(
            {"img": datasets.Image(), "digit": datasets.ClassLabel(names=names), "caption": datasets.Value("string")}
        ),
    )
    halves = ds.train_test_split(test_size=2, seed=0)
    # a DatasetDict with Hugging Face's split name "validation": our "val"
    datasets.DatasetDict({"train": halves["train"], "validation": halves["test"]}).save_to_disk(str(tmp_path / "dd"))
    summary = convert.main([str(tmp_path / "dd"), str(tmp_path / "out"), "--map", "rationale=caption"])
    assert summary["rows_written"] == 6 and summary["splits"] == {"train": 4, "val": 2, "test": 0}
    info = load_dataset_info(str(tmp_path / "out"))
    assert info.classes == names
    rows = read_split(str(tmp_path / "out"), "train", info).to_pylist()
    by_image = {s.image: s for s in items}
    assert all(by_image[r["image"]].label == r["class_name"] for r in rows)


def test_labels_without_a_mapping_name_the_classes_in_sorted_order(tmp_path):
    classes, items = forms.samples(8, with_bad=False)
    path = forms.write_manifest(tmp_path / "m", items, ".jsonl", "rle")
    summary = convert.main([str(path), str(tmp_path / "out")])
    assert load_dataset_info(str(tmp_path / "out")).classes == sorted({s.label for s in items})
    assert summary["rows_written"] == 8


def test_column_map_errors_are_one_clear_line(written, tmp_path):
    with pytest.raises(UserError, match="KEY=COLUMN"):
        ColumnMap.parse(["picture"])
    with pytest.raises(UserError, match="image takes one column"):
        ColumnMap.parse(["image=a,b"])
    src = written["csv_png"][0]
    with pytest.raises(UserError, match="no column 'nope'"):
        convert.main([str(src), str(tmp_path / "x"), "--map", "image=nope"])
    with pytest.raises(UserError, match="--map image=<column>"):
        convert.main([str(src), str(tmp_path / "x")])  # the CSV's image column is called "file"
    ints = tmp_path / "ints"
    ints.mkdir()
    (ints / "m.jsonl").write_text(json.dumps({"image": "a.png", "label": 3, "rationale": "x"}) + "\n")
    with pytest.raises(UserError, match="--classes"):
        convert.main([str(ints / "m.jsonl"), str(tmp_path / "y")])


def test_image_masks_read_as_soft_greyscale_or_binarised_by_threshold(tmp_path):
    classes, items = forms.samples(1, with_bad=False)
    s = items[0]
    s.box = (2, 2, 10, 10)
    folder = tmp_path / "src"
    path = forms.write_manifest(folder, [s], ".jsonl", "png")
    grey = np.zeros(s.size, np.uint8)
    grey[2:10, 2:10] = 100  # a faint mask
    Image.fromarray(grey).save(folder / f"masks/{s.id}.png")
    soft = convert.main([str(path), str(tmp_path / "soft"), "--classes", _classes(tmp_path, classes)])
    hard = convert.main(
        [str(path), str(tmp_path / "hard"), "--mask-threshold", "0.3", "--classes", _classes(tmp_path, classes)]
    )
    assert soft["with_mask"] == hard["with_mask"] == 1

    def peak(dst):
        info = load_dataset_info(str(dst))
        split = next(k for k, v in info.splits.items() if v)
        return mask_from_bytes(read_split(str(dst), split, info).to_pylist()[0]["mask"], 64).max()

    assert peak(tmp_path / "soft") == 100 and peak(tmp_path / "hard") == 255


def _classes(tmp_path: Path, classes: list[str]) -> str:
    path = tmp_path / "classes.txt"
    path.write_text("\n".join(classes) + "\n")  # the one-name-per-line form of --classes
    return str(path)


def test_bad_rle_and_polygons_are_mask_rejections(tmp_path):
    classes, items = forms.samples(3, with_bad=False)
    path = forms.write_manifest(tmp_path / "m", items, ".jsonl", "rle")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    lines[0]["mask"] = {"size": [2, 2], "counts": [1, 2]}  # runs do not cover 2x2
    lines[1]["mask"] = [[1, 2, 3]]  # not even 3 points
    lines[2]["mask"] = {"size": [64], "counts": "abc"}
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    summary = convert.main([str(path), str(tmp_path / "out"), "--classes", _classes(tmp_path, classes)])
    assert summary["rows_written"] == 3 and summary["with_mask"] == 0
    assert set(_rejected(tmp_path / "out")) == {s.id for s in items}
    assert summary["rejected_by_reason"] == {"mask_shape_mismatch": 1, "mask_unreadable": 2}


def test_an_unparseable_jsonl_line_is_one_rejection(tmp_path):
    classes, items = forms.samples(2, with_bad=False)
    path = forms.write_manifest(tmp_path / "m", items, ".jsonl", "rle")
    path.write_text(path.read_text() + "{not json\n[1, 2]\n")
    summary = convert.main([str(path), str(tmp_path / "out"), "--classes", _classes(tmp_path, classes)])
    assert summary["rows_written"] == 2 and summary["rejected_by_reason"] == {"bad_json": 1, "not_an_object": 1}


def test_png_bytes_are_not_reencoded(written, converted):
    """The stored image is the source file's bytes, whatever form carried them (HF and WebDataset embed them)."""
    _, dst = converted["webdataset_png"]
    row = next(iter(_rows(dst).values()))
    with Image.open(io.BytesIO(row["image"])) as image:
        assert image.format == "PNG"


def test_webdataset_cls_and_txt_members_serve_as_label_and_rationale(tmp_path):
    classes, items = forms.samples(4, with_bad=False)
    folder = tmp_path / "wds"
    folder.mkdir()
    with tarfile.open(folder / "only.tar", "w") as tar:
        for s in items:
            for ext, data in {
                "jpg": _as_jpeg(s.image),
                "cls": s.label.encode(),
                "txt": s.rationales[0].encode(),
            }.items():
                info = tarfile.TarInfo(f"part/{s.id}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    summary = convert.main([str(folder / "only.tar"), str(tmp_path / "out"), "--map", "image=jpg"])
    assert summary["format"] == "webdataset" and summary["rows_written"] == 4
    rows = _rows(tmp_path / "out")
    assert set(rows) == {f"part/{s.id}" for s in items}  # no id in a JSON: the sample key
    for s in items:
        row = rows[f"part/{s.id}"]
        assert row["class_name"] == s.label and row["rationales"] == [s.rationales[0]] and row["image_format"] == "jpeg"


def _as_jpeg(png: bytes) -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("RGB").save(out, format="JPEG")
    return out.getvalue()


def test_sources_of_several_blocks_are_read_block_by_block_in_a_seeded_order():
    blocks = [[(f"b{b}-{i}", (b, i)) for i in range(5)] for b in range(4)]
    order = ordered_records(blocks, seed=0)
    assert sorted(order) == sorted(p for block in blocks for p in block)
    runs = [order[i : i + 5] for i in range(0, 20, 5)]
    assert all(len({loc[0] for _, loc in run}) == 1 for run in runs)  # each block whole, never interleaved
    assert order == ordered_records(blocks, seed=0) != ordered_records(blocks, seed=1)
    assert order != [p for block in blocks for p in block]  # shuffled: blocks, and the rows within each
    assert ordered_records(blocks[:1], seed=0) == shuffled_records(blocks[0], seed=0)  # one block: as it always was
