"""``megl_ray.evaluation.inference``: LoRA adapters merged for inference give the unmerged model's outputs; bf16 VLM
weights
with an fp32 classifier where asked; a model that never emits EOS generates exactly ``model.max_text_tokens``
tokens when no ``max_new_tokens`` is given."""

import numpy as np
import pytest
import torch
from peft.tuners.lora import LoraLayer

from megl_ray.config import config_from_dict
from megl_ray.data.reader import bundled_dataset_uri, read_split
from megl_ray.data.schema import load_dataset_info
from megl_ray.evaluation.inference import load_for_inference, resolve_dtype, run_batch
from megl_ray.model import build_megl_model
from megl_ray.model.export_io import load_export, save_export
from megl_ray.model.precision import is_norm


@pytest.fixture(scope="module")
def rows():
    uri = bundled_dataset_uri()
    info = load_dataset_info(uri)
    return info, read_split(uri, "val", info).slice(0, 3).to_pydict()


def _export(tmp_path, info, overrides):
    """A freshly built (untrained) tiny model saved as an export; LoRA B factors made non-zero so merging matters."""
    torch.manual_seed(0)
    cfg = config_from_dict({}, overrides)
    corpus = [*info.classes, "a bird with a red crown and black wings", "the beak is short and the tail is long"]
    model = build_megl_model(cfg, len(info.classes), corpus=corpus)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    return save_export(model, cfg, list(info.classes), str(tmp_path / "export"))


def test_lora_is_merged_and_changes_no_output(rows, tmp_path):
    info, columns = rows
    uri = _export(tmp_path, info, ["model.lora_r=4", "model.max_text_tokens=6"])
    plain = load_export(uri)
    merged, placement = load_for_inference(uri, "cpu", "fp32")
    assert placement.lora_merged == 8 and placement.device == "cpu" and placement.dtype == "float32"  # 2 layers × qkvo
    assert not any(isinstance(m, LoraLayer) and not m.merged for m in merged.model.modules())
    a = run_batch(plain, columns, info.mask_size, 1)
    b = run_batch(merged, columns, info.mask_size, 1)
    np.testing.assert_allclose(a["probs"], b["probs"])
    assert list(a["generated"]) == list(b["generated"])
    # the merge really folded the adapters in: the base weight moved by B·A·scale
    name = next(n for n, m in plain.model.named_modules() if isinstance(m, LoraLayer))
    before, after = (_base_weight(dict(e.model.named_modules())[name]) for e in (plain, merged))
    assert not torch.allclose(before, after)


def _base_weight(module):
    return module.get_base_layer().weight if isinstance(module, LoraLayer) else module.weight


def test_bf16_vlm_with_fp32_classifier(rows, tmp_path):
    info, columns = rows
    uri = _export(tmp_path, info, ["model.max_text_tokens=6"])
    exported, placement = load_for_inference(uri, "cpu", "bf16")
    assert placement.dtype == "bfloat16"
    dtypes = {name: p.dtype for name, p in exported.model.vlm.named_parameters()}
    norms = {n for n, m in exported.model.vlm.named_modules() if is_norm(m)}
    assert norms and {d for n, d in dtypes.items() if n.rsplit(".", 1)[0] in norms} == {torch.float32}  # as trained
    assert {d for n, d in dtypes.items() if n.rsplit(".", 1)[0] not in norms} == {torch.bfloat16}
    assert {p.dtype for p in exported.model.classifier.parameters()} == {torch.float32}
    out = run_batch(exported, columns, info.mask_size, 1)
    assert out["probs"].dtype == np.float32 and len(out["generated"]) == 3
    assert resolve_dtype("auto", "cpu") == torch.float32 and resolve_dtype("auto", "cuda") == torch.bfloat16


class _NoSpecialTokens(torch.nn.Module):
    """An LM head whose special-token logits (EOS, pad, ...) are −inf: the model never stops by itself."""

    def __init__(self, head, banned):
        super().__init__()
        self.head, self.banned = head, banned

    def forward(self, hidden):
        logits = self.head(hidden)
        logits[..., self.banned] = float("-inf")
        return logits


@pytest.mark.parametrize("num_beams", [1, 2])
def test_rationales_reach_the_trained_max_text_tokens_without_eos(rows, tmp_path, num_beams):
    info, columns = rows
    n = 34  # above the old fixed default of 32
    uri = _export(tmp_path, info, [f"model.max_text_tokens={n}"])
    exported, _ = load_for_inference(uri, "cpu", "fp32")
    vlm, tok = exported.model.vlm, exported.model.tokenizer
    vlm.lm_head = _NoSpecialTokens(vlm.lm_head, sorted(set(tok.all_special_ids)))
    lengths, generate = [], vlm.generate

    def recording(*args, **kwargs):
        out = generate(*args, **kwargs)
        lengths.append(out.shape[1])  # from inputs_embeds alone, transformers returns only the new tokens
        return out

    vlm.generate = recording
    out = run_batch(exported, columns, info.mask_size, num_beams)  # no max_new_tokens: the trained length
    assert lengths == [n] and all(len(tok(g)["input_ids"]) > 0 for g in out["generated"])
    run_batch(exported, columns, info.mask_size, num_beams, max_new_tokens=5)
    assert lengths == [n, 5]
