"""Per-sample transforms from stored rows to model inputs. No Ray: the Ray Data pipeline maps these over batches,
and tests and single-process code call them directly.

The model consumes one batch dict (see ``collate``):
    pixels        float32 (B, 3, S, S) in [0, 1]  (S: the model's pixel_size; the model resizes down and normalises
                                                   per consumer: classifier and CLIP differ)
    labels        int64 (B,)
    masks         float32 (B, M, M) in [0, 1]     (zeros where has_mask is False)
    has_mask      bool (B,)
    input_ids     int64 (B, T)   prompt (with image tokens) + rationale + EOS, right-padded
    attention_mask int64 (B, T)
    text_labels   int64 (B, T)   −100 on prompt, image and padding tokens: only the rationale is learned
    sample_weight float32 (B,)   1, or 0 for rows that only pad a worker's shard to equal length

Stored rows go through two steps: ``preprocess_rows`` (decode, resize, tokenise every rationale; epoch-independent
and heavy, so the Ray Data pipeline runs it in ``map_batches``) and ``model_batch`` (draw this epoch's rationale,
build the token sequences; cheap, on the training worker).
"""

from __future__ import annotations

import io
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from megl_ray.data.prompt import (  # noqa: F401 - the text side's names, importable from here as before
    DEFAULT_CONTEXT,
    IGNORE_INDEX,
    IMAGE_TOKEN,
    encode_example,
    encode_prompt,
    encode_rationale,
    format_prompt,
    pad_sequences,
    prompt_context,
)
from megl_ray.data.schema import mask_from_bytes

_HIGH_DEPTH = {"I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I;16N": 65535.0, "I": 65535.0, "F": 1.0}
"""Greyscale modes of more than 8 bits and the value that means white (16-bit PNGs open as I;16 or I; float
TIFFs as F, in [0, 1]). PIL's own ``convert("RGB")`` clips them at 255 instead of scaling them."""


def to_rgb(img: Image.Image) -> Image.Image:
    """An opened image as 8-bit RGB, with 16-bit, 32-bit and float greyscale scaled rather than clipped."""
    if img.mode in _HIGH_DEPTH:
        values = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0)
        white = _HIGH_DEPTH[img.mode]
        if values.max(initial=0.0) > white:  # out of the mode's usual range (a 32-bit or unnormalised float image)
            white = float(values.max())
        img = Image.fromarray(np.rint(np.clip(values / white, 0.0, 1.0) * 255.0).astype(np.uint8), "L")
    return img.convert("RGB")


PAD_RGB = (122, 116, 104)
"""The background of LLaVA-1.5's ``expand2square``: ``int(255 × CLIP image mean)`` per channel."""


def expand_to_square(img: Image.Image, fill: tuple[int, int, int] = PAD_RGB) -> Image.Image:
    """LLaVA-1.5's pad-to-square: the image centred on a square canvas of ``fill`` (offset floor((long-short)/2))."""
    width, height = img.size
    if width == height:
        return img
    side = max(width, height)
    canvas = Image.new(img.mode, (side, side), fill)
    canvas.paste(img, ((side - width) // 2, (side - height) // 2))
    return canvas


def decode_image_sized(data: bytes, size: int, aspect: str = "squash") -> tuple[np.ndarray, tuple[int, int]]:
    """(``decode_image``'s pixels, the image's original (width, height)): pad mode needs the latter for the mask."""
    with Image.open(io.BytesIO(data)) as img:
        img = to_rgb(img)
        original = img.size
        if aspect == "pad":
            img = expand_to_square(img)
        elif aspect != "squash":
            raise ValueError(f"image aspect must be 'squash' or 'pad', got {aspect!r}")
        if img.size != (size, size):
            img = img.resize((size, size), Image.BILINEAR)
        return np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0, original


def decode_image(data: bytes, size: int, aspect: str = "squash") -> np.ndarray:
    """Encoded image bytes → float32 (3, size, size) in [0, 1] (RGB, bilinear resize; ``aspect`` ``squash``
    stretches a non-square image, ``pad`` pads it to a square first, see ``expand_to_square``)."""
    return decode_image_sized(data, size, aspect)[0]


def pad_mask(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    """A stored (M, M) uint8 mask — area-resized from a width × height image, i.e. squashed — moved into the frame
    of ``expand_to_square``: shrunk along the short side and centred on zeros, so it stays on the padded pixels."""
    if width == height:
        return mask
    m, side = mask.shape[0], max(width, height)
    inner = (max(1, round(m * width / side)), max(1, round(m * height / side)))
    offset = (round(m * ((side - width) // 2) / side), round(m * ((side - height) // 2) / side))
    out = Image.new("L", (m, m), 0)
    out.paste(Image.fromarray(mask, "L").resize(inner, Image.BOX), offset)
    return np.asarray(out, dtype=np.uint8)


def decode_mask(data: bytes | None, mask_size: int) -> np.ndarray:
    """Stored mask bytes (uint8, mask_size², row-major) → float32 (mask_size, mask_size) in [0, 1]; zeros if None."""
    if data is None:
        return np.zeros((mask_size, mask_size), dtype=np.float32)
    return mask_from_bytes(data, mask_size).astype(np.float32) / 255.0


def tokenize_rationales(
    tokenizer: Any, rationales: Sequence[str], max_rationales: int, max_text_tokens: int, context: str = DEFAULT_CONTEXT
) -> tuple[np.ndarray, int]:
    """All of an image's rationales as ids, (max_rationales, max_text_tokens) int32 padded with −1, plus how many
    there are. Tokenising every rationale up front lets the trainer draw a different one each epoch for free."""
    out = np.full((max_rationales, max_text_tokens), -1, dtype=np.int32)
    kept = [r for r in rationales][:max_rationales]
    for i, text in enumerate(kept):
        ids = encode_rationale(tokenizer, text, context)[: max_text_tokens - 1]
        ids.append(tokenizer.eos_token_id)
        out[i, : len(ids)] = ids
    return out, len(kept)


def preprocess_rows(
    rows: dict[str, Any],
    tokenizer: Any,
    image_size: int,
    mask_size: int,
    max_rationales: int,
    max_text_tokens: int,
    aspect: str = "squash",
) -> dict[str, np.ndarray]:
    """The heavy, epoch-independent part, on a columnar batch of stored rows (``schema.PARQUET_SCHEMA`` columns):
    decode and resize images (kept uint8 to move 4× fewer bytes), decode masks, tokenise rationales. This is what
    the Ray Data pipeline runs in ``map_batches``; the single-process reader calls it directly. ``image_size`` is
    the decode side, the model's ``pixel_size`` (the larger of the classifier's and the vision tower's sides);
    ``aspect`` is ``model.image_aspect``."""
    n = len(rows["id"])
    pixels = np.empty((n, 3, image_size, image_size), dtype=np.uint8)
    masks = np.zeros((n, mask_size, mask_size), dtype=np.uint8)
    rationale_ids = np.empty((n, max_rationales, max_text_tokens), dtype=np.int32)
    counts = np.empty(n, dtype=np.int32)
    for i in range(n):
        decoded, (width, height) = decode_image_sized(rows["image"][i], image_size, aspect)
        pixels[i] = np.rint(decoded * 255.0).astype(np.uint8)
        if rows["has_mask"][i]:
            masks[i] = mask_from_bytes(rows["mask"][i], mask_size)
            if aspect == "pad":
                masks[i] = pad_mask(masks[i], width, height)
        rationale_ids[i], counts[i] = tokenize_rationales(
            tokenizer, list(rows["rationales"][i]), max_rationales, max_text_tokens
        )
    return {
        "id": np.asarray(rows["id"], dtype=object),
        "class_name": np.asarray(rows["class_name"], dtype=object),
        "label": np.asarray(rows["class_id"], dtype=np.int64),
        "has_mask": np.asarray(rows["has_mask"], dtype=bool),
        "pixels": pixels,
        "mask": masks,
        "rationale_ids": rationale_ids,
        "rationale_count": counts,
        "weight": np.asarray(rows.get("weight", np.ones(n)), dtype=np.float32),
    }


def rationale_index(sample_id: str, count: int, epoch: int, seed: int) -> int:
    """Which of an image's ``count`` rationales to train on this epoch: reproducible from (seed, epoch, id),
    whichever worker sees the image and in whatever order."""
    if count <= 1:
        return 0
    return random.Random(f"{seed}:{epoch}:{sample_id}").randrange(count)


def model_batch(
    pre: dict[str, Any], tokenizer: Any, template: str, num_image_tokens: int, epoch: int, seed: int
) -> dict[str, torch.Tensor]:
    """A preprocessed batch (``preprocess_rows``) → the model's batch dict, drawing one rationale per image."""
    prompts: dict[str, list[int]] = {}
    input_ids, text_labels = [], []
    for i, sample_id in enumerate(pre["id"]):
        name = str(pre["class_name"][i])
        if name not in prompts:
            prompts[name] = encode_prompt(tokenizer, template, name, num_image_tokens)
        k = rationale_index(str(sample_id), int(pre["rationale_count"][i]), epoch, seed)
        answer = [int(t) for t in pre["rationale_ids"][i][k] if t >= 0]
        input_ids.append(prompts[name] + answer)
        text_labels.append([IGNORE_INDEX] * len(prompts[name]) + answer)
    return {
        "pixels": torch.tensor(np.asarray(pre["pixels"])).float().div_(255.0),
        "labels": torch.tensor(np.asarray(pre["label"], dtype=np.int64)),  # a copy: Arrow's buffers are read-only
        "masks": torch.tensor(np.asarray(pre["mask"])).float().div_(255.0),
        "has_mask": torch.tensor(np.asarray(pre["has_mask"], dtype=bool)),
        "input_ids": pad_sequences(input_ids, tokenizer.pad_token_id),
        "attention_mask": pad_sequences([[1] * len(x) for x in input_ids], 0),
        "text_labels": pad_sequences(text_labels, IGNORE_INDEX),
        "sample_weight": torch.tensor(np.asarray(pre["weight"], dtype=np.float32)),
    }


def collate(
    examples: Sequence[dict[str, Any]], tokenizer: Any, template: str, num_image_tokens: int, max_text_tokens: int
) -> dict[str, torch.Tensor]:
    """In-memory examples with ``pixels`` (3,S,S) float, ``label``, ``label_name``, ``mask`` (M,M) float,
    ``has_mask`` and one ``rationale`` text → the model's batch dict (for tests and notebooks; stored datasets go
    through ``preprocess_rows`` and ``model_batch``)."""
    encoded = [
        encode_example(tokenizer, template, ex["label_name"], ex["rationale"], num_image_tokens, max_text_tokens)
        for ex in examples
    ]
    input_ids = pad_sequences([e["input_ids"] for e in encoded], tokenizer.pad_token_id)
    text_labels = pad_sequences([e["text_labels"] for e in encoded], IGNORE_INDEX)
    attention_mask = pad_sequences([[1] * len(e["input_ids"]) for e in encoded], 0)
    return {
        "pixels": torch.as_tensor(np.stack([np.asarray(ex["pixels"], dtype=np.float32) for ex in examples])),
        "labels": torch.tensor([int(ex["label"]) for ex in examples], dtype=torch.long),
        "masks": torch.as_tensor(np.stack([np.asarray(ex["mask"], dtype=np.float32) for ex in examples])),
        "has_mask": torch.tensor([bool(ex["has_mask"]) for ex in examples], dtype=torch.bool),
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "text_labels": text_labels,
    }
