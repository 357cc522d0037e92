"""Errors a user can cause. Entry points show them as one line (see ``megl_ray.cli``), never as a traceback."""


class UserError(Exception):
    """An error caused by the user's input (config, paths, data, storage); its message is shown as one line."""


class ConfigError(UserError, ValueError):
    """A bad configuration key or value; the message names the key."""
