"""megl_ray.storage.weed: helpers around the weed process."""

from __future__ import annotations

import socket

from megl_ray.storage import weed


def test_only_stale_sockets_count_as_stale(tmp_path):
    path = str(tmp_path / "s.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    assert not weed._socket_is_stale(path)
    listener.close()
    assert weed._socket_is_stale(path)
