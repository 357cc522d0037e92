"""Every config key with its type, default and one line of documentation, read from the dataclasses' own field
docstrings (the string literal under each field) — what ``train --help`` and ``tune --help`` list, so the keys a
user can override are documented in one place, the code."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import re
import textwrap
from functools import cache
from typing import Any

from megl_ray.cli import plain
from megl_ray.config.megl_config import MEGLConfig


@cache
def field_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` of a dataclass, from the string literal that follows each annotated field."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, after in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def first_sentence(text: str) -> str:
    text = " ".join(plain(text).split())
    end = re.search(r"(?<!e\.g\.)(?<!i\.e\.)(?<=\.)\s", text)  # "e.g. x" goes on
    return text[: end.start()].rstrip(".") if end else text


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def config_keys() -> list[tuple[str, str, str]]:
    """``(section.key, default, first sentence of its docstring)`` for every key, in declaration order."""
    rows = []
    for section in dataclasses.fields(MEGLConfig):
        cls = section.default_factory  # type: ignore[misc]
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            default = _default(f)
            shown = json.dumps(default) if default is None or isinstance(default, bool) else str(default)
            shown = shown.replace("\n", "\\n")  # as YAML spells them: null, true
            rows.append((f"{section.name}.{f.name}", shown, first_sentence(docs.get(f.name, ""))))
    return rows


def config_reference(width: int = 118) -> str:
    """The keys as an argparse epilog: ``key (default)`` then its line, wrapped, section by section."""
    lines = ["config keys (override as key=value; `megl train --print-config` shows a resolved config):"]
    section = None
    for key, default, doc in config_keys():
        if key.split(".")[0] != section:
            section = key.split(".")[0]
            lines.append("")
        if len(default) > 30:
            default = default[:27] + "..."
        head = f"  {key} ({default})"
        lines.extend(textwrap.wrap(doc, width, initial_indent=f"{head}  ", subsequent_indent=" " * 6) or [head])
    return "\n".join(lines)
