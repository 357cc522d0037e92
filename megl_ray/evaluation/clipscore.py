"""CLIPScore of a generated rationale against its image, as the MEGL paper reports it (Hessel et al. 2021):

    CLIP-S(c, v) = w · max(cos(E_v, E_c), 0),   w = 2.5

with E_v, E_c the projected CLIP image and text embeddings (transformers ``CLIPModel``). The corpus score is the
mean of the per-image values. torchmetrics' ``CLIPScore`` is not used: it scales by 100 rather than 2.5 and clips
the corpus mean rather than each image's score, so its number is not the paper's.

The CLIP checkpoint is whatever the user points ``--clip-path`` at (a local or ``s3://`` directory holding a
``CLIPModel``, its tokenizer and its image-processor config, e.g. a copy of ``openai/clip-vit-base-patch32``, the
model Hessel et al. use): nothing is fetched from a model hub. No candidate prefix ("A photo depicts") is added.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel
from transformers.utils import logging as hf_logging

from megl_ray.errors import UserError
from megl_ray.model.checkpoint_io import local_dir

CLIP_SCORE_WEIGHT = 2.5
"""w of Hessel et al.: rescales cosines, which rarely exceed 0.4 for CLIP, to roughly [0, 1]."""


def _embedding(output: Any) -> torch.Tensor:
    """``get_*_features`` return a tensor in transformers 4 and a ``BaseModelOutputWithPooling`` (its
    ``pooler_output`` the projected embedding) in transformers 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class CLIPScorer:
    """A CLIP model, tokenizer and image processor loaded once from ``path``; ``score`` gives per-pair CLIP-S."""

    def __init__(self, path: str, device: str | torch.device = "cpu"):
        hf_logging.disable_progress_bar()
        root = str(local_dir(path))
        try:
            # float64 on CPU: a CPU's float32 convolutions sum in an order that depends on the thread count, and a
            # Ray actor (1 CPU) must score exactly as this process does; float32 on GPUs, where float64 is slow
            self.dtype = torch.float64 if torch.device(device).type == "cpu" else torch.float32
            self.model = CLIPModel.from_pretrained(root, dtype=self.dtype).to(device).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(root)
            self.image_processor = AutoImageProcessor.from_pretrained(root)
        except (OSError, ValueError, TypeError) as err:
            raise UserError(
                f"--clip-path: cannot load a CLIP model, tokenizer and image processor from {path}: "
                f"{str(err).splitlines()[0]}"
            ) from None
        self.device = torch.device(device)
        self.max_length = int(self.model.config.text_config.max_position_embeddings)

    @torch.no_grad()
    def embed_images(self, images: Sequence[Any]) -> torch.Tensor:
        """L2-normalised image embeddings (N, D) of PIL images."""
        pixels = self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        emb = _embedding(self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype))).double()
        return emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings (N, D); texts longer than CLIP's context are truncated, as in Hessel's."""
        tok = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        emb = _embedding(
            self.model.get_text_features(
                input_ids=tok["input_ids"].to(self.device), attention_mask=tok["attention_mask"].to(self.device)
            )
        ).double()
        return emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def score(self, images: Sequence[Any], texts: Sequence[str]) -> np.ndarray:
        """CLIP-S of each (image, text) pair: w · max(cos, 0), float64 (N,), rounded to 1e-9 so that the last bits
        of a reduction's order do not make two runs' corpus means differ."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        scores = np.zeros(len(texts), dtype=np.float64)
        # An empty rationale (a model that emits EOS at once) describes nothing: it scores 0, and is kept out of the
        # batch, since a batch of empty strings tokenises to (N, 0) ids, which CLIP's text tower cannot embed.
        kept = [i for i, text in enumerate(texts) if text.strip()]
        if kept:
            cos = (self.embed_images([images[i] for i in kept]) * self.embed_texts([texts[i] for i in kept])).sum(
                dim=-1
            )
            scores[kept] = np.round((CLIP_SCORE_WEIGHT * cos.clamp_min(0.0)).cpu().numpy(), 9)
        return scores

    def score_bytes(self, encoded: Sequence[bytes], texts: Sequence[str]) -> np.ndarray:
        """``score`` for encoded images (the dataset's stored bytes, at their own resolution)."""
        images = []
        for data in encoded:
            with Image.open(io.BytesIO(data)) as img:
                images.append(img.convert("RGB"))
        return self.score(images, texts)


NO_CLIP_REASON = (
    "no --clip-path given: CLIPScore needs a CLIP checkpoint directory (e.g. a local copy of "
    "openai/clip-vit-base-patch32); nothing is downloaded"
)


def corpus_clip_score(per_image: np.ndarray | None) -> float | None:
    """The corpus CLIP-S: the mean of the per-image scores (None when none were computed)."""
    if per_image is None or len(per_image) == 0:
        return None
    return float(np.mean(np.asarray(per_image, dtype=np.float64)))
