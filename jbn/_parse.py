"""The parser: ``parse`` turns ``batchnorm``'s arguments into a ``Call``, an immutable
description the numerics read, or raises a clear error at trace time; ``parse_micro_batches``
does the same for ``batch_statistics``. Beside them, what every other entry point checks
with the same messages: ``check_layer`` (a layer's ``params`` and ``state``, for the core,
the converters, folding and the framework layers), ``number`` (a numeric option), ``check_mode``
and ``check_eps``."""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import sys
import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array, lax
from jax.typing import DTypeLike

from jbn._activation import DEFAULT_PARAMS, Activation
from jbn._normalize import Renorm
from jbn._reduction import Reduction, axis_size

PARAM_KEYS = ("weight", "bias")
STATE_KEYS = ("running_mean", "running_var", "num_batches_tracked")
# A state's keys, with the one it has where it accumulates micro-batches.
LAYER_STATE_KEYS = (*STATE_KEYS, "accumulator")
# What a layer may hold besides all of its keys or none: PyTorch's bias=False has a weight
# alone, a frozen layer (torchvision's FrozenBatchNorm2d) running statistics without a count.
PARTIAL_KEYS = {"params": (("weight",), "alone (PyTorch's bias=False)"),
                "state": (("running_mean", "running_var"),
                          "alone (a frozen layer's, as FrozenBatchNorm2d keeps them)")}
# The accumulator of a state that accumulates micro-batches: the fields of ``Statistics``
# and the calls counted, by kind: a floating scalar, a floating (C,) vector, an int count.
ACCUMULATOR = {"count": "scalar", "degrees": "scalar", "mean_head": "vector",
               "mean_tail": "vector", "m2": "vector", "micro_batches": "count"}
MODES = ("tracked", "untracked", "frozen")
POOLINGS = ("union", "micro-batches")


def empty_accumulator(channels: int, dtype: DTypeLike) -> dict[str, Array]:
    """An accumulator of no micro-batch: zeros of each entry's kind, counts in int32."""
    shapes = {"scalar": (), "vector": (channels,), "count": ()}
    return {key: jnp.zeros(shapes[kind], jnp.int32 if kind == "count" else dtype)
            for key, kind in ACCUMULATOR.items()}


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["x", "weight", "bias", "given", "valid", "renorm",
                                "residual"],
                   meta_fields=["reduction", "updates_state", "eps", "momentum",
                                "accumulation_steps", "within", "activation"])
@dataclasses.dataclass(frozen=True)
class Call:
    """One call of ``batchnorm``, parsed: a pytree of its arrays, its static options the
    rest (so that a jitted function takes it whole)."""

    x: Array
    reduction: Reduction  # which values share the statistics
    weight: Array | None  # (C,), or None without affine; constants in a frozen layer
    bias: Array | None  # zeros for a weight alone
    # (mean, var) given to normalize with: the running statistics in eval, or the caller's
    # ``statistics``; None: the batch's own normalize.
    given: tuple[Array, Array] | None
    updates_state: bool  # whether the running state learns from the batch's statistics
    eps: float
    momentum: float | None
    valid: Array | None  # the mask, shaped to broadcast against x
    renorm: Renorm | None  # what batch renormalization corrects towards, or None
    accumulation_steps: int | None  # micro-batches per running update, or None: every call
    within: bool  # accumulated micro-batches pooled within (ghost-style), or as one union
    activation: Activation | None  # applied to y + residual; None: neither
    residual: Array | None  # added to y before the activation, x's shape and dtype


class MicroBatches(NamedTuple):
    """``batch_statistics``' arguments, parsed."""

    xs: Array  # (k, N, C, ...)
    valid: Array | None  # the masks, each shaped to broadcast against one micro-batch
    reduction: Reduction  # of one micro-batch
    momentum: float | None
    updates_state: bool


def parse(params: Any, state: Any, x: Any, training: Any, *, mode: Any, momentum: Any,
          eps: Any, axis: Any, mask: Any, axis_name: Any, axis_index_groups: Any,
          group_size: Any, renorm: Any, virtual_batch_size: Any, accumulation_steps: Any,
          accumulation_pooling: Any, statistics: Any, activation: Any, activation_param: Any,
          residual: Any) -> Call:
    """``batchnorm``'s arguments as a ``Call``; raises ``TypeError``/``ValueError`` naming the
    argument, what was seen and what was expected."""
    _check_training(training)
    x, channel_axis, channels = _input(params, state, x, axis, axis_name)
    own_statistics, updates_state = _phase(check_mode(mode), training, state)
    given = _given_statistics(statistics, channels, own_statistics)
    if given is not None:
        own_statistics = updates_state = False
    if updates_state:
        _check_learnable(state)
    momentum = _momentum(momentum, warn=updates_state)
    eps = check_eps(eps, positive=own_statistics or given is not None)
    ghost = _virtual_batch_size(virtual_batch_size, x.shape, channel_axis, own_statistics)
    reduction = Reduction.of(x, channel_axis, axis_name,
                             _device_groups(axis_index_groups, group_size, axis_name), ghost)
    limits = _renorm_limits(renorm, state)
    steps, within = _accumulation(accumulation_steps, accumulation_pooling, state,
                                  training and mode == "tracked" and given is None, ghost)
    if given is not None and (ghost or limits is not None):
        raise ValueError("statistics normalize in place of the batch's own: renorm and "
                         "virtual_batch_size, which change how the batch's own normalize, "
                         "do not go with them")
    if own_statistics:  # normalizing with given statistics needs no other device
        _check_values_per_channel(x.shape, reduction, masked=mask is not None)
    if not own_statistics and given is None:  # the running statistics normalize
        given = (state["running_mean"], state["running_var"])
    weight, bias = _weight_and_bias(params, frozen=mode == "frozen")
    return Call(
        x=x, reduction=reduction, weight=weight, bias=bias, given=given,
        updates_state=updates_state, eps=eps, momentum=momentum,
        valid=_valid(mask, x.shape, channel_axis),
        renorm=None if limits is None or not own_statistics else Renorm(
            state["running_mean"], state["running_var"], *limits),
        accumulation_steps=steps, within=within,
        activation=check_activation(activation, activation_param, fused=residual is not None),
        residual=_residual(residual, x))


def parse_micro_batches(state: Any, xs: Any, *, momentum: Any, axis: Any, mask: Any,
                        axis_name: Any, axis_index_groups: Any,
                        group_size: Any) -> MicroBatches:
    """``batch_statistics``' arguments as ``MicroBatches``: each micro-batch as a training
    call of ``batchnorm`` takes ``x`` and ``mask``, stacked along a new axis 0."""
    if not hasattr(xs, "shape") or getattr(xs, "ndim", 0) < 2:
        raise ValueError(f"xs must stack micro-batches along a new axis 0, got "
                         f"{getattr(xs, 'shape', type(xs).__name__)}")
    if mask is not None and getattr(mask, "shape", (None,))[:1] != xs.shape[:1]:
        raise ValueError(f"mask must stack the micro-batches' masks along axis 0, as xs "
                         f"{xs.shape} does; got {getattr(mask, 'shape', type(mask).__name__)}")
    x, channel_axis, _ = _input({}, state, xs[0], axis, axis_name)
    updates_state = bool(state)
    if updates_state:
        _check_learnable(state)
    momentum = _momentum(momentum, warn=updates_state)
    reduction = Reduction.of(x, channel_axis, axis_name,
                             _device_groups(axis_index_groups, group_size, axis_name), None)
    _check_values_per_channel(x.shape, reduction, masked=mask is not None)
    valid = _valid(None if mask is None else mask[0], x.shape, channel_axis)
    return MicroBatches(jnp.asarray(xs), None if mask is None else jnp.reshape(
        mask, xs.shape[:1] + valid.shape), reduction, momentum, updates_state)


def number(name: str, value: Any, *, integral: bool, at_least: float | None = None,
           at_most: float | None = None, optional: bool = False) -> Any:
    """``value`` as an int (``integral``) or a float, checked: a number of that kind (a bool
    is none), within ``[at_least, at_most]``; None passes where ``optional``.

    Raises:
      TypeError: ``"{name} must be an int or None, got 2.0"``, ``"... a float ≥ 0, got True"``.
      ValueError: ``"{name} must be positive, got 0"``, ``"... in [0, 1], got 1.5"``.
    """
    if value is None and optional:
        return None
    if at_most is not None:
        bounds = f"in [{at_least}, {at_most}]"
    elif integral and at_least == 1:
        bounds = "positive"
    else:
        bounds = "" if at_least is None else f"≥ {at_least}"
    kind = numbers.Integral if integral else numbers.Real
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, kind):
        expected = "an int" if integral else " ".join(filter(None, ("a float", bounds)))
        raise TypeError(f"{name} must be {expected}{' or None' if optional else ''}, "
                        f"got {value!r}")
    if not ((at_least is None or value >= at_least) and (at_most is None or value <= at_most)):
        raise ValueError(f"{name} must be {bounds}, got {value}")
    return int(value) if integral else float(value)


def check_activation(activation: Any, activation_param: Any, *,
                     fused: bool = False) -> Activation | None:
    """The activation fused after batch norm, one of ``DEFAULT_PARAMS``, with its parameter
    (leaky ReLU's slope, ELU's alpha: > 0; None: the default); None for no activation, or
    ``identity`` where a residual is ``fused`` without one."""
    if activation is None:
        if activation_param is not None:
            raise ValueError(f"activation_param={activation_param!r} goes with activation "
                             "'leaky_relu' or 'elu', and activation is None")
        return Activation("identity", None) if fused else None
    if not isinstance(activation, str):
        raise TypeError(f"activation must be a str, one of {list(DEFAULT_PARAMS)}, or None; "
                        f"got {activation!r}")
    if activation not in DEFAULT_PARAMS:
        raise ValueError(f"activation must be one of {list(DEFAULT_PARAMS)} or None, got "
                         f"{activation!r}")
    if DEFAULT_PARAMS[activation] is None:
        if activation_param is not None:
            raise ValueError(f"activation {activation!r} takes no activation_param, got "
                             f"{activation_param!r}")
        return Activation(activation, None)
    if activation_param is None:
        return Activation(activation, DEFAULT_PARAMS[activation])
    param = number("activation_param", activation_param, integral=False)
    if not param > 0:  # a slope ≤ 0 or an alpha ≤ 0 is not invertible
        raise ValueError(f"activation_param of {activation!r} must be > 0 (invertible), got "
                         f"{param}")
    return Activation(activation, param)


def _residual(residual: Any, x: Array) -> Array | None:
    """``residual``: None, or an array of exactly ``x``'s shape and dtype (no broadcasting)."""
    if residual is None:
        return None
    if not hasattr(residual, "shape") or not hasattr(residual, "dtype"):
        raise TypeError(f"residual must be an array, got {type(residual).__name__}")
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(f"residual must have x's shape and dtype, {x.shape} {x.dtype}; got "
                         f"{residual.shape} {residual.dtype}")
    return jnp.asarray(residual)


def check_mode(mode: Any, *, hint: Mapping[str, str] | None = None) -> str:
    """``mode``, one of ``MODES``; ``hint`` adds to the message for values that mean
    something elsewhere (a framework's own modes)."""
    if not isinstance(mode, str):
        raise TypeError(f"mode must be a str, one of {list(MODES)}; got {mode!r}")
    if mode not in MODES:
        why = (hint or {}).get(mode)
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}"
                         + (f": {why}" if why else ""))
    return mode


def check_eps(eps: Any, *, positive: bool = False) -> float:
    """``eps``: a float ≥ 0, and > 0 (``positive``) where the batch's own statistics
    normalize."""
    eps = number("eps", eps, integral=False, at_least=0)
    if positive and eps == 0:
        # A constant channel would divide 0 by 0; PyTorch refuses it too.
        raise ValueError("eps must be positive when the batch's own statistics normalize "
                         "(training, or eval with state == {}), as in PyTorch; got 0.0")
    return eps


def check_pooling(pooling: Any) -> str:
    if pooling not in POOLINGS:
        raise ValueError(f"accumulation_pooling must be one of {list(POOLINGS)}, got "
                         f"{pooling!r}")
    return pooling


def check_layer(params: Any, state: Any, *, channels: int | None = None,
                names: Mapping[str, str] | None = None) -> int | None:
    """Checks one layer's ``params`` and ``state`` as ``batchnorm`` takes them: each a dict,
    ``{}`` or with exactly its keys, or ``{"weight"}`` alone (PyTorch's ``bias=False``) and
    ``{"running_mean", "running_var"}`` alone (a frozen layer's, without a batch count);
    ``weight``, ``bias``, ``running_mean``, ``running_var`` floating arrays of shape (C,);
    ``num_batches_tracked`` an int32 or int64 scalar (a narrower integer would wrap around,
    and ``momentum=None`` divides by it); and, where the state accumulates micro-batches,
    ``accumulator`` with the entries of ``ACCUMULATOR``.

    Args:
      params, state: the layer's dicts.
      channels: C, if known; otherwise the size of the first vector.
      names: how messages name each key (such as the state_dict key a converter read it
        from); by default ``params['weight']``...

    Returns:
      C, or None for a layer with neither params nor state.

    Raises:
      TypeError: for a dict that is not a mapping, and an entry that is not an array.
      ValueError: naming the entry, for keys missing or unexpected (and params and state
        passed in each other's place), and for a shape or dtype other than expected.
    """
    _check_not_swapped(params, state)
    entries = []  # (name, value, kind)
    for kind, found, keys in (("params", params, PARAM_KEYS), ("state", state, STATE_KEYS)):
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
        if kind == "vector" and channels is None and len(getattr(value, "shape", ())) == 1:
            channels, reference = value.shape[0], name
        _check_entry(name, value, kind, channels, reference)
    return channels


def _check_not_swapped(params: Any, state: Any) -> None:
    """Both dicts, and not each in the other's place (``batchnorm(state, params, ...)``)."""
    for kind, found in (("params", params), ("state", state)):
        if not isinstance(found, Mapping):
            raise TypeError(f"{kind} must be a dict, got {type(found).__name__}")
    params_look_like_state = bool(set(params) & set(LAYER_STATE_KEYS))
    state_looks_like_params = bool(set(state) & set(PARAM_KEYS))
    if params_look_like_state and (state_looks_like_params or not state):
        raise ValueError(f"params and state look swapped: params has a state's keys "
                         f"{sorted(params)}, state {sorted(state)}; pass params first, then "
                         "state, as jbn.init returns them: params, state = jbn.init(C)")


def _check_entry(name: str, value: Any, kind: str, channels: int | None,
                 reference: str | None = None) -> None:
    """One entry of a layer: a count (an int32 or int64 scalar), a floating scalar, or a
    floating vector of shape (``channels``,), whose size was taken from ``reference``."""
    if not hasattr(value, "shape") or not hasattr(value, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(value).__name__}")
    shape, dtype = tuple(value.shape), np.dtype(value.dtype)
    if kind == "count":
        if shape != () or dtype not in (np.int32, np.int64):
            raise ValueError(f"{name} must have shape () and an int32 or int64 dtype, "
                             f"got shape {shape} {dtype}")
        return
    if kind == "scalar":
        expected = "()"
    else:
        expected = "(C,)" if channels is None else f"({channels},)"
        if reference is not None and reference != name:
            expected += f" (the size of {reference})"
    if (shape != (() if kind == "scalar" else (channels,))
            or not jnp.issubdtype(dtype, jnp.floating)):
        raise ValueError(f"{name} must have shape {expected} and a floating dtype, "
                         f"got shape {shape} {dtype}")


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


def _phase(mode: str, training: bool, state) -> tuple[bool, bool]:
    """Whether the batch's own statistics normalize, and whether the running state learns
    from them, in ``mode``."""
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
    float32: at a small momentum a bfloat16 running mean's updates fall below half a unit of
    its last place and round away (python -m benchmarks.running_stats)."""
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


def _weight_and_bias(params, *, frozen: bool) -> tuple[Array | None, Array | None]:
    """``weight`` and ``bias``, or None without affine; a zero bias for a weight alone
    (PyTorch's ``bias=False``); constants to the derivative in a frozen layer."""
    weight, bias = params.get("weight"), params.get("bias")
    if weight is not None and bias is None:
        bias = jnp.zeros_like(weight)
    return lax.stop_gradient((weight, bias)) if frozen else (weight, bias)


def _input(params, state, x, axis, axis_name) -> tuple[Array, int, int]:
    """``x`` as an array, its channel axis (in [0, ndim)) and C, checked against the layer."""
    channel_axis = channel_axis_of(x, axis, axis_name)
    _check_channels_of_x(x.shape, channel_axis, axis, params, state)
    channels = check_layer(params, state, channels=x.shape[channel_axis])
    return jnp.asarray(x), channel_axis, channels


def channel_axis_of(x: Any, axis: Any, axis_name: Any) -> int:
    """``x``'s channel axis, in [0, ndim), after ``batchnorm``'s checks of ``x`` and ``axis``
    (for a layer that makes its variables from ``x``)."""
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
    return _channel_axis(axis, x.shape, axis_name)


def _channel_axis(axis, shape: tuple[int, ...], axis_name) -> int:
    axis = number("axis", axis, integral=True)
    ndim = len(shape)
    if not -ndim <= axis < ndim:
        hint = ""
        if axis_name is not None:
            # The usual case: a per-example jax.vmap, where x has lost its batch axis.
            hint = ("; under jax.vmap over examples x is one example, without its batch "
                    "axis: for channels first, as in (C,) or (C, L), pass axis=0")
        raise ValueError(f"axis {axis} is out of range for x of rank {ndim} "
                         f"(shape {shape}){hint}")
    return axis % ndim


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


def _momentum(momentum, *, warn: bool) -> float | None:
    momentum = number("momentum", momentum, integral=False, at_least=0, at_most=1,
                      optional=True)
    if warn and momentum is not None and momentum >= 0.9:
        warnings.warn(
            f"momentum={momentum} is the weight of the new batch (PyTorch's convention), so "
            "the running statistics follow the last batch almost entirely. Flax's and "
            "Haiku's momentum is the weight of the old value: their momentum=0.99 is "
            "jbn's momentum=0.01.", UserWarning, stacklevel=_callers_level())
    return momentum


# The packages whose frames lie between a user's line and the parser: jbn's own, the
# frameworks whose layers call it, and JAX's transformations.
_LIBRARIES = ("jbn", "flax", "equinox", "jax")


def _callers_level() -> int:
    """The ``stacklevel`` that points a warning at the user's line: the first frame, from
    the caller of ``_callers_level``'s caller outwards, outside jbn and the frameworks its
    layers run in (directly, through a layer, or in a traced function)."""
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] in _LIBRARIES:
        frame, level = frame.f_back, level + 1
    return level


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
                        own_statistics: bool) -> int | None:
    """The ghost batches' size, where the batch's own statistics normalize; None otherwise."""
    size = number("virtual_batch_size", size, integral=True, at_least=1, optional=True)
    if size is None or not own_statistics:
        return None
    if channel_axis == 0:
        raise ValueError(f"virtual_batch_size groups the examples of axis 0, and x (shape "
                         f"{shape}) has its channels there; under a per-example jax.vmap, x "
                         "has no batch axis to group")
    if shape[0] % size:
        raise ValueError(f"virtual_batch_size {size} must divide the batch: x has "
                         f"{shape[0]} examples on axis 0 (shape {shape})")
    return size


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
    size = axis_size(axis_name)
    if group_size is not None:
        group_size = number("group_size", group_size, integral=True, optional=True)
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
    within = check_pooling(pooling) == "micro-batches"
    steps = number("accumulation_steps", steps, integral=True, at_least=1, optional=True)
    if steps is None:
        return None, False
    if not accumulates:  # eval, or given statistics: the running state does not learn
        return steps, within
    if not state or "accumulator" not in state:
        raise ValueError("accumulation_steps accumulates into state['accumulator'], and "
                         f"state has keys {sorted(state)}: make the state with "
                         "jbn.init(num_features, accumulation_steps=k)")
    if ghost is not None:
        raise ValueError("accumulation_steps and virtual_batch_size do not go together: "
                         "accumulate the micro-batches' statistics, or pool ghost batches, "
                         "not both")
    return steps, within


def _given_statistics(statistics, channels, own_statistics) -> tuple[Array, Array] | None:
    """``statistics``' (mean, var), where they normalize in place of the batch's own."""
    if statistics is None:
        return None
    if not isinstance(statistics, Mapping) or not {"mean", "var"} <= set(statistics):
        raise TypeError("statistics must be a dict with 'mean' and 'var' (biased), as "
                        f"jbn.batch_statistics returns, got {statistics!r}")
    if not own_statistics:
        raise ValueError("statistics normalize in place of the batch's own, in training; in "
                         "eval the running statistics normalize (and in mode='frozen'): pass "
                         "training=True, or statistics=None")
    for key in ("mean", "var"):
        _check_entry(f"statistics[{key!r}]", statistics[key], "vector", channels)
    return statistics["mean"], statistics["var"]


def _check_values_per_channel(shape: tuple[int, ...], reduction: Reduction, *,
                              masked: bool) -> None:
    """More than one value per channel (per ghost batch), as PyTorch requires where batch
    statistics normalize."""
    ghost = reduction.virtual_batch_size
    if ghost is not None:
        if ghost * math.prod(shape[i] for i in reduction.reduce_axes if i != 0) == 1:
            raise ValueError(f"Expected more than 1 value per channel in each ghost batch, "
                             f"got virtual_batch_size={ghost} for input of shape {shape}")
        return
    devices = reduction.devices()
    if devices * math.prod(shape[i] for i in reduction.reduce_axes) == 1:
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
