"""The public functions: ``init`` and ``batchnorm``, which reads as the formula: parse the
arguments, compute the batch's statistics, normalize, update the running state."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Literal

import jax
import jax.numpy as jnp
from jax import Array, lax
from jax.typing import ArrayLike, DTypeLike

from jbn._activation import activated
from jbn._normalize import normalize, normalize_activated, normalize_with
from jbn._parse import Call, empty_accumulator, number, parse, parse_micro_batches
from jbn._reduction import compute_dtype
from jbn._stats import Statistics, measure

Params = dict[str, Array]
State = dict[str, Array]


def init(
    num_features: int,
    *,
    affine: bool = True,
    bias: bool = True,
    track_running_stats: bool = True,
    dtype: DTypeLike = jnp.float32,
    accumulation_steps: int | None = None,
) -> tuple[Params, State]:
    """Parameters and state of a batch norm over ``num_features`` channels.

    Args:
      num_features: C, the number of channels.
      affine: whether there is a learnable per-channel ``weight`` (ones) and ``bias`` (zeros).
      bias: with ``affine``, whether there is a ``bias``; without it, ``weight`` alone.
      track_running_stats: whether there are running statistics for eval mode.
      dtype: floating dtype of the parameters. The running statistics are kept in the finer
        of it and float32: a bfloat16 or float16 running average loses its small updates to
        rounding (``batchnorm`` refuses to train one), and Flax keeps them in float32 too.
      accumulation_steps: None, or the k of ``batchnorm(..., accumulation_steps=k)``: the
        state then also carries ``"accumulator"``, the statistics of the micro-batches of
        the optimizer step under way, their mean as ``mean_head + mean_tail`` (empty:
        ``count``, ``degrees`` 0, ``mean_head``, ``mean_tail``, ``m2`` zeros(C), in at least
        float32; ``micro_batches`` int32 0).

    Returns:
      ``params``: ``{"weight": ones(C), "bias": zeros(C)}``, ``{"weight"}`` without bias,
      or ``{}`` without affine.
      ``state``: ``{"running_mean": zeros(C), "running_var": ones(C),
      "num_batches_tracked": int32 0}``, or ``{}`` without running statistics.
      The names are PyTorch's state_dict names; ``to_torch`` leaves the accumulator out.

    PyTorch: ``torch.nn.BatchNorm{1,2,3}d(num_features, affine=..., track_running_stats=...,
    bias=...)``.
    """
    num_features = number("num_features", num_features, integral=True, at_least=1)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"dtype must be a floating dtype, got {jnp.dtype(dtype)}")
    accumulation_steps = number("accumulation_steps", accumulation_steps, integral=True,
                                at_least=1, optional=True)
    if accumulation_steps is not None and not track_running_stats:
        raise ValueError("accumulation_steps accumulates into the running statistics, and "
                         "track_running_stats=False has none")
    params = {}
    if affine:
        params = {"weight": jnp.ones(num_features, dtype)}
        if bias:
            params["bias"] = jnp.zeros(num_features, dtype)
    state = {}
    if track_running_stats:
        statistics_dtype = compute_dtype(dtype)
        state = {
            "running_mean": jnp.zeros(num_features, statistics_dtype),
            "running_var": jnp.ones(num_features, statistics_dtype),
            "num_batches_tracked": jnp.zeros((), jnp.int32),
        }
    if accumulation_steps is not None:
        state["accumulator"] = empty_accumulator(num_features, compute_dtype(dtype))
    return params, state


def batchnorm(
    params: Params,
    state: State,
    x: Array,
    training: bool,
    *,
    mode: Literal["tracked", "untracked", "frozen"] = "tracked",
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    axis: int = 1,
    mask: Array | None = None,
    axis_name: Hashable | tuple[Hashable, ...] | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    group_size: int | None = None,
    renorm: tuple[ArrayLike, ArrayLike] | None = None,
    virtual_batch_size: int | None = None,
    accumulation_steps: int | None = None,
    accumulation_pooling: str = "union",
    statistics: Mapping[str, Array] | None = None,
    activation: Literal["identity", "relu", "leaky_relu", "elu"] | None = None,
    activation_param: float | None = None,
    residual: Array | None = None,
) -> tuple[Array, State]:
    """Batch normalization of each channel of ``x``, over all its other axes, as a pure
    function.

    .. math:: y = \\frac{x - \\mathrm{E}[x]}{\\sqrt{\\mathrm{Var}[x] + \\epsilon}}\\, w + b

    In training the batch's own statistics normalize (the biased variance) and the running
    state learns ``running ← (1 − momentum)·running + momentum·batch`` with the *unbiased*
    batch variance, ``num_batches_tracked += 1``. In eval the running statistics normalize,
    centering first; without them (``state == {}``) the batch's own. The state comes back
    unchanged wherever it does not learn, and carries no derivative. The guides have the
    details: *Training* (modes, masks, the edges), *Variants*, *Large batches*.

    Args:
      params: ``{"weight", "bias"}``, (C,) each; ``{"weight"}`` (PyTorch's ``bias=False``);
        or ``{}`` (no affine).
      state: ``{"running_mean", "running_var"}`` (C,) and ``"num_batches_tracked"`` (int
        scalar); the two alone (a frozen layer's); or ``{}`` (no running statistics).
      x: floating, rank ≥ 2 (≥ 1 with ``axis_name``), channels at ``axis``.
      training: Python bool, the model's phase (static under ``jax.jit``).
      mode: ``"tracked"`` (PyTorch's BatchNorm), ``"untracked"`` (batch statistics in both
        phases, the state left) or ``"frozen"`` (running statistics in both, ``weight`` and
        ``bias`` constants: ``FrozenBatchNorm2d``).
      momentum: the new batch's weight in the running update, in [0, 1]; None: the
        cumulative average.
      eps: added to the variance; > 0 where the batch's statistics normalize.
      axis: the channel axis: 1 for (N, C, ...), -1 for channels-last.
      mask: boolean, ``x``'s shape without the channel axis or a leading prefix of it:
        False positions enter no statistic, and are normalized all the same.
      axis_name: mapped axes (``shard_map``, ``pmap``, ``vmap``) sharing the statistics.
      axis_index_groups, group_size: statistics per group of devices along ``axis_name``.
      renorm: None or ``(rmax, dmax)``, numbers or arrays: batch renormalization.
      virtual_batch_size: None or k dividing ``x.shape[0]``: ghost batch norm.
      accumulation_steps, accumulation_pooling: None or k: the running state learns once
        every k training calls, from all k micro-batches (``"union"`` or
        ``"micro-batches"``); the state from ``init(C, accumulation_steps=k)``.
      statistics: None or ``{"mean", "var"}`` (biased, as ``batch_statistics`` returns):
        they normalize in place of the batch's own, constants to the derivative.
      activation, activation_param, residual: ``y = act(BN(x) + residual)``; for
        ``"identity"``, ``"leaky_relu"`` (slope, 0.01) and ``"elu"`` (alpha, 1.0) the
        backward pass keeps ``y``, not ``x`` (*Variants*); ``residual`` as ``x``.

    Returns:
      ``(y, state)``: ``y`` of the shape and dtype of ``x``, and the new state.

    Raises:
      TypeError, ValueError: at trace time, naming the argument, what was seen and what
        was expected.

    Warns:
      UserWarning: ``momentum ≥ 0.9`` where the running state learns: most often Flax's
        convention by mistake.

    Example:
      >>> params, state = jbn.init(3)
      >>> y, state = jbn.batchnorm(params, state, jnp.ones((4, 3)), training=True)

    PyTorch: ``torch.nn.BatchNorm{1,2,3}d``; ``momentum`` as PyTorch's (Flax's 0.99 is 0.01).
    """
    call = parse(params, state, x, training, mode=mode, momentum=momentum, eps=eps, axis=axis,
                 mask=mask, axis_name=axis_name, axis_index_groups=axis_index_groups,
                 group_size=group_size, renorm=renorm, virtual_batch_size=virtual_batch_size,
                 accumulation_steps=accumulation_steps,
                 accumulation_pooling=accumulation_pooling, statistics=statistics,
                 activation=activation, activation_param=activation_param, residual=residual)
    y, new_state = _apply(call, state if call.updates_state else {})
    return y, new_state if call.updates_state else state


# Jitted, so that an eager call runs one executable (compiled once per shape and static
# option), not one operation at a time; inside a traced function it is inlined.
@jax.jit
def _apply(call: Call, state: State) -> tuple[Array, State]:
    """The formula: statistics, normalization, running state, as ``call`` describes."""
    if call.given is not None:  # running statistics in eval, or the caller's
        y = normalize_with(call.reduction, call.eps, call.x, *call.given, call.weight,
                           call.bias)
        return activated(call.activation, y, call.residual), state
    if call.activation is not None and call.activation.invertible:
        y, found = normalize_activated(call.reduction, call.eps, call.activation, call.x,
                                       call.valid, call.weight, call.bias, call.residual,
                                       call.renorm)
    else:
        y, found = normalize(call.reduction, call.eps, call.x, call.valid, call.weight,
                             call.bias, call.renorm)
        y = activated(call.activation, y, call.residual)
    if call.updates_state:
        state = _learned(state, found.pooled(
            call.reduction, fine_mean=call.accumulation_steps is not None), call)
    return y, state


def batch_statistics(
    state: State,
    xs: Array,
    *,
    momentum: float | None = 0.1,
    axis: int = 1,
    mask: Array | None = None,
    axis_name: Hashable | tuple[Hashable, ...] | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    group_size: int | None = None,
) -> tuple[dict[str, Array], State]:
    """The statistics of many micro-batches together, and the running state updated once
    with them: what one training call on the whole batch would compute and learn.

    The micro-batches are stacked along a new axis 0 of ``xs`` and visited one at a time
    (``lax.scan``), so only one is in memory at once; their statistics merge by Chan's update
    (sums of squares about each micro-batch's mean: nothing cancels). Normalize each
    micro-batch with them through ``batchnorm(..., statistics=...)``. What that derivative
    keeps: the statistics are constants to it, so ``ẏ = w·ẋ/√(var + eps)``; the derivative of
    batch norm on the whole batch has two more terms,
    ``−w/√(var + eps)·(⟨ẋ⟩ + x̂·⟨x̂·ẋ⟩)``, means over every micro-batch, which no single
    micro-batch's backward pass can know.

    Args:
      state: the running state, or ``{}``; an accumulator in it is left as it is.
      xs: the micro-batches, stacked: (k, N, C, ...), each as ``batchnorm`` takes ``x``.
      momentum, axis, axis_name, axis_index_groups, group_size: as in ``batchnorm``, for
        each micro-batch.
      mask: None, or the micro-batches' masks stacked along axis 0, each as in
        ``batchnorm``.

    Returns:
      ``{"mean", "var", "count"}``: the mean and biased variance (C,) of all valid values
      and their number per channel (over every device along ``axis_name``, or of this
      device's group), and the state updated as by one training call on all of them
      (``num_batches_tracked + 1``).

    PyTorch: no equivalent.
    """
    batches = parse_micro_batches(state, xs, momentum=momentum, axis=axis, mask=mask,
                                  axis_name=axis_name, axis_index_groups=axis_index_groups,
                                  group_size=group_size)
    channels = batches.xs.shape[1 + batches.reduction.channel_axis]
    empty = empty_accumulator(channels, compute_dtype(xs.dtype))
    empty = Statistics(*(empty[key] for key in Statistics._fields))

    def merge(so_far, micro_batch):
        x, valid = micro_batch
        return so_far.merged(measure(x, valid, batches.reduction)), None

    total, _ = lax.scan(merge, empty, (batches.xs, batches.valid))
    if batches.updates_state:
        state = _updated(state, lax.stop_gradient(total.pooled(batches.reduction)),
                         batches.momentum)
    return {"mean": total.mean, "var": total.variance, "count": total.count}, state


def _learned(state: State, statistics: Statistics, call: Call) -> State:
    """The state after a training call: updated from the batch's statistics, or with
    ``accumulation_steps``, from those of the step's micro-batches on its last one."""
    statistics = lax.stop_gradient(statistics)
    if call.accumulation_steps is None:
        return _updated(state, statistics, call.momentum)
    accumulator = state["accumulator"]
    so_far = Statistics(*(accumulator[key] for key in Statistics._fields))
    merged = so_far.merged(statistics, within=call.within)
    micro_batches = accumulator["micro_batches"] + 1
    step_ends = micro_batches >= call.accumulation_steps
    updated = _updated(state, merged, call.momentum)
    empty = empty_accumulator(accumulator["m2"].shape[0], accumulator["m2"].dtype)
    merged = {**merged._asdict(), "micro_batches": micro_batches}
    return {**{key: jnp.where(step_ends, updated[key], state[key]) for key in updated},
            "accumulator": {key: jnp.where(step_ends, empty[key], merged[key]).astype(
                accumulator[key].dtype) for key in accumulator}}


def _updated(state: State, statistics: Statistics, momentum: float | None) -> State:
    """``running ← (1 − momentum)·running + momentum·batch``, the batch's mean and unbiased
    variance; ``momentum=None``: the cumulative average, factor ``1/num_batches_tracked``.

    Every training call counts, as PyTorch's module counts before it looks at the batch (an
    empty batch too); the running statistics learn only from 2 or more valid values: with
    fewer (an empty batch, or a mask known only at run time) the unbiased variance would be
    inf or nan, so they stay as they were."""
    num_batches = state["num_batches_tracked"] + 1
    factor = 1 / num_batches.astype(statistics.mean.dtype) if momentum is None else momentum

    def updated(running, batch_value):
        new = (1 - factor) * running + factor * batch_value
        return jnp.where(statistics.informative, new, running).astype(running.dtype)

    return {
        "running_mean": updated(state["running_mean"], statistics.mean),
        "running_var": updated(state["running_var"], statistics.unbiased_variance),
        "num_batches_tracked": num_batches,
    }
