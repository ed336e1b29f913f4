"""jbn: batch normalization for JAX as one pure function, with PyTorch's semantics."""

from jbn._batchnorm import batchnorm, init

__all__ = ["batchnorm", "init"]
__version__ = "0.1.0"
