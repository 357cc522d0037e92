"""The Ray Data pipeline against a real SeaweedFS S3 server and a real local Ray instance."""

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from megl_ray import storage  # noqa: E402
from megl_ray.data import convert  # noqa: E402
from megl_ray.data.pipeline import build_dataset, iter_epoch, iter_model_batches  # noqa: E402
from megl_ray.data.reader import read_split  # noqa: E402
from megl_ray.data.sample import sample_dataset_path  # noqa: E402
from megl_ray.data.schema import area_resize, load_dataset_info  # noqa: E402
from megl_ray.data.transforms import decode_image  # noqa: E402
from megl_ray.model.vlm import train_tokenizer  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.shared_ray]
SRC = sample_dataset_path()


@pytest.fixture(scope="module")
def s3_env(embedded_s3):
    """Point the process (and the Ray workers it starts) at the embedded server through the usual AWS variables."""
    mp = pytest.MonkeyPatch()
    for key, value in embedded_s3.env().items():
        mp.setenv(key, value)
    yield embedded_s3
    mp.undo()


@pytest.fixture
def ray_local(s3_env, shared_ray):
    """The suite's shared local Ray: its workers reach the embedded server (the same variables as ``s3_env``)."""
    return shared_ray


@pytest.fixture(scope="module")
def s3_dataset(s3_env):
    uri = "s3://megl-pipeline/digits"
    storage.ensure_bucket(uri)
    summary = convert.main([str(SRC), uri, "--rows-per-shard", "32", "--overwrite"])
    assert summary["rows_rejected"] == 0
    return uri


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["a digit with a closed loop", "a straight stroke"], 120)


@ray.remote(num_cpus=0)
def _consume(shard, rank):
    out = {"id": [], "pixels": [], "mask": [], "has_mask": [], "weight": []}
    for batch in iter_epoch(shard, epoch=0, batch_size=16, seed=0, rank=rank):
        for key in out:
            out[key].extend(list(batch[key]))
    return out


def test_round_trip_two_worker_shards_are_disjoint_complete_and_exact(ray_local, s3_dataset, tokenizer):
    info = load_dataset_info(s3_dataset)
    ds = build_dataset(
        s3_dataset,
        "train",
        tokenizer=tokenizer,
        image_size=64,
        max_rationales=4,
        max_text_tokens=32,
        num_shards=2,
        info=info,
    )
    shards = ds.streaming_split(2, equal=True)
    parts = ray.get([_consume.remote(shard, rank) for rank, shard in enumerate(shards)])
    assert len(parts[0]["id"]) == len(parts[1]["id"])  # equal shards: no worker waits at the epoch's end
    real = [set(i for i, w in zip(p["id"], p["weight"]) if w > 0) for p in parts]
    assert not real[0] & real[1]
    annotations = json.loads((SRC / "exp_annotation.json").read_text())
    train_ids = set(read_split(s3_dataset, "train").column("id").to_pylist())
    assert real[0] | real[1] == train_ids and len(train_ids) == info.splits["train"]
    for part in parts:
        for sample_id, pixels, mask, has_mask in zip(part["id"], part["pixels"], part["mask"], part["has_mask"]):
            record = annotations[sample_id]
            source = decode_image((SRC / record["image_path"]).read_bytes(), 64)
            assert np.array_equal(pixels, np.rint(source * 255).astype(np.uint8)), sample_id
            assert has_mask == bool(record["visual_exp"])
            if has_mask:
                expected = area_resize(np.load(SRC / record["visual_exp"]).astype(np.float64), info.mask_size)
                assert np.abs(mask / 255.0 - expected).max() <= 1 / 255 + 1e-9, sample_id
            else:
                assert not mask.any()


def test_model_batches_draw_a_rationale_per_epoch_and_shuffle_differs_by_epoch(ray_local, s3_dataset, tokenizer):
    ds = build_dataset(
        s3_dataset, "val", tokenizer=tokenizer, image_size=64, max_rationales=4, max_text_tokens=32, cache=True
    )
    orders = [[i for b in iter_epoch(ds, epoch=e, batch_size=8, seed=3) for i in b["id"]] for e in (0, 1, 0)]
    assert sorted(orders[0]) == sorted(orders[1])
    assert orders[0] == orders[2]  # seeded: the same epoch gives the same order
    assert orders[0] != orders[1]  # and a different epoch a different one
    batch = next(
        iter_model_batches(
            ds,
            tokenizer=tokenizer,
            template="USER: <image> {label}? ASSISTANT:",
            num_image_tokens=4,
            epoch=0,
            batch_size=4,
            seed=0,
        )
    )
    assert batch["pixels"].shape == (4, 3, 64, 64) and batch["pixels"].max() <= 1.0
    assert (batch["input_ids"] == tokenizer.convert_tokens_to_ids("<image>")).sum(1).tolist() == [4] * 4


def test_read_survives_a_server_restart_and_objects_stay_intact(ray_local, s3_dataset, tokenizer, s3_env):
    before = {uri: storage.read_bytes(uri) for uri in storage.list_files(s3_dataset)}
    ds = build_dataset(
        s3_dataset, "train", tokenizer=tokenizer, image_size=64, max_rationales=4, max_text_tokens=32, cache=False
    )  # streaming: every read goes to the server
    s3_env.stop()  # the server is down when the read starts: every first attempt fails
    result = {}

    def read():
        try:
            result["ids"] = [i for b in iter_epoch(ds, epoch=0, batch_size=32, seed=0) for i in b["id"]]
        except Exception as err:  # surfaced below with its message
            result["error"] = f"{type(err).__name__}: {err}"

    reader = threading.Thread(target=read)
    reader.start()
    time.sleep(3)
    s3_env.start()
    reader.join(timeout=240)
    assert not reader.is_alive(), "the read hung after the server came back"
    assert "error" not in result, result.get("error")
    assert len(result["ids"]) == len(set(result["ids"])) == load_dataset_info(s3_dataset).splits["train"]
    after = {uri: storage.read_bytes(uri) for uri in storage.list_files(s3_dataset)}
    assert after == before


def test_pipeline_module_is_the_only_data_module_importing_ray():
    import subprocess
    import sys

    code = (
        "import sys; import megl_ray.data.schema, megl_ray.data.convert, megl_ray.data.transforms, "
        "megl_ray.data.reader, megl_ray.data.make_sample, megl_ray.model, megl_ray.model.losses; "
        "assert 'ray' not in sys.modules, [m for m in sys.modules if m.startswith('ray')]"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


def test_a_class_sorted_dataset_gives_mixed_batches_in_an_order_that_changes_every_epoch(
    ray_local, tmp_path, tokenizer
):
    """The converter writes rows in a seeded random order, and each epoch deals a new seeded share to each worker
    and reads files in a new seeded order: even without the local shuffle buffer no batch is a single class."""
    import shutil

    from megl_ray.training.accounting import epoch_seed, epoch_share

    src = tmp_path / "sorted"
    shutil.copytree(SRC, src)
    records = json.loads((src / "exp_annotation.json").read_text())
    ordered = dict(sorted(records.items(), key=lambda kv: kv[1]["class_id"]))
    (src / "exp_annotation.json").write_text(json.dumps(ordered))
    uri = str(tmp_path / "ds")
    convert.main([str(src), uri, "--rows-per-shard", "32"])
    ids = [str(i) for i in read_split(uri, "train", columns=["id"]).column("id").to_pylist()]
    classes = {r["id"]: r["class_id"] for r in read_split(uri, "train", columns=["id", "class_id"]).to_pylist()}
    orders = []
    for epoch in (0, 1):
        ds = build_dataset(
            uri,
            "train",
            tokenizer=tokenizer,
            image_size=32,
            max_rationales=1,
            max_text_tokens=16,
            include_ids=epoch_share(ids, 0, epoch, 0, 2),
            pad_to=-(-len(ids) // 2),
            seed=epoch_seed(0, epoch),
        )
        batches = [
            [str(i) for i, w in zip(b["id"], b["weight"]) if w > 0]
            for b in iter_epoch(ds, epoch=epoch, batch_size=16, seed=0, shuffle_buffer=0)
        ]
        full = [b for b in batches if len(b) == 16]
        assert full and all(len({classes[i] for i in b}) >= 3 for b in full), [
            sorted({classes[i] for i in b}) for b in full
        ]
        orders.append([i for b in batches for i in b])
    assert orders[0] != orders[1]
