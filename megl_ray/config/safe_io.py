"""Reading files a user points at, and placing paths a user names, without hanging, exhausting memory or escaping.

Two kinds of check live here, one helper each, used by every entry point:

* bounded reads (``read_bytes``, ``read_text``): only regular files are opened (a FIFO or a device named as an
  image or a config would block ``open`` forever or never end), and the size is checked from ``stat`` before a
  byte is read (a huge sparse file would otherwise be read whole into memory);
* confinement (``check_name``, ``check_relative``, ``resolve_inside``): a run name or a path from a data file
  cannot climb out of the root it is joined to.

Problems are ``FileProblem`` (a ``UserError``) with a short ``kind`` code, so that the converter can turn them into
counted rejections (``image_<kind>``) while the CLIs show them as one line.
"""

from __future__ import annotations

import os
import stat

from megl_ray.errors import UserError

MIB = 1024 * 1024
_CHUNK = 16 * MIB
TEXT_LIMIT = 64 * MIB
"""Default ceiling of a config, search-space, ``meta.json`` or ``dataset.json`` file."""


class FileProblem(UserError):
    """A file that cannot be read safely: ``kind`` is ``missing``, ``not_regular_file``, ``too_large``,
    ``unreadable`` or ``not_utf8``; the message names the file."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind, self.detail = kind, detail


def _kind_of(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def check_regular_file(path: str | os.PathLike[str], what: str = "file", limit: int | None = None) -> int:
    """The size of the regular file ``path`` (symlinks followed); ``FileProblem`` when it is missing, something
    else (a FIFO, a directory, a device) or larger than ``limit``. For files handed to a library that opens them."""
    name = os.fspath(path)
    if "\x00" in name:
        raise FileProblem("unreadable", f"{what} path {name!r} contains a NUL byte")
    try:
        info = os.stat(name)
    except FileNotFoundError:
        raise FileProblem("missing", f"{what} {name!r} does not exist") from None
    except OSError as err:
        raise FileProblem("unreadable", f"cannot read {what} {name!r}: {err.strerror or err}") from None
    if not stat.S_ISREG(info.st_mode):
        raise FileProblem("not_regular_file", f"{what} {name!r} is {_kind_of(info.st_mode)}, not a regular file")
    if limit is not None and info.st_size > limit:
        raise FileProblem("too_large", f"{what} {name!r} has {info.st_size} bytes, more than the limit of {limit}")
    return info.st_size


def read_bytes(path: str | os.PathLike[str], limit: int, what: str = "file") -> bytes:
    """The bytes of the regular file ``path`` (symlinks followed), refusing anything else and anything over
    ``limit`` bytes before reading. ``what`` names the file in messages ("image", "config file", ...)."""
    name = os.fspath(path)
    check_regular_file(name, what, limit)
    data = bytearray()
    try:
        # O_NONBLOCK: should the path be swapped for a FIFO after the stat, open still returns at once.
        fd = os.open(name, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as err:
        raise FileProblem("unreadable", f"cannot read {what} {name!r}: {err.strerror or err}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise FileProblem("not_regular_file", f"{what} {name!r} is not a regular file")
        try:
            while len(data) <= limit:  # in chunks: read(limit) would allocate the whole limit at once
                chunk = f.read(min(_CHUNK, limit + 1 - len(data)))
                if not chunk:
                    break
                data += chunk
        except OSError as err:
            raise FileProblem("unreadable", f"cannot read {what} {name!r}: {err.strerror or err}") from None
    if len(data) > limit:  # grew since the stat
        raise FileProblem("too_large", f"{what} {name!r} has more than the limit of {limit} bytes")
    return bytes(data)


def decode_utf8(data: bytes, name: str, what: str = "file") -> str:
    """``data`` as UTF-8 text; anything else is a ``FileProblem`` naming the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise FileProblem("not_utf8", f"{what} {name!r} is not UTF-8 text ({err.reason} at byte {err.start})") from None


def read_text(path: str | os.PathLike[str], limit: int = TEXT_LIMIT, what: str = "file") -> str:
    """A regular UTF-8 text file of at most ``limit`` bytes (see ``read_bytes``)."""
    return decode_utf8(read_bytes(path, limit, what), os.fspath(path), what)


# ------------------------------------------------------------------------------------------------ confinement


def check_name(name: str) -> str | None:
    """Why ``name`` cannot be one path component (a run or sweep name), or None when it can: it must be non-empty,
    not ``.`` or ``..``, and hold no separator, NUL or other control character."""
    if not name or name in (".", ".."):
        return "must be a non-empty name other than '.' and '..'"
    if "/" in name or "\\" in name:
        return "must not contain '/' or '\\'"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "must not contain control characters"
    return None


def check_relative(path: str) -> str | None:
    """Why ``path`` (from a data file; local or a key under an ``s3://`` prefix) is not a plain relative path that
    stays below its root, or None when it is. Checked on the text alone, so it holds for object stores too."""
    if not path or "\x00" in path:
        return "is empty or contains a NUL byte"
    if path.startswith(("/", "\\")) or os.path.isabs(path) or "://" in path or (len(path) > 1 and path[1] == ":"):
        return "is absolute; it must be relative to its root"
    if any(part == ".." for part in path.replace("\\", "/").split("/")):
        return "contains '..'"
    return None


def resolve_inside(root: str, relative: str) -> str:
    """``relative`` resolved under the local folder ``root`` (symlinks followed), or ``ValueError`` with the reason
    when it is absolute, holds a NUL byte or lands outside ``root`` (``..``, a symlink pointing out)."""
    if "\x00" in relative:
        raise ValueError(f"path {relative!r} contains a NUL byte")
    if os.path.isabs(relative) or relative.startswith(("/", "\\")):
        raise ValueError(f"absolute path {relative!r}; paths must be relative to the dataset folder")
    root_real = os.path.realpath(root)
    full = os.path.realpath(os.path.join(root_real, relative))
    if os.path.commonpath([root_real, full]) != root_real:
        raise ValueError(f"path {relative!r} resolves outside the dataset folder")
    return full


def overlaps(a: str, b: str) -> bool:
    """Whether local paths ``a`` and ``b`` are the same folder or one lies inside the other (symlinks followed)."""
    ra, rb = os.path.realpath(a), os.path.realpath(b)
    common = os.path.commonpath([ra, rb])
    return common in (ra, rb)
