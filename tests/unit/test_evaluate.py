"""``python -m megl_ray.evaluate`` on an export trained here by ``megl_ray.train_local``: all keys, the JSON file,
identical numbers in-process and through Ray Data, and one clear line for each bad input."""

import json
import shutil
from pathlib import Path

import pytest

from megl_ray.cli import run_cli
from megl_ray.evaluate import main


def _run(argv, capsys):
    """run_cli in this process: (exit code, stdout's last line as JSON, stderr)."""
    code = run_cli("python -m megl_ray.evaluate", main, argv)
    captured = capsys.readouterr()
    return code, json.loads(captured.out.strip().splitlines()[-1]), captured.err


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
