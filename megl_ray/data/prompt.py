"""The text side of a model batch: the prompt with its image tokens, the rationale's ids, LM labels, padding.

Plain Python and torch only (no Ray, no pyarrow): the model encodes prompts with it at generation time, so it must
import on a machine that has torch and transformers and nothing of the data pipeline (bench/gpu_step.py on a bare
GPU box). ``megl_ray.data.transforms`` re-exports every name here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from megl_ray.data.tokens import IGNORE_INDEX, IMAGE_TOKEN


def format_prompt(template: str, label_name: str) -> tuple[str, str]:
    """Split the prompt template at ``<image>``: (text before, text after with {label} filled)."""
    before, after = template.split(IMAGE_TOKEN, 1)
    return before, after.replace("{label}", label_name)


def encode_prompt(tokenizer: Any, template: str, label_name: str, num_image_tokens: int) -> list[int]:
    """Token ids of the prompt with ``num_image_tokens`` copies of the image token where ``<image>`` stands."""
    before, after = format_prompt(template, label_name)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    ids: list[int] = []
    if tokenizer.bos_token_id is not None:
        ids.append(tokenizer.bos_token_id)
    ids += tokenizer.encode(before, add_special_tokens=False)
    ids += [image_id] * num_image_tokens
    ids += tokenizer.encode(after, add_special_tokens=False)
    return ids


DEFAULT_CONTEXT = "? ASSISTANT:"


def prompt_context(template: str) -> str:
    """The fixed text right before the rationale: the template's tail after its last ``{label}``/``<image>``."""
    tail = template.split(IMAGE_TOKEN)[-1]
    return tail.split("{label}")[-1] or DEFAULT_CONTEXT


def encode_rationale(tokenizer: Any, rationale: str, context: str = DEFAULT_CONTEXT) -> list[int]:
    """The rationale's token ids as the tokenizer produces them *after the prompt*: the text ``context + " " +
    rationale`` is tokenised at once and the context's own tokens removed. Tokenising ``" " + rationale`` on its own
    would, with SentencePiece/Metaspace (Llama) tokenizers, start every rationale with a stray word-boundary token
    ``▁`` the model never saw there; byte-level BPE (GPT-2, Qwen2) gives the same ids either way. If the context's
    tokens are not a prefix of the joint tokenisation (a merge across the boundary), the piece-wise encoding is
    used."""
    text = rationale.strip()
    ctx = tokenizer.encode(context, add_special_tokens=False)
    joint = tokenizer.encode(context + " " + text, add_special_tokens=False)
    if joint[: len(ctx)] == ctx:
        return joint[len(ctx) :]
    return tokenizer.encode(" " + text, add_special_tokens=False)


def encode_example(
    tokenizer: Any, template: str, label_name: str, rationale: str, num_image_tokens: int, max_text_tokens: int
) -> dict[str, list[int]]:
    """Prompt + rationale + EOS as input ids with LM labels that cover the rationale and EOS only."""
    prompt = encode_prompt(tokenizer, template, label_name, num_image_tokens)
    answer = encode_rationale(tokenizer, rationale, prompt_context(template))[: max_text_tokens - 1]
    answer.append(tokenizer.eos_token_id)
    return {
        "input_ids": prompt + answer,
        "text_labels": [IGNORE_INDEX] * len(prompt) + answer,
    }


def pad_sequences(sequences: Sequence[Sequence[int]], pad_value: int, side: str = "right") -> torch.Tensor:
    """Pad lists of ids to one (B, T) tensor; left padding is what batched generation needs."""
    length = max(len(s) for s in sequences)
    out = torch.full((len(sequences), length), pad_value, dtype=torch.long)
    for i, seq in enumerate(sequences):
        if side == "right":
            out[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        else:
            out[i, length - len(seq) :] = torch.tensor(seq, dtype=torch.long)
    return out
