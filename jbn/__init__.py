"""jbn: batch normalization for JAX as one pure function, with PyTorch's semantics."""

from jbn._batchnorm import batch_statistics, batchnorm, init
from jbn._running_stats import reset_running_stats, stale_layers, sync_running_stats
from jbn.interop import (
    fold,
    fold_into,
    from_flax,
    from_torch,
    from_torch_model,
    options_from_torch,
    to_flax,
    to_torch,
    to_torch_model,
)

__all__ = ["batch_statistics", "batchnorm", "fold", "fold_into", "from_flax", "from_torch",
           "from_torch_model", "init", "options_from_torch", "reset_running_stats",
           "stale_layers", "sync_running_stats", "to_flax", "to_torch", "to_torch_model"]
__version__ = "0.1.0"
