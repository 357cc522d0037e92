"""What the training path reads back from the device: nothing per micro-step on the default objective, one value
per optimizer step (the divergence guard), the loss terms only at a log step.

On a GPU each such read (``float()``/``bool()``/``.item()`` of a device tensor, a boolean selection, ``nonzero``)
stalls the host until the queued kernels finish. On the CPU they are free, so the tests record them as the aten ops
that perform them, under a ``TorchDispatchMode``; a boolean-indexed selection counts, an integer-indexed one does
not (its shape is known without the device)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megl_ray.config import load_config, packaged_config
from megl_ray.model import build_megl_model
from megl_ray.model.losses import masked_mean
from megl_ray.reporting.log_window import LogWindow
from megl_ray.training.guards import DivergenceGuard
from megl_ray.training.host_batch import ready_on_host, right_padded
from tests.support.toy import corpus, make_batch

READS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default"}


class HostReads(TorchDispatchMode):
    """Records every op that needs a device value on the host."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        boolean_index = name == "aten.index.Tensor" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]
        )
        if name in READS or boolean_index:
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


def _model_and_batch(*overrides):
    torch.manual_seed(0)
    cfg = load_config(packaged_config("tiny"), ["loss.text_weight=1", "loss.dc_weight=0.5", *overrides])
    model = build_megl_model(cfg, num_classes=4, corpus=corpus())
    model.train()
    return model, make_batch(model, cfg, n=4, mask_every=2)


def test_a_training_micro_step_reads_nothing_back_once_its_batch_is_readied_on_the_host():
    model, batch = _model_and_batch()
    batch = ready_on_host(batch)  # what the training loop does before moving the batch
    assert "text_rows" in batch and "attention_mask" not in batch  # the toy batch is right-padded, as training's
    window = LogWindow(torch.device("cpu"))
    with HostReads() as recorded:
        out = model(**batch)
        out.loss.backward()
        window.add(out.terms, 4, 40)
    assert recorded.reads == [], recorded.reads
    assert {"loss", "ce", "text", "visual", "dc"} <= set(out.terms)


def test_the_batch_as_it_comes_makes_the_step_read_back_and_the_recorder_sees_it():
    model, batch = _model_and_batch()  # evaluation's path: no positions, the attention mask given
    with HostReads() as recorded:
        model(**batch)
    # the rationale positions counted on the device, and transformers' check of the padding mask (this test would
    # fail blind otherwise)
    assert "aten.nonzero.default" in recorded.reads and "aten._local_scalar_dense.default" in recorded.reads


def test_the_objective_and_its_terms_are_the_same_for_the_batch_readied_on_the_host():
    model, batch = _model_and_batch()
    assert (batch["attention_mask"] == 0).any()  # padded: dropping the mask changes what the padding sees
    plain = model(**batch)
    hosted = model(**ready_on_host(batch))
    torch.testing.assert_close(hosted.loss, plain.loss, rtol=1e-6, atol=1e-7)
    for name, value in plain.terms.items():
        torch.testing.assert_close(hosted.terms[name], value, rtol=1e-6, atol=1e-7, equal_nan=True)


def test_right_padding_is_told_apart_from_left_padding_and_holes():
    assert right_padded(torch.tensor([[1, 1, 0], [1, 1, 1]]))
    assert not right_padded(torch.tensor([[0, 1, 1], [1, 1, 1]]))  # left padding (generation's) keeps its mask
    assert not right_padded(torch.tensor([[1, 0, 1]]))
    kept = ready_on_host({"attention_mask": torch.tensor([[0, 1, 1]])})
    assert "attention_mask" in kept


def test_a_batch_without_masks_logs_no_visual_term_and_the_window_counts_it_absent():
    model, batch = _model_and_batch()
    batch["has_mask"][:] = False
    out = model(**batch)
    assert math.isnan(out.terms["visual"]) and math.isfinite(out.terms["dc"])
    window = LogWindow(torch.device("cpu"))
    window.add(out.terms, 4, 40)
    window.add({**out.terms, "visual": torch.tensor(0.25, dtype=torch.float64)}, 4, 40)
    stats = window.reduce((0.0, 0.0))
    assert stats.terms["visual"] == pytest.approx(0.25)  # the mean over the micro-batch that had it
    assert stats.terms["dc"] == pytest.approx(float(out.terms["dc"]))


def test_masked_mean_by_hand():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert masked_mean(values, torch.tensor([True, False, True, False])).item() == pytest.approx(2.0)
    assert math.isnan(masked_mean(values, torch.zeros(4, dtype=torch.bool)).item())


def test_the_divergence_guard_reads_one_value_per_optimizer_step_and_still_counts_in_a_row():
    guard = DivergenceGuard(patience=2)
    verdicts = []
    for step, value in enumerate([1.0, float("nan"), 2.0, float("inf"), float("nan")], start=1):
        with HostReads() as recorded:
            verdicts.append(guard.update(torch.tensor(value), step))
        assert recorded.reads.count("aten._local_scalar_dense.default") <= 1 + verdicts[-1], recorded.reads
    assert verdicts == [False, False, False, False, True]  # two non-finite steps in a row, not two in all
    assert "not finite" in guard.message and "step 5" in guard.message
