"""Training across two real Ray nodes on this machine (``two_node_cluster``): one worker per node, run storage on
the embedded S3, a node-local storage path refused, and a node lost mid-run and replaced (one training run)."""

import json
import math
import shutil
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch

from megl_ray.cli import run_cli
from megl_ray.data.reader import read_split

pytestmark = pytest.mark.slow
FAST = Path(__file__).resolve().parents[1] / "configs" / "tiny-fast.yaml"
# No validation (the dataset has no val split and none is carved): on 2 cores each validation pass is a Ray Data
# execution of ~20 s, once per epoch and attempt, and what these tests check is the steps, samples and shards.
FAST_ARGS = [
    "train.placement_strategy=STRICT_SPREAD",
    "train.num_workers=2",
    "train.cache_data=true",
    "data.val_fraction=0",
]
GLOBAL_BATCH = 2 * 16  # 2 workers × tiny-fast's data.batch_size
# Run names new to every session: each session has a fresh S3 server, and the end-of-run gallery fetches the
# export through the node cache ($MEGL_HOME/cache/s3/<bucket>/<key>): a fixed name would find an earlier session's
# copy there (fetched again, since the objects differ, but the names keep the runs apart).
SESSION = uuid.uuid4().hex[:8]


SUBSET = 160  # of the bundled 400 images: ~4 optimizer steps an epoch; on 2 cores every step counts


@pytest.fixture(scope="module")
def s3_data(embedded_s3, tmp_path_factory):
    """The driver talks to the embedded server through the usual variables; the first ``SUBSET`` images of the
    bundled dataset are converted once, without a val split (train and test only)."""
    mp = pytest.MonkeyPatch()
    for key, value in embedded_s3.env().items():
        mp.setenv(key, value)
    from megl_ray import storage
    from megl_ray.data import convert
    from megl_ray.data.sample import sample_dataset_path

    full, src = sample_dataset_path(), tmp_path_factory.mktemp("digits-subset")
    subset = dict(list(json.loads((full / "exp_annotation.json").read_text()).items())[:SUBSET])  # classes mixed
    (src / "exp_annotation.json").write_text(json.dumps(subset))
    shutil.copy(full / "label_class_id_mapping.json", src)
    for record in subset.values():  # copies: the converter refuses files reached through links (path escapes)
        for rel in (record["image_path"], record.get("visual_exp")):
            if rel:
                (src / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(full / rel, src / rel)
    uri = "s3://megl-multinode/datasets/digits-subset"
    storage.ensure_bucket(uri)
    summary = convert.main([str(src), uri, "--val-fraction", "0", "--rows-per-shard", "32", "--overwrite"])
    assert summary["rows_rejected"] == 0
    storage.ensure_bucket("s3://megl-multinode/runs")
    yield uri
    mp.undo()


def _train_ids(uri):
    return sorted(read_split(uri, "train").column("id").to_pylist())


def _steps_per_epoch(uri):
    return math.ceil(len(_train_ids(uri)) / GLOBAL_BATCH)  # the last batch of each worker padded, none dropped


def _train(cluster, args, capsys):
    from megl_ray import train

    code = run_cli("megl_ray.train", train.main, ["--config", str(FAST), "--address", cluster.address, *args])
    out, err = capsys.readouterr()
    return code, out, err


def _nodes(cluster):
    from ray.util.state import list_nodes

    return {n.node_id: n for n in list_nodes(address=cluster.address, limit=100)}


def _node_with(cluster, resource, alive=True):
    return [i for i, n in _nodes(cluster).items() if resource in n.resources_total and (n.state == "ALIVE") == alive]


def _train_worker_nodes(cluster):
    """{node id: [actor states]} of the Ray Train workers the cluster ran (dead ones included)."""
    from ray.util.state import list_actors

    out = {}
    for actor in list_actors(
        address=cluster.address, filters=[("class_name", "=", "RayTrainWorker")], limit=1000, detail=True
    ):
        out.setdefault(actor.node_id, []).append(actor.state)
    return out


def _sample_rows(sample_dir):
    return [json.loads(line) for f in sorted(sample_dir.glob("*.jsonl")) for line in f.read_text().splitlines()]


def test_a_node_local_storage_path_is_refused_with_workers_on_two_nodes(two_node_cluster, s3_data, tmp_path, capsys):
    code, out, err = _train(
        two_node_cluster,
        [*FAST_ARGS, f"data.uri={s3_data}", f"run.storage_path={tmp_path / 'runs'}", f"run.name=local-{SESSION}"],
        capsys,
    )
    assert code == 2, err[-3000:]
    assert "is a node-local path, but workers can be placed on 2 nodes" in err and "Traceback" not in err
    assert json.loads(out.strip().splitlines()[-1])["error"]


def test_a_run_that_diverges_on_ray_stops_with_one_line_and_exports_nothing(two_node_cluster, s3_data, capsys):
    """The divergence guard's verdict reaches the driver (Ray Train's ``Result.metrics`` are the latest
    checkpoint's: a report without a checkpoint never did, and a diverged run read as a success)."""
    from megl_ray import storage

    name = f"diverged-{SESSION}"
    code, out, err = _train(
        two_node_cluster,
        [
            *FAST_ARGS,
            f"data.uri={s3_data}",
            "run.storage_path=s3://megl-multinode/runs",
            f"run.name={name}",
            "optim.lr=1e10",  # finite, accepted, and the weights blow up within a step or two
            "train.max_nonfinite_steps=1",
        ],
        capsys,
    )
    assert code == 2, err[-3000:]
    assert "training diverged" in err and "Traceback" not in err, err[-3000:]
    assert json.loads(out.strip().splitlines()[-1])["error"]
    assert not storage.exists(f"s3://megl-multinode/runs/{name}/export/model.safetensors")


def test_hub_ids_and_a_torchvision_state_dict_train_on_ray_into_an_export_for_torchvision_and_peft(
    two_node_cluster, s3_data, tmp_path, capsys, monkeypatch
):
    """A Ray run (ZeRO-3) of the clip-qwen2 preset named by hub ids (an offline HF cache the test fills; the workers
    resolve the ids themselves) with a ResNet-18 started from a torchvision-layout ``.pt``, LoRA on the LM: it trains,
    and its export holds the torchvision classifier, the PEFT adapter and a card naming the ids' revision and the
    run's test accuracy.

    The driver (this process) never builds a VLM nor loads a model's or an export's weights — each raises here —
    while the test metrics and the explanation gallery are still produced, by the Ray Train workers with the model
    they trained (this dataset has no val split and none is carved: the gallery shows test examples)."""
    import torchvision
    from huggingface_hub import ModelCard
    from peft import PeftConfig
    from safetensors.torch import load_file

    from megl_ray import storage
    from tests.support.base_models import make_clip_qwen2_base
    from tests.support.hf_cache import SHA1, place_in_cache

    cache = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    vision, lm = make_clip_qwen2_base(tmp_path / "base", ["a round digit", "a straight stroke", "zero", "one"])
    place_in_cache(cache, "tiny-org/clip", Path(vision), SHA1)
    place_in_cache(cache, "tiny-org/qwen2", Path(lm), SHA1)
    weights = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18().state_dict(), weights)  # torchvision's keys: conv1, layer1..., fc

    def forbidden(*args, **kwargs):
        raise AssertionError("the driver loaded a model")

    from transformers import LlavaForConditionalGeneration, PreTrainedModel

    from megl_ray.model import export_io

    monkeypatch.setattr(LlavaForConditionalGeneration, "__init__", forbidden)
    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(forbidden))
    monkeypatch.setattr(export_io, "_load_weights", forbidden)
    code, out, err = _train(
        two_node_cluster,
        [
            *FAST_ARGS,
            f"data.uri={s3_data}",
            "run.storage_path=s3://megl-multinode/runs",
            f"run.name=hub-{SESSION}",
            "model.preset=clip-qwen2",
            "model.vision_path=tiny-org/clip",
            "model.lm_path=tiny-org/qwen2",
            "model.classifier=resnet18",
            f"model.classifier_weights={weights}",
            "model.lora_r=4",
            "model.freeze_vision=true",
            # ZeRO-3: the export gathers module by module, and every rank runs the gallery's forwards and
            # generation in step (synced_gpus), rank 0 keeping the pictures
            "train.zero_stage=3",
        ],
        capsys,
    )
    assert code == 0, err[-4000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["steps"] == result["planned_steps"] == _steps_per_epoch(s3_data)
    assert result["test_accuracy"] is not None and result["test_miou"] is not None
    assert result["pictures"]["gallery_of"] == "test" and result["pictures"]["gallery_examples"] >= 2
    assert "gallery of test explanations" in err and "could not write the explanation gallery" not in err
    assert storage.exists(result["run_dir"] + "/gallery/index.html")
    export = tmp_path / "export"
    storage.download(result["export"], export)
    classifier = torchvision.models.resnet18(num_classes=10)
    classifier.load_state_dict(load_file(str(export / "classifier" / "model.safetensors")))  # strict: every key
    assert json.loads((export / "classifier" / "config.json").read_text())["num_classes"] == 10
    adapter = PeftConfig.from_pretrained(str(export / "adapter"))
    assert adapter.r == 4 and "multi_modal_projector" in adapter.modules_to_save
    card = ModelCard.load(str(export / "README.md")).text
    assert f"`tiny-org/clip` (revision `{SHA1}`)" in card and f"`tiny-org/qwen2` (revision `{SHA1}`)" in card
    assert f"test_accuracy: {result['test_accuracy']}" in card


def test_a_node_lost_mid_run_is_replaced_and_the_run_completes_with_exact_steps_and_samples(
    two_node_cluster, s3_data, tmp_path, capsys, monkeypatch
):
    """One worker per node (STRICT_SPREAD), both shards checkpointed to S3 every 2 steps; node_b is lost at step 3
    and replaced; the run resumes from step 2 and completes with exact steps and samples. (Also proves what the
    former ``test_two_workers_on_two_nodes_checkpoint_both_shards_to_s3`` did on a run of its own: workers on both
    nodes, each rank's ZeRO-2 optimizer partition and RNG state in the checkpoint, every train id trained.)"""
    from megl_ray import storage

    cluster = two_node_cluster
    lost = [i for i in _node_with(cluster, "node_b")]
    assert len(lost) == 1
    marker, samples = tmp_path / "held", tmp_path / "samples"
    per_epoch = _steps_per_epoch(s3_data)
    assert per_epoch >= 4, "the loss must fall inside the first epoch, after its checkpoint at step 2"
    # Rank 1 stops at step 3 (the last checkpoint is step 2) and waits there while the test kills node_b's whole
    # process group (raylet, agents, its training worker and the Ray Data tasks it ran) and starts a replacement.
    monkeypatch.setenv("MEGL_TEST_KILL_AT_STEP", "3")
    monkeypatch.setenv("MEGL_TEST_KILL_MARKER", str(marker))
    monkeypatch.setenv("MEGL_TEST_KILL_HOLD_S", "240")
    events = {}

    def lose_and_replace_node_b():
        deadline = time.monotonic() + 400
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        # Ray Train's controller collects the workers' reports when it polls them (every 2 s,
        # RAY_TRAIN_HEALTH_CHECK_INTERVAL_S): a node lost sooner after step 2 can take that checkpoint's report along,
        # and the run (still exact) restarts from scratch instead. Rank 1 is held at step 3 meanwhile.
        time.sleep(5)
        node_b = next(n for n in cluster.nodes if "node_b" in n.resources)
        cluster.kill(node_b)
        events["killed"] = time.monotonic()
        cluster.add_node(num_cpus=1, resources={"node_b": 1})
        events["replaced"] = time.monotonic()

    thread = threading.Thread(target=lose_and_replace_node_b, daemon=True)
    thread.start()
    code, out, err = _train(
        cluster,
        [
            *FAST_ARGS,
            f"data.uri={s3_data}",
            "run.storage_path=s3://megl-multinode/runs",
            f"run.name=node-loss-{SESSION}",
            "train.epochs=2",
            "train.checkpoint_every=2",
            f"train.sample_log_dir={samples}",
        ],
        capsys,
    )
    thread.join(timeout=60)
    assert code == 0, err[-4000:]
    assert "killed" in events and "replaced" in events, "the node was never lost"
    result = json.loads(out.strip().splitlines()[-1])
    assert result["steps"] == result["planned_steps"] == 2 * per_epoch

    # the second attempt ran on the head and the replacement node; the lost node's workers are dead
    replacement = [i for i in _node_with(cluster, "node_b") if i not in lost]
    assert len(replacement) == 1 and lost[0] in _node_with(cluster, "node_b", alive=False)
    workers = _train_worker_nodes(cluster)
    assert replacement[0] in workers and lost[0] in workers

    rows = _sample_rows(samples)
    resumed = [r for r in rows if r["start_step"] > 0]
    assert {r["start_step"] for r in resumed} == {2}, "resumed from another step than the last checkpoint"
    train_ids = _train_ids(s3_data)
    before = [i for r in rows if r["start_step"] == 0 and r["epoch"] == 0 and r["step"] <= 2 for i in r["ids"]]
    after = [i for r in resumed if r["epoch"] == 0 for i in r["ids"]]
    assert sorted(before + after) == train_ids, "the interrupted epoch: every sample exactly once"
    # epoch 2 read the cached split again, some of whose blocks were produced on (and lost with) node_b
    second = [i for r in resumed if r["epoch"] == 1 for i in r["ids"]]
    assert sorted(second) == train_ids
    assert max(r["step"] for r in resumed) == 2 * per_epoch
    from ray.util.state import list_tasks

    data_tasks = [
        t
        for t in list_tasks(address=cluster.address, filters=[("node_id", "=", lost[0])], limit=10000)
        if "ReadParquet" in t.name or "MapBatches" in t.name
    ]
    assert data_tasks, "no Ray Data task ran on the lost node"
    assert _node_with(cluster, "node_a")[0] in workers  # rank 0 on the head, rank 1 on node_b (then its replacement)
    names = {f.rsplit("/", 1)[-1] for f in storage.list_files(result["checkpoint"])}
    for rank in (0, 1):  # each rank's ZeRO-2 partition of the optimizer state, and its RNG state
        assert f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in names, sorted(names)
        assert f"rng_rank{rank}.pt" in names
    assert "train_state.json" in names
