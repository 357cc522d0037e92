"""Errors a user can cause. Entry points show them as one line (see ``megl_ray.cli``), never as a traceback."""

import re


class UserError(Exception):
    """An error caused by the user's input (config, paths, data, storage); its message is shown as one line."""


class ConfigError(UserError, ValueError):
    """A bad configuration key or value; the message names the key."""


_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^\s/@]*@")


def redact_urls(text: str) -> str:
    """``text`` with the user info of every URL replaced (``http://user:pass@host`` → ``http://***@host``): an
    endpoint URL may carry credentials, and messages end up in logs and CI output."""
    return _USERINFO.sub(r"\1***@", text)
