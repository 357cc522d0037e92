"""Errors a user can cause. Entry points show them as one line (see ``megl_ray.cli``), never as a traceback."""

import re


class UserError(Exception):
    """An error caused by the user's input (config, paths, data, storage); its message is shown as one line."""


class ConfigError(UserError, ValueError):
    """A bad configuration key or value; the message names the key."""


class Interrupted(KeyboardInterrupt):
    """A command stopped by SIGINT (exit 130) or SIGTERM (exit 143); ``lines`` say what was interrupted and how
    to go on (the entry point prints them instead of a traceback)."""

    def __init__(self, exit_code: int = 130, lines: tuple[str, ...] = ()):
        super().__init__(*lines)
        self.exit_code = exit_code
        self.lines = lines


_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^\s/@]*@")


def redact_urls(text: str) -> str:
    """``text`` with the user info of every URL replaced (``http://user:pass@host`` → ``http://***@host``): an
    endpoint URL may carry credentials, and messages end up in logs and CI output."""
    return _USERINFO.sub(r"\1***@", text)
