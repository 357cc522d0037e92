"""megl_ray.storage.transfer: every operation on local paths, and against the real embedded SeaweedFS (slow)."""

from __future__ import annotations

import pytest

from megl_ray import storage
from megl_ray.storage import NotFoundError


def test_local_paths(tmp_path):
    """Every operation also takes local paths, so callers need not branch."""
    src = tmp_path / "src"
    storage.write_bytes(str(src / "a" / "one.bin"), b"1")
    storage.write_bytes(str(src / "two.bin"), b"22")
    assert storage.read_bytes(str(src / "two.bin")) == b"22"
    assert storage.exists(str(src / "a")) and not storage.exists(str(src / "none"))
    assert storage.list_files(str(src)) == [str(src / "a" / "one.bin"), str(src / "two.bin")]
    assert storage.local_copy(str(src)) == src
    copied = storage.download(str(src), tmp_path / "dl")
    assert (copied / "a" / "one.bin").read_bytes() == b"1"
    storage.upload(src / "two.bin", str(tmp_path / "up") + "/")
    assert (tmp_path / "up" / "two.bin").read_bytes() == b"22"
    with pytest.raises(NotFoundError, match="none"):
        storage.read_bytes(str(src / "none"))
