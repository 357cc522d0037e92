"""Reading weights safely from local paths or ``s3://`` URIs: safetensors, or ``torch.load(weights_only=True)``.

Nothing here unpickles arbitrary objects, so a checkpoint from an untrusted bucket cannot run code."""

from __future__ import annotations

import io
from pathlib import Path

import torch

from megl_ray.errors import UserError


def read_uri_bytes(uri: str) -> bytes:
    if uri.startswith("s3://"):
        from megl_ray import storage  # boto3 only when needed

        return storage.read_bytes(uri)
    path = Path(uri)
    if not path.is_file():
        raise UserError(f"weights file not found: {uri}")
    return path.read_bytes()


def load_state_dict_file(uri: str) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors or .pt/.pth file (local or s3://)."""
    data = read_uri_bytes(uri)
    if uri.endswith(".safetensors"):
        from safetensors.torch import load as load_safetensors

        return load_safetensors(data)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # a pickle with objects, or not a torch file at all
        raise UserError(f"{uri} is not a weights-only torch state dict ({type(err).__name__})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{uri} does not hold a state dict of tensors")
    return state


def local_dir(uri: str) -> Path:
    """A local directory for a model directory given as a local path or ``s3://`` prefix (downloaded and cached)."""
    if uri.startswith("s3://"):
        from megl_ray import storage

        return Path(storage.local_copy(uri))
    path = Path(uri).expanduser()
    if not path.is_dir():
        raise UserError(f"model directory not found: {uri}")
    return path
