"""The one place where ``batchnorm``'s arguments are checked: ``parse`` turns them into a
``Call``, an immutable description the numerics read, or raises a clear error at trace time.
``check_layer`` is the one check of a layer's ``params`` and ``state``, shared by
``batchnorm``, the converters, folding and the framework layers."""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import warnings
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array, lax
from jax.typing import ArrayLike

from jbn._normalize import Renorm
from jbn._reduction import Reduction

PARAM_KEYS = ("weight", "bias")
STATE_KEYS = ("running_mean", "running_var", "num_batches_tracked")
# A state's keys, with the one it has where it accumulates micro-batches.
LAYER_STATE_KEYS = (*STATE_KEYS, "accumulator")
# What a layer may hold besides all of its keys or none: PyTorch's bias=False has a weight
# alone, a frozen layer (torchvision's FrozenBatchNorm2d) running statistics without a count.
PARTIAL_KEYS = {"params": (("weight",), "alone (PyTorch's bias=False)"),
                "state": (("running_mean", "running_var"),
                          "alone (a frozen layer's, as FrozenBatchNorm2d keeps them)")}
MODES = ("tracked", "untracked", "frozen")


POOLINGS = ("union", "micro-batches")


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["x", "weight", "bias", "fixed", "valid", "renorm"],
                   meta_fields=["reduction", "updates_state", "eps", "momentum",
                                "accumulation_steps", "within"])
@dataclasses.dataclass(frozen=True)
class Call:
    """One call of ``batchnorm``, parsed: a pytree of its arrays, its static options the
    rest (so that a jitted function takes it whole)."""

    x: Array
    reduction: Reduction  # which values share the statistics
    weight: Array | None  # (C,), or None without affine; constants in a frozen layer
    bias: Array | None  # zeros for a weight alone
    fixed: tuple[Array, Array] | None  # (mean, var) that normalize, or None: the batch's own
    updates_state: bool  # whether the running state learns from the batch's statistics
    eps: float
    momentum: float | None
    valid: Array | None  # the mask, shaped to broadcast against x
    renorm: Renorm | None  # what batch renormalization corrects towards, or None
    accumulation_steps: int | None  # micro-batches per running update, or None: every call
    within: bool  # accumulated micro-batches pooled within (ghost-style), or as one union


def parse(
    params: Any,
    state: Any,
    x: Any,
    training: Any,
    *,
    mode: Any,
    momentum: Any,
    eps: Any,
    axis: Any,
    mask: Any,
    axis_name: Hashable | tuple[Hashable, ...] | None,
    axis_index_groups: Sequence[Sequence[int]] | None,
    group_size: Any,
    renorm: tuple[ArrayLike, ArrayLike] | None,
    virtual_batch_size: Any,
    accumulation_steps: Any,
    accumulation_pooling: Any,
    statistics: Any,
) -> Call:
    """``batchnorm``'s arguments as a ``Call``; raises ``TypeError``/``ValueError`` naming the
    argument, what was seen and what was expected."""
    _check_training(training)
    x = _array_x(x, axis_name)
    channel_axis = _channel_axis(axis, x.shape, axis_name)
    _check_channels_of_x(x.shape, channel_axis, axis, params, state)
    channels = check_layer(params, state, channels=x.shape[channel_axis])
    batch_statistics, updates_state = _mode(mode, training, state)
    given = _given_statistics(statistics, channels, batch_statistics)
    if given is not None:
        batch_statistics = updates_state = False
    if updates_state:
        _check_learnable(state)
    _check_momentum(momentum, warn=updates_state)
    check_eps(eps, positive=batch_statistics or given is not None)
    ghost = _virtual_batch_size(virtual_batch_size, x.shape, channel_axis, batch_statistics)
    groups = _device_groups(axis_index_groups, group_size, axis_name)
    reduction = Reduction(x.ndim, channel_axis, axis_name, groups, ghost,
                          _ghost_sharding(x, ghost))
    limits = _renorm_limits(renorm, state)
    steps, within = _accumulation(accumulation_steps, accumulation_pooling, state,
                                  training and mode == "tracked" and given is None, ghost)
    if given is not None and (ghost or limits is not None):
        raise ValueError("statistics normalize in place of the batch's own: renorm and "
                         "virtual_batch_size, which change how the batch's own normalize, "
                         "do not go with them")
    if batch_statistics:  # normalizing with given statistics needs no other device
        _check_values_per_channel(x.shape, reduction, _devices(reduction),
                                  masked=mask is not None)
    if not batch_statistics and given is None:  # the running statistics normalize
        given = (state["running_mean"], state["running_var"])
    weight, bias = _affine(params, frozen=mode == "frozen")
    return Call(
        x=x, reduction=reduction, weight=weight, bias=bias, fixed=given,
        updates_state=updates_state,
        eps=float(eps), momentum=momentum, valid=_valid(mask, x.shape, channel_axis),
        renorm=None if limits is None or not batch_statistics else Renorm(
            state["running_mean"], state["running_var"], *limits),
        accumulation_steps=steps, within=within)


def check_layer(params: Any, state: Any, *, channels: int | None = None,
                names: Mapping[str, str] | None = None) -> int | None:
    """Checks one layer's ``params`` and ``state`` as ``batchnorm`` takes them: each a dict,
    ``{}`` or with exactly its keys, or ``{"weight"}`` alone (PyTorch's ``bias=False``) and
    ``{"running_mean", "running_var"}`` alone (a frozen layer's, without a batch count);
    ``weight``, ``bias``, ``running_mean``, ``running_var`` floating arrays of shape (C,);
    ``num_batches_tracked`` an int32 or int64 scalar (a narrower integer would wrap around,
    and ``momentum=None`` divides by it); and, where the state accumulates micro-batches,
    ``accumulator``: ``count``, ``degrees`` floating scalars, ``shift``, ``mean_offset``,
    ``m2`` of shape (C,), ``micro_batches`` an int32 or int64 scalar.

    Args:
      params, state: the layer's dicts.
      channels: C, if known; otherwise the size of the first vector.
      names: how messages name each key (such as the state_dict key a converter read it
        from); by default ``params['weight']``...

    Returns:
      C, or None for a layer with neither params nor state.

    Raises:
      TypeError: for a dict that is not a mapping, and an entry that is not an array.
      ValueError: naming the entry, for keys missing or unexpected, and for a shape or
        dtype other than expected.
    """
    entries = []  # (name, value, kind)
    for kind, found, keys in (("params", params, PARAM_KEYS), ("state", state, STATE_KEYS)):
        if not isinstance(found, Mapping):
            raise TypeError(f"{kind} must be a dict, got {type(found).__name__}")
        if not found:
            continue
        optional = ("accumulator",) if kind == "state" else ()
        partial, why = PARTIAL_KEYS[kind]
        if set(found) == set(partial):
            keys = partial
        elif not set(keys) <= set(found) <= set(keys) | set(optional):
            raise ValueError(f"{kind} must have keys {list(keys)}, or {list(partial)} {why} "
                             "(or be empty)"
                             + "".join(f"; with all of them it may have {key!r}"
                                       for key in optional)
                             + f"; missing {sorted(set(keys) - set(found))}, unexpected "
                             f"{sorted(set(found) - set(keys) - set(optional))}")
        entries += [((names or {}).get(key, f"{kind}[{key!r}]"), found[key],
                     "count" if key == "num_batches_tracked" else "vector") for key in keys]
        if "accumulator" in found:
            accumulator = found["accumulator"]
            if not isinstance(accumulator, Mapping) or set(accumulator) != set(ACCUMULATOR):
                raise ValueError(f"state['accumulator'] must be a dict with keys "
                                 f"{list(ACCUMULATOR)}, as jbn.init(..., accumulation_steps=k) "
                                 f"makes it; got {accumulator!r}")
            entries += [(f"state['accumulator'][{key!r}]", accumulator[key], kind)
                        for key, kind in ACCUMULATOR.items()]
    reference = None  # the name of the entry C was taken from
    for name, value, kind in entries:
        if not hasattr(value, "shape") or not hasattr(value, "dtype"):
            raise TypeError(f"{name} must be an array, got {type(value).__name__}")
        shape, dtype = tuple(value.shape), np.dtype(value.dtype)
        if kind == "count":
            if shape != () or dtype not in (np.int32, np.int64):
                raise ValueError(f"{name} must have shape () and an int32 or int64 dtype, "
                                 f"got shape {shape} {dtype}")
            continue
        if kind == "scalar":
            expected = "()"
        else:
            if channels is None and len(shape) == 1:
                channels, reference = shape[0], name
            expected = "(C,)" if channels is None else f"({channels},)"
            if reference is not None and reference != name:
                expected += f" (the size of {reference})"
        if (shape != (() if kind == "scalar" else (channels,))
                or not jnp.issubdtype(dtype, jnp.floating)):
            raise ValueError(f"{name} must have shape {expected} and a floating dtype, "
                             f"got shape {shape} {dtype}")
    return channels


# The entries of a state's accumulator, by kind: a floating scalar, a floating (C,) vector, a
# count of calls (int32 or int64).
ACCUMULATOR = {"count": "scalar", "degrees": "scalar", "shift": "vector",
               "mean_offset": "vector", "m2": "vector", "micro_batches": "count"}


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


def _mode(mode, training: bool, state) -> tuple[bool, bool]:
    """Whether the batch's own statistics normalize, and whether the running state learns
    from them, in ``mode``."""
    if not isinstance(mode, str):
        raise TypeError(f"mode must be a str, one of {list(MODES)}; got {mode!r}")
    if mode not in MODES:
        hint = ""
        if mode in ("ema", "batch"):
            hint = (": eqx.nn.BatchNorm's mode chooses how it averages, where jbn averages as "
                    "PyTorch does; leave mode out")
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}{hint}")
    if mode == "frozen":
        if not state:
            raise ValueError("mode='frozen' normalizes with the running statistics, and state "
                             "is {} (track_running_stats=False): pass a state with running "
                             "statistics")
        return False, False
    if mode == "untracked":
        return True, False
    return training or not state, training and bool(state)


def _check_learnable(state) -> None:
    """A state that training updates has its batch count, and running statistics of at least
    float32: at momentum 0.01 a bfloat16 running mean's updates fall below half a unit of its
    last place and round away (python -m benchmarks.running_stats)."""
    if "num_batches_tracked" not in state:
        raise ValueError(
            "state has no 'num_batches_tracked': it is a frozen layer's (FrozenBatchNorm2d keeps "
            "none), which training does not update. Normalize with it (training=False, or "
            "mode='frozen'), or give it a count to train it: {**state, "
            "'num_batches_tracked': jnp.zeros((), jnp.int32)}")
    for key in ("running_mean", "running_var"):
        dtype = jnp.dtype(state[key].dtype)
        if jnp.finfo(dtype).bits < 32:
            raise ValueError(
                f"state[{key!r}] is {dtype}, and training updates it: its small updates would "
                "round away (at momentum 0.01, a bfloat16 running mean stops far short of the "
                "data's mean). Keep the running statistics in float32, as jbn.init does for "
                "params of any dtype: cast running_mean and running_var with "
                ".astype(jnp.float32)")


def _affine(params, *, frozen: bool) -> tuple[Array | None, Array | None]:
    """``weight`` and ``bias``, or None without affine; a zero bias for a weight alone
    (PyTorch's ``bias=False``); constants to the derivative in a frozen layer."""
    weight, bias = params.get("weight"), params.get("bias")
    if weight is not None and bias is None:
        bias = jnp.zeros_like(weight)
    return lax.stop_gradient((weight, bias)) if frozen else (weight, bias)


def _array_x(x, axis_name) -> Array:
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


def _channel_axis(axis, shape: tuple[int, ...], axis_name) -> int:
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


def _check_channels_of_x(shape: tuple[int, ...], channel_axis: int, axis: int, params,
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


def check_eps(eps, *, positive: bool = False) -> None:
    """``eps``: a float ≥ 0, and > 0 (``positive``) where the batch's own statistics
    normalize."""
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
        # Four frames up: _check_momentum, parse, batchnorm, its caller.
        warnings.warn(
            f"momentum={momentum} is the weight of the new batch (PyTorch's convention), so "
            "the running statistics follow the last batch almost entirely. Flax's and "
            "Haiku's momentum is the weight of the old value: their momentum=0.99 is "
            "jbn's momentum=0.01.", UserWarning, stacklevel=4)


def _renorm_limits(renorm, state) -> tuple[Array, Array] | None:
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


def _virtual_batch_size(size, shape: tuple[int, ...], channel_axis: int,
                        batch_statistics: bool) -> int | None:
    """The ghost batches' size, where batch statistics normalize; None otherwise."""
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


def _ghost_sharding(x: Array, ghost: int | None) -> tuple[Any, ...] | None:
    """Under Explicit mesh axes, the mesh axes of x's axis 0 split between the ghost batches
    (major) and the examples of one (minor): a ghost batch lies on one device, or on the
    devices of the minor axes exactly. None without ghost batches or Explicit axes."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if ghost is None or mesh is None or jax.sharding.AxisType.Explicit not in mesh.axis_types:
        return None
    entry = sharding.spec[0] if len(sharding.spec) else None
    axes = () if entry is None else entry if isinstance(entry, tuple) else (entry,)
    sizes = [mesh.shape[name] for name in axes]
    devices, batches = math.prod(sizes), x.shape[0] // ghost
    per_device = x.shape[0] // devices
    for split in range(len(axes), -1, -1):
        minor = math.prod(sizes[split:])
        if (minor == 1 and batches % devices == 0) or (
                minor > 1 and ghost == minor * per_device and batches * minor == devices):
            return mesh, axes[:split], axes[split:]
    raise ValueError(
        f"virtual_batch_size {ghost} does not follow the sharding of x's axis 0 over mesh "
        f"axes {axes} of sizes {sizes} ({per_device} examples per device): a ghost batch "
        "must lie on one device, or on all the devices of the last mesh axes of axis 0. "
        f"With Explicit axes, shard it over a mesh like jax.make_mesh((groups, k), "
        f"('groups', 'group')) with P(('groups', 'group')) and virtual_batch_size = k × "
        f"{per_device}; or use jax.shard_map with group_size=k")


def _device_groups(axis_index_groups, group_size, axis_name) -> tuple[tuple[int, ...], ...] | None:
    """The partition of the devices along ``axis_name`` into groups, from ``group_size``
    (consecutive devices) or ``axis_index_groups``; None without groups."""
    if axis_index_groups is None and group_size is None:
        return None
    name = "axis_index_groups" if group_size is None else "group_size"
    value = axis_index_groups if group_size is None else group_size
    if axis_name is None:
        raise ValueError(f"{name} {value!r} needs axis_name: the groups split the devices of "
                         "that axis")
    if axis_index_groups is not None and group_size is not None:
        raise ValueError("pass group_size or axis_index_groups, not both: both say how the "
                         "devices group")
    size = _axis_size(axis_name)
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral):
            raise TypeError(f"group_size must be an int or None, got {group_size!r}")
        if group_size <= 0 or size % group_size:
            raise ValueError(f"group_size must be positive and divide the {size} devices along "
                             f"axis_name {axis_name!r}, got {group_size}")
        return tuple(tuple(range(start, start + group_size))
                     for start in range(0, size, group_size))
    groups = tuple(tuple(int(i) for i in group) for group in axis_index_groups)
    if sorted(i for group in groups for i in group) != list(range(size)) or not all(groups):
        raise ValueError(f"axis_index_groups must split the {size} devices along axis_name "
                         f"{axis_name!r}, each in one group; got {axis_index_groups!r}")
    return groups


def _accumulation(steps, pooling, state, accumulates: bool,
                  ghost: int | None) -> tuple[int | None, bool]:
    """``accumulation_steps`` (None, or micro-batches per running update) and whether the
    micro-batches pool within, where the running state accumulates."""
    if pooling not in POOLINGS:
        raise ValueError(f"accumulation_pooling must be one of {list(POOLINGS)}, got "
                         f"{pooling!r}")
    if steps is None:
        return None, False
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise TypeError(f"accumulation_steps must be an int or None, got {steps!r}")
    if steps <= 0:
        raise ValueError(f"accumulation_steps must be positive, got {steps}")
    if not accumulates:  # eval, or given statistics: the running state does not learn
        return int(steps), pooling == "micro-batches"
    if not state or "accumulator" not in state:
        raise ValueError("accumulation_steps accumulates into state['accumulator'], and "
                         f"state has keys {sorted(state)}: make the state with "
                         "jbn.init(num_features, accumulation_steps=k)")
    if ghost is not None:
        raise ValueError("accumulation_steps and virtual_batch_size do not go together: "
                         "accumulate the micro-batches' statistics, or pool ghost batches, "
                         "not both")
    return int(steps), pooling == "micro-batches"


def _given_statistics(statistics, channels, batch_statistics) -> tuple[Array, Array] | None:
    """``statistics``' (mean, var), where they normalize in place of the batch's own."""
    if statistics is None:
        return None
    if not isinstance(statistics, Mapping) or not {"mean", "var"} <= set(statistics):
        raise TypeError("statistics must be a dict with 'mean' and 'var' (biased), as "
                        f"jbn.batch_statistics returns, got {statistics!r}")
    if not batch_statistics:
        raise ValueError("statistics normalize in place of the batch's own, in training; in "
                         "eval the running statistics normalize (and in mode='frozen'): pass "
                         "training=True, or statistics=None")
    for key in ("mean", "var"):
        value = statistics[key]
        if (not hasattr(value, "shape") or tuple(value.shape) != (channels,)
                or not jnp.issubdtype(value.dtype, jnp.floating)):
            raise ValueError(f"statistics[{key!r}] must be a floating array of shape "
                             f"({channels},), got {getattr(value, 'shape', type(value).__name__)}")
    return statistics["mean"], statistics["var"]


def _axis_size(axis_name) -> int:
    """How many devices (or mapped examples) lie along ``axis_name``; checks that the named
    axes are bound."""
    size = 1
    for name in axis_name if isinstance(axis_name, tuple) else (axis_name,):
        try:
            size *= lax.axis_size(name)
        except NameError:
            raise ValueError(
                f"axis_name {name!r} is not bound: call batchnorm inside jax.pmap, "
                f"jax.shard_map or jax.vmap that names the axis {name!r}") from None
    return size


def _devices(reduction: Reduction) -> int:
    """How many devices (or mapped examples) share the statistics; checks that the named axes
    are bound."""
    if reduction.axis_name is None:
        return 1
    devices = _axis_size(reduction.axis_name)
    if reduction.axis_index_groups is not None:
        devices = min(len(group) for group in reduction.axis_index_groups)
    return devices


def _check_values_per_channel(shape: tuple[int, ...], reduction: Reduction, devices: int, *,
                              masked: bool) -> None:
    """More than one value per channel (per ghost batch), as PyTorch requires where batch
    statistics normalize."""
    ghost = reduction.virtual_batch_size
    if ghost is not None:
        if ghost * math.prod(shape[i] for i in reduction.reduce_axes if i != 0) == 1:
            raise ValueError(f"Expected more than 1 value per channel in each ghost batch, "
                             f"got virtual_batch_size={ghost} for input of shape {shape}")
    elif devices * math.prod(shape[i] for i in reduction.reduce_axes) == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input "
                         f"of shape {shape} over {devices} device(s)"
                         + (" (before masking)" if masked else ""))


def _valid(mask, shape: tuple[int, ...], channel_axis: int) -> Array | None:
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
