"""``python -m megl_ray.evaluate`` on an export trained here by ``megl_ray.train_local``: all keys, the JSON file,
identical numbers in-process and through Ray Data, and one clear line for each bad input."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from megl_ray import train_local
from megl_ray.cli import run_cli
from megl_ray.data.reader import bundled_dataset_uri
from megl_ray.data.schema import load_dataset_info
from megl_ray.evaluate import main
from megl_ray.evaluation.scoring import METRIC_KEYS

ROOT = Path(__file__).resolve().parents[1]
KEYS = {*METRIC_KEYS, "split", "samples", "per_class", "mask_samples", "checkpoint", "data", "out"}


@pytest.fixture(scope="module")
def data_uri():
    return bundled_dataset_uri()


@pytest.fixture(scope="module")
def export(tmp_path_factory, data_uri):
    out = str(tmp_path_factory.mktemp("evaluate") / "export")
    train_local.main(["--max-steps", "4", "--export", out, "train.epochs=2", f"data.uri={data_uri}"])
    return out


def _run(argv, capsys):
    """run_cli in this process: (exit code, stdout's last line as JSON, stderr)."""
    code = run_cli("python -m megl_ray.evaluate", main, argv)
    captured = capsys.readouterr()
    return code, json.loads(captured.out.strip().splitlines()[-1]), captured.err


def test_cli_prints_every_key_and_writes_the_json(export, data_uri, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "megl_ray.evaluate",
            "--checkpoint",
            export,
            "--data",
            data_uri,
            "--split",
            "val",
            "--max-new-tokens",
            "8",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert KEYS <= set(result), KEYS - set(result)
    rows = load_dataset_info(data_uri).splits["val"]
    assert result["split"] == "val" and result["samples"] == rows and result["workers"] == 1
    assert len(result["per_class"]) == 10 and sum(row["support"] for row in result["per_class"]) == rows
    for key in METRIC_KEYS:
        assert result[key] is None or isinstance(result[key], float), key
    assert result["max_new_tokens"] == 8 and [p["device"] for p in result["placement"]] == ["cpu"]
    # without --clip-path CLIPScore is null and says why; SPICE is null with its reason unless CoreNLP is installed
    assert result["clip_score"] is None and "--clip-path" in result["not_computed"]["clip_score"]
    from megl_ray.evaluation.spice import spice_status

    assert (result["spice"] is None) == (spice_status() is not None)
    assert result["spice"] is not None or result["not_computed"]["spice"] == spice_status()
    assert result["meteor"] is not None or shutil.which("java") is None
    assert 0.0 <= result["accuracy"] <= 1.0 and 0.0 <= result["text_similarity"] <= 1.0
    written = Path(export) / "eval_val.json"  # the default --out
    assert result["out"] == str(written) and json.loads(written.read_text()) == result
    assert "accuracy" in proc.stderr and "pointing game" in proc.stderr  # the readable table


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    # A short temp dir: Ray's unix sockets live under it and their paths are limited to ~107 bytes.
    ray.init(
        num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=tempfile.mkdtemp(prefix="ray", dir="/tmp")
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from tests.tiny_clip import save_tiny_clip

    return str(save_tiny_clip(tmp_path_factory.mktemp("clip") / "clip"))


def test_in_process_and_ray_data_give_identical_numbers(export, data_uri, tmp_path, ray_cluster, clip_dir):
    import ray

    common = [
        "--checkpoint",
        export,
        "--data",
        data_uri,
        "--split",
        "val",
        "--batch-size",
        "8",
        "--max-new-tokens",
        "8",
        "--clip-path",
        clip_dir,
    ]
    local = main([*common, "--workers", "1", "--out", str(tmp_path / "local.json")])
    distributed = main([*common, "--workers", "2", "--out", str(tmp_path / "ray.json")])
    assert local["workers"] == 1 and distributed["workers"] == 2
    for key in (*METRIC_KEYS, "per_class", "samples", "mask_samples", "not_computed"):
        assert local[key] == distributed[key], key
    assert local["clip_score"] is not None and "clip_score" not in local["not_computed"]
    # where the model ran: this process for --workers 1; two other processes, each resolving 'auto' itself, on
    # this Ray node for the Ray path
    assert [(p["pid"], p["device"]) for p in local["placement"]] == [(os.getpid(), "cpu")]
    actors = distributed["placement"]
    # Ray Data hands blocks to whichever actor is ready: on a loaded machine one of the two may do all of them
    assert 1 <= len({p["pid"] for p in actors}) <= 2 and os.getpid() not in {p["pid"] for p in actors}
    assert {(p["device"], p["dtype"], p["node"]) for p in actors} == {
        ("cpu", "float32", ray.get_runtime_context().get_node_id())
    }


def test_ray_path_reports_a_foreign_export_in_one_line(export, data_uri, tmp_path, ray_cluster, capsys):
    foreign = _foreign_export(export, tmp_path)
    code, out, err = _run(
        [
            "--checkpoint",
            foreign,
            "--data",
            data_uri,
            "--split",
            "val",
            "--workers",
            "2",
            "--out",
            str(tmp_path / "x.json"),
        ],
        capsys,
    )
    assert code == 2 and "weights do not fit" in out["error"] and "Traceback" not in err


def _foreign_export(export: str, tmp_path: Path) -> str:
    """An export whose weights belong to another model (its config now builds a wider VLM)."""
    import yaml

    foreign = tmp_path / "foreign"
    shutil.copytree(export, foreign)
    cfg = yaml.safe_load((foreign / "config.yaml").read_text())
    cfg["model"]["tiny_hidden_size"] *= 2
    (foreign / "config.yaml").write_text(yaml.safe_dump(cfg))
    return str(foreign)


def test_bad_inputs_give_one_clear_line(export, data_uri, tmp_path, capsys):
    base = ["--split", "val", "--out", str(tmp_path / "x.json")]
    (tmp_path / "not_an_export").mkdir()
    (tmp_path / "not_an_export" / "notes.txt").write_text("hello")
    (tmp_path / "not_a_dataset").mkdir()
    renamed = tmp_path / "renamed"  # the same data under other class names: another task's dataset
    shutil.copytree(data_uri, renamed)
    info = json.loads((renamed / "dataset.json").read_text())
    info["classes"] = [f"class{i}" for i in range(len(info["classes"]))]
    (renamed / "dataset.json").write_text(json.dumps(info))
    cases = [
        (["--checkpoint", str(tmp_path / "missing"), "--data", data_uri], "model directory not found"),
        (["--checkpoint", str(tmp_path / "not_an_export"), "--data", data_uri], "is not a megl_ray export"),
        (["--checkpoint", _foreign_export(export, tmp_path), "--data", data_uri], "weights do not fit"),
        (["--checkpoint", export, "--data", str(tmp_path / "not_a_dataset")], "no dataset.json"),
        (["--checkpoint", export, "--data", str(renamed)], "was not trained on"),
        (["--checkpoint", export, "--data", data_uri, "--split", "nope"], "has no split 'nope'"),
        (["--checkpoint", export, "--data", data_uri, "--workers", "0"], "--workers must be at least 1"),
        (["--data", data_uri], "--checkpoint"),
    ]
    for argv, message in cases:
        code, out, err = _run([*base, *argv], capsys)  # argv last: its --split wins
        assert code == 2, (argv, err)
        assert message in out["error"], (message, out["error"])
        lines = [line for line in err.splitlines() if "error:" in line]
        assert len(lines) == 1 and "Traceback" not in err, err


def test_a_bad_input_through_a_subprocess_has_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, "-m", "megl_ray.evaluate", "--checkpoint", str(tmp_path / "missing"), "--data", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("python -m megl_ray.evaluate: error: ")


def test_efficiency_prints_the_table_and_the_json(export, tmp_path, capsys):
    from megl_ray.model.export_io import load_export

    code, out, err = _run(
        [
            "--efficiency",
            "--checkpoint",
            export,
            "--batch-size",
            "3",
            "--warmup",
            "1",
            "--repeats",
            "2",
            "--max-new-tokens",
            "5",
            "--out",
            str(tmp_path / "eff.json"),
        ],
        capsys,
    )
    assert code == 0, err
    assert json.loads((tmp_path / "eff.json").read_text()) == out
    assert out["device"] == "cpu" and out["gpu"] is None and out["max_new_tokens"] == 5 and out["batch_sizes"] == [1, 3]
    model = load_export(export).model
    assert out["params"]["total"] + out["params"]["lora"] == sum(p.numel() for p in model.parameters())
    assert out["params"]["classifier"] == sum(p.numel() for p in model.classifier.parameters())
    rows = {(r["pipeline"], r["batch"]): r for r in out["rows"]}
    assert set(rows) == {(p, b) for p in ("classifier+saliency", "classifier+saliency+rationale") for b in (1, 3)}
    for (_pipeline, batch), r in rows.items():
        assert r["latency_ms_per_image"] > 0
        assert r["images_per_s"] == pytest.approx(1e3 / r["latency_ms_per_image"], rel=1e-2)
        assert r["batch_latency_ms"] == pytest.approx(r["latency_ms_per_image"] * batch, rel=1e-3)
    # Which pipeline is faster is a measurement (bench/efficiency.py), not asserted here: with the 16×16-grid tiny
    # CNN and 5 tokens of a 2-layer LM the two are close enough for a loaded 2-core machine to flip them.
    assert out["rationale_slowdown"]["1"] == pytest.approx(
        rows[("classifier+saliency+rationale", 1)]["latency_ms_per_image"]
        / rows[("classifier+saliency", 1)]["latency_ms_per_image"],
        abs=0.01,
    )
    assert "ms/image" in err and "images/s" in err and "classifier+saliency+rationale" in err


def test_actor_pool_follows_the_cluster_gpus():
    from megl_ray.errors import UserError
    from megl_ray.evaluation.evaluate_run import plan_actors

    gpu_cluster, cpu_cluster = {"CPU": 64.0, "GPU": 8.0}, {"CPU": 16.0}
    assert plan_actors(None, "auto", 10_000, gpu_cluster) == (8, True)  # one actor per GPU, not per core
    assert plan_actors(3, "auto", 10_000, gpu_cluster) == (3, True)
    assert plan_actors(None, "cpu", 10_000, gpu_cluster) == (32, False)
    assert plan_actors(None, "auto", 10_000, cpu_cluster) == (8, False)
    assert plan_actors(None, "auto", 5, gpu_cluster) == (5, True)  # never more actors than rows
    assert plan_actors(4, "cuda", 10_000, cpu_cluster) == (4, True)  # an autoscaler may add the GPUs
    with pytest.raises(UserError, match="has no GPU"):
        plan_actors(None, "cuda", 10_000, cpu_cluster)


def test_the_actor_resolves_the_device_itself(export):
    import torch

    from megl_ray.evaluation.evaluate_run import Predictor

    actor = Predictor(export, "auto", "auto", None, 64, 1, 4)
    assert actor.error is None and actor.placement.device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert actor.placement.dtype == ("bfloat16" if torch.cuda.is_available() else "float32")
    if not torch.cuda.is_available():  # a GPU actor placed on a machine without one says so in one line
        assert "--device cuda: no CUDA device" in Predictor(export, "cuda", "auto", None, 64, 1, 4).error
