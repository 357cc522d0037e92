"""Reading weights safely from local paths or ``s3://`` URIs: safetensors, or ``torch.load(weights_only=True)``.

Nothing here unpickles arbitrary objects, so a checkpoint from an untrusted bucket cannot run code."""

from __future__ import annotations

import hashlib
import io
import tempfile
from pathlib import Path

import torch
from filelock import FileLock
from safetensors.torch import load as load_safetensors

from megl_ray.errors import UserError
from megl_ray.model import hub


def read_uri_bytes(uri: str) -> bytes:
    if uri.startswith("s3://"):
        # Lazy: storage brings boto3 and pyarrow, which only an s3:// URI needs (bench/gpu_step.py's bare GPU box
        # has torch and transformers, neither of them).
        from megl_ray import storage  # noqa: PLC0415

        return storage.read_bytes(uri)
    path = Path(uri)
    if not path.is_file():
        raise UserError(f"weights file not found: {uri}")
    return path.read_bytes()


def load_state_dict_file(uri: str) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors or .pt/.pth file (local or s3://)."""
    data = read_uri_bytes(uri)
    if uri.endswith(".safetensors"):
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


def fetch_lock_path(uri: str) -> Path:
    """The node-local lock file guarding the download of ``uri`` (in the temp dir: one per machine, i.e. per node)."""
    digest = hashlib.sha256(uri.encode()).hexdigest()[:24]
    return Path(tempfile.gettempdir()) / "megl-fetch-locks" / f"{digest}.lock"


def local_dir(uri: str, allow_patterns: list[str] | None = None) -> Path:
    """A local directory for a model given as a local path, an ``s3://`` prefix (downloaded and cached) or a Hugging
    Face Hub id ``org/name[@revision]`` (the HF cache's snapshot: ``megl_ray.model.hub``; ``allow_patterns``
    fetches only those files, e.g. ``hub.TOKENIZER_FILES`` where no weights are needed, from a hub or an ``s3://``
    prefix).

    A remote directory is fetched once per node: the workers of a node share its cache, and a file lock makes the
    first one download while the others wait and then reuse its copy (the cache's rename keeps a copy whole, but
    without the lock every racing worker would still download a 7B checkpoint in full)."""
    if uri.startswith("s3://") or hub.is_hub_id(uri):
        lock = fetch_lock_path(uri)
        lock.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(lock)):
            if not uri.startswith("s3://"):
                return hub.snapshot(uri, allow_patterns)
            # Lazy, as in read_uri_bytes: boto3 and pyarrow load only where an s3:// copy is fetched.
            from megl_ray import storage  # noqa: PLC0415

            return Path(storage.local_copy(uri, patterns=allow_patterns))
    path = Path(uri).expanduser()
    if not path.is_dir():
        raise UserError(f"model directory not found: {uri} (a local folder, s3://bucket/prefix or a hub id org/name)")
    return path
