"""normlayers: normalization layers for studying Batch Normalization and its alternatives.

Pure PyTorch. ``build_norm(spec, num_features)`` builds any registered variant from a spec
(``"bn"``, ``"gn:groups=8"``, ``{"name": "bgn", "groups": 8}``); ``available()`` lists them.
``BNPreconditioner(model)`` is Batch Normalization Preconditioning: no layer, the gradients of
every conv and linear layer conditioned as BN would condition them (:mod:`normlayers.bnp`).
"""

from normlayers import batchgroup as _batchgroup  # noqa: F401
from normlayers import batchnorm as _batchnorm  # noqa: F401  (registers its variants)
from normlayers import cbn as _cbn  # noqa: F401
from normlayers import evonorm as _evonorm  # noqa: F401
from normlayers import frn as _frn  # noqa: F401
from normlayers import ghost as _ghost  # noqa: F401
from normlayers import groupnorm as _groupnorm  # noqa: F401
from normlayers import ic as _ic  # noqa: F401
from normlayers import iebn as _iebn  # noqa: F401
from normlayers import kalman as _kalman  # noqa: F401
from normlayers import positional as _positional  # noqa: F401
from normlayers import proxy as _proxy  # noqa: F401
from normlayers import renorm as _renorm  # noqa: F401
from normlayers.base import NormLayer
from normlayers.bnp import BNPreconditioner
from normlayers.kalman import link_kalman_layers
from normlayers.registry import NormInfo, available, build_norm, norm_class, parse_spec, register
from normlayers.stats import batch_moments
from normlayers.sync import convert_sync, revert_sync

__all__ = [
    "BNPreconditioner",
    "NormInfo",
    "NormLayer",
    "available",
    "batch_moments",
    "build_norm",
    "convert_sync",
    "link_kalman_layers",
    "norm_class",
    "parse_spec",
    "register",
    "revert_sync",
]
