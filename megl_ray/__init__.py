"""megl_ray: Multimodal Explanation-Guided Learning (arXiv 2411.13053) on Ray Train, Ray Data and DeepSpeed.

The library (``megl_ray.model``, ``megl_ray.losses``, ``megl_ray.data`` transforms and schema) imports no Ray;
only the entry points (``megl_ray.train``, ``megl_ray.tune``, ``megl_ray.data.pipeline``) wire Ray in.
"""

__version__ = "0.1.0"
