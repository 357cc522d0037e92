"""The MEGL model (classifier, saliency, SDTG vision-language model). Imports no Ray."""

from megl_ray.model.megl import MEGLModel, MEGLOutput, build_megl_model

__all__ = ["MEGLModel", "MEGLOutput", "build_megl_model"]
