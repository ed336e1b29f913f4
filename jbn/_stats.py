"""Per-channel batch statistics: masks, shifted moments, cross-device combination.

This module is the single owner of how jbn computes E[x] and Var[x]. The details it takes
care of:

* **No cancellation.** Two passes over ``x``. The first takes the mean about ``K``,
  one value of the data per channel: ``mean = K + ⟨x − K⟩``; ``⟨x − K⟩`` is of the
  order of the spread, not of the mean. The second sums squared deviations from that mean,
  ``M2 = Σ ((x − K) − ⟨x − K⟩)²``, a sum of non-negative terms that nothing can cancel,
  where the textbook ``E[x²] − E[x]²`` loses every digit once the mean is 10⁴× the spread
  (and a one-pass sum about ``K`` loses digits when ``K`` happens to be an outlier). The
  mean is kept as a pair: the mean rounded to the compute dtype, as ``shift``, and the
  remainder below its rounding error, as ``mean_offset``. ``x − shift`` is exact for data
  close to the mean (Sterbenz), so the normalized value ``(x − shift) − mean_offset`` is
  finer than a mean rounded to the input precision, and a constant channel gives exactly 0.
* **Precision.** Sums accumulate in at least float32, whatever the input dtype.
* **Masks.** Positions where ``valid`` is False enter neither the sums nor the count.
* **Several devices, count-weighted.** Each device reduces its own values to
  ``(n_i, mean_i, M2_i)``; two all-reduces of O(C) values combine them as if all values sat
  on one device (Chan et al.'s parallel update), a device with no valid values counting for
  nothing. The first all-reduce gives the total count and a common shift (the count-weighted
  mean, to input precision); the second sums ``n_i·e_i`` and ``M2_i + n_i·e_i²``, with
  ``e_i`` each device's mean about the common shift. Since the common shift is within a
  rounding error of the true mean, the second sum cannot cancel either. One all-reduce of
  plain sums would need a shift shared by all devices *before* communicating, and no such
  value is close to the data in general (a running mean starts at 0); averaging E[x] and
  E[x²] across devices, as single-collective implementations do, cancels as above.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import Array, lax
from jax.sharding import PartitionSpec as P
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

    def psum(self, v: Array) -> Array:
        """Σ over the devices of ``axis_name``: one all-reduce (identity on one device)."""
        if self.axis_name is None:
            return v
        try:
            return lax.psum(v, self.axis_name, axis_index_groups=self.axis_index_groups)
        except NotImplementedError as error:
            if self.axis_index_groups is None:
                raise
            raise ValueError("axis_index_groups works under jax.pmap only, as in lax.psum "
                             f"(jax.shard_map and jax.vmap have none): {error}") from None


class Moments(NamedTuple):
    """Per-channel moments of the valid values: ``mean = shift + mean_offset``,
    ``M2 = Σ (x − mean)²``, ``count`` values per channel (the same for every channel)."""

    count: Array  # ()
    shift: Array  # (C,): the mean, rounded to the compute dtype
    mean_offset: Array  # (C,): mean − shift, below the rounding error of shift
    m2: Array  # (C,)

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
    local = _local_moments(x, valid, batch)
    if batch.axis_name is None:
        return local
    return _combined_across_devices(local, batch)


def _local_moments(x: Array, valid: Array | None, batch: Batch) -> Moments:
    dtype = compute_dtype(x.dtype)
    count = _count(x.shape, valid, batch, dtype)
    # K is a constant of the formulas (the mean and M2 do not depend on it), so no derivative
    # flows through it; a device with no valid value uses 0, so that garbage in masked
    # positions cannot reach the combination.
    k = lax.stop_gradient(jnp.where(count > 0, _first_valid_value(x, valid, batch), 0))
    k = k.astype(dtype)
    # One copy of K per pass, opaque to XLA: each reduction then reads x and fuses its own
    # x − K, where a shared x − K would be written to memory and read back twice.
    k_mean, k_m2 = lax.optimization_barrier((k, k))
    offset = batch.sum(x.astype(dtype) - batch.per_channel(k_mean), valid) / jnp.maximum(count, 1)
    deviation = (x.astype(dtype) - batch.per_channel(k_m2)) - batch.per_channel(offset)
    m2 = batch.sum(jnp.square(deviation), valid)
    mean = k + offset
    return Moments(count, mean, (k - mean) + offset, m2)


def _combined_across_devices(local: Moments, batch: Batch) -> Moments:
    n_i = local.count
    totals = batch.psum(jnp.concatenate([n_i[None], n_i * local.mean]))
    count, weighted_mean_sum = totals[0], totals[1:]
    common_shift = weighted_mean_sum / jnp.maximum(count, 1)
    e_i = (local.shift - common_shift) + local.mean_offset  # mean_i − common_shift
    sums = batch.psum(jnp.concatenate([n_i * e_i, local.m2 + n_i * e_i * e_i]))
    sum_e, sum_m2 = jnp.split(sums, 2)
    mean_offset = sum_e / jnp.maximum(count, 1)
    return Moments(count, common_shift, mean_offset, sum_m2 - sum_e * mean_offset)


def _count(shape: tuple[int, ...], valid: Array | None, batch: Batch, dtype) -> Array:
    """Valid values per channel on this device."""
    if valid is None:
        return jnp.asarray(math.prod(shape[i] for i in batch.reduce_axes), dtype)
    # Axes the mask does not cover (size 1 in ``valid``) multiply the count.
    uncovered = math.prod(shape[i] for i in batch.reduce_axes if valid.shape[i] == 1)
    return jnp.sum(valid, dtype=dtype) * uncovered


def _first_valid_value(x: Array, valid: Array | None, batch: Batch) -> Array:
    """x at the first valid position of the reduced axes, per channel: (C,)."""

    def pick(x, valid):
        if valid is None:
            position = [0] * x.ndim
        else:
            position = list(jnp.unravel_index(jnp.argmax(valid.reshape(-1)), valid.shape))
        position[batch.channel_axis] = slice(None)
        return x[tuple(position)]

    spec = jax.typeof(x).sharding.spec
    if any(i < len(spec) and spec[i] is not None for i in batch.reduce_axes):
        # Sharding in types (explicit mesh axes) has no rule for indexing into a sharded
        # axis; with the axes automatic, XLA picks the value on its device and broadcasts it.
        channel_spec = spec[batch.channel_axis] if batch.channel_axis < len(spec) else None
        pick = jax.sharding.auto_axes(pick, out_sharding=P(channel_spec))
    return pick(x, valid)
