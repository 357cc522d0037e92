import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from megl_ray.storage.retrying_fs import RetryingHandler, StorageUnavailableError, is_transient, retrying


class Flaky(pafs.FileSystemHandler):
    """A filesystem that refuses connections ``failures`` times, then serves from a local one."""

    def __init__(self, root, failures, error="AWS Error NETWORK_CONNECTION during GetObject: Connection refused"):
        self.local = pafs.SubTreeFileSystem(str(root), pafs.LocalFileSystem())
        self.failures, self.error, self.calls = failures, error, 0

    def _maybe_fail(self):
        self.calls += 1
        if self.calls <= self.failures:
            raise OSError(self.error)

    def get_type_name(self):
        return "flaky"

    def equals(self, other):
        return other is self

    def normalize_path(self, path):
        return path

    def get_file_info(self, paths):
        self._maybe_fail()
        return self.local.get_file_info(paths)

    def get_file_info_selector(self, selector):
        self._maybe_fail()
        return self.local.get_file_info(selector)

    def open_input_stream(self, path):
        self._maybe_fail()
        return self.local.open_input_stream(path)

    open_input_file = open_input_stream

    def _unused(self, *args, **kwargs):  # the write side is not exercised here
        raise NotImplementedError

    copy_file = create_dir = delete_dir = delete_dir_contents = delete_file = _unused
    delete_root_dir_contents = move = open_append_stream = open_output_stream = _unused


def test_transient_errors_are_retried_until_the_read_succeeds(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"payload")
    flaky = Flaky(tmp_path, failures=3)
    fs = pafs.PyFileSystem(RetryingHandler(pafs.PyFileSystem(flaky), deadline_s=10, first_delay_s=0.01))
    with fs.open_input_file("a.bin") as f:
        assert f.read() == b"payload"
    assert flaky.calls == 4


def test_outage_longer_than_the_deadline_gives_one_clear_error(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"x")
    fs = pafs.PyFileSystem(
        RetryingHandler(pafs.PyFileSystem(Flaky(tmp_path, failures=10**6)), deadline_s=0.3, first_delay_s=0.05)
    )
    with pytest.raises(OSError, match=r"storage unreachable for \d+s while trying to read a.bin"):
        fs.open_input_file("a.bin")


def test_permanent_errors_are_not_retried(tmp_path):
    flaky = Flaky(tmp_path, failures=1, error="AWS Error ACCESS_DENIED")
    fs = pafs.PyFileSystem(RetryingHandler(pafs.PyFileSystem(flaky), deadline_s=10, first_delay_s=0.01))
    with pytest.raises(OSError, match="ACCESS_DENIED"):
        fs.get_file_info(["a.bin"])
    assert flaky.calls == 1


def test_classification_and_local_passthrough(tmp_path):
    assert is_transient(OSError("curlCode: 7, Couldn't connect to server"))
    assert is_transient(ConnectionRefusedError())
    assert not is_transient(FileNotFoundError("no such key"))
    local = pafs.LocalFileSystem()
    assert retrying(local) is local
    assert isinstance(StorageUnavailableError("x"), OSError)
    assert pa  # pyarrow imported for the filesystem types above
