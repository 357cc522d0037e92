"""A conversion's destination: DST checked before anything is written, a staging prefix inside it, and the swap
into place once the conversion succeeded — so that a failed or interrupted run leaves the previous dataset as it
was, on a local disk or an object store alike."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from pyarrow.fs import FileSelector, FileType

from megl_ray.data import schema
from megl_ray.data.schema import SPLITS
from megl_ray.errors import UserError

log = logging.getLogger("megl_ray.data.convert")

STAGING_PREFIX = ".megl-staging-"
OWNED = (schema.DATASET_INFO_FILE, schema.REJECTED_FILE, *SPLITS)
"""What a conversion writes at DST, in the order an overwrite deletes it (dataset.json first: no longer valid)."""


class Destination:
    """DST checked before anything is written, a staging prefix inside it, and the swap once the conversion
    succeeded (``commit``) or the clean-up when it did not (``abort``)."""

    def __init__(self, fs: Any, base: str, dst: str, overwrite: bool):
        self.fs, self.base, self.dst = fs, base, dst
        info = fs.get_file_info(base)
        if info.type not in (FileType.NotFound, FileType.Directory):
            raise UserError(f"cannot write to {dst}: it exists and is not a folder")
        self.created = info.type == FileType.NotFound
        names = [] if self.created else [i.base_name for i in fs.get_file_info(FileSelector(base))]
        names = [n for n in names if not n.startswith(STAGING_PREFIX)]  # another run's staging is not ours to judge
        self.existing = [n for n in OWNED if n in names]
        foreign = sorted(set(names) - set(OWNED))
        if foreign and schema.DATASET_INFO_FILE not in names:
            raise UserError(
                f"{dst} is not empty and holds no converted dataset ({', '.join(foreign[:3])}...); "
                "refusing to write into it: choose an empty or new destination"
            )
        if self.existing and not overwrite:
            raise UserError(
                f"{dst} already holds a dataset ({', '.join(self.existing)}); use an empty destination or --overwrite"
            )
        self.staging = f"{base}/{STAGING_PREFIX}{uuid.uuid4().hex[:12]}"
        fs.create_dir(self.staging, recursive=True)
        for split in SPLITS:
            fs.create_dir(f"{self.staging}/{split}", recursive=True)

    def commit(self) -> None:
        """Replace the old dataset's own files by the new ones; ``dataset.json`` goes first and comes back last."""
        for name in self.existing:
            path = f"{self.base}/{name}"
            (self.fs.delete_dir if self.fs.get_file_info(path).type == FileType.Directory else self.fs.delete_file)(
                path
            )
        files = [
            i.path for i in self.fs.get_file_info(FileSelector(self.staging, recursive=True)) if i.type == FileType.File
        ]
        info_file = f"{self.staging}/{schema.DATASET_INFO_FILE}"
        for split in SPLITS:
            self.fs.create_dir(f"{self.base}/{split}", recursive=True)
        for path in sorted(files, key=lambda p: p == info_file):  # file by file: object stores cannot move folders
            self.fs.move(path, self.base + path[len(self.staging) :])
        self.fs.delete_dir(self.staging)

    def abort(self) -> None:
        """Remove the staging prefix (and DST itself when this run created it), leaving DST as it was."""
        for path in (self.staging, self.base) if self.created else (self.staging,):
            try:
                self.fs.delete_dir(path)
            except OSError as err:
                log.warning("could not clean up %s: %s", path, err)
