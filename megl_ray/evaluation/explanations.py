"""What an exported MEGL model predicts for images, where it looked, and why it says so: the library of
``python -m megl_ray.explain`` (whose docstring lists the files it writes).

Each image gets the top-k classes, the saliency Â of the predicted class upsampled and drawn over it as a heat map
(``overlay``), the same map alone in grey, and the rationale generated for the predicted class; the gallery renders
a few examples per class of a split (``megl_ray.evaluation.gallery``).
"""

from __future__ import annotations

import io
import json
import logging
import re
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
from PIL import Image

from megl_ray import storage
from megl_ray.data.conversion import DEFAULT_MAX_PIXELS
from megl_ray.data.reader import read_split
from megl_ray.data.schema import Invalid, check_image_bytes, load_dataset_info
from megl_ray.data.transforms import decode_image, expand_to_square, to_rgb
from megl_ray.errors import UserError
from megl_ray.evaluation.gallery import COLORMAP, render_gallery
from megl_ray.evaluation.inference import load_for_inference, run_batch
from megl_ray.evaluation.metrics import binarize_saliency, saliency_iou, upsample_saliency
from megl_ray.evaluation.options import ExplainOptions
from megl_ray.storage.embedded_home import embedded_store_for

log = logging.getLogger("megl_ray.explain")

OVERLAY_ALPHA = 0.5


# -------------------------------------------------------------------------------------------------------- images


def read_image(uri: str) -> tuple[bytes, Image.Image]:
    """An image's bytes and RGB picture; anything that is not a readable image is one clear ``UserError``."""

    try:
        data = storage.read_bytes(uri)
    except UserError:  # storage's own errors (no such file, access denied) are already one clear line
        raise
    except OSError as err:
        raise UserError(f"{uri}: cannot read: {err.strerror or err}") from None
    try:
        check_image_bytes(data, DEFAULT_MAX_PIXELS)  # the converter's checks: format, decompression bomb, truncation
    except Invalid as problem:
        raise UserError(f"{uri}: not a usable image: {problem.detail}") from None
    with Image.open(io.BytesIO(data)) as img:
        return data, to_rgb(img)


def heat(saliency: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(h, w) saliency → (H, W) float in [0, 1]: bilinear upsampling and max-normalisation, as the metrics do."""

    return upsample_saliency(saliency.unsqueeze(0), size)[0].clamp(0, 1).numpy()


def overlay(image: Image.Image, heat_map: np.ndarray, alpha: float = OVERLAY_ALPHA) -> Image.Image:
    """The heat map through matplotlib's colormap (no figure, no display), alpha-blended over the image."""
    colours = matplotlib.colormaps[COLORMAP](heat_map)[..., :3]
    base = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    blended = (1.0 - alpha) * base + alpha * colours
    return Image.fromarray(np.clip(np.rint(blended * 255.0), 0, 255).astype(np.uint8), "RGB")


def grey(values: np.ndarray) -> Image.Image:
    """A [0, 1] map as an 8-bit greyscale picture."""
    return Image.fromarray(np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8), "L")


def model_pixels(data: bytes, image_size: int, aspect: str = "squash") -> torch.Tensor:
    """(3, S, S) pixels exactly as training feeds them: decoded (squashed or padded to a square), resized, rounded
    to uint8 levels, in [0, 1]."""

    return torch.as_tensor(np.rint(decode_image(data, image_size, aspect) * 255.0) / 255.0, dtype=torch.float32)


def as_seen(image: Image.Image, aspect: str) -> Image.Image:
    """The picture in the frame Â refers to: padded to a square as the model saw it with ``model.image_aspect=pad``
    (Â covers the padding too), the picture itself when squashed (Â is stretched back over it)."""
    return expand_to_square(image) if aspect == "pad" else image


class _Names:
    """File-name stems that are safe on every filesystem and in URLs, and unique within one output folder."""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def __call__(self, raw: str) -> str:
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", raw).strip("._") or "image"
        name, k = base, 2
        while name in self.used:
            name, k = f"{base}-{k}", k + 1
        self.used.add(name)
        return name


# ------------------------------------------------------------------------------------------------------ explain


def explain_images(
    exported: Any,
    loaded: Sequence[tuple[str, bytes, Image.Image]],
    out: Path,
    top_k: int,
    num_beams: int,
    max_new_tokens: int | None,
    batch_size: int,
    names: _Names,
) -> list[dict[str, Any]]:
    """Predict, draw and explain each (uri, bytes, picture) of ``read_image``; write its PNGs into ``out``; return
    one record per image."""
    model, size, aspect = exported.model, exported.model.pixel_size, exported.config.model.image_aspect
    records = []
    device = next(model.classifier.parameters()).device
    k = max(1, min(top_k, len(exported.classes)))
    for start in range(0, len(loaded), batch_size):
        chunk = loaded[start : start + batch_size]
        pixels = torch.stack([model_pixels(data, size, aspect) for _, data, _ in chunk]).to(device)
        probs, saliency = model.predict(pixels)
        probs, saliency = probs.float().cpu(), saliency.float().cpu()
        predicted = [exported.classes[i] for i in probs.argmax(dim=1).tolist()]
        rationales = model.generate(pixels, predicted, max_new_tokens=max_new_tokens, num_beams=num_beams)
        for i, (uri, _, image) in enumerate(chunk):
            name = names(Path(uri.rstrip("/")).stem)
            image = as_seen(image, aspect)
            heat_map = heat(saliency[i], (image.height, image.width))
            overlay(image, heat_map).save(out / f"{name}_overlay.png")
            grey(heat_map).save(out / f"{name}_saliency.png")
            p, idx = probs[i].topk(k)
            records.append(
                {
                    "image": uri,
                    "name": name,
                    "predicted": predicted[i],
                    "probability": float(p[0]),
                    "top_k": [
                        {"class": exported.classes[j], "probability": float(q)}
                        for q, j in zip(p.tolist(), idx.tolist())
                    ],
                    "rationale": rationales[i],
                    "overlay": f"{name}_overlay.png",
                    "saliency": f"{name}_saliency.png",
                }
            )
    return records


# ------------------------------------------------------------------------------------------------------ gallery


def select_rows(table: Any, num_classes: int, per_class: int) -> list[int]:
    """Row indices: up to ``per_class`` per class in class-id order, rows with a mask first, then split order."""
    labels = table.column("class_id").to_pylist()
    has_mask = table.column("has_mask").to_pylist()
    chosen = []
    for c in range(num_classes):
        rows = [i for i, label in enumerate(labels) if label == c]
        rows.sort(key=lambda i: not has_mask[i])  # stable: split order within each group
        chosen += rows[:per_class]
    return chosen


def explain_rows(
    exported: Any,
    table: Any,
    mask_size: int,
    out: Path,
    names: _Names,
    num_beams: int = 1,
    max_new_tokens: int | None = None,
    batch_size: int = 32,
) -> list[dict[str, Any]]:
    """Run the model on stored dataset rows (``schema.PARQUET_SCHEMA`` columns) and write, per row, the image,
    the Â overlay, the binarised Â region and (when the row has one) the ground-truth mask as PNGs in ``out``.
    Returns one record per row: id, label, predicted, probability, iou (None without a mask, or when both
    regions are empty), rationale, references, and the PNG file names (image, overlay, region, mask or None)."""

    examples = []
    for start in range(0, table.num_rows, batch_size):
        columns = table.slice(start, batch_size).to_pydict()
        outs = run_batch(exported, columns, mask_size, num_beams, max_new_tokens)
        for i in range(len(columns["id"])):
            name = names(str(columns["id"][i]))
            with Image.open(io.BytesIO(columns["image"][i])) as img:
                image = as_seen(to_rgb(img), exported.config.model.image_aspect)
            image.save(out / f"{name}_image.png")  # re-encoded: the source format may be one browsers cannot show
            sal = torch.as_tensor(outs["saliency"][i])
            overlay(image, heat(sal, (image.height, image.width))).save(out / f"{name}_overlay.png")
            # the region the IoU scores: Â at the mask's resolution, ≥ half its peak (metrics.SALIENCY_THRESHOLD)
            region = binarize_saliency(sal.unsqueeze(0), (mask_size, mask_size))[0].float().numpy()
            grey(region).resize(image.size, Image.NEAREST).save(out / f"{name}_region.png")
            mask, iou = None, None
            if outs["has_mask"][i]:
                mask = f"{name}_mask.png"
                gt = outs["mask"][i] / 255.0
                grey(gt).resize(image.size, Image.NEAREST).save(out / mask)
                value = float(saliency_iou(sal.unsqueeze(0), torch.as_tensor(gt).unsqueeze(0))[0])
                iou = value if np.isfinite(value) else None
            probs = outs["probs"][i]
            examples.append(
                {
                    "id": str(columns["id"][i]),
                    "label": str(columns["class_name"][i]),
                    "predicted": exported.classes[int(probs.argmax())],
                    "probability": float(probs.max()),
                    "iou": iou,
                    "rationale": str(outs["generated"][i]),
                    "references": list(columns["rationales"][i]),
                    "image": f"{name}_image.png",
                    "overlay": f"{name}_overlay.png",
                    "region": f"{name}_region.png",
                    "mask": mask,
                }
            )
    return examples


def write_gallery(
    exported: Any,
    checkpoint: str,
    data_uri: str,
    split: str,
    per_class: int,
    out: Path,
    num_beams: int = 1,
    max_new_tokens: int | None = None,
    batch_size: int = 32,
    names: _Names | None = None,
    ids: Sequence[str] | None = None,
    split_label: str | None = None,
) -> list[dict[str, Any]]:
    """A few examples per class of ``split`` (only its rows ``ids`` when given: a validation carved from train) as
    ``out/index.html`` plus its PNGs; returns the examples. ``split_label`` is what the page calls them."""

    info = load_dataset_info(data_uri)
    if list(info.classes) != exported.classes:
        raise UserError(f"{checkpoint} was not trained on {data_uri}: their classes differ")
    table = read_split(data_uri, split, info)
    if ids is not None:
        wanted = set(ids)
        table = table.take([i for i, row_id in enumerate(table.column("id").to_pylist()) if row_id in wanted])
    picked = table.take(select_rows(table, len(info.classes), per_class))
    examples = explain_rows(
        exported, picked, info.mask_size, out, names or _Names(), num_beams, max_new_tokens, batch_size
    )
    render_gallery(examples, info.classes, out, checkpoint, data_uri, split_label or split)
    return examples


def explain(args: ExplainOptions) -> dict[str, Any]:
    """Explain ``args.images`` (and with ``gallery`` a few examples per class of ``args.data``) into ``args.out``."""
    if not args.images and not args.gallery:
        raise UserError("give at least one IMAGE, or --gallery with --data")
    if args.gallery and not args.data:
        raise UserError("--gallery needs --data (a converted dataset)")
    for name in ("top_k", "num_beams", "max_new_tokens", "per_class", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    loaded = [(uri, *read_image(uri)) for uri in args.images]  # a bad image fails before the slow model load
    exported, _ = load_for_inference(args.checkpoint, args.device, args.precision, args.base_path)

    remote = storage.is_s3(args.out)
    staging = tempfile.TemporaryDirectory(prefix="megl-explain-") if remote else None
    out = Path(staging.name) if staging else Path(args.out).expanduser()
    try:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create {args.out}: {err.strerror or err}") from None
        names = _Names()  # one namespace: gallery files must not overwrite the IMAGE arguments' files
        records = explain_images(
            exported, loaded, out, args.top_k, args.num_beams, args.max_new_tokens, args.batch_size, names
        )
        result: dict[str, Any] = {"checkpoint": args.checkpoint, "out": args.out, "explanations": records}
        if args.gallery:
            examples = write_gallery(
                exported,
                args.checkpoint,
                args.data,
                args.split,
                args.per_class,
                out,
                args.num_beams,
                args.max_new_tokens,
                args.batch_size,
                names,
            )
            result["gallery"] = {
                "index": "index.html",
                "split": args.split,
                "examples": len(examples),
                "records": examples,
            }
        (out / "explanations.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        if remote:
            storage.upload(str(out), args.out)
    finally:
        if staging:
            staging.cleanup()
    for r in records:
        top = ", ".join(f"{t['class']} {t['probability']:.2f}" for t in r["top_k"])
        print(f"{r['image']}: {top}\n  {r['rationale']}", file=sys.stderr)
    return result


def run(options: ExplainOptions) -> dict[str, Any]:
    """``python -m megl_ray.explain``, with the embedded store of ``$MEGL_HOME`` served again when the URIs point
    into it (the default run's, after it ended)."""
    with embedded_store_for(options.checkpoint, options.data, options.out, *options.images):
        return explain(options)
