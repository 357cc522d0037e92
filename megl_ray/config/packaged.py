"""The presets shipped in ``megl_ray/config/presets``, named wherever a config file is asked for (``--config tiny``):
a path that exists wins, as it does for ``from_pretrained``."""

from __future__ import annotations

from pathlib import Path

from megl_ray.errors import ConfigError

PRESETS_DIR = Path(__file__).parent / "presets"


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
