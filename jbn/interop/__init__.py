"""Conversion to and from PyTorch and Flax, and batch norm folded away for inference.

``torch``: state_dicts in and out, one layer or a whole model, and the options of a live
model's batch norms; ``flax``: ``linen.BatchNorm`` variables in and out; ``folding``: eval-mode
batch norm as a multiply-add, or folded into the layer before it. Only
``options_from_torch`` imports torch, and nothing here imports flax.
"""

from jbn.interop.flax import from_flax, to_flax
from jbn.interop.folding import fold, fold_into
from jbn.interop.torch import (
    from_torch,
    from_torch_model,
    options_from_torch,
    to_torch,
    to_torch_model,
)

__all__ = ["fold", "fold_into", "from_flax", "from_torch", "from_torch_model",
           "options_from_torch", "to_flax", "to_torch", "to_torch_model"]
