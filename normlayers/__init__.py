"""normlayers: normalization layers for studying Batch Normalization and its alternatives.

Pure PyTorch. ``build_norm(spec, num_features)`` builds any registered variant from a spec
(``"bn"``, ``"gn:groups=8"``, ``{"name": "bgn", "groups": 8}``); ``NormSpec.parse(spec)`` parses
and checks one without building it; ``available()`` lists them.
``BNPreconditioner(model)`` is Batch Normalization Preconditioning: no layer, the gradients of
every conv and linear layer conditioned as BN would condition them (:mod:`normlayers.bnp`).
"""

import importlib

# name -> the module defining it. Names load on first use (PEP 562): ``import normlayers`` and checking a
# spec (NormSpec, normlayers.catalog) need no torch; a layer's module loads when its class is first asked for.
_EXPORTS = {
    "adaptive_clip_grad_": "agc", "unitwise_norm": "agc",
    "NormLayer": "base",
    "BinaryConv2d": "binary", "RPReLU": "binary", "RSign": "binary", "approx_sign": "binary",
    "binarize_weight": "binary",
    "BNPreconditioner": "bnp",
    "freeze_norms": "frozen", "unfreeze_norms": "frozen",
    "link_kalman_layers": "kalman",
    "precise_stats": "precise",
    "NormInfo": "registry", "available": "registry", "build_norm": "registry", "norm_class": "registry",
    "parse_spec": "registry", "register": "registry",
    "NormSpec": "spec",
    "batch_covariance": "stats", "batch_moments": "stats",
    "convert_sync": "sync", "revert_sync": "sync",
    "set_virtual_devices": "virtual",
    "GAMMA_RELU": "weight_std", "standardize_weights": "weight_std", "trainable_weight": "weight_std",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"normlayers.{_EXPORTS[name]}"), name)
    else:
        try:  # a submodule, e.g. normlayers.bnp
            value = importlib.import_module(f"normlayers.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"normlayers.{name}":
                raise
            raise AttributeError(f"module 'normlayers' has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


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
