"""Put on PYTHONPATH, this makes a Python that looks like a bare GPU machine's: the top-level packages named in
``MEGL_BLOCK_IMPORTS`` (comma-separated) cannot be imported, and ``importlib.util.find_spec`` reports them missing.

None in ``sys.modules`` is Python's own "not importable" mark: ``import ray`` raises ModuleNotFoundError and
``find_spec("ray")`` returns None, so code that probes for an optional package (accelerate, transformers) behaves as
where it is not installed — a finder that raised from ``find_spec`` would break those probes instead. The venv has
no sitecustomize of its own for this one to shadow (tests/integration/test_gpu_step_bench.py checks).
"""

import os
import sys

for _name in filter(None, os.environ.get("MEGL_BLOCK_IMPORTS", "").split(",")):
    sys.modules[_name.strip()] = None
