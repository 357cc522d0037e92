"""megl_ray.reporting.tracking, and what a user of ``python -m megl_ray.train`` sees: one real training run of the
tiny preset (2 workers, 9 steps) tracked at once by TensorBoard, a real ``mlflow server`` on 127.0.0.1 and W&B in
offline mode serves the slow tests — read back through ``MlflowClient`` and W&B's offline run file — together with
its console (line budget) and its pictures (curves.png, a gallery that renders in headless Chromium)."""

from __future__ import annotations

import io
import math
import sys
import types

from megl_ray.config import load_config
from megl_ray.reporting import tracking

# ------------------------------------------------------------------------------------------------- no training


def test_backends_and_flat_params():
    assert tracking.backends_of("none") == [] and tracking.backends_of("mlflow") == ["mlflow"]
    assert tracking.backends_of(["wandb", "none", "wandb", "tensorboard"]) == ["wandb", "tensorboard"]
    assert tracking.flatten({"a": {"b": 1, "c": {"d": None}}, "e": [1]}) == {"a.b": 1, "a.c.d": None, "e": [1]}


def test_a_failing_backend_warns_once_and_training_goes_on(tmp_path, monkeypatch, caplog):
    calls = []

    class Flaky:
        def __init__(self, *args):
            pass

        def metrics(self, values, step):
            calls.append(step)
            raise ConnectionError("tracking server at http://127.0.0.1:9 refused the connection")

    class Broken:
        def __init__(self, *args):
            raise RuntimeError("api_key not configured")

    monkeypatch.setitem(tracking.BACKENDS, "mlflow", Flaky)
    monkeypatch.setitem(tracking.BACKENDS, "wandb", Broken)
    cfg = load_config(None, ["run.tracking=[mlflow,wandb]"])
    tracker = tracking.Tracker(cfg, str(tmp_path / "run"), tmp_path)
    assert list(tracker.backends) == ["mlflow"]
    tracker.metrics({"train/loss": 1.0, "train/nan": math.nan}, 3)
    tracker.metrics({"train/loss": 0.5}, 6)  # the backend is off after its first failure
    tracker.close(success=True)
    assert calls == [3]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2 and "wandb is off" in warnings[0] and "mlflow failed" in warnings[1]


# ------------------------------------------------------------------------------------------- one tracked run


def test_standard_variables_name_the_experiment_and_project_when_the_config_does_not(tmp_path, monkeypatch):
    """``$MLFLOW_EXPERIMENT_NAME`` and ``$WANDB_PROJECT`` count where ``run.experiment``/``run.wandb_project`` are
    unset, and the config wins where it sets them (the clients stand in for MLflow's and W&B's)."""
    seen = {}

    class Client:
        def __init__(self, tracking_uri=None):
            self.tracking_uri = "file:///x"

        def get_experiment_by_name(self, name):
            seen["experiment"] = name
            return types.SimpleNamespace(experiment_id="1")

        def search_runs(self, *args, **kwargs):
            return []

        def create_run(self, experiment_id, run_name, tags):
            return types.SimpleNamespace(info=types.SimpleNamespace(run_id="r"))

    def init(**kwargs):
        seen["project"] = kwargs["project"]
        return types.SimpleNamespace()

    monkeypatch.setitem(sys.modules, "mlflow", types.SimpleNamespace(MlflowClient=Client))
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init, Settings=lambda **kw: None))
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-env")
    monkeypatch.setenv("WANDB_PROJECT", "env-project")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cfg = load_config(None, ["run.tracking=[mlflow,wandb]"])
    tracking.Tracker(cfg, str(tmp_path / "run"), tmp_path)
    assert seen == {"experiment": "from-env", "project": "env-project"}
    cfg = load_config(None, ["run.tracking=[mlflow,wandb]", "run.experiment=mine", "run.wandb_project=ours"])
    tracking.Tracker(cfg, str(tmp_path / "run"), tmp_path)
    assert seen == {"experiment": "mine", "project": "ours"}
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME")
    monkeypatch.delenv("WANDB_PROJECT")
    tracking.Tracker(load_config(None, ["run.tracking=[mlflow,wandb]"]), str(tmp_path / "run"), tmp_path)
    assert seen == {"experiment": tracking.DEFAULT_EXPERIMENT, "project": tracking.DEFAULT_WANDB_PROJECT}


def test_tensorboard_gets_the_curves_and_each_gallery_overlay_with_its_rationale(tmp_path):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    gallery = tmp_path / "pictures" / "gallery"
    gallery.mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "pictures" / "curves.png")
    examples = []
    for i, colour in enumerate([(0, 0, 255), (0, 255, 0)]):
        Image.new("RGB", (16, 16), colour).save(gallery / f"{i:04d}_overlay.png")
        examples.append(
            {
                "id": f"{i:04d}",
                "label": "cat",
                "predicted": "dog",
                "probability": 0.75,
                "iou": None,
                "rationale": f"rationale {i}",
                "overlay": f"{i:04d}_overlay.png",
            }  # fmt: skip
        )
    made = {"curves": str(tmp_path / "pictures" / "curves.png"), "gallery": str(gallery / "index.html")}
    tracker = tracking.Tracker(load_config(None), str(tmp_path / "run"), tmp_path / "local")
    tracker.metrics({"train/loss": 1.0}, 7)
    tracker.pictures(made, examples)
    tracker.close(success=True)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    assert set(events.Tags()["images"]) == {"curves", "gallery/0000", "gallery/0001"}
    image = events.Images("gallery/0001")[0]
    assert image.step == 7 and (image.width, image.height) == (16, 16)
    with Image.open(io.BytesIO(image.encoded_image_string)) as decoded:
        assert decoded.convert("RGB").getpixel((3, 3)) == (0, 255, 0)
    text = events.Tensors("gallery/0000/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "**cat** → predicted **dog** (p=0.75)" in text and "rationale 0" in text
