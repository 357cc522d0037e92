"""``python -m megl_ray.evaluate`` on an export trained here by ``megl_ray.train_local``: all keys, the JSON file,
identical numbers in-process and through Ray Data, and one clear line for each bad input."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megl_ray.cli import run_cli
from megl_ray.data.schema import load_dataset_info
from megl_ray.evaluate import main
from megl_ray.evaluation.scoring import METRIC_KEYS

pytestmark = pytest.mark.shared_ray
ROOT = Path(__file__).resolve().parents[2]
KEYS = {*METRIC_KEYS, "split", "samples", "per_class", "mask_samples", "checkpoint", "data", "out"}


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
def clip_dir(tmp_path_factory):
    from tests.support.tiny_clip import save_tiny_clip

    return str(save_tiny_clip(tmp_path_factory.mktemp("clip") / "clip"))


def test_in_process_and_ray_data_give_identical_numbers(export, data_uri, tmp_path, shared_ray, clip_dir):
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


def test_ray_path_reports_a_foreign_export_in_one_line(export, data_uri, tmp_path, shared_ray, capsys):
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
