"""Writing a ``.safetensors`` file tensor by tensor.

``safetensors.torch.save_file`` first turns every tensor into a ``bytes`` object (``_flatten``) and then writes:
for a 7B model that is a second copy of the model in host RAM (~13.5 GB in bf16) at the moment of writing, and it
refuses tensors that share storage (tied embeddings), which callers then ``clone()`` — a third copy. The format is
simple and stable (https://github.com/huggingface/safetensors#format): an 8-byte little-endian header length, a JSON
header naming each tensor's dtype, shape and byte range, then the bytes. Written here from each tensor's own memory,
one at a time; ``safetensors.torch.load_file``/``safe_open`` read the result (tests/unit/test_safetensors_stream.py).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _raw(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes without a copy (one only where it is not contiguous on the host already)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def write_safetensors(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """``tensors`` into ``path`` in the safetensors format; tensors may share storage (each name gets its bytes)."""
    header: dict[str, object] = {}
    offset = 0
    names = sorted(tensors)
    for name in names:
        tensor = tensors[name]
        if tensor.dtype not in DTYPES:
            raise TypeError(f"{name}: dtype {tensor.dtype} has no safetensors name")
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    if metadata:
        header["__metadata__"] = dict(metadata)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as stream:
        stream.write(struct.pack("<Q", len(encoded)))
        stream.write(encoded)
        for name in names:
            stream.write(_raw(tensors[name]))
