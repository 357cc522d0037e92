"""``dataset.json``: what a converted dataset holds (``DatasetInfo``), and reading it back safely.

The file comes from storage a user controls, so every field is checked for its type and every shard path for
staying inside the dataset (no ``..``, nothing absolute) before anything trusts it. This module imports no Ray.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import numpy as np
from pyarrow.fs import FileType

from megl_ray.config import safe_io
from megl_ray.errors import UserError
from megl_ray.storage import S3Options, is_s3, pyarrow_filesystem
from megl_ray.storage.retrying_fs import is_transient, retrying

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
DATASET_INFO_FILE = "dataset.json"
INFO_LIMIT = safe_io.TEXT_LIMIT

# field -> (JSON type, name shown): checked before the fields are used, so a hand-edited file fails with one line.
_FIELD_TYPES: dict[str, tuple[type | tuple[type, ...], str]] = {
    "classes": (list, "an array of names"),
    "counts": (dict, "an object"),
    "mask_coverage": (dict, "an object"),
    "splits": (dict, "an object"),
    "mask_size": (int, "an integer"),
    "prior_size": (int, "an integer"),
    "prior": (list, "an array of arrays"),
    "shards": (dict, "an object"),
    "source": (str, "a string"),
    "format_version": (int, "an integer"),
    "num_classes": (int, "an integer"),
    "convert_options": (dict, "an object"),
}


def _fail(message: str) -> UserError:
    return UserError(f"dataset.json {message}")


@dataclasses.dataclass
class DatasetInfo:
    """``dataset.json``: what a converted dataset holds, written last so its presence marks a complete conversion.

    ``prior`` is the mean over train masks of each mask area-resized to ``prior_size``² and normalised to sum 1: a
    spatial probability distribution (the Ā of MEGL's distribution-consistency loss KL(Â‖Ā)). Uniform when the
    train split has no masks. ``shards`` paths are relative to the dataset root.
    """

    classes: list[str]
    counts: dict[str, dict[str, int]]
    mask_coverage: dict[str, float]
    splits: dict[str, int]
    mask_size: int
    prior_size: int
    prior: list[list[float]]
    shards: dict[str, list[str]]
    source: str
    format_version: int = FORMAT_VERSION
    num_classes: int = -1
    convert_options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.num_classes, int) and self.num_classes < 0 and isinstance(self.classes, list):
            self.num_classes = len(self.classes)

    def validate(self) -> None:
        """Raise ``UserError`` when a field has the wrong type or the fields contradict each other (a hand-edited
        or foreign file), or a shard path leaves the dataset."""
        for name, (typ, shown) in _FIELD_TYPES.items():
            value = getattr(self, name)
            if not isinstance(value, typ) or isinstance(value, bool):
                raise _fail(f"{name} must be {shown}, got {type(value).__name__}")
        if self.format_version != FORMAT_VERSION:
            raise _fail(f"format_version {self.format_version} is not supported ({FORMAT_VERSION})")
        if not self.classes or not all(isinstance(c, str) and c for c in self.classes):
            raise _fail("classes must be a non-empty array of non-empty names")
        if self.num_classes != len(self.classes):
            raise _fail(f"num_classes {self.num_classes} != {len(self.classes)} class names")
        for name in ("mask_size", "prior_size"):
            if not 1 <= getattr(self, name) <= 4096:
                raise _fail(f"{name} must be in 1..4096, got {getattr(self, name)}")
        for split, count in self.splits.items():
            if not isinstance(count, int) or isinstance(count, bool) or count < 0:
                raise _fail(f"splits.{split} must be a count, got {count!r}")
        self._validate_shards()
        try:
            prior = np.asarray(self.prior, dtype=np.float64)
        except (TypeError, ValueError):
            raise _fail("prior must be an array of arrays of numbers") from None
        if prior.shape != (self.prior_size, self.prior_size):
            raise _fail(f"prior has shape {prior.shape}, expected {self.prior_size}x{self.prior_size}")
        if not np.isfinite(prior).all() or (prior < 0).any() or not math.isclose(prior.sum(), 1.0, rel_tol=1e-6):
            raise _fail("prior is not a probability distribution (non-negative, sums to 1)")

    def _validate_shards(self) -> None:
        for split, paths in self.shards.items():
            if split not in SPLITS:
                raise _fail(f"shards has an unknown split {split!r} (expected {', '.join(SPLITS)})")
            if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
                raise _fail(f"shards.{split} must be an array of paths")
            for path in paths:
                problem = safe_io.check_relative(path)
                if problem:  # a shard must never be read from outside the dataset
                    raise _fail(f"shard path {path!r} of split {split} {problem}")

    def prior_array(self) -> np.ndarray:
        """The prior as a float32 (prior_size, prior_size) array."""
        return np.asarray(self.prior, dtype=np.float32)

    def to_json(self) -> str:
        """Serialise (fields in declaration order, classes in id order: identical conversions give identical files)."""
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> DatasetInfo:
        """Parse and validate; unknown keys are ignored so newer writers stay readable by older readers."""
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"dataset.json:{err.lineno}:{err.colno}: {err.msg}") from None
        except (RecursionError, ValueError) as err:  # absurd nesting, an integer of thousands of digits
            raise _fail(f"cannot be parsed: {type(err).__name__}") from None
        if not isinstance(raw, dict):
            raise UserError("dataset.json is not a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        required = {
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        }
        missing = sorted(required - raw.keys())
        if missing:
            raise UserError(f"dataset.json lacks key(s): {', '.join(missing)}")
        info = cls(**{k: v for k, v in raw.items() if k in names})
        info.validate()
        return info


def load_dataset_info(uri: str) -> DatasetInfo:
    """Load ``dataset.json`` from a converted dataset's root (local path or ``s3://``), or from the file's own URI."""
    fs, path = pyarrow_filesystem(uri, probe=True)  # a wrong endpoint is one line in seconds, not after ~90 s
    if is_s3(uri):  # an endpoint that is down (a server restarting) is retried for MEGL_S3_RETRY_SECONDS
        fs = retrying(fs, S3Options.from_env().retry_seconds)
    if not path.endswith(".json"):
        path = path.rstrip("/") + "/" + DATASET_INFO_FILE
    try:
        info = fs.get_file_info(path)
        if info.type == FileType.NotFound:
            raise FileNotFoundError(path)
        if info.type != FileType.File or (info.size or 0) > INFO_LIMIT:  # a FIFO would block the read forever
            raise UserError(f"{DATASET_INFO_FILE} at {uri} is not a regular file of at most {INFO_LIMIT} bytes")
        with fs.open_input_stream(path) as f:
            text = f.read(min(info.size or INFO_LIMIT, INFO_LIMIT) + 1).decode("utf-8")
    except FileNotFoundError:
        raise UserError(
            f"no {DATASET_INFO_FILE} at {uri} (not a converted dataset, or its conversion did not finish)"
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        if is_transient(err):
            raise UserError(f"storage unreachable while reading {DATASET_INFO_FILE} at {uri}: {first}") from None
        raise UserError(f"cannot read {DATASET_INFO_FILE} at {uri}: {first}") from None
    return DatasetInfo.from_json(text)
