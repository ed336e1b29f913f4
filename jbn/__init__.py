"""jbn: batch normalization for JAX as one pure function, with PyTorch's semantics."""

from jbn._batchnorm import batchnorm, init
from jbn.interop import fold, fold_into, from_flax, from_torch, to_flax, to_torch

__all__ = ["batchnorm", "fold", "fold_into", "from_flax", "from_torch", "init", "to_flax",
           "to_torch"]
__version__ = "0.1.0"
