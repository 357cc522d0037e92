"""megl_ray: Multimodal Explanation-Guided Learning (arXiv 2411.13053) on Ray Train, Ray Data and DeepSpeed.

The package in layers, each importing only those below it (an import-linter contract in ``pyproject.toml``):
commands (``train``, ``tune``, ``evaluate``, ``explain``, ``export``, ``train_local``) → ``tuning`` → ``driver`` →
``training`` → ``reporting`` → ``evaluation`` → ``model`` → ``data`` → ``cluster`` → ``storage`` → ``config`` →
``cli``/``errors``. ``model`` (losses included) and the data transforms import no Ray.

Modules that moved in 0.2 stay importable under their old names for one release (``MOVED`` below): Ray Tune pickles
classes and functions by module path (a sweep's scheduler and callbacks live in its experiment state), so a sweep
started before the move must find ``megl_ray.tune_hooks.ResumableASHA`` to resume; user code importing an old path
keeps working too. Each old name is the new module itself (a ``sys.modules`` alias), not a copy. Remove in 0.3.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType

__version__ = "0.2.0"

MOVED = {
    "megl_ray.clipscore": "megl_ray.evaluation.clipscore",
    "megl_ray.config_build": "megl_ray.config.build",
    "megl_ray.efficiency": "megl_ray.evaluation.efficiency",
    "megl_ray.inference": "megl_ray.evaluation.inference",
    "megl_ray.losses": "megl_ray.model.losses",
    "megl_ray.metrics": "megl_ray.evaluation.metrics",
    "megl_ray.optim": "megl_ray.training.optim",
    "megl_ray.retrying_fs": "megl_ray.storage.retrying_fs",
    "megl_ray.safe_io": "megl_ray.config.safe_io",
    "megl_ray.spice": "megl_ray.evaluation.spice",
    "megl_ray.strict_yaml": "megl_ray.config.strict_yaml",
    "megl_ray.tune_hooks": "megl_ray.tuning.hooks",
    "megl_ray.tune_space": "megl_ray.tuning.space",
    "megl_ray.training.console": "megl_ray.reporting.console",
    "megl_ray.training.cost_model": "megl_ray.planning.cost_model",
    "megl_ray.training.credentials": "megl_ray.cluster.credentials",
    "megl_ray.training.embedded": "megl_ray.driver.embedded",
    "megl_ray.training.inputs": "megl_ray.driver.inputs",
    "megl_ray.training.local_cluster": "megl_ray.cluster.local_cluster",
    "megl_ray.training.memory_model": "megl_ray.planning.memory_model",
    "megl_ray.training.pictures": "megl_ray.reporting.pictures",
    "megl_ray.training.placement": "megl_ray.cluster.placement",
    "megl_ray.training.probe": "megl_ray.probes.fixed_batch",
    "megl_ray.training.progress": "megl_ray.reporting.progress",
    "megl_ray.training.ray_env": "megl_ray.cluster.ray_env",
    "megl_ray.training.resume_probe": "megl_ray.probes.resume",
    "megl_ray.training.run_identity": "megl_ray.driver.run_identity",
    "megl_ray.training.tracking": "megl_ray.reporting.tracking",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old module name and loads it as the module it became."""

    def find_spec(self, fullname: str, path: object = None, target: object = None):
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec) -> ModuleType:
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module: ModuleType) -> None:
        pass  # the new module is already executed; its spec and name stay its own


_FINDER = _Alias()


if _FINDER not in sys.meta_path:
    sys.meta_path.append(_FINDER)
