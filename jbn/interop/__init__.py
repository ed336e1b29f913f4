"""Conversion to and from PyTorch and Flax, and batch norm folded away for inference.

``torch``: state_dicts in and out; ``flax``: ``linen.BatchNorm`` variables in and out;
``fold``: eval-mode batch norm as a multiply-add, or folded into the layer before it.
None of them imports torch or flax.
"""

from jbn.interop.flax import from_flax, to_flax
from jbn.interop.fold import fold, fold_into
from jbn.interop.torch import from_torch, to_torch

__all__ = ["fold", "fold_into", "from_flax", "from_torch", "to_flax", "to_torch"]
