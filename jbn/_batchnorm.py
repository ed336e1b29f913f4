"""The public functions: ``init`` and ``batchnorm``; argument checks, modes, running state."""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Hashable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array, lax
from jax.typing import ArrayLike, DTypeLike

from jbn._normalize import Renorm, normalize, normalize_with
from jbn._stats import Batch, Estimate, population_estimate

Params = dict[str, Array]
State = dict[str, Array]

_PARAM_KEYS = ("weight", "bias")
_STATE_KEYS = ("running_mean", "running_var", "num_batches_tracked")


def init(
    num_features: int,
    *,
    affine: bool = True,
    track_running_stats: bool = True,
    dtype: DTypeLike = jnp.float32,
) -> tuple[Params, State]:
    """Parameters and state of a batch norm over ``num_features`` channels.

    Args:
      num_features: C, the number of channels.
      affine: whether there is a learnable per-channel ``weight`` (ones) and ``bias`` (zeros).
      track_running_stats: whether there are running statistics for eval mode.
      dtype: floating dtype of the parameters and running statistics.

    Returns:
      ``params``: ``{"weight": ones(C), "bias": zeros(C)}``, or ``{}`` without affine.
      ``state``: ``{"running_mean": zeros(C), "running_var": ones(C),
      "num_batches_tracked": int32 0}``, or ``{}`` without running statistics.
      The names are PyTorch's state_dict names.

    PyTorch: ``torch.nn.BatchNorm{1,2,3}d(num_features, affine=..., track_running_stats=...)``.
    """
    if isinstance(num_features, bool) or not isinstance(num_features, numbers.Integral):
        raise TypeError(f"num_features must be an int, got {num_features!r}")
    if num_features <= 0:
        raise ValueError(f"num_features must be positive, got {num_features}")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"dtype must be a floating dtype, got {jnp.dtype(dtype)}")
    params = {}
    if affine:
        params = {"weight": jnp.ones(num_features, dtype), "bias": jnp.zeros(num_features, dtype)}
    state = {}
    if track_running_stats:
        state = {
            "running_mean": jnp.zeros(num_features, dtype),
            "running_var": jnp.ones(num_features, dtype),
            "num_batches_tracked": jnp.zeros((), jnp.int32),
        }
    return params, state


def batchnorm(
    params: Params,
    state: State,
    x: Array,
    training: bool,
    *,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    axis: int = 1,
    mask: Array | None = None,
    axis_name: Hashable | tuple[Hashable, ...] | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    renorm: tuple[ArrayLike, ArrayLike] | None = None,
    virtual_batch_size: int | None = None,
) -> tuple[Array, State]:
    """Batch normalization, per channel, as a pure function.

    .. math:: y = \\frac{x - \\mathrm{E}[x]}{\\sqrt{\\mathrm{Var}[x] + \\epsilon}}\\, w + b

    The statistics run over every axis of ``x`` except ``axis`` (and over every device along
    ``axis_name``); the biased variance normalizes.

    * Training, or no running statistics (``state == {}``): batch statistics normalize.
      In training with state, ``running ← (1 − momentum)·running + momentum·batch`` with the
      *unbiased* batch variance ``n/(n − 1)·Var[x]`` for ``running_var``, and
      ``num_batches_tracked += 1``; ``momentum=None`` makes it the cumulative average
      (factor ``1/num_batches_tracked``).
    * Eval with state: the running statistics normalize, in one elementwise pass that
      centers first, ``(x − running_mean)·w/√(running_var + eps) + b``, so that a channel
      whose mean is large against its spread loses nothing to cancellation.

    The state comes back unchanged whenever it is not updated.

    Two variants change how batch statistics normalize; eval with running statistics is as
    above:

    * ``renorm=(rmax, dmax)``: batch renormalization (Ioffe 2017, arXiv:1702.03275,
      Algorithm 1), ``y = (x̂·r + d)·w + b`` with ``r = clip(σ_B/σ, 1/rmax, rmax)``,
      ``d = clip((μ_B − μ)/σ, −dmax, dmax)``, ``σ_B = √(Var[x] + eps)``, ``μ_B = E[x]``,
      ``μ`` and ``σ = √(running_var + eps)`` the running statistics before this batch's
      update, which is the plain one; r and d are constants to the derivative.
    * ``virtual_batch_size=k``: ghost batch norm (Hoffer et al. 2017, arXiv:1705.08741):
      every group of k consecutive examples along axis 0 is normalized with its own
      statistics, as if alone. A training call updates the running statistics once, with
      the mean of all valid values and the pooled within-group variance
      ``Σ M2_g / Σ (n_g − 1)`` (for groups of equal counts: the mean of the groups' unbiased
      variances), and counts one batch.

    Args:
      params: ``{"weight", "bias"}`` of shape (C,), or ``{}`` (no affine transform).
      state: ``{"running_mean", "running_var"}`` of shape (C,) and an integer scalar
        ``"num_batches_tracked"``, or ``{}`` (no running statistics).
      x: floating array, rank ≥ 2 (rank ≥ 1 with ``axis_name``), channel at ``axis``.
      training: Python bool (static under ``jax.jit``).
      momentum: weight of the batch statistic in the running update, in [0, 1], or None.
      eps: added to the variance; > 0 where batch statistics normalize, ≥ 0 in eval with
        running statistics (as PyTorch).
      axis: the channel axis: 1 for (N, C, ...), -1 for channels-last.
      mask: boolean, shaped like ``x`` without its channel axis, or a leading prefix of that
        shape (``(N,)`` or ``(N, L)`` for ``(N, C, L)``). False positions enter neither the
        statistics nor the Bessel count; their outputs are normalized all the same.
      axis_name: name(s) of mapped axes (``jax.pmap``, ``jax.shard_map``, ``jax.vmap``)
        whose devices or examples share the statistics (synchronized batch norm).
      axis_index_groups: as in ``lax.psum`` (pmap): each group has its own statistics.
      renorm: None, or ``(rmax, dmax)``, scalars (Python numbers or arrays, which may be
        traced: a schedule under ``jax.jit`` does not recompile) with ``rmax ≥ 1`` and
        ``dmax ≥ 0``; ``(1, 0)`` is plain batch norm. Needs running statistics; in eval mode
        with them it changes nothing.
      virtual_batch_size: None, or k, a positive int dividing ``x.shape[0]`` where batch
        statistics normalize (ignored in eval with running statistics); axis 0 must be the
        batch axis, not the channel axis. With ``axis_name``, groups lie within each
        device's slice and the running statistics learn from the groups of every device.

    Returns:
      ``y`` (shape and dtype of ``x``) and the new state.

    Raises:
      TypeError, ValueError: at trace time, for arguments of the wrong type, shape, dtype or
        range, and when training with exactly one value per channel (per ghost group), for
        ``renorm`` without running statistics, and for a ``virtual_batch_size`` that does not
        divide the batch.

    Warns:
      UserWarning: for ``momentum ≥ 0.9`` in training with running statistics, which is
        most often Flax's convention by mistake (once per trace; ``warnings`` filters apply).

    An empty batch (no value per channel) gives an empty ``y`` and, as in PyTorch, counts in
    ``num_batches_tracked`` but leaves the running statistics as they were. So does a batch
    whose mask leaves fewer than 2 valid values (known only at run time), where PyTorch, for
    exactly one value, would raise; ``y`` stays finite there. Masked positions are
    normalized too, so ``x`` must be finite there: a NaN in the padding reaches ``y`` there
    and, through Σ ct·x̂, the gradient of ``weight``.

    PyTorch: ``torch.nn.BatchNorm{1,2,3}d`` and ``torch.nn.functional.batch_norm``
    (``momentum`` has PyTorch's convention; Flax's ``momentum=0.99`` is jbn's 0.01).
    PyTorch has neither variant; Keras 2 had both (``renorm``, ``virtual_batch_size``).
    """
    _check_training(training)
    x = _check_x(x, axis_name)
    channel_axis = _check_axis(axis, x.shape, axis_name)
    _check_channels(x.shape, channel_axis, axis, params, state)
    channels = x.shape[channel_axis]
    _check_entries("params", params, _PARAM_KEYS, channels)
    _check_entries("state", state, _STATE_KEYS, channels)
    _check_momentum(momentum, warn=training and bool(state))
    batch_statistics = training or not state
    _check_eps(eps, positive=batch_statistics)
    limits = _check_renorm(renorm, state)
    group_size = _check_virtual_batch_size(virtual_batch_size, x.shape, channel_axis,
                                           batch_statistics)
    batch = Batch(x.ndim, channel_axis, axis_name, _check_groups(axis_index_groups, axis_name),
                  group_size)
    devices = _devices_per_batch(batch)
    valid = _check_mask(mask, x.shape, channel_axis)

    if not batch_statistics:
        y = normalize_with(batch, eps, x, state["running_mean"], state["running_var"],
                           params.get("weight"), params.get("bias"))
        return y, state

    if group_size is not None:
        if group_size * math.prod(x.shape[i] for i in batch.reduce_axes if i != 0) == 1:
            raise ValueError(f"Expected more than 1 value per channel in each ghost batch, "
                             f"got virtual_batch_size={group_size} for input of shape {x.shape}")
    elif devices * math.prod(x.shape[i] for i in batch.reduce_axes) == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input "
                         f"of shape {x.shape} over {devices} device(s)"
                         + (" (before masking)" if mask is not None else ""))
    renormalization = None if limits is None else Renorm(
        state["running_mean"], state["running_var"], *limits)
    try:
        y, stats = normalize(batch, float(eps), x, valid, params.get("weight"),
                             params.get("bias"), renormalization)
        if training and state:
            estimate = population_estimate(jax.lax.stop_gradient(stats), batch)
            state = _updated_state(state, estimate, momentum)
    except NotImplementedError as error:
        if batch.axis_index_groups is None:
            raise
        # jax.shard_map and jax.vmap refuse groups, once the psum is transformed.
        raise ValueError("axis_index_groups works under jax.pmap only, as in lax.psum "
                         f"(jax.shard_map and jax.vmap have none): {error}") from None
    return y, state


def _updated_state(state: State, estimate: Estimate, momentum: float | None) -> State:
    # Every training call counts, as PyTorch's module counts before it looks at the batch (an
    # empty batch too); the running statistics learn only from 2 or more valid values: with
    # fewer (an empty batch, or a mask known only at run time) the unbiased variance would be
    # inf or nan, so they stay as they were.
    num_batches = state["num_batches_tracked"] + 1
    factor = 1 / num_batches.astype(estimate.mean.dtype) if momentum is None else momentum

    def updated(running, batch_value):
        new = (1 - factor) * running + factor * batch_value
        return jnp.where(estimate.informative, new, running).astype(running.dtype)

    return {
        "running_mean": updated(state["running_mean"], estimate.mean),
        "running_var": updated(state["running_var"], estimate.variance),
        "num_batches_tracked": num_batches,
    }


def _check_training(training) -> None:
    if isinstance(training, (bool, np.bool_)):
        return
    if isinstance(training, jax.core.Tracer):
        hint = (" It is traced: mark it static, e.g. "
                "jax.jit(f, static_argnames='training').")
    elif getattr(training, "shape", None) == ():
        hint = " It is an array: pass a Python bool, e.g. bool(training)."
    else:
        hint = ""
    raise TypeError(f"training must be a Python bool, got {type(training).__name__}.{hint}")


def _check_x(x, axis_name) -> Array:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"x must be an array, got {type(x).__name__}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x must be a floating array, got dtype {x.dtype}")
    least = 1 if axis_name is not None else 2
    if x.ndim < least:
        raise ValueError(
            f"x must have rank ≥ 2 (batch and channel axes), got shape {x.shape}; a rank-1 x "
            "(one example of C channels) needs axis_name naming the mapped batch axis"
            if least == 2 else f"x must have rank ≥ 1, got shape {x.shape}")
    return jnp.asarray(x)


def _check_axis(axis, shape: tuple[int, ...], axis_name) -> int:
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"axis must be an int, got {axis!r}")
    ndim = len(shape)
    if not -ndim <= axis < ndim:
        hint = ""
        if axis_name is not None:
            # The usual case: a per-example jax.vmap, where x has lost its batch axis.
            hint = ("; under jax.vmap over examples x is one example, without its batch "
                    "axis: for channels first, as in (C,) or (C, L), pass axis=0")
        raise ValueError(f"axis {axis} is out of range for x of rank {ndim} "
                         f"(shape {shape}){hint}")
    return int(axis) % ndim


def _check_channels(shape: tuple[int, ...], channel_axis: int, axis: int, params,
                    state) -> None:
    """x's channel count against the (C,) vectors of params and state, with a hint at the
    axis that matches (a channels-last x with the default axis=1 is the common mistake)."""
    vectors = [(f"{name}[{key!r}]", entries[key]) for name, entries, key in (
        ("params", params, "weight"), ("state", state, "running_mean"))
        if isinstance(entries, Mapping) and getattr(entries.get(key), "ndim", None) == 1]
    if not vectors or vectors[0][1].shape[0] == shape[channel_axis]:
        return
    name, vector = vectors[0]
    channels = vector.shape[0]
    hint = ""
    matching = [i for i, size in enumerate(shape) if size == channels]
    if matching:
        suggested = -1 if matching[-1] == len(shape) - 1 else matching[-1]
        hint = f"; axis {suggested} of x has size {channels}: pass axis={suggested}"
    raise ValueError(f"x has {shape[channel_axis]} channels at axis {axis} (x of shape "
                     f"{shape}), {name} has {channels}{hint}")


def _check_entries(name: str, entries, keys: tuple[str, ...], channels: int) -> None:
    if not isinstance(entries, Mapping):
        raise TypeError(f"{name} must be a dict, got {type(entries).__name__}")
    if not entries:
        return
    if set(entries) != set(keys):
        missing = sorted(set(keys) - set(entries))
        extra = sorted(set(entries) - set(keys))
        raise ValueError(f"{name} must have keys {list(keys)} (or be empty); "
                         f"missing {missing}, unexpected {extra}")
    for key in keys:
        value = entries[key]
        if not hasattr(value, "shape") or not hasattr(value, "dtype"):
            raise TypeError(f"{name}[{key!r}] must be an array, got {type(value).__name__}")
        if key == "num_batches_tracked":
            # A narrower integer would wrap around, and momentum=None divide by it.
            expected_shape, kinds, expected = (), (jnp.int32, jnp.int64), "int32 or int64"
        else:
            expected_shape, kinds, expected = (channels,), (jnp.floating,), "floating"
        if value.shape != expected_shape or not any(
                jnp.issubdtype(value.dtype, kind) for kind in kinds):
            raise ValueError(f"{name}[{key!r}] must have shape {expected_shape} and a "
                             f"{expected} dtype, got shape {value.shape} {value.dtype}")


def _check_eps(eps, *, positive: bool = False) -> None:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a float ≥ 0, got {eps!r}")
    if not eps >= 0:
        raise ValueError(f"eps must be ≥ 0, got {eps!r}")
    if positive and eps == 0:
        # A constant channel would divide 0 by 0; PyTorch refuses it too.
        raise ValueError("eps must be positive when the batch's own statistics normalize "
                         "(training, or eval with state == {}), as in PyTorch; got 0.0")


def _check_momentum(momentum, *, warn: bool) -> None:
    if momentum is None:
        return
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        raise TypeError(f"momentum must be a float in [0, 1] or None, got {momentum!r}")
    if not 0 <= momentum <= 1:
        raise ValueError(f"momentum must be in [0, 1] or None, got {momentum}")
    if warn and momentum >= 0.9:
        warnings.warn(
            f"momentum={momentum} is the weight of the new batch (PyTorch's convention), so "
            "the running statistics follow the last batch almost entirely. Flax's and "
            "Haiku's momentum is the weight of the old value: their momentum=0.99 is jbn's "
            "momentum=0.01.", UserWarning, stacklevel=3)


def _check_renorm(renorm, state) -> tuple[Array, Array] | None:
    """(rmax, dmax) as scalar arrays; their values are checked where they are concrete (a
    traced schedule is not)."""
    if renorm is None:
        return None
    if not isinstance(renorm, (tuple, list)) or len(renorm) != 2:
        raise TypeError(f"renorm must be None or a pair (rmax, dmax), got {renorm!r}")
    if not state:
        raise ValueError("renorm corrects the batch statistics towards the running "
                         "statistics, and state is {} (track_running_stats=False): pass a "
                         "state with running statistics, or renorm=None")
    limits = []
    for name, value, least in zip(("rmax", "dmax"), renorm, (1, 0), strict=True):
        dtype = getattr(value, "dtype", None)
        if isinstance(value, bool) or not (isinstance(value, numbers.Real) or (
                dtype is not None and jnp.issubdtype(dtype, jnp.number)
                and not jnp.issubdtype(dtype, jnp.complexfloating))):
            raise TypeError(f"renorm's {name} must be a real number or a real scalar array, "
                            f"got {value!r}")
        if jnp.shape(value) != ():
            raise ValueError(f"renorm's {name} must be a scalar, got shape {jnp.shape(value)}")
        if not isinstance(value, jax.core.Tracer) and not float(value) >= least:
            raise ValueError(f"renorm's {name} must be ≥ {least}, got {float(value)}")
        limits.append(jnp.asarray(value))
    return limits[0], limits[1]


def _check_virtual_batch_size(size, shape: tuple[int, ...], channel_axis: int,
                              batch_statistics: bool) -> int | None:
    """The ghost batch size, where batch statistics normalize; None otherwise."""
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, numbers.Integral):
        raise TypeError(f"virtual_batch_size must be an int or None, got {size!r}")
    if size <= 0:
        raise ValueError(f"virtual_batch_size must be positive, got {size}")
    if not batch_statistics:
        return None
    if channel_axis == 0:
        raise ValueError(f"virtual_batch_size groups the examples of axis 0, and x (shape "
                         f"{shape}) has its channels there; under a per-example jax.vmap, x "
                         "has no batch axis to group")
    if shape[0] % size:
        raise ValueError(f"virtual_batch_size {size} must divide the batch: x has "
                         f"{shape[0]} examples on axis 0 (shape {shape})")
    return int(size)


def _check_groups(groups, axis_name) -> tuple[tuple[int, ...], ...] | None:
    if groups is None:
        return None
    if axis_name is None:
        raise ValueError(f"axis_index_groups {groups!r} needs axis_name: the groups split the "
                         "devices of that axis")
    return tuple(tuple(int(i) for i in group) for group in groups)


def _check_mask(mask, shape: tuple[int, ...], channel_axis: int) -> Array | None:
    """The mask, reshaped to broadcast against x (size 1 on the channel axis and on the
    trailing axes it does not cover)."""
    if mask is None:
        return None
    if not hasattr(mask, "dtype") or mask.dtype != jnp.bool_:
        raise TypeError(f"mask must be a boolean array, got "
                        f"{getattr(mask, 'dtype', type(mask).__name__)}")
    others = [i for i in range(len(shape)) if i != channel_axis]
    expected = tuple(shape[i] for i in others)
    if mask.shape != expected[: mask.ndim]:
        prefixes = " or ".join(str(expected[:k]) for k in range(len(expected), -1, -1))
        raise ValueError(f"mask must have the shape of x {shape} without its channel axis, "
                         f"or a leading prefix of it: {prefixes}; got {mask.shape}")
    broadcast = [1] * len(shape)
    for i, size in zip(others[: mask.ndim], mask.shape, strict=True):
        broadcast[i] = size
    return jnp.reshape(mask, broadcast)


def _devices_per_batch(batch: Batch) -> int:
    """How many devices (or mapped examples) share the statistics; checks the axes are bound."""
    devices = 1
    for name in _axis_names(batch.axis_name):
        try:
            devices *= lax.axis_size(name)
        except NameError:
            raise ValueError(
                f"axis_name {name!r} is not bound: call batchnorm inside jax.pmap, "
                f"jax.shard_map or jax.vmap that names the axis {name!r}") from None
    if batch.axis_index_groups is not None:
        devices = min(len(group) for group in batch.axis_index_groups)
    return devices


def _axis_names(axis_name) -> tuple:
    if axis_name is None:
        return ()
    return axis_name if isinstance(axis_name, tuple) else (axis_name,)
