"""Batch norm written from its definition in NumPy float64: the reference for tests that
PyTorch cannot serve (masks, channels-last, odd ranks, half precision, batch
renormalization, ghost batches)."""

import numpy as np


def batchnorm(params, state, x, training, *, momentum=0.1, eps=1e-5, axis=1, mask=None,
              renorm=None, virtual_batch_size=None, correction=None):
    """Returns (y, new_state) in float64, following PyTorch's BatchNorm semantics, with
    masked-out positions left out of the mean, the variance and the Bessel count.

    In training, ``renorm=(rmax, dmax)`` is Algorithm 1 of Ioffe (2017): each x̂ becomes
    ``x̂·r + d``, ``r = clip(σ_B/σ, 1/rmax, rmax)``, ``d = clip((μ_B − μ)/σ, −dmax, dmax)``,
    ``σ = √(running_var + eps)``; ``correction=(r, d)``, one row per group, replaces the
    clipped ratios by given values. ``virtual_batch_size=k`` normalizes each group of k
    examples with its own statistics (Hoffer et al. 2017); the running statistics then learn
    the mean of all valid values and the pooled within-group variance Σ M2_g / Σ (n_g − 1).
    """
    xc, valid = _channels_last(x, axis, mask)
    weight = np.asarray(params["weight"], np.float64) if params else 1.0
    bias = np.asarray(params["bias"], np.float64) if params else 0.0
    if not training and state:
        mean = np.asarray(state["running_mean"], np.float64)
        var = np.asarray(state["running_var"], np.float64)
        return np.moveaxis((xc - mean) / np.sqrt(var + eps) * weight + bias, -1, axis), state
    y = np.empty_like(xc)
    groups = list(_groups(xc, valid, virtual_batch_size))
    for g, (rows, values) in enumerate(groups):
        if not len(values):  # a group without valid values has no statistics
            y[rows] = np.nan
            continue
        mean = values.mean(axis=0)
        var = ((values - mean) ** 2).mean(axis=0)
        xhat = (xc[rows] - mean) / np.sqrt(var + eps)
        if renorm is not None:
            r, d = _clipped(state, mean, var, renorm, eps) if correction is None else (
                correction[0][g], correction[1][g])
            xhat = xhat * r + d
        y[rows] = xhat * weight + bias
    new_state = state
    if training and state:
        everything = np.concatenate([values for _, values in groups])
        mean = everything.mean(axis=0)
        m2 = sum(((values - values.mean(axis=0)) ** 2).sum(axis=0)
                 for _, values in groups if len(values))
        unbiased = m2 / sum(len(values) - 1 for _, values in groups if len(values))
        count = int(state["num_batches_tracked"]) + 1
        factor = 1.0 / count if momentum is None else momentum
        new_state = {
            "running_mean": (1 - factor) * np.asarray(state["running_mean"], np.float64)
            + factor * mean,
            "running_var": (1 - factor) * np.asarray(state["running_var"], np.float64)
            + factor * unbiased,
            "num_batches_tracked": count,
        }
    return np.moveaxis(y, -1, axis), new_state


def renorm_correction(state, x, renorm, *, eps=1e-5, axis=1, mask=None,
                      virtual_batch_size=None):
    """Batch renormalization's (r, d) of each group (one row each), for ``correction=``."""
    xc, valid = _channels_last(x, axis, mask)
    pairs = []
    for _, values in _groups(xc, valid, virtual_batch_size):
        mean = values.mean(axis=0)
        pairs.append(_clipped(state, mean, ((values - mean) ** 2).mean(axis=0), renorm, eps))
    return np.array([r for r, _ in pairs]), np.array([d for _, d in pairs])


def _channels_last(x, axis, mask):
    """x as float64 (..., C), and which of its positions (...) are valid."""
    xc = np.moveaxis(np.asarray(x, np.float64), axis, -1)
    valid = np.ones(xc.shape[:-1], bool)
    if mask is not None:
        mask = np.asarray(mask)
        valid = valid & mask.reshape(mask.shape + (1,) * (valid.ndim - mask.ndim))
    return xc, valid


def _groups(xc, valid, size):
    """(rows, valid values (n, C)) of each group of ``size`` examples, or of the batch."""
    size = size or max(len(xc), 1)
    for start in range(0, len(xc), size):
        rows = slice(start, start + size)
        yield rows, xc[rows][valid[rows]]


def _clipped(state, mean, var, renorm, eps):
    rmax, dmax = (float(limit) for limit in renorm)
    sigma = np.sqrt(np.asarray(state["running_var"], np.float64) + eps)
    r = np.clip(np.sqrt(var + eps) / sigma, 1 / rmax, rmax)
    d = np.clip((mean - np.asarray(state["running_mean"], np.float64)) / sigma, -dmax, dmax)
    return r, d
