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
    on every device along ``axis_name`` (within its group of ``axis_index_groups``).

    Static and hashable, so it can ride along as a non-differentiable argument.
    """

    ndim: int
    channel_axis: int
    axis_name: Hashable | tuple[Hashable, ...] | None = None
    axis_index_groups: tuple[tuple[int, ...], ...] | None = None

    @property
    def reduce_axes(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.ndim) if i != self.channel_axis)

    def per_channel(self, v: Array) -> Array:
        """Reshapes a (C,) vector to broadcast against x along the channel axis."""
        shape = [1] * self.ndim
        shape[self.channel_axis] = v.shape[0]
        return v.reshape(shape)

    def sum(self, v: Array, valid: Array | None) -> Array:
        """Σ over this device's valid positions, per channel: (C,)."""
        if valid is not None:
            v = jnp.where(valid, v, 0)
        return jnp.sum(v, axis=self.reduce_axes)

    def psum(self, *values: Array) -> tuple[Array, ...]:
        """Σ over the devices of ``axis_name``: one all-reduce of all the values (identity on
        one device)."""
        if self.axis_name is None:
            return values
        return lax.psum(values, self.axis_name, axis_index_groups=self.axis_index_groups)


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
    ``exact`` tells whether they came from sums about a shift (the exact path)."""

    count: Array  # ()
    shift: Array  # (C,): the mean, rounded to the compute dtype
    mean_offset: Array  # (C,): mean − shift, below the rounding error of shift
    m2: Array  # (C,)
    exact: Array  # (), bool: whether the exact path ran (for tests and measurements)

    @property
    def mean(self) -> Array:
        return self.shift + self.mean_offset

    @property
    def variance(self) -> Array:
        """Biased variance M2/n, the one that normalizes (0 when there is no value)."""
        return self.m2 / jnp.maximum(self.count, 1)


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
      Moments in ``compute_dtype(x.dtype)``, the same on every device of the batch.
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
    """Valid values per channel on this device."""
    if valid is None:
        return jnp.asarray(math.prod(shape[i] for i in batch.reduce_axes), dtype)
    # Axes the mask does not cover (size 1 in ``valid``) multiply the count.
    uncovered = math.prod(shape[i] for i in batch.reduce_axes if valid.shape[i] == 1)
    return jnp.sum(valid, dtype=dtype) * uncovered
