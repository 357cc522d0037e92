"""Optimiser and learning-rate schedule built from the config (shared by every trainer; no Ray)."""

from __future__ import annotations

import math

import torch
from torch import nn

from megl_ray.config import OptimConfig


def param_groups(
    model: nn.Module, weight_decay: float, lr: float | None = None, classifier_lr: float | None = None
) -> list[dict]:
    """Trainable parameters in groups: matrices decay, biases and norm gains do not (the usual AdamW split); with
    ``classifier_lr`` the classifier's parameters (names ``classifier.*``) get their own pair of groups at that rate
    (the schedule scales every group's rate alike)."""
    split = classifier_lr is not None and classifier_lr != lr
    groups: dict[tuple[bool, bool], list] = {(False, True): [], (False, False): []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        key = (split and name.startswith("classifier."), param.dim() >= 2)
        groups.setdefault(key, []).append(param)
    out = []
    for (is_classifier, decays), params in groups.items():  # decay, no decay, then the classifier's
        # named for the logs (``lr/<name>``): torch keeps extra keys in a group
        name = ("classifier_" if is_classifier else "") + ("decay" if decays else "no_decay")
        group = {"params": params, "weight_decay": weight_decay if decays else 0.0, "name": name}
        if is_classifier:
            group["lr"] = classifier_lr
        out.append(group)
    return out


def build_optimizer(model: nn.Module, cfg: OptimConfig, offload: bool = False) -> torch.optim.Optimizer:
    """AdamW over ``param_groups``. With ``offload`` (``train.offload=cpu``) it is DeepSpeed's ``DeepSpeedCPUAdam``:
    ZeRO-Offload steps the optimizer on the host, where torch's AdamW is a slow loop over tensors, and DeepSpeed
    refuses a client optimizer there (``zero_force_ds_cpu_optimizer``). The same update rule (AdamW, decoupled
    weight decay, bias correction); its C++ kernel is compiled by DeepSpeed on first use (~45 s, kept in
    ``$TORCH_EXTENSIONS_DIR``; the Docker image builds it in advance)."""
    groups = param_groups(model, cfg.weight_decay, cfg.lr, cfg.classifier_lr)
    if offload:
        # Lazy: DeepSpeed chooses its accelerator when imported, and the single-process trainer never needs it.
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # noqa: PLC0415

        return DeepSpeedCPUAdam(groups, lr=cfg.lr, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0.1 at ``total_steps`` (never to 0: the last steps still learn)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, cfg.warmup_steps))


def plain_step(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, batch: dict, grad_clip: float):
    """One optimizer step without DeepSpeed (forward, backward, clip, step, schedule): the update rule that the
    generated DeepSpeed config reproduces. Returns the model's output."""
    out = model(**batch)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()
    return out
