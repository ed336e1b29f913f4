"""Batch norm written from its definition in NumPy float64: the reference for tests that
PyTorch cannot serve (masks, channels-last, odd ranks, half precision)."""

import numpy as np


def batchnorm(params, state, x, training, *, momentum=0.1, eps=1e-5, axis=1, mask=None):
    """Returns (y, new_state) in float64, following PyTorch's BatchNorm semantics, with
    masked-out positions left out of the mean, the variance and the Bessel count."""
    x = np.asarray(x, np.float64)
    xc = np.moveaxis(x, axis, -1)  # (..., C)
    valid = np.ones(xc.shape[:-1], bool)
    if mask is not None:
        mask = np.asarray(mask)
        valid = valid & mask.reshape(mask.shape + (1,) * (valid.ndim - mask.ndim))
    values = xc[valid]  # (n, C)
    n = values.shape[0]
    weight = np.asarray(params["weight"], np.float64) if params else 1.0
    bias = np.asarray(params["bias"], np.float64) if params else 0.0
    new_state = state
    if training or not state:
        mean = values.mean(axis=0)
        var = ((values - mean) ** 2).mean(axis=0)
        if training and state:
            count = int(state["num_batches_tracked"]) + 1
            factor = 1.0 / count if momentum is None else momentum
            new_state = {
                "running_mean": (1 - factor) * np.asarray(state["running_mean"], np.float64)
                + factor * mean,
                "running_var": (1 - factor) * np.asarray(state["running_var"], np.float64)
                + factor * var * n / (n - 1),
                "num_batches_tracked": count,
            }
    else:
        mean = np.asarray(state["running_mean"], np.float64)
        var = np.asarray(state["running_var"], np.float64)
    y = (xc - mean) / np.sqrt(var + eps) * weight + bias
    return np.moveaxis(y, -1, axis), new_state
