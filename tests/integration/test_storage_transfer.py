"""megl_ray.storage.transfer: every operation on local paths, and against the real embedded SeaweedFS (slow)."""

from __future__ import annotations

import json

import pytest

from megl_ray import storage
from megl_ray.cli import run_cli
from megl_ray.storage import BucketNotFoundError, InvalidURIError, NotFoundError
from megl_ray.storage.serve import main as storage_main


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_round_trip(embedded_s3, tmp_path):
    options = embedded_s3.options
    storage.ensure_bucket("s3://t-roundtrip", options)
    storage.ensure_bucket("s3://t-roundtrip/any/key", options)  # already there: no error

    storage.write_bytes("s3://t-roundtrip/runs/a.txt", b"alpha", options)
    storage.write_bytes("s3://t-roundtrip/runs/sub/b.bin", bytes(range(256)) * 4096, options)  # 1 MiB
    storage.write_bytes("s3://t-roundtrip/runs2/c.txt", b"not under runs/", options)
    assert storage.read_bytes("s3://t-roundtrip/runs/a.txt", options) == b"alpha"
    assert storage.read_bytes("s3://t-roundtrip/runs/sub/b.bin", options) == bytes(range(256)) * 4096

    assert storage.list_files("s3://t-roundtrip/runs", options) == [
        "s3://t-roundtrip/runs/a.txt",
        "s3://t-roundtrip/runs/sub/b.bin",
    ]
    assert storage.list_files("s3://t-roundtrip/runs/", options) == storage.list_files("s3://t-roundtrip/runs", options)
    assert storage.list_files("s3://t-roundtrip/runs/a.txt", options) == ["s3://t-roundtrip/runs/a.txt"]
    assert len(storage.list_files("s3://t-roundtrip", options)) == 3
    assert storage.list_files("s3://t-roundtrip/nothing", options) == []

    assert storage.exists("s3://t-roundtrip/runs/a.txt", options)
    assert storage.exists("s3://t-roundtrip/runs", options)  # a prefix counts as a directory
    assert not storage.exists("s3://t-roundtrip/run", options)
    assert not storage.exists("s3://t-roundtrip/runs/missing.txt", options)
    assert storage.exists("s3://t-roundtrip", options) and not storage.exists("s3://t-no-such-bucket", options)

    single = storage.download("s3://t-roundtrip/runs/a.txt", tmp_path / "one", options)
    assert single == (tmp_path / "one" / "a.txt").resolve() and single.read_bytes() == b"alpha"
    tree = storage.download("s3://t-roundtrip/runs", tmp_path / "tree", options)
    assert (tree / "a.txt").read_bytes() == b"alpha" and (tree / "sub" / "b.bin").stat().st_size == 1 << 20
    assert not (tree / "c.txt").exists()

    local = tmp_path / "model"
    (local / "tokenizer").mkdir(parents=True)
    (local / "config.json").write_text('{"dim": 4}')
    (local / "tokenizer" / "vocab.txt").write_text("a\nb\n")
    storage.upload(local, "s3://t-roundtrip/models/m1", options)
    storage.upload(local / "config.json", "s3://t-roundtrip/single/", options)
    storage.upload(local / "config.json", "s3://t-roundtrip/single/renamed.json", options)
    assert storage.list_files("s3://t-roundtrip/models/m1", options) == [
        "s3://t-roundtrip/models/m1/config.json",
        "s3://t-roundtrip/models/m1/tokenizer/vocab.txt",
    ]
    assert storage.list_files("s3://t-roundtrip/single", options) == [
        "s3://t-roundtrip/single/config.json",
        "s3://t-roundtrip/single/renamed.json",
    ]

    cache = tmp_path / "cache"
    copy = storage.local_copy("s3://t-roundtrip/models/m1", cache_dir=cache, options=options)
    assert copy == (cache / "t-roundtrip" / "models" / "m1").resolve()
    assert (copy / "tokenizer" / "vocab.txt").read_text() == "a\nb\n"
    stamp = (copy / "config.json").stat().st_mtime_ns
    assert storage.local_copy("s3://t-roundtrip/models/m1", cache_dir=cache, options=options) == copy
    assert (copy / "config.json").stat().st_mtime_ns == stamp  # unchanged in the store: reused, not fetched again
    # a model re-uploaded under the same prefix is fetched again (its objects' ETags and sizes changed)
    storage.write_bytes("s3://t-roundtrip/models/m1/config.json", b"changed", options)
    assert storage.local_copy("s3://t-roundtrip/models/m1", cache_dir=cache, options=options) == copy
    assert (copy / "config.json").read_text() == "changed" and (copy / "tokenizer" / "vocab.txt").is_file()
    one = storage.local_copy("s3://t-roundtrip/runs/a.txt", cache_dir=cache, options=options)
    assert one.is_file() and one.read_bytes() == b"alpha"
    storage.write_bytes("s3://t-roundtrip/runs/a.txt", b"alpha, again", options)
    assert storage.local_copy("s3://t-roundtrip/runs/a.txt", cache_dir=cache, options=options).read_bytes() == (
        b"alpha, again"
    )
    assert not list(cache.rglob(".*partial*"))

    # The driver's share of a model directory: its tokenizer and config files, not its weights
    storage.write_bytes("s3://t-roundtrip/models/m1/model-00001-of-00002.safetensors", b"w" * 4096, options)
    configs = storage.local_copy("s3://t-roundtrip/models/m1", cache_dir=cache, options=options, patterns=["*.json"])
    assert configs != copy and sorted(p.name for p in configs.rglob("*") if p.is_file()) == ["config.json"]
    assert (configs / "config.json").read_text() == "changed"
    assert (
        storage.local_copy("s3://t-roundtrip/models/m1", cache_dir=cache, options=options, patterns=["*.json"])
        == configs
    )  # reused while the matching objects are unchanged


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_the_model_cache_lives_under_megl_home_and_the_storage_command_shows_and_clears_it(
    embedded_s3, tmp_path, monkeypatch, capsys
):
    options = embedded_s3.options
    monkeypatch.delenv("MEGL_CACHE_DIR", raising=False)
    monkeypatch.setenv("MEGL_HOME", str(tmp_path / "home"))
    storage.ensure_bucket("s3://t-cache", options)
    storage.write_bytes("s3://t-cache/m/weights.bin", b"w" * 1000, options)
    copy = storage.local_copy("s3://t-cache/m", options=options)
    assert copy == (tmp_path / "home" / "cache" / "s3" / "t-cache" / "m").resolve()
    assert run_cli("python -m megl_ray.storage", storage_main, ["cache"]) == 0
    shown = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert shown["cache_dir"] == str(tmp_path / "home" / "cache" / "s3") and shown["bytes"] >= 1000
    assert run_cli("python -m megl_ray.storage", storage_main, ["cache", "--clear"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["cleared"] is True and not copy.exists()


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_missing_object_and_bucket(embedded_s3, tmp_path):
    options = embedded_s3.options
    storage.ensure_bucket("s3://t-missing", options)
    with pytest.raises(NotFoundError) as info:
        storage.read_bytes("s3://t-missing/no/such.txt", options)
    assert "s3://t-missing/no/such.txt" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(BucketNotFoundError) as info:
        storage.read_bytes("s3://t-no-such-bucket/x.txt", options)
    assert "s3://t-no-such-bucket/x.txt" in str(info.value) and "t-no-such-bucket" in str(info.value)
    with pytest.raises(BucketNotFoundError):
        storage.exists("s3://t-no-such-bucket/x.txt", options)
    with pytest.raises(BucketNotFoundError):
        storage.list_files("s3://t-no-such-bucket/", options)
    with pytest.raises(BucketNotFoundError):
        storage.write_bytes("s3://t-no-such-bucket/x.txt", b"x", options)
    with pytest.raises(NotFoundError, match="s3://t-missing/nothing"):
        storage.download("s3://t-missing/nothing", tmp_path, options)
    with pytest.raises(NotFoundError):
        storage.local_copy("s3://t-missing/nothing", cache_dir=tmp_path / "cache", options=options)
    assert not (tmp_path / "cache" / "t-missing" / "nothing").exists()
    with pytest.raises(InvalidURIError):
        storage.read_bytes("s3://t-missing/dir/", options)
