import io

import numpy as np
import torch
from PIL import Image

from megl_ray.data.transforms import (
    IGNORE_INDEX,
    IMAGE_TOKEN,
    collate,
    decode_image,
    decode_mask,
    encode_example,
    model_batch,
    pad_sequences,
    preprocess_rows,
    rationale_index,
)
from megl_ray.model.vlm import train_tokenizer
from tests.support.toy import corpus, make_examples

TEMPLATE = "USER: <image>\nWhy is this image a {label}? ASSISTANT:"


def test_encode_example_labels_only_the_rationale_and_eos():
    tok = train_tokenizer(corpus(), 300)
    enc = encode_example(tok, TEMPLATE, "top left", "a bright square", num_image_tokens=4, max_text_tokens=10)
    ids, labels = enc["input_ids"], enc["text_labels"]
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    assert ids.count(image_id) == 4
    first = next(i for i, v in enumerate(labels) if v != IGNORE_INDEX)
    assert all(v == IGNORE_INDEX for v in labels[:first])
    assert labels[first:] == ids[first:] and ids[-1] == tok.eos_token_id
    assert tok.decode(ids[first:-1]).strip() == "a bright square"
    assert "top left" in tok.decode(ids[:first])


def test_rationale_is_truncated_to_max_text_tokens():
    tok = train_tokenizer(corpus(), 300)
    enc = encode_example(tok, TEMPLATE, "x", " ".join(["square"] * 50), num_image_tokens=1, max_text_tokens=6)
    assert sum(v != IGNORE_INDEX for v in enc["text_labels"]) == 6


def test_collate_builds_the_model_batch():
    tok = train_tokenizer(corpus(), 300)
    batch = collate(make_examples(4), tok, TEMPLATE, 16, 32)
    assert batch["pixels"].shape == (4, 3, 64, 64) and batch["masks"].shape == (4, 64, 64)
    assert batch["input_ids"].shape == batch["text_labels"].shape == batch["attention_mask"].shape
    padded = batch["attention_mask"] == 0
    assert (batch["text_labels"][padded] == IGNORE_INDEX).all()
    assert (batch["input_ids"][padded] == tok.pad_token_id).all()
    assert batch["has_mask"].tolist() == [True, False, False, False]


def test_left_padding_for_generation():
    out = pad_sequences([[1, 2, 3], [4]], 0, side="left")
    assert out.tolist() == [[1, 2, 3], [0, 0, 4]]


def test_rationale_index_is_deterministic_and_varies_by_epoch():
    picks = [rationale_index("id-7", 5, epoch, seed=0) for epoch in range(20)]
    assert picks == [rationale_index("id-7", 5, epoch, seed=0) for epoch in range(20)]
    assert len(set(picks)) > 1 and all(0 <= p < 5 for p in picks)
    assert rationale_index("id-7", 1, 3, 0) == 0


def _png(color, size=(12, 10)):
    buf = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), color, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_preprocess_then_model_batch_matches_the_in_memory_collate():
    tok = train_tokenizer(corpus(), 300)
    rows = {
        "id": ["a", "b"],
        "image": [_png(255), _png(0)],
        "class_id": [1, 3],
        "class_name": ["top right", "bottom right"],
        "has_mask": [True, False],
        "mask": [bytes([0, 255, 255, 0]), None],
        "rationales": [["a bright square"], ["a white patch", "the rest is dark"]],
    }
    pre = preprocess_rows(rows, tok, image_size=8, mask_size=2, max_rationales=4, max_text_tokens=10)
    assert pre["pixels"].dtype == np.uint8 and pre["pixels"].shape == (2, 3, 8, 8)
    assert pre["rationale_count"].tolist() == [1, 2]
    batch = model_batch(pre, tok, TEMPLATE, num_image_tokens=4, epoch=0, seed=0)
    k = rationale_index("b", 2, 0, 0)
    examples = [
        {
            "pixels": np.ones((3, 8, 8)),
            "label": 1,
            "label_name": "top right",
            "mask": [[0, 1], [1, 0]],
            "has_mask": True,
            "rationale": "a bright square",
        },
        {
            "pixels": np.zeros((3, 8, 8)),
            "label": 3,
            "label_name": "bottom right",
            "mask": np.zeros((2, 2)),
            "has_mask": False,
            "rationale": rows["rationales"][1][k],
        },
    ]
    expected = collate(examples, tok, TEMPLATE, 4, 10)
    for key, value in expected.items():
        assert torch.equal(batch[key], value.to(batch[key].dtype)), key
    assert batch["sample_weight"].tolist() == [1.0, 1.0]


def test_decode_image_and_mask():
    buf = io.BytesIO()
    Image.fromarray(np.full((10, 20, 3), 255, dtype=np.uint8)).save(buf, format="PNG")
    pixels = decode_image(buf.getvalue(), 16)
    assert pixels.shape == (3, 16, 16) and np.allclose(pixels, 1.0)
    mask = decode_mask(bytes([0, 255, 51, 0]), 2)
    assert np.allclose(mask, [[0, 1], [0.2, 0]])
    assert decode_mask(None, 3).sum() == 0


def test_high_bit_depth_images_are_scaled_not_clipped():
    import io

    from PIL import Image

    from megl_ray.data.transforms import decode_image

    ramp16 = np.linspace(0, 65535, 16 * 16).reshape(16, 16).astype(np.uint16)
    ramp_f = np.linspace(0.0, 1.0, 16 * 16, dtype=np.float32).reshape(16, 16)
    for array, fmt, mode in ((ramp16, "PNG", None), (ramp_f, "TIFF", "F")):
        buf = io.BytesIO()
        Image.fromarray(array, mode).save(buf, fmt)
        pixels = decode_image(buf.getvalue(), 16)
        expected = array.astype(np.float64) / (65535.0 if array.dtype == np.uint16 else 1.0)
        assert np.abs(pixels[0] - expected).max() <= 1 / 255 + 1e-6, fmt  # 8-bit scaling clips at 255/65535
        assert np.array_equal(pixels[0], pixels[2])


def _llama_style_tokenizer():
    """A Llama-style tokenizer trained from config, laid out as transformers' LlamaTokenizerFast (Llama-2, Vicuna,
    LLaVA-1.5): a normalizer that prepends ``▁`` and turns spaces into ``▁``, a Metaspace split, and a decoder that
    turns ``▁`` back into spaces and strips the one leading space."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tests.support.toy import corpus

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<unk>", "<s>", "</s>", IMAGE_TOKEN], show_progress=False
    )
    tok.train_from_iterator(corpus() + ["USER: Why is this image a top left? ASSISTANT:"], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )


def test_rationale_tokens_are_the_ones_the_llama_style_tokenizer_gives_after_the_prompt():
    from megl_ray.data.transforms import encode_rationale, prompt_context
    from tests.support.toy import RATIONALES

    tok = _llama_style_tokenizer()
    template = "USER: <image>\nWhy is this image a {label}? ASSISTANT:"
    context = prompt_context(template)
    assert context == "? ASSISTANT:"
    stray = tok.convert_tokens_to_ids("▁")
    for rationale in RATIONALES:
        ids = encode_rationale(tok, rationale, context)
        whole = tok.encode(context + " " + rationale, add_special_tokens=False)
        assert whole[-len(ids) :] == ids and whole[: len(whole) - len(ids)] == tok.encode(
            context, add_special_tokens=False
        )
        assert ids[0] != stray and tok.convert_ids_to_tokens(ids[0]).startswith("▁")
        assert tok.decode(ids) == rationale  # decode(encode(rationale)) round-trips exactly
        # the piece-wise encoding this replaces starts with a stray boundary token
        assert tok.encode(" " + rationale, add_special_tokens=False) == [stray] + ids
        example = encode_example(tok, template, "top left", rationale, num_image_tokens=4, max_text_tokens=64)
        labelled = [t for t in example["text_labels"] if t != -100]
        assert labelled == ids + [tok.eos_token_id]  # labels cover exactly the rationale tokens and EOS
