"""The MEGL model: classifier f → saliency Â → SDTG vision-language model, and the whole objective in ``forward``.

The loss is computed inside ``forward`` on purpose: DeepSpeed engines wrap ``forward``, and an autograd Grad-CAM
(double backward) only works under ZeRO-2 when it runs inside the module's forward. One backward then covers all
terms.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from megl_ray.config import LossConfig, MEGLConfig, ModelConfig
from megl_ray.data.prompt import encode_prompt, pad_sequences
from megl_ray.model import losses
from megl_ray.model.classifier import Classifier, build_classifier, fit_pixels
from megl_ray.model.counterfactual import (
    COUNTERFACTUAL_VIEWS,
    BackgroundBank,
    background_images,
    counterfactual_images,
    explained_region,
)
from megl_ray.model.precision import autocast_dtype, prepare_model
from megl_ray.model.saliency import gradcam, upsample
from megl_ray.model.vlm import CLIP_MEAN, CLIP_STD, VLMBundle, build_vlm


@dataclass
class MEGLOutput:
    loss: torch.Tensor
    """The batch mean of the per-sample MEGL objective (what is back-propagated)."""
    logits: torch.Tensor
    saliency: torch.Tensor
    """Â, (B, h, w) in [0, 1]."""
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    """Detached batch means for logging: ce, text, visual (over samples with a mask), dc (over samples without);
    NaN where no sample of the batch has the term."""
    text_logits: torch.Tensor | None = None
    """Full-sequence LM logits, only with ``forward(full_logits=True)``."""
    text: torch.Tensor | None = None
    """Per-sample L_text (B,), differentiable; None when the text term is off."""


class SDTGFusion(nn.Module):
    """W_I: projects the classifier's spatial features Z_I onto the LM's image-token grid and hidden size.

    Zero-initialised, so that at step 0 the image tokens are exactly W_A·CLIP(I ⊙ Â) and a pretrained LLaVA starts
    from the behaviour it was trained for; W_I still receives gradients (its input is non-zero) and grows as useful.
    """

    def __init__(self, feature_channels: int, hidden_size: int, grid: int):
        super().__init__()
        self.grid = grid
        self.proj = nn.Linear(feature_channels, hidden_size)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.shape[-1] != self.grid or features.shape[-2] != self.grid:
            features = F.interpolate(features, size=(self.grid, self.grid), mode="bilinear", align_corners=False)
        return self.proj(features.flatten(2).transpose(1, 2))  # (B, grid², hidden)


class MEGLModel(nn.Module):
    """Classifier + saliency + SDTG VLM with the MEGL objective."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        loss_cfg: LossConfig,
        classifier: Classifier,
        vlm: VLMBundle,
        prior: torch.Tensor | None = None,
    ):
        super().__init__()
        self.cfg = model_cfg
        self.loss_cfg = loss_cfg
        self.classifier = classifier
        self.vlm = vlm.model
        self.tokenizer = vlm.tokenizer
        self.image_token_id = vlm.image_token_id
        self.num_image_tokens = vlm.num_image_tokens
        self.vision_image_size = vlm.vision_image_size
        # The side the data is decoded at (``vlm.pixel_size`` from the config alone): each consumer resizes down.
        self.pixel_size = max(model_cfg.image_size, vlm.vision_image_size)
        grid = int(round(vlm.num_image_tokens**0.5))
        if grid * grid != vlm.num_image_tokens:
            raise ValueError(f"SDTG needs a square image-token grid, got {vlm.num_image_tokens} tokens")
        hidden = vlm.model.config.text_config.hidden_size
        self.fusion = SDTGFusion(classifier.channels, hidden, grid) if model_cfg.sdtg else None
        self.register_buffer("clip_mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("clip_std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)
        # Ā: the dataset's mean normalised ground-truth map. Uniform until the data pipeline provides one.
        self.register_buffer("prior", prior.float().clone() if prior is not None else torch.ones(8, 8))
        self.generate_defaults: dict[str, Any] = {}
        """Keyword arguments every ``generate`` passes to transformers' (the caller's win)."""
        self.background_bank = BackgroundBank()  # loss.counterfactual_weight's donors

    def set_prior(self, prior: torch.Tensor) -> None:
        self.prior = prior.to(self.prior.device, torch.float32).clone()

    # -- pieces --------------------------------------------------------------------------------------------------

    def image_tokens(self, pixels: torch.Tensor, saliency: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """V = W_A·CLIP(I ⊙ Â) + W_I·Z_I with SDTG; the plain LLaVA image tokens W_A·CLIP(I) without. I ⊙ Â is
        taken at the pixels' own side (``pixel_size``, never below the tower's), Â upsampled to it, and the product
        resized down to the tower's side when larger."""
        image = pixels * upsample(saliency, tuple(pixels.shape[-2:])) if self.fusion is not None else pixels
        if image.shape[-1] != self.vision_image_size:
            image = F.interpolate(
                image,
                size=(self.vision_image_size, self.vision_image_size),
                mode="bilinear",
                align_corners=False,
                antialias=True,
            )
        image = (image - self.clip_mean) / self.clip_std
        dtype = self.vlm.model.vision_tower.dtype if hasattr(self.vlm.model.vision_tower, "dtype") else image.dtype
        projected = self.vlm.model.get_image_features(pixel_values=image.to(dtype)).pooler_output
        tokens = torch.stack(list(projected)) if isinstance(projected, (list, tuple)) else projected
        if self.fusion is not None:
            z = features.detach() if self.cfg.detach_classifier_features else features
            tokens = tokens + self.fusion(z.to(tokens.dtype))
        return tokens

    def text_embeddings(self, input_ids: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """Token embeddings with the image-token positions replaced by ``image_tokens`` (B, N, hidden)."""
        embeds = self.vlm.get_input_embeddings()(input_ids)
        is_image = input_ids == self.image_token_id
        counts = is_image.sum(dim=1)
        # Checked on the device (raised at once on a CPU): a host read here would stall every micro-step on a GPU.
        # The data pipeline builds every sequence with them; this guards that contract, not user input.
        torch._assert_async(
            (counts == self.num_image_tokens).all(),
            f"every sequence needs exactly {self.num_image_tokens} image tokens",
        )
        return embeds.masked_scatter(is_image.unsqueeze(-1), image_tokens.to(embeds.dtype))

    def classify_with_saliency(self, pixels: torch.Tensor, target: torch.Tensor | str):
        """(classifier output, Â of ``target`` classes or of the "prediction"). Closed-form CAM inside the head
        when it has one (ZeRO-3 safe); otherwise autograd Grad-CAM, differentiable while training. The classifier
        reads the pixels resized to ``model.image_size``."""
        out = self.classifier(fit_pixels(pixels, self.cfg.image_size), cam_target=target)
        if out.cam is not None:
            return out, out.cam
        classes = out.logits.argmax(dim=1) if isinstance(target, str) else target
        return out, gradcam(out.features, out.logits, classes, None, create_graph=self.training)

    def rationale_text_loss(
        self,
        embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        text_labels: torch.Tensor,
        positions: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Per-sample L_text with the LM head applied only at the positions that predict a rationale token: the
        full (B, T, vocab) fp32 logits — ~10 GB at batch 8 for Qwen2's 150k vocabulary — never exist.
        ``positions`` (rows, columns of ``losses.rationale_positions``) found on the host by the training loop: a
        boolean selection on the device would wait for the GPU to count them, every micro-step."""
        hidden = self.vlm.model(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
        if positions is None:
            positions = losses.rationale_indices(text_labels)
        logits = self.vlm.lm_head(hidden[:, :-1][positions])  # a module call: ZeRO-3 gathers lm_head's weight
        return losses.text_loss_at(logits, text_labels, positions)

    # -- the objective -------------------------------------------------------------------------------------------

    def forward(
        self,
        pixels: torch.Tensor,
        labels: torch.Tensor,
        masks: torch.Tensor | None = None,
        has_mask: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        text_labels: torch.Tensor | None = None,
        sample_weight: torch.Tensor | None = None,
        full_logits: bool = False,
        visual_scale: float = 1.0,
        text_rows: torch.Tensor | None = None,
        text_cols: torch.Tensor | None = None,
        **_: Any,
    ) -> MEGLOutput:
        """The MEGL objective. ``full_logits`` computes the LM's logits at every position (tests; training computes
        them at the rationale positions only). ``visual_scale`` multiplies λ_vis (the training loop's ramp,
        ``losses.visual_ramp``); the visual terms are computed and logged at 0 too (they are cheap beside the CAM),
        so their curves start at step 1. ``text_rows``/``text_cols``: the rationale positions, found on the host
        (``losses.rationale_indices``).

        No host read of a device value on the default path: L_visual and L_dc are computed for every sample and
        selected per sample (``megl_objective``'s ``torch.where``), not skipped after asking the GPU whether any
        sample has a mask; the logged terms are masked means (NaN where no sample has the term, which the log window
        counts as absent). The options ``loss.rrr_weight`` (a double backward) still ask."""
        w = self.loss_cfg
        visual_on = w.visual_weight > 0
        if has_mask is None:
            has_mask = torch.zeros_like(labels, dtype=torch.bool)
        rrr_on = (
            w.rrr_weight > 0
            and masks is not None
            and bool(has_mask.any())
            and self.training
            and torch.is_grad_enabled()
        )
        if rrr_on:  # the input gradient of the option loss.rrr_weight needs the pixels in the graph
            pixels = pixels.detach().requires_grad_(True)
        out, sal = self.classify_with_saliency(pixels, labels if self.cfg.cam_target == "label" else "prediction")
        ce = losses.classification_loss(out.logits, labels)

        visual = dc = text = text_logits = rrr = counterfactual = background = trusted = None
        if (w.counterfactual_weight > 0 or w.background_weight > 0) and self.training and pixels.shape[0] > 1:
            counterfactual, background, trusted = self._counterfactual_terms(pixels, sal, labels, masks, has_mask)
        if rrr_on:
            # Σ_k log p_k of the annotated samples only; samples are independent (per-sample norms), so the others
            # get a zero input gradient and no penalty.
            score = (F.log_softmax(out.logits.float(), dim=1).sum(dim=1) * has_mask).sum()
            (input_grad,) = torch.autograd.grad(score, pixels, create_graph=True)
            rrr = losses.input_gradient_penalty(input_grad, masks)
        if visual_on and masks is not None:
            visual = losses.visual_loss(sal, masks, w.visual_transform, w.gaussian_sigma)
        if visual_on and w.dc_weight > 0:
            dc = losses.distribution_consistency_loss(sal, self.prior, w.kl_eps)
        if w.text_weight > 0 and input_ids is not None:
            tokens = self.image_tokens(pixels, sal, out.features)
            embeds = self.text_embeddings(input_ids, tokens)
            if full_logits:
                text_logits = self.vlm(inputs_embeds=embeds, attention_mask=attention_mask).logits
                text = losses.text_loss(text_logits, text_labels)
            else:
                positions = (text_rows, text_cols) if text_rows is not None and text_cols is not None else None
                text = self.rationale_text_loss(embeds, attention_mask, text_labels, positions)

        loss = losses.megl_objective(
            ce, text, visual, dc, has_mask, w, sample_weight, rrr, counterfactual, visual_scale, background
        )
        terms = {"loss": loss.detach(), "ce": ce.detach().mean()}
        if text is not None:
            terms["text"] = text.detach().mean()
        if visual is not None:
            terms["visual"] = losses.masked_mean(visual.detach(), has_mask)
        if dc is not None:
            terms["dc"] = losses.masked_mean(dc.detach(), ~has_mask)
        if rrr is not None:
            terms["rrr"] = losses.masked_mean(rrr.detach(), has_mask)
        if counterfactual is not None:
            terms["cf"] = losses.masked_mean(counterfactual.detach(), trusted)
        if background is not None:
            terms["bg"] = losses.masked_mean(background.detach(), trusted)
        return MEGLOutput(loss=loss, logits=out.logits, saliency=sal, terms=terms, text_logits=text_logits, text=text)

    def _counterfactual_terms(
        self,
        pixels: torch.Tensor,
        sal: torch.Tensor,
        labels: torch.Tensor,
        masks: torch.Tensor | None,
        has_mask: torch.Tensor,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        """Per-sample L_cf and L_bg (0 for untrusted samples; None when the weight is 0) and the trusted mask.

        Donors are drawn from the bank of this rank's last trusted backgrounds (this micro-batch's included). With
        ``counterfactual_regions=masks`` trusted samples are few (10 % carry a map: one or two in a micro-batch of
        16), so each gets ``COUNTERFACTUAL_VIEWS`` counterfactuals; otherwise every sample is trusted, one view
        each. Only trusted samples go through the classifier: one host read of how many there are (an option's
        cost, not the default path's)."""
        w = self.loss_cfg
        trusted = has_mask | (w.counterfactual_regions != "masks")
        zero = torch.zeros_like(labels, dtype=torch.float32)
        counterfactual = zero if w.counterfactual_weight > 0 else None
        background = zero if w.background_weight > 0 else None
        index = trusted.nonzero().flatten()
        any_trusted = index.numel() > 0
        if not any_trusted:  # a stand-in, zeroed below: every rank runs the same forwards (ZeRO-3 gathers in them)
            index = torch.zeros(1, dtype=torch.long, device=labels.device)
        own = pixels.detach()[index]
        prior = self.prior if w.counterfactual_regions == "prior" else None
        region = explained_region(
            sal[index], None if masks is None else masks[index], has_mask[index], own.shape[-2:], prior
        )
        blanked = background_images(own, region)
        if any_trusted:
            self.background_bank.add(blanked)
        # several views where only the annotated few are trusted; one where every sample is
        views = COUNTERFACTUAL_VIEWS if w.counterfactual_regions == "masks" else 1
        images = []  # at the decoded size, then resized like f's input
        if w.counterfactual_weight > 0:
            n = own.shape[0] * views
            donors = self.background_bank.draw(n) if self.background_bank.items else blanked.repeat_interleave(views, 0)
            images.append(
                counterfactual_images(own.repeat_interleave(views, 0), region.repeat_interleave(views, 0), donors)
            )
        if w.background_weight > 0:
            images.append(blanked)
        logits = self.classifier(fit_pixels(torch.cat(images), self.cfg.image_size)).logits
        if counterfactual is not None:
            cf_logits = logits[: own.shape[0] * views]
            cf = losses.classification_loss(cf_logits, labels[index].repeat_interleave(views))
            counterfactual = torch.where(trusted, zero.index_put((index,), cf.view(-1, views).mean(dim=1)), zero)
        if background is not None:
            bg = zero.index_put((index,), losses.uniform_kl(logits[-own.shape[0] :]))
            background = torch.where(trusted, bg, zero)
        return counterfactual, background, trusted

    # -- inference -----------------------------------------------------------------------------------------------

    def _infer(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits, features, saliency of the predicted class), without building a graph for the parameters."""
        with torch.enable_grad() if self.classifier.cam_weight is None else torch.no_grad():
            # the autograd path needs d logits / d features even at inference
            out, sal = self.classify_with_saliency(pixels, "prediction")
        return out.logits.detach(), out.features.detach(), sal.detach()

    @torch.no_grad()
    def predict(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(class probabilities (B, K), saliency Â of the predicted class (B, h, w))."""
        logits, _, sal = self._infer(pixels)
        return logits.softmax(dim=1), sal

    @torch.no_grad()
    def generate(
        self,
        pixels: torch.Tensor,
        label_names: Sequence[str],
        max_new_tokens: int | None = None,
        num_beams: int = 1,
        **generate_kwargs: Any,
    ) -> list[str]:
        """Rationales for a batch: greedy (``num_beams=1``) or beam search, from the fused image embeddings. At
        most ``max_new_tokens`` tokens, by default the ``max_text_tokens`` rationales were trained with; further
        keyword arguments go to transformers' ``generate`` (e.g. ``min_new_tokens``), over ``generate_defaults``
        (``synced_gpus`` where every ZeRO-3 rank generates together)."""
        _, features, sal = self._infer(pixels)
        prompts = [
            encode_prompt(self.tokenizer, self.cfg.prompt_template, name, self.num_image_tokens) for name in label_names
        ]
        input_ids = pad_sequences(prompts, self.tokenizer.pad_token_id, side="left").to(pixels.device)
        attention_mask = pad_sequences([[1] * len(p) for p in prompts], 0, side="left").to(pixels.device)
        embeds = self.text_embeddings(input_ids, self.image_tokens(pixels, sal, features))
        generated = self.vlm.generate(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens or self.cfg.max_text_tokens,
            num_beams=num_beams,
            do_sample=False,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
            **{**self.generate_defaults, **generate_kwargs},
        )
        return [t.strip() for t in self.tokenizer.batch_decode(generated, skip_special_tokens=True)]


def build_megl_model(
    cfg: MEGLConfig,
    num_classes: int,
    corpus: Iterable[str] | None = None,
    tokenizer: Any = None,
    prior: torch.Tensor | None = None,
    vlm: VLMBundle | None = None,
) -> MEGLModel:
    """The configured MEGL model. ``corpus`` (rationales, class names) trains the tiny preset's tokenizer; ``vlm``
    replaces the preset's VLM (a standalone export's, or a bench's shapes)."""
    m = cfg.model
    classifier = build_classifier(
        m.classifier,
        num_classes,
        image_size=m.image_size,
        head=m.classifier_head,
        vit_pool=m.vit_pool,
        weights=m.classifier_weights,
    )
    if m.freeze_norm or (m.freeze_norm is None and m.classifier_weights and m.classifier.startswith("resnet")):
        classifier.freeze_norm()
    if m.sync_bn:
        classifier = nn.SyncBatchNorm.convert_sync_batchnorm(classifier)
    classifier.set_gradient_checkpointing(m.gradient_checkpointing)
    half = autocast_dtype(cfg.train.precision)
    vlm = vlm if vlm is not None else build_vlm(m, corpus, tokenizer, dtype=half or torch.float32)
    model = MEGLModel(m, cfg.loss, classifier, vlm, prior)
    if half is not None:  # trainable weights fp32 (the master copy), frozen ones 16-bit, norms fp32
        prepare_model(model, cfg.train.precision)
    return model
