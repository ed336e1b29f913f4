"""The public functions: ``init`` and ``batchnorm``, which reads as the formula: parse the
arguments, compute the batch's statistics, normalize, update the running state."""

from __future__ import annotations

import numbers
from collections.abc import Hashable, Mapping, Sequence
from typing import Literal

import jax
import jax.numpy as jnp
from jax import Array, lax
from jax.typing import ArrayLike, DTypeLike

from jbn._call import Call, parse
from jbn._normalize import normalize, normalize_with
from jbn._reduction import compute_dtype
from jbn._stats import Statistics
from jbn._stats import statistics as statistics_of

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
        the optimizer step under way, their mean as ``shift + mean_offset`` (empty:
        ``count``, ``degrees`` 0, ``shift``, ``mean_offset``, ``m2`` zeros(C), in at least
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
    if isinstance(num_features, bool) or not isinstance(num_features, numbers.Integral):
        raise TypeError(f"num_features must be an int, got {num_features!r}")
    if num_features <= 0:
        raise ValueError(f"num_features must be positive, got {num_features}")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"dtype must be a floating dtype, got {jnp.dtype(dtype)}")
    if accumulation_steps is not None and (
            isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int)
            or accumulation_steps <= 0):
        raise ValueError(f"accumulation_steps must be a positive int or None, got "
                         f"{accumulation_steps!r}")
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
        state["accumulator"] = _empty_accumulator(num_features, compute_dtype(dtype))
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
) -> tuple[Array, State]:
    """Batch normalization, per channel, as a pure function.

    .. math:: y = \\frac{x - \\mathrm{E}[x]}{\\sqrt{\\mathrm{Var}[x] + \\epsilon}}\\, w + b

    The statistics run over every axis of ``x`` except ``axis`` (and over every device along
    ``axis_name``); the biased variance normalizes. ``training`` is the phase of the model;
    ``mode`` the kind of layer, as PyTorch chooses between ``BatchNorm2d`` and
    ``FrozenBatchNorm2d``:

    * ``"tracked"`` (PyTorch's ``BatchNorm``). Training, or no running statistics
      (``state == {}``): batch statistics normalize. In training with state,
      ``running ← (1 − momentum)·running + momentum·batch`` with the *unbiased* batch
      variance ``n/(n − 1)·Var[x]`` for ``running_var``, and ``num_batches_tracked += 1``;
      ``momentum=None`` makes it the cumulative average (factor ``1/num_batches_tracked``).
      Eval with state: the running statistics normalize, in one elementwise pass that
      centers first, ``(x − running_mean)·w/√(running_var + eps) + b``, so that a channel
      whose mean is large against its spread loses nothing to cancellation.
    * ``"untracked"``: batch statistics normalize in training and eval, and the state is
      left as it is (PyTorch's ``track_running_stats=False``, Haiku's ``test_local_stats``):
      test-time adaptation, MAML's inner loop.
    * ``"frozen"``: the running statistics normalize in training and eval, and ``weight``
      and ``bias`` are constants to the derivative (torchvision's ``FrozenBatchNorm2d``);
      ``x`` still receives its gradient. Fine-tuning detection and segmentation models.

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

    Statistics can also span more than one call, or less than all devices:

    * ``accumulation_steps=k`` (gradient accumulation): each training call normalizes its
      micro-batch with its own statistics, as without, and merges them into
      ``state["accumulator"]`` (Chan's update: sums of squares about each micro-batch's
      mean, so nothing cancels; a micro-batch with no valid value adds nothing). Every k-th
      call updates the running statistics once, as above, from the statistics of all the
      step's values (``accumulation_pooling="union"``: their mean and unbiased variance,
      what one call on the whole batch gives) or from the micro-batches pooled as ghost
      batches are (``"micro-batches"``: the mean of all values and ``Σ M2_b / Σ (n_b − 1)``),
      counts one batch and empties the accumulator; between those calls the running
      statistics and ``num_batches_tracked`` stay as they were. The state comes from
      ``init(C, accumulation_steps=k)``.
    * ``group_size=k`` (or ``axis_index_groups``): each group of devices along ``axis_name``
      has its own statistics. The running statistics learn from all groups, pooled as ghost
      batches are, and are the same on every device.
    * ``statistics={"mean", "var"}`` (``batch_statistics`` of many micro-batches): they
      normalize in place of the batch's own, as constants to the derivative, which keeps
      only the direct term ``w·ẋ/√(var + eps)``; the state is not updated.

    Args:
      params: ``{"weight", "bias"}`` of shape (C,), ``{"weight"}`` alone (PyTorch's
        ``bias=False``), or ``{}`` (no affine transform).
      state: ``{"running_mean", "running_var"}`` of shape (C,) and an integer scalar
        ``"num_batches_tracked"``; those two alone (a frozen layer's, as
        ``FrozenBatchNorm2d`` keeps them: used to normalize, never trained); or ``{}`` (no
        running statistics).
      x: floating array, rank ≥ 2 (rank ≥ 1 with ``axis_name``), channel at ``axis``.
      training: Python bool (static under ``jax.jit``).
      mode: ``"tracked"``, ``"untracked"`` or ``"frozen"``, as above.
      momentum: weight of the batch statistic in the running update, in [0, 1], or None.
      eps: added to the variance; > 0 where batch statistics normalize, ≥ 0 where running
        statistics do (as PyTorch; FrozenBatchNorm2d's are often 0).
      axis: the channel axis: 1 for (N, C, ...), -1 for channels-last.
      mask: boolean, shaped like ``x`` without its channel axis, or a leading prefix of that
        shape (``(N,)`` or ``(N, L)`` for ``(N, C, L)``). False positions enter neither the
        statistics nor the Bessel count; their outputs are normalized all the same.
      axis_name: name(s) of mapped axes (``jax.pmap``, ``jax.shard_map``, ``jax.vmap``)
        whose devices or examples share the statistics (synchronized batch norm). Where
        running statistics normalize it is not used, and need not be bound.
      axis_index_groups: None, or the devices along ``axis_name`` split into groups (lists
        of indices, each index once), each group with its own statistics; under
        ``jax.shard_map``, ``jax.vmap`` and ``jax.pmap`` alike.
      group_size: None, or k dividing the number of devices (or mapped examples) along
        ``axis_name``: groups of k consecutive ones, ``axis_index_groups=[[0, …, k − 1],
        [k, …], …]``.
      renorm: None, or ``(rmax, dmax)``, scalars (Python numbers or arrays, which may be
        traced: a schedule under ``jax.jit`` does not recompile) with ``rmax ≥ 1`` and
        ``dmax ≥ 0``; ``(1, 0)`` is plain batch norm. Needs running statistics; in eval mode
        with them it changes nothing.
      virtual_batch_size: None, or k, a positive int dividing ``x.shape[0]`` where batch
        statistics normalize (ignored in eval with running statistics); axis 0 must be the
        batch axis, not the channel axis. With ``axis_name``, groups lie within each
        device's slice and the running statistics learn from the groups of every device.
      accumulation_steps: None, or k, a positive int (static): micro-batches per update of
        the running statistics; needs the accumulator of ``init(C, accumulation_steps=k)``.
      accumulation_pooling: ``"union"`` or ``"micro-batches"``: what the accumulated
        micro-batches give the running statistics, as above.
      statistics: None, or ``{"mean", "var"}`` (the biased variance), (C,) each: they
        normalize in place of the batch's own, in training or eval without running
        statistics; ``batch_statistics`` computes them over many micro-batches.

    Returns:
      ``y`` (shape and dtype of ``x``) and the new state.

    Raises:
      TypeError, ValueError: at trace time, for arguments of the wrong type, shape, dtype or
        range, and when training with exactly one value per channel (per ghost group), for
        ``renorm`` without running statistics, for a ``virtual_batch_size`` that does not
        divide the batch, for ``mode="frozen"`` without running statistics, and for
        training a state without ``num_batches_tracked`` or with running statistics narrower
        than float32 (bfloat16, float16), whose small updates would round away.

    Warns:
      UserWarning: for ``momentum ≥ 0.9`` where training updates the running statistics, which is
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
    call = parse(params, state, x, training, mode=mode, momentum=momentum, eps=eps, axis=axis,
                 mask=mask, axis_name=axis_name, axis_index_groups=axis_index_groups,
                 group_size=group_size, renorm=renorm, virtual_batch_size=virtual_batch_size,
                 accumulation_steps=accumulation_steps,
                 accumulation_pooling=accumulation_pooling, statistics=statistics)
    y, new_state = _apply(call, state if call.updates_state else {})
    return y, new_state if call.updates_state else state


# Jitted, so that an eager call runs one executable (compiled once per shape and static
# option), not one operation at a time; inside a traced function it is inlined.
@jax.jit
def _apply(call: Call, state: State) -> tuple[Array, State]:
    """The formula: statistics, normalization, running state, as ``call`` describes."""
    if call.fixed is not None:  # running statistics in eval, or given ones
        return normalize_with(call.reduction, call.eps, call.x, *call.fixed, call.weight,
                              call.bias), state
    y, found = normalize(call.reduction, call.eps, call.x, call.valid, call.weight, call.bias,
                         call.renorm)
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
    if not hasattr(xs, "shape") or getattr(xs, "ndim", 0) < 2:
        raise ValueError(f"xs must stack micro-batches along a new axis 0, got "
                         f"{getattr(xs, 'shape', type(xs).__name__)}")
    if mask is not None and getattr(mask, "shape", (None,))[:1] != xs.shape[:1]:
        raise ValueError(f"mask must stack the micro-batches' masks along axis 0, as xs "
                         f"{xs.shape} does; got {getattr(mask, 'shape', type(mask).__name__)}")
    call = parse({}, state, xs[0], True, mode="tracked", momentum=momentum, eps=1.0, axis=axis,
                 mask=None if mask is None else mask[0], axis_name=axis_name,
                 axis_index_groups=axis_index_groups, group_size=group_size, renorm=None,
                 virtual_batch_size=None, accumulation_steps=None,
                 accumulation_pooling="union", statistics=None)
    valid = None if mask is None else mask.reshape(xs.shape[:1] + call.valid.shape)
    dtype, channels = compute_dtype(xs.dtype), call.x.shape[call.reduction.channel_axis]
    empty = Statistics(jnp.zeros((), dtype), jnp.zeros((), dtype), jnp.zeros(channels, dtype),
                       jnp.zeros(channels, dtype), jnp.zeros(channels, dtype))

    def merge(so_far, micro_batch):
        x, micro_valid = micro_batch
        return so_far.merged(statistics_of(x, micro_valid, call.reduction)), None

    total, _ = lax.scan(merge, empty, (xs, valid))
    if call.updates_state:
        state = _updated(state, lax.stop_gradient(total.pooled(call.reduction)), momentum)
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
    empty = _empty_accumulator(accumulator["m2"].shape[0], accumulator["m2"].dtype)
    merged = {**merged._asdict(), "micro_batches": micro_batches}
    return {**{key: jnp.where(step_ends, updated[key], state[key]) for key in updated},
            "accumulator": {key: jnp.where(step_ends, empty[key], merged[key]).astype(
                accumulator[key].dtype) for key in accumulator}}


def _empty_accumulator(channels: int, dtype: DTypeLike) -> dict[str, Array]:
    return {"count": jnp.zeros((), dtype), "degrees": jnp.zeros((), dtype),
            "shift": jnp.zeros(channels, dtype), "mean_offset": jnp.zeros(channels, dtype),
            "m2": jnp.zeros(channels, dtype), "micro_batches": jnp.zeros((), jnp.int32)}


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
