"""megl_ray.storage.shared_store without a server or a subprocess: leases of users that are gone are reclaimed and a
store.json whose keeper is gone is no store (the server's life: tests/integration/test_shared_store.py)."""

from __future__ import annotations

import json
import os

from megl_ray.storage.shared_store import LEASES_DIR, STATE_FILE, live_leases, locked, read_state


def _dead_pid() -> int:
    """A pid no process has (counted down from the kernel's maximum)."""
    pid = int(open("/proc/sys/kernel/pid_max").read()) - 1
    while os.path.exists(f"/proc/{pid}"):
        pid -= 1
    return pid


def test_leases_of_dead_users_are_reclaimed_and_live_ones_kept(tmp_path):
    leases = tmp_path / LEASES_DIR
    leases.mkdir()
    mine, gone, junk = leases / f"{os.getpid()}-a1", leases / f"{_dead_pid()}-b2", leases / "not-a-pid"
    for lease in (mine, gone, junk):
        lease.write_text("")
    with locked(tmp_path):
        assert live_leases(tmp_path) == [mine]
    assert sorted(p.name for p in leases.iterdir()) == [mine.name]


def test_a_state_file_counts_only_while_its_keeper_runs(tmp_path):
    assert read_state(tmp_path) is None
    (tmp_path / STATE_FILE).write_text(json.dumps({"endpoint_url": "http://x", "keeper_pid": _dead_pid()}))
    assert read_state(tmp_path) is None
    (tmp_path / STATE_FILE).write_text(json.dumps({"endpoint_url": "http://x", "keeper_pid": os.getpid()}))
    assert read_state(tmp_path)["endpoint_url"] == "http://x"
    (tmp_path / STATE_FILE).write_text("{half")
    assert read_state(tmp_path) is None
