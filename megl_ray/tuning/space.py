"""Search spaces of ``python -m megl_ray.tune``: a small YAML form, validated against ``MEGLConfig``.

A space file is a mapping of config path → distribution, each distribution a one-key mapping::

    loss.text_weight: {loguniform: [0.01, 1.0]}   # log-uniform float in [low, high], 0 < low < high
    loss.dc_weight:   {uniform: [0, 1]}           # uniform float in [low, high], low < high
    data.batch_size:  {randint: [8, 33]}          # uniform integer in [low, high), low < high
    loss.visual_weight: {choice: [0.5, 1, 2]}     # one of the values, drawn at random per trial
    optim.lr:         {grid: [1e-4, 3e-4]}        # every value: the grid is crossed with every sample

Paths are the dotted keys of the config (``loss.text_weight``, ``optim.lr``, ...). ``uniform`` and ``loguniform``
need a float key, ``randint`` a numeric one; ``choice`` and ``grid`` take any values the key accepts (e.g.
``loss.visual_transform: {choice: [none, gradia]}``). Every bound and value is checked as the config would check it
(``loss.*_weight >= 0``, ``optim.lr > 0``), so a bad space fails before any trial starts, naming the file and the key.
Keys the sweep sets itself (``run.name``, ``run.storage_path``) or that fix a trial's resources or schedule
(``train.num_workers``, ``train.cpus_per_worker``, ``train.use_gpu``, ``train.epochs``) cannot be swept: set them
in the base config.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ray import tune

from megl_ray.config import MEGLConfig, config_from_dict
from megl_ray.config.build import coerce
from megl_ray.config.packaged import space_path
from megl_ray.config.strict_yaml import load_yaml_file
from megl_ray.errors import ConfigError

DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice", "grid")
NOT_SWEEPABLE = {
    "run.name": "each trial's run name is set by the sweep",
    "run.storage_path": "the sweep keeps its trials on the base config's storage",
    "train.num_workers": "it fixes each trial's resources; set it in the base config",
    "train.cpus_per_worker": "it fixes each trial's resources; set it in the base config",
    "train.use_gpu": "it fixes each trial's resources; set it in the base config",
    "train.epochs": "it is the schedule ASHA stops trials early on; set it in the base config",
}
_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


class SpaceError(ConfigError):
    """A bad search space; the message names the file and the key."""


@dataclass(frozen=True)
class Param:
    """One swept config key."""

    key: str
    """Dotted config path, e.g. ``loss.text_weight``."""
    kind: str
    """One of ``DISTRIBUTIONS``."""
    args: tuple[Any, ...]
    """``(low, high)`` for uniform/loguniform/randint, the values for choice/grid."""

    def domain(self) -> Any:
        """The Ray Tune domain (or grid search) of this parameter."""
        if self.kind == "uniform":
            return tune.uniform(*self.args)
        if self.kind == "loguniform":
            return tune.loguniform(*self.args)
        if self.kind == "randint":
            return tune.randint(*self.args)
        if self.kind == "choice":
            return tune.choice(list(self.args))
        return tune.grid_search(list(self.args))

    def describe(self) -> str:
        return f"{self.key}: {{{self.kind}: {list(self.args)}}}"


@dataclass(frozen=True)
class SearchSpace:
    """A validated search space: the parameters in file order."""

    source: str
    params: tuple[Param, ...]

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.params]

    def grid_size(self) -> int:
        """Trials per sample: the product of the grid sizes (1 without grids)."""
        return math.prod(len(p.args) for p in self.params if p.kind == "grid")

    def only_grid(self) -> bool:
        return all(p.kind == "grid" for p in self.params)

    def param_space(self) -> dict[str, Any]:
        """Ray Tune's ``param_space``: nested like the config (``{"loss": {"text_weight": loguniform}}``)."""
        space: dict[str, Any] = {}
        for p in self.params:
            section, name = p.key.split(".", 1)
            space.setdefault(section, {})[name] = p.domain()
        return space

    def values(self, trial_config: dict[str, Any]) -> dict[str, Any]:
        """The swept values of one trial, by dotted key, from the trial's (nested) config."""
        out = {}
        for key in self.keys:
            section, name = key.split(".", 1)
            out[key] = _plain(trial_config.get(section, {}).get(name))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {p.key: {p.kind: list(p.args)} for p in self.params}


def _plain(value: Any) -> Any:
    """numpy scalars (as Tune samples them) as plain Python numbers."""
    item = getattr(value, "item", None)
    return item() if callable(item) else value


def apply_values(base: dict[str, Any], values: dict[str, Any]) -> MEGLConfig:
    """``base`` (a ``MEGLConfig.to_dict()``) with ``values`` (dotted key → value) set, validated."""
    tree = {section: dict(fields) if isinstance(fields, dict) else fields for section, fields in base.items()}
    for key, value in values.items():
        section, name = key.split(".", 1)
        tree.setdefault(section, {})[name] = _plain(value)
    return config_from_dict(tree)


def _field_type(key: str) -> Any:
    """The annotation of a dotted config key, or None when the key does not exist."""
    parts = key.split(".")
    if len(parts) != 2:
        return None
    cls: Any = MEGLConfig
    for part in parts:
        if not dataclasses.is_dataclass(cls):
            return None
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return None
        cls = hints[part]
    return None if dataclasses.is_dataclass(cls) else cls


def _base_type(tp: Any) -> Any:
    """``float | None`` → float; Literal and list types unchanged."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _number(value: Any, integer: bool = False) -> Any:
    """A YAML number, also the ``1e-4`` spelling that YAML 1.1 reads as a string; None when not a number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and _FLOAT.match(value.strip()):
        value = float(value)
    if integer:
        if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
            return int(value)
        return None
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def _valid_keys() -> list[str]:
    sections = typing.get_type_hints(MEGLConfig)
    return [f"{name}.{f.name}" for name, cls in sections.items() for f in dataclasses.fields(cls)]


def _valid_keys_of(section: str) -> list[str]:
    return [k for k in _valid_keys() if k.startswith(section + ".")]


def _closest(key: str) -> str:
    match = difflib.get_close_matches(key, _valid_keys(), n=1)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _parse_param(key: Any, spec: Any, fail: Any) -> Param:
    if isinstance(key, str) and key in typing.get_type_hints(MEGLConfig):
        fail(key, f"is a config section: name a key in it, e.g. '{_valid_keys_of(key)[0]}'")
    if not isinstance(key, str) or _field_type(key) is None:
        fail(key, f"unknown config key{_closest(str(key))}")
    if key in NOT_SWEEPABLE:
        fail(key, f"cannot be swept: {NOT_SWEEPABLE[key]}")
    tp = _base_type(_field_type(key))
    if not isinstance(spec, dict) or len(spec) != 1:
        fail(
            key,
            f"expected one distribution as {{name: args}} with name one of {', '.join(DISTRIBUTIONS)}, got {spec!r}",
        )
    ((kind, args),) = spec.items()
    if kind not in DISTRIBUTIONS:
        fail(key, f"unknown distribution '{kind}' (valid: {', '.join(DISTRIBUTIONS)})")
    if not isinstance(args, list) or not args:
        fail(key, f"{kind} takes a non-empty list, got {args!r}")
    if kind in ("uniform", "loguniform", "randint"):
        if tp not in (float, int) or (tp is int and kind != "randint"):
            what = "an integer key: use randint, choice or grid" if tp is int else f"not numeric ({_describe(tp)})"
            fail(key, f"{kind} needs a {'numeric' if kind == 'randint' else 'float'} key, but it is {what}")
        if len(args) != 2:
            fail(key, f"{kind} takes [low, high], got {args!r}")
        low, high = (_number(a, integer=kind == "randint") for a in args)
        if low is None or high is None:
            fail(key, f"{kind} bounds must be {'integers' if kind == 'randint' else 'numbers'}, got {args!r}")
        if low >= high:
            fail(key, f"{kind} needs low < high, got [{low}, {high}]")
        if kind == "loguniform" and low <= 0:
            fail(key, f"loguniform needs 0 < low, got [{low}, {high}]")
        return Param(key, kind, (float(low), float(high)) if kind != "randint" else (low, high))
    values = []
    for value in args:
        if tp in (float, int):
            number = _number(value, integer=tp is int)
            value = value if number is None else number  # a non-number fails in the type check below
        try:
            values.append(coerce(value, _field_type(key), key))
        except ConfigError as err:
            fail(key, f"{kind} value {value!r} does not fit: {str(err).split(': ', 1)[-1]}")
    return Param(key, kind, tuple(values))


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def parse_space(data: Any, source: str = "<space>", base: MEGLConfig | None = None) -> SearchSpace:
    """Validate a loaded space (a mapping) against ``MEGLConfig`` and, for the values, against ``base``."""

    def fail(key: Any, message: str) -> typing.NoReturn:
        raise SpaceError(f"{source}: {key}: {message}")

    if not isinstance(data, dict) or not data:
        raise SpaceError(f"{source}: expected a non-empty mapping of config key → distribution, got {data!r}")
    params = tuple(_parse_param(key, spec, fail) for key, spec in data.items())
    base_dict = (base or MEGLConfig()).to_dict()
    for p in params:  # every bound and value as the config checks it (e.g. loss.dc_weight >= 0)
        candidates = p.args if p.kind in ("choice", "grid") else p.args[:2]
        for value in candidates:
            if p.kind == "randint" and value == p.args[1]:
                value = value - 1  # the upper bound is excluded
            try:
                apply_values(base_dict, {p.key: value})
            except ConfigError as err:
                message = str(err)
                message = message[len(p.key) + 2 :] if message.startswith(p.key + ": ") else message
                fail(p.key, f"{p.kind} value {value!r} is invalid: {message}")
    return SearchSpace(source, params)


def load_space(path: str | Path, base: MEGLConfig | None = None) -> SearchSpace:
    """Load and validate a space file (or a packaged space by name); every error is a ``SpaceError`` naming the
    file (and the key)."""
    try:
        path = space_path(path)
    except ConfigError as err:
        raise SpaceError(str(err)) from None
    return parse_space(load_yaml_file(path, "search space file", SpaceError), str(path), base)
