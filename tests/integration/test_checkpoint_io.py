"""``megl_ray.model.checkpoint_io``: safe weight loading, and base checkpoints fetched once per node."""

import time
import uuid

import pytest

from megl_ray.model.checkpoint_io import local_dir

pytestmark = pytest.mark.shared_ray


@pytest.mark.slow
def test_two_workers_on_one_node_download_a_base_checkpoint_once(embedded_s3, shared_ray, tmp_path):
    """Two Ray workers on one node ask for the same ``s3://`` model directory at the same moment: its objects are
    read from S3 once in all (every GetObject is counted, and slowed down so that unguarded workers would race)."""
    from megl_ray import storage

    ray = shared_ray  # one node; its workers reach the embedded server
    files = 4
    source = tmp_path / "model"
    source.mkdir()
    for i in range(files):
        (source / f"shard{i}.bin").write_bytes(bytes([i]) * 200_000)
    uri = f"s3://megl-fetch-once/{uuid.uuid4().hex}/model"
    storage.ensure_bucket(uri, embedded_s3.options)
    storage.upload(str(source), uri, embedded_s3.options)

    @ray.remote(num_cpus=0.5)
    class Worker:
        def fetch(self, uri: str, start_at: float):
            import botocore.client

            calls = []
            original = botocore.client.BaseClient._make_api_call

            def counting(client, operation, params):
                if operation == "GetObject":
                    calls.append(params["Key"])
                    time.sleep(0.2)
                return original(client, operation, params)

            botocore.client.BaseClient._make_api_call = counting
            time.sleep(max(0.0, start_at - time.time()))  # both ask at once
            path = local_dir(uri)
            return (
                str(path),
                len(calls),
                ray.get_runtime_context().get_node_id(),
                sorted(p.name for p in path.iterdir()),
            )

    workers = [Worker.remote() for _ in range(2)]
    ray.get([w.__ray_ready__.remote() for w in workers])
    results = ray.get([w.fetch.remote(uri, time.time() + 2.0) for w in workers])
    try:
        paths, counts, nodes, listings = zip(*results)
        assert len(set(nodes)) == 1, "the two workers were meant to share one node"
        assert len(set(paths)) == 1 and listings[0] == listings[1] == [f"shard{i}.bin" for i in range(files)]
        assert sum(counts) == files, f"GetObject calls per worker: {counts} (a full download per worker?)"
        assert sorted(counts) == [0, files]
    finally:
        import shutil

        shutil.rmtree(paths[0], ignore_errors=True)
