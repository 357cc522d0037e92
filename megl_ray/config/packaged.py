"""The presets shipped in ``megl_ray/config/presets``, named wherever a config file is asked for (``--config tiny``),
and the search spaces in ``megl_ray/config/spaces`` (``tune --space loss_weights``): a path that exists wins, as it
does for ``from_pretrained``."""

from __future__ import annotations

from pathlib import Path

from megl_ray.errors import ConfigError

PRESETS_DIR = Path(__file__).parent / "presets"
SPACES_DIR = Path(__file__).parent / "spaces"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def packaged_config(name: str) -> Path:
    """Path of a preset shipped in ``megl_ray/config/presets`` (e.g. ``tiny``)."""
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"no packaged config named '{name}' (presets: {', '.join(preset_names())})")
    return path


def config_path(value: str | Path) -> Path:
    """A config file: ``value`` where that file exists, else the preset of that name; neither is one line naming
    both."""
    path = Path(value).expanduser()
    if path.exists() or path.suffix in (".yaml", ".yml", ".json") or "/" in str(value):
        return path  # the YAML reader says what is wrong with it
    if (PRESETS_DIR / f"{value}.yaml").is_file():
        return PRESETS_DIR / f"{value}.yaml"
    raise ConfigError(f"config file not found: {value} (nor a packaged preset: {', '.join(preset_names())})")


def space_names() -> list[str]:
    return sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))


def space_path(value: str | Path) -> Path:
    """A search space file: ``value`` where that file exists or it looks like a path, else the packaged space of
    that name."""
    path = Path(value).expanduser()
    if path.exists() or path.suffix in (".yaml", ".yml") or "/" in str(value):
        return path
    if (SPACES_DIR / f"{value}.yaml").is_file():
        return SPACES_DIR / f"{value}.yaml"
    raise ConfigError(f"search space file not found: {value} (nor a packaged space: {', '.join(space_names())})")
