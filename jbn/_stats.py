"""Per-channel batch statistics: masks, guarded moments, cross-device combination.

This module is the single owner of how jbn computes E[x] and Var[x]. The details it takes
care of:

* **Cheap where it is safe.** The plain sums ``n``, ``Σx``, ``Σx²`` give the mean and
  ``M2 = Σx² − (Σx)²/n``. That difference cancels when the mean is large against the spread
  (the textbook ``E[x²] − E[x]²`` loses every digit at mean = 10⁴ σ), but it loses only a
  factor ``1 + mean²/σ²`` of relative precision, so where every channel has
  ``mean² ≤ CANCELLATION_BOUND · σ²`` the plain sums are within a few ulps and serve.
  Sums with no operand but ``x`` are the cheapest reductions there are.
* **Exact where it is not.** Otherwise (``lax.cond``: only then) a second pass sums about
  ``K``, the mean of the first pass rounded to the compute dtype: ``Σ (x − K)``,
  ``Σ (x − K)²``. ``K`` is within a few roundings of the mean, so these are of the order of
  the spread and nothing cancels. The data decide the branch, not the caller.
* **The mean as a pair.** ``shift``, the mean rounded to the compute dtype, and
  ``mean_offset``, the remainder below its rounding error. ``x − shift`` is exact for data
  close to the mean (Sterbenz), so the normalized value ``(x − shift) − mean_offset`` is
  finer than a mean rounded to the input precision. The remainder is formed as a sum over
  the values divided once, so a constant channel gives exactly 0.
* **Precision.** Sums accumulate in at least float32, whatever the input dtype.
* **Masks.** Positions where ``valid`` is False enter neither the sums nor the count.
* **Several devices, count-weighted.** Sums add across devices: one all-reduce carries the
  count, ``Σx`` and ``Σx²`` of every device (``2C + 1`` values); a device with no valid value
  adds nothing. Every device then holds the same totals, so all take the same branch, and
  only the exact path needs a second all-reduce (``2C`` values). The global mean from the
  first is a shift shared by all devices and close to all the data, which is what a single
  all-reduce of sums about a shift lacks before it has communicated.
* **Ensembles.** Under ``jax.vmap`` over independent members, the branch is chosen for all
  of them together (exact if any member needs it), so ``lax.cond`` stays a branch and does
  not become a select that computes both.
* **Ghost batches.** With ``Batch.group_size = k``, every group of ``k`` consecutive
  examples along axis 0 has its own moments, of shape (G, C), with the same sums, the same
  guard (one branch for all groups, as for ensembles) and the same pair for the mean. A
  group lies within one device, so its sums take no all-reduce.
* **What the running state learns** (``population_estimate``): the mean and the unbiased
  variance ``M2/(n − 1)`` of the valid values; over ghost groups, the mean of all valid
  values and the pooled within-group variance ``Σ M2_g / Σ (n_g − 1)``, which for groups of
  equal counts is the mean of the groups' own unbiased variances.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import Array, lax
from jax.typing import DTypeLike


@dataclasses.dataclass(frozen=True)
class Batch:
    """Which values share one set of statistics: every axis of ``x`` but ``channel_axis``,
    on every device along ``axis_name`` (within its group of ``axis_index_groups``); or,
    with ``group_size = k`` (ghost batches), each group of ``k`` consecutive examples along
    axis 0 of this device's ``x``, every axis but ``channel_axis`` (never 0) within it.

    Static and hashable, so it can ride along as a non-differentiable argument.
    """

    ndim: int
    channel_axis: int
    axis_name: Hashable | tuple[Hashable, ...] | None = None
    axis_index_groups: tuple[tuple[int, ...], ...] | None = None
    group_size: int | None = None

    @property
    def reduce_axes(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.ndim) if i != self.channel_axis)

    def per_channel(self, v: Array) -> Array:
        """Reshapes a (C,) vector, or (G, C) per ghost group, to broadcast against x along
        the channel axis (and, per group, along axis 0)."""
        shape = [1] * self.ndim
        shape[self.channel_axis] = v.shape[-1]
        if v.ndim == 2:
            # Each group's row for each of its examples: a broadcast XLA fuses into its user.
            v = jnp.repeat(v, self.group_size, axis=0)
            shape[0] = v.shape[0]
        return v.reshape(shape)

    def sum(self, v: Array, valid: Array | None) -> Array:
        """Σ over this device's valid positions, per channel: (C,), or (G, C) per group."""
        if valid is not None:
            v = jnp.where(valid, v, 0)
        if self.group_size is None:
            return jnp.sum(v, axis=self.reduce_axes)
        # Per example first, (N, C), then per group: XLA's CPU backend runs these two
        # reductions faster than one over a (G, k, ...) view of x (a training forward of
        # 64×64×32×32 in about 1.3 copies of x, as without groups, instead of 2.9).
        per_example = jnp.sum(v, axis=self.reduce_axes[1:])
        groups = per_example.shape[0] // self.group_size
        return jnp.sum(per_example.reshape(groups, self.group_size, per_example.shape[1]),
                       axis=1)

    def psum(self, *values: Array) -> tuple[Array, ...]:
        """Σ over the devices of ``axis_name``: one all-reduce of all the values (identity on
        one device, and for ghost groups, which lie within one device)."""
        if self.axis_name is None or self.group_size is not None:
            return values
        return _all_devices(self, values)


def _all_devices(batch: Batch, values):
    return lax.psum(values, batch.axis_name, axis_index_groups=batch.axis_index_groups)


# The plain sums serve when every channel has mean² ≤ CANCELLATION_BOUND · variance, i.e.
# |mean| ≤ 5σ: their difference Σx² − (Σx)²/n then loses at most a factor 26 of the
# variance's relative precision (y within about 1e-5 of float64 at the bound). Chosen by
# measurement (python -m benchmarks.guard): over the examples' training runs it sends no
# call of the digits MLP and 7.5 % of ResNet-18's to the exact path, where a bound of 10
# sent 48 % and 22 %.
CANCELLATION_BOUND = 25.0


class Moments(NamedTuple):
    """Per-channel moments of the valid values: ``mean = shift + mean_offset``,
    ``M2 = Σ (x − mean)²``, ``count`` values per channel (the same for every channel);
    ``exact`` tells whether they came from sums about a shift (the exact path). Over ghost
    groups, one row per group: ``count`` (G, 1), the others (G, C)."""

    count: Array  # (), or (G, 1)
    shift: Array  # (C,) or (G, C): the mean, rounded to the compute dtype
    mean_offset: Array  # mean − shift, below the rounding error of shift
    m2: Array
    exact: Array  # (), bool: whether the exact path ran (for tests and measurements)

    @property
    def mean(self) -> Array:
        return self.shift + self.mean_offset

    @property
    def variance(self) -> Array:
        """Biased variance M2/n, the one that normalizes (0 when there is no value)."""
        return self.m2 / jnp.maximum(self.count, 1)


class BatchStatistics(NamedTuple):
    """What the running state needs of a batch: its count, mean and biased variance (per
    ghost group: count (G, 1), the others (G, C))."""

    count: Array
    mean: Array
    variance: Array


class Estimate(NamedTuple):
    """A batch's estimate of the population statistics, which the running state averages."""

    mean: Array  # (C,)
    variance: Array  # (C,), unbiased
    informative: Array  # (), bool: whether there were at least 2 valid values to learn from


def population_estimate(stats: BatchStatistics, batch: Batch) -> Estimate:
    """The mean and unbiased variance the running statistics learn from a batch.

    One set of statistics: ``mean`` and ``n/(n − 1)·variance`` (PyTorch's Bessel
    correction), informative from ``n ≥ 2`` valid values. Ghost groups: the mean of all valid
    values, ``Σ n_g·mean_g / Σ n_g``, and the pooled within-group variance
    ``Σ M2_g / Σ (n_g − 1)`` over the groups of every device along ``axis_name`` (one
    all-reduce of 2C + 2 values), informative from one group of 2 valid values. For groups of
    equal counts that is the mean of the group means and of the groups' unbiased variances,
    the statistics each group was normalized with (Bessel-corrected); a group of fewer valid
    values weighs less, one of 0 or 1 not at all in the variance.
    """
    count, mean, variance = stats
    if batch.group_size is None:
        return Estimate(mean, variance * count / (count - 1), count > 1)
    totals = (jnp.sum(count), jnp.sum(count * mean, axis=0), jnp.sum(count * variance, axis=0),
              jnp.sum(jnp.maximum(count - 1, 0)))
    if batch.axis_name is not None:
        totals = _all_devices(batch, totals)
    n, sum_x, m2, degrees = totals
    return Estimate(sum_x / jnp.maximum(n, 1), m2 / jnp.maximum(degrees, 1), degrees > 0)


def compute_dtype(dtype: DTypeLike) -> jnp.dtype:
    """The dtype statistics accumulate in: at least float32."""
    return jnp.promote_types(dtype, jnp.float32)


# Jitted so that an eager call compiles its branches once per shape rather than on every call
# (lax.cond traces the closures it is given anew); inside a traced function it is inlined.
@partial(jax.jit, static_argnames="batch")
def moments(x: Array, valid: Array | None, batch: Batch) -> Moments:
    """Moments of ``x`` over ``batch``, counting only positions where ``valid`` is True.

    Args:
      x: the input, channel at ``batch.channel_axis``.
      valid: None (all valid) or a boolean array broadcastable to ``x``, of size 1 along the
        channel axis.
      batch: the axes and devices the statistics run over.

    Returns:
      Moments in ``compute_dtype(x.dtype)``, the same on every device of the batch; with
      ghost groups (``batch.group_size``), one per group, each within its device.
    """
    dtype = compute_dtype(x.dtype)
    x = x.astype(dtype)
    local_count = _count(x.shape, valid, batch, dtype)
    count, sum_x, sum_squares = batch.psum(local_count, batch.sum(x, valid),
                                           batch.sum(x * x, valid))
    mean = sum_x / jnp.maximum(count, 1)
    variance = (sum_squares - sum_x * mean) / jnp.maximum(count, 1)
    # |mean| ≤ √(bound·variance), in this form so that neither side underflows to 0 where
    # the other does not; an overflowing Σx² is not finite, and not safe. The totals are the
    # same on every device of the batch, and so is the branch.
    safe = _for_every_member(lax.stop_gradient(jnp.all(
        (jnp.abs(mean) <= jnp.sqrt(CANCELLATION_BOUND * variance)) & (variance < jnp.inf))))

    def about_the_mean(mean):
        # Each reduction gets its own copy of the shift, opaque to XLA: it then reads x and
        # fuses its own x − shift, where a shared x − shift would be written to memory.
        for_sum, for_squares = lax.optimization_barrier((mean, mean))
        return mean, *batch.psum(
            batch.sum(x - batch.per_channel(for_sum), valid),
            batch.sum(jnp.square(x - batch.per_channel(for_squares)), valid))

    # The branch returns the shift its sums are about, so that what follows uses that very
    # value: computed again outside, XLA may round it otherwise (÷n as ×(1/n), a fused
    # multiply-add), and a constant channel would lose its exact 0.
    shift, sum_deviations, sum_squared_deviations = lax.cond(
        safe, lambda _: (jnp.zeros_like(sum_x), sum_x, sum_squares), about_the_mean,
        lax.stop_gradient(mean))
    return _moments_about(shift, count, sum_deviations, sum_squared_deviations,
                          exact=jnp.logical_not(safe))


def _moments_about(shift: Array, count: Array, sum_deviations: Array,
                   sum_squared_deviations: Array, exact) -> Moments:
    """Moments from ``Σ (x − shift)`` and ``Σ (x − shift)²`` over ``count`` values."""
    n = jnp.maximum(count, 1)
    offset = sum_deviations / n
    mean = shift + offset
    # The remainder as a sum over the values, divided once: for a constant channel the sum
    # of (x − shift) is n·(x − shift) exactly, so this is exactly 0 (and y too), however the
    # division rounds.
    mean_offset = ((shift - mean) * n + sum_deviations) / n
    m2 = jnp.maximum(sum_squared_deviations - sum_deviations * offset, 0)
    return Moments(count, mean, mean_offset, m2, jnp.asarray(exact))


@jax.custom_batching.custom_vmap
def _for_every_member(condition: Array) -> Array:
    """``condition``, which under ``jax.vmap`` holds only if it holds for every member: one
    branch then serves the whole ensemble, where a batched predicate would turn
    ``lax.cond`` into a select that computes both."""
    return condition


@_for_every_member.def_vmap
def _for_every_member_vmap(axis_size, in_batched, condition):
    del axis_size
    return (jnp.all(condition) if in_batched[0] else condition), False


def _count(shape: tuple[int, ...], valid: Array | None, batch: Batch, dtype) -> Array:
    """Valid values per channel on this device: (), or (G, 1) per ghost group."""
    if batch.group_size is not None:
        ones = jnp.ones([1 if i == batch.channel_axis else n for i, n in enumerate(shape)], dtype)
        return batch.sum(ones, valid)
    if valid is None:
        return jnp.asarray(math.prod(shape[i] for i in batch.reduce_axes), dtype)
    # Axes the mask does not cover (size 1 in ``valid``) multiply the count.
    uncovered = math.prod(shape[i] for i in batch.reduce_axes if valid.shape[i] == 1)
    return jnp.sum(valid, dtype=dtype) * uncovered
