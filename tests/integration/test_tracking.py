"""megl_ray.reporting.tracking, and what a user of ``python -m megl_ray.train`` sees: one real training run of the
tiny preset (2 workers, 2 epochs of 9 micro-batches each, 3 accumulated to a step: 6 steps, each logged) tracked at
once by TensorBoard, a real ``mlflow server`` on 127.0.0.1 and W&B in offline mode serves the slow tests — read back
through ``MlflowClient``, TensorBoard's event reader and W&B's offline run file — together with its console (line
budget), its pictures (curves.png, a gallery that renders in headless Chromium, in every tracker) and its best
checkpoint by the training loss (gradient ascent from step 3 on, a test hook, forces the best into epoch 1: in six
steps validation accuracy does not leave chance on this sample — 0.067 at both epochs — so it cannot be the metric
whose peak is forced; selection by a maximised metric is tested in tests/unit/test_best_checkpoint.py)."""

from __future__ import annotations

import json
import math
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from megl_ray.config import load_config
from tests.support.subprocess_env import subprocess_env
from tests.support.tracking_support import mlflow_server

REPO = Path(__file__).resolve().parents[2]
FAST = REPO / "tests" / "configs" / "tiny-fast.yaml"
EXPERIMENT = "megl-test"
TRAIN_KEYS = (
    "loss",
    "ce",
    "text",
    "dc",
    "samples_per_s",
    "tokens_per_s",
    "step_s",
    "data_wait_frac",
    "lr",
    "lr/decay",
    "lr/no_decay",
    "grad_norm",
    "skipped_steps",
    "peak_mem_mib",
    "peak_mem_mib_min",
    "peak_reserved_mib",
    "tflops",
    "mfu",
    "peak_tflops",
)
STEPS = [1, 2, 3, 4, 5, 6]
NAN = float("nan")
PEAK_TFLOPS = 0.05  # a stated "peak" of these CPU workers (they have no datasheet figure): MFU = TFLOP/s / 0.05


# ------------------------------------------------------------------------------------------------- no training


# ------------------------------------------------------------------------------------------- one tracked run


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    root = tmp_path_factory.mktemp("tracked")
    (root / "mlflow").mkdir()
    with mlflow_server(root / "mlflow") as uri:
        env = subprocess_env(
            ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "WANDB_API_KEY"),
            MEGL_HOME=str(root / "home"),
            WANDB_MODE="offline",
            WANDB_DIR=str(root / "wandb"),
            MEGL_TEST_LR_SCALE_AT_STEP="3:-10",  # gradient ascent after epoch 1: the loss is lowest there
        )
        args = [
            "--config",
            str(FAST),
            "run.name=tracked",
            "train.epochs=2",
            "train.grad_accum=3",
            "run.checkpoint_metric=loss",
            f"run.peak_tflops={PEAK_TFLOPS}",
            "run.log_every=1",
            f"train.sample_log_dir={root / 'samples'}",
            "run.tracking=[tensorboard,mlflow,wandb]",
            f"run.tracking_uri={uri}",
            f"run.experiment={EXPERIMENT}",
        ]
        proc = subprocess.run(
            [sys.executable, "-m", "megl_ray.train", *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        assert proc.returncode == 0, proc.stderr[-5000:]
        yield {
            "root": root,
            "uri": uri,
            "stderr": proc.stderr,
            "env": env,
            "result": json.loads(proc.stdout.strip().splitlines()[-1]),
            "args": args,
        }


@pytest.mark.slow
def test_the_console_shows_each_progress_line_once_within_the_line_budget(tracked):
    lines = tracked["stderr"].splitlines()
    result = tracked["result"]
    steps = [line for line in lines if line.startswith("[megl] step ")]
    epochs = [line for line in lines if line.startswith("[megl] epoch ")]
    # 9 micro-batches, 3 to a step: 3 steps per epoch, each logged, 2 epochs; each line once, each step once
    assert [re.match(r"\[megl\] step (\d+)/6 ", s).group(1) for s in steps] == [str(s) for s in STEPS]
    assert len(epochs) == 2 and f"val_accuracy={result['val_accuracy']:.4f}" in epochs[-1]
    assert all(re.search(r"loss=\S+ ce=\S+ text=\S+ .*samples/s \| eta \d", s) for s in steps)
    assert all(f"of {PEAK_TFLOPS:.4g} TFLOP/s | " in s for s in steps), steps[0]  # MFU with the peak it assumed
    for chatter in (
        "RayTrainWorker pid=",
        "Checkpoint successfully created",
        "Execution plan of Dataset",
        "built successfully",
        "Started a local Ray instance",
        "Found credentials",
    ):
        assert chatter not in tracked["stderr"], chatter
    # The line budget of the embedded default (the packaged tiny config on the bundled sample's 699 train images):
    # what is not a progress line does not grow with the steps, so this run bounds it. It is counted with a first
    # run's extra lines (embedded S3 created, the bundled dataset uploaded).
    from megl_ray.config import packaged_config
    from megl_ray.training.accounting import planned_steps

    default = load_config(packaged_config("tiny"))
    planned = planned_steps(
        699, default.train.num_workers, default.data.batch_size, default.train.epochs, default.train.grad_accum
    )
    assert planned == 264
    fixed = len(lines) - len(steps) - len(epochs)
    assert fixed + -(-planned // default.run.log_every) + default.train.epochs <= 60, "\n".join(lines)
    # the closing lines: the pictures and TensorBoard, then the commands that evaluate and explain the export
    assert lines[-5].startswith("[megl] curves: ") and lines[-4].startswith("[megl] gallery of validation")
    assert lines[-3].startswith("[megl] TensorBoard: tensorboard --logdir ")
    assert lines[-2].startswith("[megl] evaluate it: ") and lines[-1].startswith("[megl] explain it: ")


@pytest.mark.slow
def test_logged_losses_and_throughput_cover_every_micro_batch_of_every_rank(tracked):
    """With train.grad_accum=3 on 2 workers a logged step is 6 micro-batches: its loss (and each term) is their
    mean — checked against the values each rank recorded per micro-batch — and its samples are all of theirs (one
    micro-batch of one rank, times the world size, was what the line used to count)."""
    from mlflow import MlflowClient

    records = [
        json.loads(line)
        for path in sorted((tracked["root"] / "samples").glob("samples-rank*.jsonl"))
        for line in path.read_text().splitlines()
    ]
    client = MlflowClient(tracking_uri=tracked["uri"])
    run = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])[0]

    def logged(key):
        return {m.step: m.value for m in client.get_metric_history(run.info.run_id, f"train/{key}")}

    for key in ("loss", "ce", "text", "visual", "dc"):
        for step, value in logged(key).items():
            # a micro-batch without the term (no sample with a mask, say) records NaN: absent, as the window counts it
            window = [
                r["terms"][key] for r in records if r["step"] == step and not math.isnan(r["terms"].get(key, NAN))
            ]
            assert len({r["rank"] for r in records if r["step"] == step}) == 2
            assert value == pytest.approx(sum(window) / len(window), rel=1e-5), (key, step)
    samples, step_s = logged("samples_per_s"), logged("step_s")
    for step in (1, 2):  # full steps: 2 ranks × 3 micro-batches × 16 images (the last step holds the padding)
        assert samples[step] * step_s[step] == pytest.approx(2 * 3 * 16, rel=0.01)
    last = tracked["result"]["last_logged"]
    assert last["step"] == 6 and last["grad_norm"] > 0 and last["peak_mem_mib"] >= last["peak_mem_mib_min"] > 0
    # TFLOP/s per device = counted FLOPs per sample × samples/s over the 2 workers; MFU its share of the stated peak
    tflops, mfu = logged("tflops"), logged("mfu")
    assert all(tflops[s] > 0 and mfu[s] == pytest.approx(tflops[s] / PEAK_TFLOPS, rel=1e-6) for s in STEPS)
    per_sample = [tflops[s] * 1e12 * 2 / samples[s] for s in STEPS]  # the same model, the same FLOPs per sample
    assert max(per_sample) == pytest.approx(min(per_sample), rel=1e-6) and per_sample[0] > 1e6
    assert last["mfu"] == pytest.approx(mfu[6], abs=1e-4) and last["peak_tflops"] == PEAK_TFLOPS


@pytest.mark.slow
def test_mlflow_has_the_config_every_logged_step_and_the_test_metrics(tracked):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracked["uri"])
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run, result = runs[0], tracked["result"]
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    assert run.data.params["model.classifier"] == "tiny" and run.data.params["train.epochs"] == "2"
    assert run.data.params["run.tracking_uri"] == tracked["uri"]
    for term in TRAIN_KEYS:
        assert [m.step for m in client.get_metric_history(run.info.run_id, f"train/{term}")] == STEPS, term
    assert client.get_metric_history(run.info.run_id, "train/loss")[-1].value == pytest.approx(
        result["final_loss"], abs=1e-4
    )
    assert run.data.metrics["val/accuracy"] == pytest.approx(result["val_accuracy"], abs=1e-4)
    assert run.data.metrics["test/accuracy"] == pytest.approx(result["test_accuracy"], abs=1e-4)
    assert run.data.metrics["test/miou"] == pytest.approx(result["test_miou"], abs=1e-4)
    assert run.data.tags["megl.export_uri"] == result["export"] == "s3://megl/runs/tracked/export"
    local = client.download_artifacts(run.info.run_id, "export_reference.json", str(tracked["root"] / "art"))
    assert json.loads(Path(local).read_text())["export_uri"] == result["export"]


def _wandb_records(path: Path):
    """The protobuf records of a W&B run file: a 7-byte W&B header, then LevelDB log blocks of 32 KiB."""
    from wandb.proto import wandb_internal_pb2

    data, position, pending = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while position + 7 <= len(data):
        left = 32768 - position % 32768
        if left < 7:  # a block's tail too short for a header is padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        position += 7
        pending += data[position : position + length]
        position += length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


@pytest.mark.slow
def test_wandb_offline_run_file_has_the_config_history_and_summary(tracked):
    # the training run's file: the first (``evaluate --track`` below adds a resumed run's own later)
    files = sorted((tracked["root"] / "wandb" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert files
    history, config, summary, artifacts = {}, {}, {}, []
    for record in _wandb_records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            item = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
            history[item["_step"]] = item
        elif kind == "config":
            config.update({u.key: json.loads(u.value_json) for u in record.config.update})
        elif kind == "summary":
            summary.update({"/".join(u.nested_key) or u.key: json.loads(u.value_json) for u in record.summary.update})
        elif kind == "artifact":
            artifacts.append(record.artifact)
    result = tracked["result"]
    assert config["model.classifier"] == "tiny" and config["run.name"] == "tracked"
    assert sorted(s for s, item in history.items() if "train/loss" in item) == STEPS
    assert {f"train/{key}" for key in TRAIN_KEYS} <= set(history[6])
    assert history[6]["val/accuracy"] == pytest.approx(result["val_accuracy"], abs=1e-4)
    # the end-of-run pictures: curves.png as an image, the gallery as a table of overlays with their rationales
    assert history[6]["curves/_type"] == "image-file" and history[6]["gallery/_type"] == "table-file"
    assert history[6]["gallery/nrows"] == result["pictures"]["gallery_examples"]
    assert summary["test/accuracy"] == pytest.approx(result["test_accuracy"], abs=1e-4)
    assert summary["export_uri"] == result["export"]
    assert sorted(a.type for a in artifacts) == ["model", "run_table"]  # the export, and the gallery's table
    model = next(a for a in artifacts if a.type == "model")
    assert result["export"] in str(model.manifest)  # a reference to the export, not a copy


@pytest.mark.slow
def test_curves_and_gallery_are_in_the_run_dir_and_render(tracked, tmp_path):
    from PIL import Image

    from megl_ray import storage
    from megl_ray.storage import EmbeddedS3
    from tests.support.chromium import CHECK_SCRIPT, find_chromium, loaded_images

    pictures = tracked["result"]["pictures"]
    with Image.open(pictures["curves"]) as image:
        assert image.format == "PNG" and image.size[0] > 500
    gallery = Path(pictures["gallery"])
    page = gallery.read_text()
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert pictures["gallery_examples"] >= 5 and len(sources) >= 2 * pictures["gallery_examples"]
    with EmbeddedS3(tracked["root"] / "home" / "embedded_s3") as server:  # the run's own S3, started again
        run_dir = tracked["result"]["run_dir"]
        names = storage.list_files(run_dir, server.options)
        assert f"{run_dir}/curves.png" in names and f"{run_dir}/gallery/index.html" in names
        assert storage.read_bytes(f"{run_dir}/curves.png", server.options) == Path(pictures["curves"]).read_bytes()
        assert any(n.startswith(f"{run_dir}/tensorboard/events.out.tfevents") for n in names)
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("Debian chromium is not installed and could not be installed (apt-get install -y chromium)")
    check = gallery.parent / "check.html"
    check.write_text(page.replace("</body>", CHECK_SCRIPT + "</body>"))
    assert loaded_images(chromium, check, tmp_path / "profile") == (len(sources), len(sources))


@pytest.mark.slow
def test_the_gallery_curves_and_every_logged_key_are_in_tensorboard_and_mlflow(tracked):
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = tracked["result"]
    examples = result["pictures"]["gallery_examples"]
    events = EventAccumulator(result["tensorboard"], size_guidance={"images": 0, "tensors": 0, "scalars": 0})
    events.Reload()
    gallery = [tag for tag in events.Tags()["images"] if tag.startswith("gallery/")]
    assert "curves" in events.Tags()["images"] and len(gallery) == examples >= 5
    assert all(events.Images(tag)[0].step == 6 and events.Images(tag)[0].width > 0 for tag in gallery)
    captions = [events.Tensors(f"{tag}/text_summary")[0].tensor_proto.string_val[0].decode() for tag in gallery]
    assert all("→ predicted" in caption for caption in captions)
    # and the logged steps' scalars, every key (grad norm, lr per group, memory, MFU ...) at every step
    for key in TRAIN_KEYS:
        assert [e.step for e in events.Scalars(f"train/{key}")] == STEPS, key

    client = MlflowClient(tracking_uri=tracked["uri"])
    run = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])[0]
    root = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"curves.png", "gallery", "export_reference.json"} <= root
    files = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "gallery")}
    assert "index.html" in files and sum(name.endswith("_overlay.png") for name in files) == examples


@pytest.mark.slow
def test_the_best_checkpoint_is_kept_exported_and_evaluates_and_tracks(tracked):
    """The loss is lowest at epoch 1's end (step 3; gradient ascent after it): Ray keeps that checkpoint beside the
    latest, the workers export and test its weights, ``result.json`` names it; ``evaluate --track`` given the
    checkpoint itself (an intermediate one) exports it on the fly, reproduces the validation accuracy its weights
    had at step 3 and logs it to the run's MLflow run."""
    from mlflow import MlflowClient

    from megl_ray import storage
    from megl_ray.storage import EmbeddedS3

    result, best = tracked["result"], tracked["result"]["best_checkpoint"]
    client = MlflowClient(tracking_uri=tracked["uri"])
    run_id = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])[0].info.run_id
    loss = {m.step: m.value for m in client.get_metric_history(run_id, "train/loss")}
    val = {m.step: m.value for m in client.get_metric_history(run_id, "val/accuracy")}
    assert loss[6] > loss[3] and min(loss[s] for s in (3, 6)) == loss[3], loss  # the forced best, at an epoch end
    assert best["metric"] == "loss" and best["mode"] == "min" and (best["step"], best["epoch"]) == (3, 1)
    assert best["value"] == pytest.approx(loss[3], abs=1e-4) and result["exported_from"] == "best"
    assert result["steps"] == 6 and best["uri"] != result["checkpoint"]
    assert best["uri"].startswith("s3://megl/runs/tracked/checkpoint_")
    with EmbeddedS3(tracked["root"] / "home" / "embedded_s3") as server:
        meta = json.loads(storage.read_bytes(result["export"] + "/meta.json", server.options))
        names = storage.list_files(result["run_dir"], server.options)
    inside = [n[len(result["run_dir"]) + 1 :].split("/") for n in names]
    kept = {parts[0] for parts in inside if len(parts) > 1 and parts[0].startswith("checkpoint_")}
    assert meta["steps"] == 3 and meta["checkpoint"] == best["uri"]  # the export holds the best weights
    assert kept == {best["uri"].split("/")[-1], result["checkpoint"].split("/")[-1]}  # the best and the latest

    args = ["evaluate", "--checkpoint", best["uri"], "--data", result["data_uri"], "--split", "val", "--track"]
    args += ["--max-new-tokens", "4", "--out", str(tracked["root"] / "eval_best.json")]
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "megl"), *args],
        cwd=REPO,
        env=tracked["env"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    evaluated = json.loads(proc.stdout.strip().splitlines()[-1])
    assert evaluated["checkpoint"] == best["uri"] and evaluated["tracked"] == ["tensorboard", "mlflow", "wandb"]
    assert evaluated["accuracy"] == pytest.approx(val[3], abs=1e-4)
    logged = client.get_metric_history(run_id, "eval/val/accuracy")
    assert [(m.step, round(m.value, 4)) for m in logged] == [(3, round(evaluated["accuracy"], 4))]
    assert client.get_run(run_id).data.metrics["eval/val/miou"] == pytest.approx(evaluated["miou"], abs=1e-6)


@pytest.mark.slow
def test_dry_run_resolves_everything_a_run_would_and_takes_no_step(tracked):
    """``megl train --dry-run`` with the tracked run's command line: the data (from the embedded store, served
    again), the run directory's state (this run is complete), this machine's resources against the workers', the
    plan and the model's memory — exit 0, JSON last, no Ray started, nothing written to the run."""
    from megl_ray import storage
    from megl_ray.storage import EmbeddedS3
    from megl_ray.training.accounting import planned_steps

    def objects():  # the run directory's objects and their contents' digests, read through its own S3 server
        with EmbeddedS3(tracked["root"] / "home" / "embedded_s3") as server:
            return {n: storage.read_bytes(n, server.options) for n in storage.list_files(run_dir, server.options)}

    megl, run_dir = str(Path(sys.executable).parent / "megl"), tracked["result"]["run_dir"]
    before = objects()
    proc = subprocess.run(
        [megl, "train", "--dry-run", *tracked["args"]],
        cwd=REPO,
        env=tracked["env"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan, result = json.loads(proc.stdout.strip().splitlines()[-1]), tracked["result"]
    assert plan["dry_run"] is True and plan["run_dir"] == result["run_dir"] and plan["run_state"] == "complete"
    assert plan["data_uri"] == result["data_uri"] and plan["classes"] == 10 and plan["splits"]["val"] > 0
    assert plan["planned_steps"] == result["planned_steps"] == planned_steps(plan["train_images"], 2, 16, 2, 3)
    assert plan["global_batch_size"] == result["global_batch_size"] == 96 and plan["use_gpu"] is False
    assert plan["resources"]["CPU"] == os.cpu_count()
    memory = plan["memory_per_worker_gib"]
    assert memory["trainable_params"] > 100_000 and memory["frozen_params"] == 0 and memory["model_states"] > 0
    assert "Started a local Ray" not in proc.stderr and "[megl] step" not in proc.stderr
    assert before and objects() == before, "a dry run wrote into the run"


@pytest.mark.slow
def test_verbose_brings_back_rays_own_logs(tracked):
    """Ray's INFO lines are absent from the quiet run above and back with --verbose (a run that stops at the
    resource check, right after Ray has started)."""
    args = [sys.executable, "-m", "megl_ray.train", "--config", str(FAST), "train.num_workers=64"]
    proc = subprocess.run(
        [*args, "--verbose"], cwd=REPO, env=tracked["env"], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 2 and "train.num_workers=64 needs" in proc.stderr, proc.stderr[-3000:]
    assert "Started a local Ray instance" in proc.stderr
    assert "Started a local Ray instance" not in tracked["stderr"]
