"""YAML as megl_ray reads it: safe, strict about duplicate keys, bounded, and every problem one line.

Plain ``yaml.safe_load`` keeps the last of two equal keys (a config that says ``lr`` twice silently trains with
one of them), follows any number of aliases (a few lines can expand to billions of nodes once copied), and raises
``RecursionError`` on absurd nesting. Config files, search spaces and exports' ``config.yaml`` all load through
``load_yaml_file``/``parse_yaml`` instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from megl_ray.config import safe_io
from megl_ray.errors import ConfigError, UserError

MAX_ALIASES = 64
"""Alias uses (``*name``) allowed in one document: configs need few, an alias bomb needs many."""
YAML_LIMIT = 16 * safe_io.MIB


class StrictLoader(yaml.SafeLoader):
    """``SafeLoader`` that refuses duplicate mapping keys and alias bombs."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self._aliases = getattr(self, "_aliases", 0) + 1
            if self._aliases > MAX_ALIASES:
                raise yaml.composer.ComposerError(
                    None, None, f"more than {MAX_ALIASES} aliases", self.peek_event().start_mark
                )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                except TypeError:  # an unhashable key: the base class reports it
                    break
                if duplicate:
                    raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


def parse_yaml(text: str, source: str, error: type[UserError] = ConfigError) -> Any:
    """Parse one YAML document strictly; any problem is ``error`` naming ``source`` and, when known, line:column."""
    try:
        return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - StrictLoader is a SafeLoader
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise error(f"{source}{where}: invalid YAML ({getattr(err, 'problem', None) or err})") from None
    except RecursionError:
        raise error(f"{source}: invalid YAML (nested too deeply)") from None


def load_yaml_file(path: str | Path, what: str, error: type[UserError] = ConfigError) -> Any:
    """A YAML file read with ``safe_io.read_text`` (regular, bounded, UTF-8) and parsed with ``parse_yaml``."""
    try:
        text = safe_io.read_text(path, YAML_LIMIT, what)
    except safe_io.FileProblem as problem:
        raise error(f"{what} not found: {path}" if problem.kind == "missing" else problem.detail) from None
    return parse_yaml(text, str(path), error)
