"""normlayers: normalization layers for studying Batch Normalization and its alternatives.

Pure PyTorch. ``build_norm(spec, num_features)`` builds any registered variant from a spec
(``"bn"``, ``"gn:groups=8"``, ``{"name": "bgn", "groups": 8}``); ``NormSpec.parse(spec)`` parses
and checks one without building it; ``available()`` lists them.
``BNPreconditioner(model)`` is Batch Normalization Preconditioning: no layer, the gradients of
every conv and linear layer conditioned as BN would condition them (:mod:`normlayers.bnp`).
"""

from normlayers import batchgroup as _batchgroup  # noqa: F401
from normlayers import batchnorm as _batchnorm  # noqa: F401  (registers its variants)
from normlayers import cbn as _cbn  # noqa: F401
from normlayers import evonorm as _evonorm  # noqa: F401
from normlayers import frn as _frn  # noqa: F401
from normlayers import frozen as _frozen  # noqa: F401
from normlayers import ghost as _ghost  # noqa: F401
from normlayers import groupnorm as _groupnorm  # noqa: F401
from normlayers import ic as _ic  # noqa: F401
from normlayers import iebn as _iebn  # noqa: F401
from normlayers import kalman as _kalman  # noqa: F401
from normlayers import positional as _positional  # noqa: F401
from normlayers import proxy as _proxy  # noqa: F401
from normlayers import renorm as _renorm  # noqa: F401
from normlayers import rms as _rms  # noqa: F401
from normlayers import switchable as _switchable  # noqa: F401
from normlayers import whitening as _whitening  # noqa: F401
from normlayers.agc import adaptive_clip_grad_, unitwise_norm
from normlayers.base import NormLayer
from normlayers.binary import BinaryConv2d, RPReLU, RSign, approx_sign, binarize_weight
from normlayers.bnp import BNPreconditioner
from normlayers.frozen import freeze_norms, unfreeze_norms
from normlayers.kalman import link_kalman_layers
from normlayers.precise import precise_stats
from normlayers.registry import NormInfo, available, build_norm, norm_class, parse_spec, register
from normlayers.spec import NormSpec
from normlayers.stats import batch_covariance, batch_moments
from normlayers.sync import convert_sync, revert_sync
from normlayers.virtual import set_virtual_devices
from normlayers.weight_std import GAMMA_RELU, standardize_weights, trainable_weight

__all__ = [
    "GAMMA_RELU",
    "BinaryConv2d",
    "RPReLU",
    "RSign",
    "adaptive_clip_grad_",
    "approx_sign",
    "binarize_weight",
    "standardize_weights",
    "trainable_weight",
    "unitwise_norm",
    "BNPreconditioner",
    "NormInfo",
    "NormLayer",
    "NormSpec",
    "available",
    "batch_covariance",
    "batch_moments",
    "build_norm",
    "convert_sync",
    "freeze_norms",
    "link_kalman_layers",
    "norm_class",
    "parse_spec",
    "precise_stats",
    "register",
    "revert_sync",
    "unfreeze_norms",
    "set_virtual_devices",
]
