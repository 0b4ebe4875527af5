"""normlayers: normalization layers for studying Batch Normalization and its alternatives.

Pure PyTorch. ``build_norm(spec, num_features)`` builds any registered variant from a spec
(``"bn"``, ``"gn:groups=8"``, ``{"name": "bgn", "groups": 8}``); ``available()`` lists them.
"""

from normlayers import batchnorm as _batchnorm  # noqa: F401  (registers its variants)
from normlayers.base import NormLayer
from normlayers.registry import NormInfo, available, build_norm, norm_class, parse_spec, register
from normlayers.stats import batch_moments

__all__ = [
    "NormInfo",
    "NormLayer",
    "available",
    "batch_moments",
    "build_norm",
    "norm_class",
    "parse_spec",
    "register",
]
