"""The one typed configuration (``megl_config``), how it is built from YAML and overrides (``build``,
``strict_yaml``), where megl_ray keeps its files (``home``) and the I/O safety checks everything below the commands
relies on (``safe_io``). The bottom layer of the package: it imports nothing of megl_ray but ``errors``."""

from megl_ray.config.home import megl_home
from megl_ray.config.megl_config import (
    DataConfig,
    LossConfig,
    MEGLConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
    config_from_dict,
    load_config,
)
from megl_ray.config.packaged import packaged_config, preset_names

__all__ = [
    "DataConfig",
    "LossConfig",
    "MEGLConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "TrainConfig",
    "config_from_dict",
    "load_config",
    "megl_home",
    "packaged_config",
    "preset_names",
]
