"""Shared conventions of every ``python -m megl_ray.*`` command.

Each command prints logs to stderr and its result as one JSON object on the last line of stdout, so that scripts
can read ``tail -n 1``. Errors a user can cause (bad config, missing file, unreachable S3) are raised as
``UserError`` and become one clear line on stderr, ``{"error": ...}`` on stdout and exit status 2 — never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from megl_ray.errors import UserError, redact_urls

T = TypeVar("T")

__all__ = ["ArgumentParser", "UserError", "options_from", "print_result", "run_cli", "setup_logging"]


_RST_LITERAL = re.compile(r"``([^`]*)``")


def plain(text: str) -> str:
    """RST inline literals (````x````) as plain text: docstrings use them, ``--help`` shows text."""
    return _RST_LITERAL.sub(r"\1", text)


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises ``UserError`` (one line, exit 2 through ``run_cli``) instead of exiting itself, and
    shows docstring text (description, help) without RST markup. An epilog is kept as written (a table)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("description"):
            kwargs["description"] = plain(kwargs["description"])
        if kwargs.get("epilog"):
            kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args: Any, **kwargs: Any) -> Any:
        if isinstance(kwargs.get("help"), str):
            kwargs["help"] = plain(kwargs["help"])
        return super().add_argument(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{self.prog}: {message}")


def options_from(cls: type[T], args: argparse.Namespace, **changes: Any) -> T:
    """The typed options ``cls`` (a dataclass whose fields are named as the parser's destinations) of parsed
    ``args``, with ``changes`` applied (e.g. a list argument as a tuple)."""
    return cls(**{**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}, **changes})


def add_base_path_argument(p: argparse.ArgumentParser) -> None:
    """``--base-path`` of the commands that load an export (evaluate, explain, export)."""
    p.add_argument(
        "--base-path",
        action="append",
        default=[],
        metavar="[ROLE=]PATH",
        help="re-point a non-standalone export at its base checkpoint (local, s3:// or a hub id): the LLaVA for "
        "the llava preset; vision=PATH and lm=PATH for clip-qwen2 (repeatable)",
    )


def standard_json(value: Any) -> Any:
    """``value`` with every NaN or infinity replaced by None: JSON has no such numbers (``json.dumps`` would write
    ``NaN``, which strict parsers such as ``jq`` or JavaScript refuse)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: standard_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [standard_json(v) for v in value]
    return value


def print_result(result: dict[str, Any]) -> None:
    """Print the command's result as one standard JSON object on the last line of stdout."""
    sys.stdout.flush()
    print(json.dumps(standard_json(result), sort_keys=True, default=str, allow_nan=False), flush=True)


class _StderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is when a record is emitted, not as it was when logging was set up: a
    ``main(argv)`` called in process (a test, a notebook) that swaps ``sys.stderr`` must not leave logging bound to
    a stream that is closed afterwards."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass  # always the current sys.stderr


def setup_logging(verbose: bool = False) -> None:
    """Logs go to stderr so stdout's last line stays machine-readable."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=[_StderrHandler()],
        force=True,
    )


def run_cli(
    prog: str, main: Callable[[Sequence[str] | None], dict[str, Any]], argv: Sequence[str] | None = None
) -> int:
    """Run ``main(argv)``, print its result dict as the last stdout line, turn ``UserError`` into one line + exit 2."""
    try:
        result = main(argv)
    except UserError as err:
        # One line, whatever the message held; characters stderr cannot encode (a lone surrogate from a data file)
        # are escaped rather than raising while the error is reported.
        message = " ".join(redact_urls(str(err)).encode("utf-8", "backslashreplace").decode("utf-8").split())
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
        print_result({"error": message})
        return 2
    except KeyboardInterrupt as err:
        lines = getattr(err, "lines", ()) or (f"{prog}: interrupted",)
        print("\n".join(lines), file=sys.stderr, flush=True)
        return getattr(err, "exit_code", 130)
    print_result(result)
    return 0
