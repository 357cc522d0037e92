"""The post-training test evaluation, kept off the head node: it runs as a Ray task with a training worker's
resources (a GPU on GPU clusters) and loads only what accuracy and mIoU need — the classifier and the tokenizer
files of the export, never the VLM's weights (the saliency Â is the classifier's own)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import ray
import torch
import yaml
from safetensors import safe_open
from transformers import AutoTokenizer

from megl_ray.cluster.credentials import credentials_file, load_credentials
from megl_ray.config import config_from_dict
from megl_ray.data.reader import iter_row_batches, read_split
from megl_ray.data.schema import load_dataset_info
from megl_ray.data.transforms import preprocess_rows
from megl_ray.evaluation.metrics import ClassificationMetrics, SaliencyMetrics
from megl_ray.model.checkpoint_io import local_dir
from megl_ray.model.classifier import build_classifier, fit_pixels
from megl_ray.model.export_io import CONFIG_FILE, META_FILE, TOKENIZER_DIR, WEIGHTS_FILE
from megl_ray.model.saliency import gradcam


class ClassifierOnly(torch.nn.Module):
    """The classifier of an export with ``MEGLModel.predict``'s contract: (probabilities, Â of the prediction)."""

    def __init__(self, classifier: Any, image_size: int, pixel_size: int):
        super().__init__()
        self.classifier = classifier
        self.image_size = image_size
        self.pixel_size = pixel_size  # the side the full model's data was decoded at: the same pixels, resized alike

    def predict(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        closed = self.classifier.cam_weight is not None
        with torch.no_grad() if closed else torch.enable_grad():  # the autograd Grad-CAM needs a graph
            out = self.classifier(fit_pixels(pixels, self.image_size), cam_target="prediction")
            sal = (
                out.cam if closed else gradcam(out.features, out.logits, out.logits.argmax(1), None, create_graph=False)
            )
        return out.logits.detach().softmax(dim=1), sal.detach()


def load_classifier_only(export_uri: str, device: str = "cpu") -> tuple[ClassifierOnly, Any, Any]:
    """(classifier predictor, config, tokenizer) of an export, reading only ``classifier.*`` tensors."""
    root = local_dir(export_uri)
    cfg = config_from_dict(yaml.safe_load((root / CONFIG_FILE).read_text()))
    meta = json.loads((root / META_FILE).read_text())
    m = cfg.model
    classifier = build_classifier(
        m.classifier,
        int(meta["num_classes"]),
        image_size=m.image_size,
        head=m.classifier_head,
        vit_pool=m.vit_pool,
        weights=None,
    )
    prefix = "classifier."
    with safe_open(str(root / WEIGHTS_FILE), framework="pt") as f:
        state = {k[len(prefix) :]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    classifier.load_state_dict(state, strict=True)
    tokenizer = AutoTokenizer.from_pretrained(str(root / TOKENIZER_DIR))
    pixels = int(meta.get("pixel_size", m.image_size))  # exports written before pixel_size decoded at image_size
    return ClassifierOnly(classifier, m.image_size, pixels).to(device).eval(), cfg, tokenizer


def evaluate_test_split(export_uri: str, data_uri: str, device: str = "cpu") -> dict[str, float | None]:
    """Accuracy and mIoU of an export's classifier on the test split (the metrics of ``megl_ray.evaluate``)."""
    model, cfg, tokenizer = load_classifier_only(export_uri, device)
    info = load_dataset_info(data_uri)
    classification, saliency = ClassificationMetrics(info.num_classes), SaliencyMetrics()
    for rows in iter_row_batches(read_split(data_uri, "test", info), 64, epoch=0, seed=0, shuffle=False):
        pre = preprocess_rows(
            {k: [r[k] for r in rows] for k in rows[0]},
            tokenizer,
            model.pixel_size,
            info.mask_size,
            1,
            cfg.model.max_text_tokens,
            cfg.model.image_aspect,
        )
        pixels = torch.as_tensor(pre["pixels"]).float().div_(255.0).to(device)
        probs, sal = model.predict(pixels)
        classification.update(probs.float().cpu(), torch.as_tensor(np.asarray(pre["label"], dtype=np.int64)))
        saliency.update(
            sal.float().cpu(),
            torch.as_tensor(pre["mask"]).float().div_(255.0),
            torch.as_tensor(np.asarray(pre["has_mask"], dtype=bool)),
        )
    return {"test_accuracy": classification.compute()["accuracy"], "test_miou": saliency.compute()["miou"]}


def _evaluate_with_credentials(
    export_uri: str, data_uri: str, device: str, credentials: str | None
) -> dict[str, float | None]:
    """In the Ray task: credentials the task's environment lacks come from the 0600 file, as in the workers (a
    joined cluster's processes did not inherit the driver's environment)."""
    load_credentials(credentials)
    return evaluate_test_split(export_uri, data_uri, device)


def evaluate_where_the_gpus_are(
    export_uri: str, data_uri: str, use_gpu: bool, cpus: float, env: dict[str, str]
) -> dict[str, float | None]:
    """``evaluate_test_split`` as a Ray task holding one training worker's resources."""
    task = ray.remote(num_gpus=1 if use_gpu else 0, num_cpus=cpus, runtime_env={"env_vars": env})(
        _evaluate_with_credentials
    )
    with credentials_file() as credentials:  # removed when the task has finished
        return ray.get(task.remote(export_uri, data_uri, "cuda" if use_gpu else "cpu", credentials))
