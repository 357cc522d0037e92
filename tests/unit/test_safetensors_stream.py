"""``write_safetensors``: what safetensors' own reader reads back, shared storages and every exported dtype included."""

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from megl_ray.model.safetensors_stream import write_safetensors


def test_safetensors_reads_back_every_tensor_bit_for_bit_shared_storages_included(tmp_path):
    embed = torch.randn(7, 3, dtype=torch.bfloat16)
    tensors = {
        "embed.weight": embed,
        "lm_head.weight": embed,  # tied: safetensors' save_file refuses these; a copy was the workaround
        "half": torch.randn(2, 5).half(),
        "full": torch.randn(4, dtype=torch.float64),
        "steps": torch.tensor(12),  # a 0-d int64 buffer (BatchNorm's num_batches_tracked)
        "flags": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
        "column": torch.randn(4, 6)[:, 1],  # a strided view: written contiguous
        "bytes": torch.arange(5, dtype=torch.uint8),
    }
    path = tmp_path / "x.safetensors"
    write_safetensors(path, tensors, metadata={"format": "pt"})
    back = load_file(str(path))
    assert set(back) == set(tensors)
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and back[name].shape == tensor.shape, name
        assert torch.equal(back[name], tensor), name
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    header_len = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert header_len % 8 == 0  # the data starts aligned, as safetensors writes it


def test_the_header_names_what_safetensors_names_and_the_file_is_as_long(tmp_path):
    tensors = {"b": torch.randn(3, 2), "a": torch.arange(6, dtype=torch.int32)}
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    write_safetensors(ours, tensors)
    save_file(tensors, str(theirs))

    def described(path):  # the byte order of the tensors is the writer's choice; what each is, is not
        return {
            k: (v["dtype"], v["shape"], v["data_offsets"][1] - v["data_offsets"][0]) for k, v in _header(path).items()
        }

    assert described(ours) == described(theirs)
    assert ours.stat().st_size == theirs.stat().st_size


def test_a_dtype_safetensors_cannot_name_is_refused_by_name(tmp_path):
    with pytest.raises(TypeError, match="weird: dtype torch.complex64"):
        write_safetensors(tmp_path / "x.safetensors", {"weird": torch.zeros(2, dtype=torch.complex64)})


def _header(path):
    data = path.read_bytes()
    return json.loads(data[8 : 8 + struct.unpack("<Q", data[:8])[0]])
