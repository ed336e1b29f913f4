"""Per-channel batch statistics: masks, statistics on each platform, cross-device combination.

This module is the single owner of how jbn computes E[x] and Var[x]. The details it takes
care of:

* **Sums about a shift.** Everything comes from ``n``, ``Σ (x − K)`` and ``Σ (x − K)²`` for a
  per-channel shift ``K``: ``mean = K + Σ(x − K)/n``, ``M2 = Σ(x − K)² − (Σ(x − K))²/n``.
  The difference cancels by a factor ``1 + (mean − K)²/σ²`` of relative precision (the
  textbook ``E[x²] − E[x]²``, ``K = 0``, loses every digit at mean = 10⁴ σ), so what matters
  is a ``K`` within a few σ of the mean. How ``K`` is found differs by platform
  (``statistics``): on a CPU a branch is cheap and a second pass costs time, on a GPU or TPU a
  branch costs a host round trip and a pass costs little.
* **The mean as a pair.** ``mean = mean_head + mean_tail``: ``mean_head`` in the compute
  dtype, near the mean (the mean rounded, for one batch), and ``mean_tail`` the small rest.
  ``x − mean_head`` is exact for data close to the mean (Sterbenz), so the normalized value
  ``(x − mean_head) − mean_tail`` is finer than a mean rounded to the input precision. The
  tail is formed as a sum over the values divided once, so a constant channel gives
  exactly 0.
* **Precision.** Sums accumulate in at least float32, whatever the input dtype.
* **Masks.** Positions where ``valid`` is False enter neither the sums nor the count, nor
  the values the shift is sampled from.
* **Several devices, count-weighted.** Sums add across devices (all-reduces of O(C) values,
  whatever the number of devices); a device with no valid value adds nothing. Sums about a
  shift add up only if every device uses the same shift, so the shift is agreed before the
  sums (the mean of the plain sums on the CPU's exact path, the count-weighted mean of the
  devices' sampled shifts on accelerators).
* **Ensembles.** Under ``jax.vmap`` over independent members, the CPU's branch is chosen for
  all of them together (exact if any member needs it), so ``lax.cond`` stays a branch and
  does not become a select that computes both.
* **Ghost batches.** With ``virtual_batch_size = k``, every group of ``k`` consecutive
  examples along axis 0 has its own statistics, of shape (G, C), with the same sums, its own
  shift and its own pair for the mean. A ghost batch lies within one device, so its sums
  take no all-reduce.
* **What the running state learns** (``Statistics.pooled``): the mean and the unbiased
  variance ``M2/(n − 1)`` of the valid values; over ghost batches, the mean of all valid
  values and the pooled within-batch variance ``Σ M2_g / Σ (n_g − 1)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array, lax
from jax.sharding import PartitionSpec as P

from jbn._reduction import Reduction, compute_dtype

# The CPU's plain sums serve when every channel has mean² ≤ CANCELLATION_BOUND · variance,
# i.e. |mean| ≤ 3σ: Σx² − (Σx)²/n then loses at most a factor 10 of the variance's relative
# precision, and y keeps the accuracy docs/numerics.md promises. Chosen by measurement:
# python -m benchmarks.guard prints the error at each candidate bound and how often the
# examples' training runs take the exact path with it.
CANCELLATION_BOUND = 9.0

# How many values of the batch the accelerators' shift is the median of: enough that a
# cluster of outliers must hold more than half of them to move it (python -m
# benchmarks.accuracy), and few enough that sampling them is a kernel of negligible size.
SHIFT_SAMPLES = 33


class Statistics(NamedTuple):
    """Per-channel statistics of the valid values of a batch, from its sums to the running
    update: ``mean = mean_head + mean_tail``, ``M2 = Σ (x − mean)²`` over ``count`` values per
    channel (the same for every channel), and ``degrees``, what ``M2`` is divided by for the
    unbiased variance (``count − 1``, or pooled over ghost batches ``Σ (n_g − 1)``). Over
    ghost batches, one row per batch: ``count`` and ``degrees`` (G, 1), the others (G, C)."""

    count: Array  # (), or (G, 1)
    degrees: Array  # like count
    mean_head: Array  # (C,) or (G, C), in the compute dtype: near the mean
    mean_tail: Array  # mean − mean_head
    m2: Array

    @property
    def mean(self) -> Array:
        return self.mean_head + self.mean_tail

    @property
    def variance(self) -> Array:
        """Biased variance ``M2/n``, the one that normalizes (0 when there is no value)."""
        return self.m2 / jnp.maximum(self.count, 1)

    @property
    def unbiased_variance(self) -> Array:
        """``M2/degrees``, the one the running variance averages (PyTorch's Bessel
        correction)."""
        return self.m2 / jnp.maximum(self.degrees, 1)

    @property
    def informative(self) -> Array:
        """Whether there is an unbiased variance to learn: 2 valid values, or a ghost batch
        of 2."""
        return jnp.all(self.degrees > 0)

    def pooled(self, reduction: Reduction, *, fine_mean: bool = False) -> Statistics:
        """The statistics the running state learns from: these; over ghost batches, or over
        groups of devices, those of every batch or group along ``axis_name`` pooled (one
        all-reduce of 2C + 2 values), so that the running state is the same on every device:
        the mean of all valid values, ``Σ n_g·mean_g / Σ n_g``, and the within-batch (or
        within-group) ``Σ M2_g`` with ``Σ (n_g − 1)`` degrees. For batches of equal counts the
        unbiased variance is then the mean of the batches' own unbiased variances, those each
        was normalized with (Bessel-corrected); a batch of fewer valid values weighs less,
        one of 0 or 1 not at all in the variance.

        ``fine_mean``: the mean as the pooled one, rounded, plus the offset from it of the
        batches' own means, by a second all-reduce of C values: for merging, where the
        rounding of a mean |mean|/σ large would reach the variance (accumulation)."""
        ghost = reduction.virtual_batch_size is not None
        if not ghost and (reduction.axis_name is None or reduction.axis_index_groups is None):
            return self

        def total(*rows):  # over every batch or group, each counted once, on every device
            if ghost:
                rows = tuple(jnp.sum(row, axis=0) for row in rows)
            else:  # a group's statistics are on each of its devices
                rows = tuple(jnp.where(reduction.first_of_group(), row, 0) for row in rows)
            return reduction.psum_all(*rows)

        count, sum_x, m2, degrees = total(self.count, self.count * self.mean, self.m2,
                                          jnp.maximum(self.degrees, 0))
        mean = sum_x / jnp.maximum(count, 1)
        offset = jnp.zeros_like(mean)
        if fine_mean:  # mean_head − mean is exact: both are near the same mean
            offset = total(self.count * ((self.mean_head - mean) + self.mean_tail))[0]
            offset = offset / jnp.maximum(count, 1)
        return Statistics(count, degrees, mean, offset, m2)

    def merged(self, other: Statistics, *, within: bool = False) -> Statistics:
        """The statistics of the values of both, by Chan, Golub and LeVeque's update:
        ``n = n_a + n_b``, ``mean = mean_a + δ·n_b/n``, ``M2 = M2_a + M2_b + δ²·n_a·n_b/n``
        with ``δ = mean_b − mean_a``: sums of squares about each set's own mean, so nothing
        cancels. ``within``: ``M2 = M2_a + M2_b`` and ``Σ (n − 1)`` degrees, the pooled
        within-set statistics (ghost batches'). A set of no value adds nothing.

        The merged mean keeps the first set's ``mean_head`` (its ``mean_tail`` then grows
        with ``δ``): ``δ`` is a difference of tails, as fine as the sets' own, where two
        rounded means ``|mean|/σ`` large would lose ``δ`` to their rounding and the δ² term
        with it (``tests/test_accumulation.py`` measures it at mean 10⁴σ)."""
        count = self.count + other.count
        head = jnp.where(self.count > 0, self.mean_head, other.mean_head)
        tail = jnp.where(self.count > 0, self.mean_tail, 0)  # mean_a − head
        delta = (other.mean_head - head) + other.mean_tail - tail
        share = other.count / jnp.maximum(count, 1)
        if within:
            m2 = self.m2 + other.m2
            degrees = jnp.maximum(self.degrees, 0) + jnp.maximum(other.degrees, 0)
        else:
            m2 = self.m2 + other.m2 + delta * delta * self.count * share
            degrees = count - 1
        return Statistics(count, degrees, head, tail + delta * share, m2)


@dataclasses.dataclass(frozen=True)
class Scheme:
    """How the statistics are computed; the default is what users run.

    ``path``: None chooses by platform (``GUARDED`` on CPU, ``SHIFTED`` elsewhere); a name
    forces that path everywhere, so that tests and benchmarks run the accelerators' path on
    a CPU. ``bound``: the guard's ``CANCELLATION_BOUND``. ``samples``: how many values the
    shifted path takes its shift from. ``observe``: None, or a function that each call's
    statistics are passed to (``jax.debug.callback``) as count, mean and biased variance.
    """

    path: str | None = None
    bound: float = CANCELLATION_BOUND
    samples: int = SHIFT_SAMPLES
    observe: Callable[[Array, Array, Array], None] | None = None


GUARDED, SHIFTED = "guarded", "shifted"
_scheme = Scheme()


@contextlib.contextmanager
def scheme(**changes):
    """Within the block, statistics computed as ``Scheme(**changes)`` says: the switch that
    tests and benchmarks use, never a public option. Traces made before are dropped on entry
    and on exit (``jax.clear_caches``), since a jitted function keeps the scheme it was
    traced with."""
    global _scheme
    previous, _scheme = _scheme, dataclasses.replace(Scheme(), **changes)
    jax.clear_caches()
    try:
        yield _scheme
    finally:
        _scheme = previous
        jax.clear_caches()


def measure(x: Array, valid: Array | None, reduction: Reduction) -> Statistics:
    """Statistics of ``x`` over ``reduction``, counting only positions where ``valid`` is
    True.

    Two paths, by platform (``lax.platform_dependent``: only the one compiled for is
    lowered), both sums about a shift ``K`` as the module says:

    * **CPU, guarded.** One pass of the plain sums ``Σx``, ``Σx²`` (``K = 0``, the cheapest
      reductions there are), then ``lax.cond``: where every channel has
      ``mean² ≤ CANCELLATION_BOUND·σ²`` they serve; otherwise a second pass about their
      mean, exact whatever the data. A conditional costs microseconds on a CPU, a second
      pass over ``x`` more.
    * **GPU, TPU, every other platform: shifted.** No data-dependent conditional (on a GPU
      each one copies its predicate to the host and waits for the device, and splits the
      CUDA graph); one pass over ``x`` for ``Σ (x − K)``, ``Σ (x − K)²``, where ``K`` is the
      median of ``SHIFT_SAMPLES`` valid values spread over the batch (``_sampled_shift``)
      and, across devices, the count-weighted mean of the devices' medians. A median is
      within σ of the mean for any distribution, and a sample median far from it needs more
      than half of the sampled values to be: only a cluster of outliers exactly at the
      sampled positions moves it, and the error of ``y`` then grows with the square of its
      distance.

    Both keep the accuracy that docs/numerics.md promises, and measures with
    ``python -m benchmarks.accuracy``; a constant channel gives exactly 0.

    Across devices the CPU's path takes one all-reduce of ``2C + 1`` values (count, ``Σx``,
    ``Σx²``) and, on its exact branch, a second of ``2C``; the accelerators' path one of
    ``C + 1`` (count and ``Σ n_d·K_d``) to agree on the shift, then one of ``2C``. Both are
    O(C), whatever the number of devices: no all-gather.

    Args:
      x: the input, channel at ``reduction.channel_axis``.
      valid: None (all valid) or a boolean array broadcastable to ``x``, of size 1 along the
        channel axis.
      reduction: the axes and devices the statistics run over.

    Returns:
      Statistics in ``compute_dtype(x.dtype)``, the same on every device that shares them;
      with ghost batches (``reduction.virtual_batch_size``), one row per batch, each within
      its device.
    """
    return _measure(x, valid, reduction, _scheme)


# Jitted so that an eager call compiles its branches once per shape rather than on every call
# (lax.cond traces the closures it is given anew); inside a traced function it is inlined.
@partial(jax.jit, static_argnames=("reduction", "scheme"))
def _measure(x: Array, valid: Array | None, reduction: Reduction,
                scheme: Scheme) -> Statistics:
    guarded = partial(_guarded, x, valid, reduction, scheme.bound)
    shifted = partial(_shifted, x, valid, reduction, scheme.samples)
    if scheme.path is None:
        # Only the branch of the platform compiled for is lowered: no conditional remains.
        found = lax.platform_dependent(cpu=guarded, default=shifted)
    else:
        found = {GUARDED: guarded, SHIFTED: shifted}[scheme.path]()
    if scheme.observe is not None:
        jax.debug.callback(scheme.observe, found.count, found.mean, found.variance)
    return found


def _guarded(x: Array, valid: Array | None, reduction: Reduction, bound: float) -> Statistics:
    """The plain sums where they cannot cancel, sums about the mean under ``lax.cond``
    otherwise."""
    x = x.astype(compute_dtype(x.dtype))
    count, sum_x, sum_squares = plain_sums(x, valid, reduction)

    def about_the_mean(mean):
        # Each reduction gets its own copy of the shift, opaque to XLA: it then reads x and
        # fuses its own x − shift, where a shared x − shift would be written to memory.
        for_sum, for_squares = lax.optimization_barrier((mean, mean))
        return mean, *reduction.psum(
            reduction.sum(x - reduction.per_channel(for_sum), valid),
            reduction.sum(jnp.square(x - reduction.per_channel(for_squares)), valid))

    # The branch returns the shift its sums are about, so that what follows uses that very
    # value: computed again outside, XLA may round it otherwise (÷n as ×(1/n), a fused
    # multiply-add), and a constant channel would lose its exact 0.
    safe = plain_sums_suffice(count, sum_x, sum_squares, bound)
    if reduction.across_devices and reduction.axis_index_groups is not None:
        # Groups see different totals, and the exact branch's all-reduce spans every device:
        # every device must take the same branch (one all-reduce of one value).
        safe = reduction.psum_all(jnp.where(safe, 0, 1))[0] == 0
    shift, sum_deviations, sum_squared_deviations = lax.cond(
        safe, lambda _: (jnp.zeros_like(sum_x), sum_x, sum_squares), about_the_mean,
        lax.stop_gradient(sum_x / jnp.maximum(count, 1)))
    return _about_shift(shift, count, sum_deviations, sum_squared_deviations)


def plain_sums(x: Array, valid: Array | None,
               reduction: Reduction) -> tuple[Array, Array, Array]:
    """``n``, ``Σx`` and ``Σx²`` over the batch: one all-reduce across devices."""
    return reduction.psum(reduction.count(x.shape, valid, x.dtype), reduction.sum(x, valid),
                          reduction.sum(x * x, valid))


def plain_sums_suffice(count: Array, sum_x: Array, sum_squares: Array, bound: float) -> Array:
    """Whether every channel has mean² ≤ bound·variance: one answer for all ghost batches, and
    for all members of an ensemble under ``jax.vmap``."""
    n = jnp.maximum(count, 1)
    mean = sum_x / n
    variance = (sum_squares - sum_x * mean) / n
    # |mean| ≤ √(bound·variance), in this form so that neither side underflows to 0 where
    # the other does not; an overflowing Σx² is not finite, and not safe. The totals are the
    # same on every device of the batch, and so is the answer.
    return _for_every_member(lax.stop_gradient(jnp.all(
        (jnp.abs(mean) <= jnp.sqrt(bound * variance)) & (variance < jnp.inf))))


def _shifted(x: Array, valid: Array | None, reduction: Reduction, samples: int) -> Statistics:
    """Sums about a shift taken from the data, in one pass and without a branch."""
    # x is widened where each pass reads it, never as a whole: a widened copy read by the
    # shift's gather and by the sums, TPUs write to memory.
    dtype = compute_dtype(x.dtype)
    shift = _sampled_shift(x, valid, reduction, samples).astype(dtype)
    count = local_count = reduction.count(x.shape, valid, dtype)
    if reduction.across_devices:
        # One shift for every device: the count-weighted mean of theirs (a device without
        # valid values weighs nothing), so that the sums below add up.
        count, weighted = reduction.psum(local_count, local_count * shift)
        shift = _rounded(weighted / jnp.maximum(count, 1))
    centered = x.astype(dtype) - reduction.per_channel(shift)
    sums = reduction.psum(reduction.sum(centered, valid), reduction.sum(centered * centered, valid))
    return _about_shift(shift, count, *sums)


def _rounded(v: Array) -> Array:
    """``v`` with its last bit cleared: an integer operation, through which XLA cannot fuse
    the arithmetic that made ``v`` into a user's multiply-add. Every use of the result then
    sees the same float; computed again inside the sums' pass, ``weighted × (1/count)`` would
    enter ``x − shift`` unrounded (a fused multiply-add), the returned shift rounded."""
    bits = jnp.dtype(f"uint{8 * v.dtype.itemsize}")
    return lax.bitcast_convert_type(lax.bitcast_convert_type(v, bits) & ~bits.type(1), v.dtype)


def _sampled_shift(x: Array, valid: Array | None, reduction: Reduction, samples: int) -> Array:
    """Per channel, the median of ``samples`` valid values of this device's batch, or of each
    ghost batch: (C,), or (G, C), in ``x.dtype``.

    Positions count over every axis but the channel axis, in the order of ``x``. The values
    sit at ``samples`` starts spread by the golden ratio (a Weyl sequence: even coverage of
    the batch, in step with no period of its layout, such as the first position of every
    sequence or image), or with a mask at the first valid position at or after each start,
    wrapping around to the first valid position."""
    channels = x.shape[reduction.channel_axis]
    ghost = reduction.virtual_batch_size
    if x.size == 0:  # nothing to sample, and no sum the shift would enter
        return jnp.zeros((0, channels) if ghost else (channels,), x.dtype)
    if not reduction.reduce_axes:  # one example under jax.vmap: its own value
        return x
    # The batch as (G, k, ...) without the channel axis: G = 1 without ghost batches. Only
    # axis 0 is split, never merged with another, which a sharded x would not allow.
    batches = 1 if ghost is None else x.shape[0] // ghost
    dims = [x.shape[i] for i in reduction.reduce_axes]
    dims[0] //= batches
    size = math.prod(dims)
    starts = sample_starts(size, samples)
    if valid is None:
        position = np.broadcast_to(starts, (batches, samples))
    else:
        flags = jnp.broadcast_to(valid, [1 if i == reduction.channel_axis else n
                                         for i, n in enumerate(x.shape)])
        flags = jnp.squeeze(flags, reduction.channel_axis)
        flags = reduction.split_batch(flags) if ghost else flags[None]  # (G, k, ...)
        at = sum(lax.broadcasted_iota(jnp.int32, flags.shape, 1 + k) * math.prod(dims[k + 1:])
                 for k in range(len(dims)))
        taken = jnp.where(flags, at, size)  # (G, ...): a valid value's position, or `size`
        after = at[:, None] >= starts.reshape(-1, *[1] * len(dims))  # (G, samples, ...)
        first = jnp.min(jnp.where(after, taken[:, None], size), axis=tuple(range(2, 2 + len(dims))))
        first_valid = jnp.min(taken, axis=tuple(range(1, 1 + len(dims))))[:, None]
        position = jnp.where(first < size, first, first_valid)  # wrap around
        position = jnp.minimum(position, size - 1)  # no valid value: any position will do
    index = list(jnp.unravel_index(position, dims) if valid is not None
                 else np.unravel_index(position, dims))

    def gathered(batch, positions):
        """The values at ``positions`` (an index array per axis but the channel axis), for
        every channel, last; replicated wherever ``batch`` lies: a sharded one adds an
        all-reduce of S × C values, over the devices that hold it."""
        where = list(positions)
        where.insert(reduction.channel_axis, slice(None))
        values = batch.at[tuple(where)].get(
            mode="promise_in_bounds", out_sharding=jax.typeof(batch).sharding.update(spec=P()))
        # Index arrays side by side keep their place: the channel axis first if it was.
        return jnp.moveaxis(values, 0, -1) if reduction.channel_axis == 0 else values

    if ghost:  # each ghost batch's from its own examples, on the devices that hold them
        values = jax.vmap(gathered)(reduction.split_batch(x), [jnp.asarray(i) for i in index])
    else:
        values = gathered(x, index)  # (1, S, C)
    median = jnp.sort(values, axis=1, stable=False)[:, samples // 2]
    return median if ghost else median[0]


def sample_starts(size: int, samples: int) -> np.ndarray:
    """The positions, among ``size``, where ``_sampled_shift`` looks for its values: a Weyl
    sequence, ``⌊size·frac(1/2 + j·φ)⌋`` with φ = (√5 − 1)/2, j = 0 … samples − 1."""
    return (size * ((0.5 + np.arange(samples) * (math.sqrt(5) - 1) / 2) % 1)).astype(np.int64)


def _about_shift(shift: Array, count: Array, sum_deviations: Array,
                   sum_squared_deviations: Array) -> Statistics:
    """Statistics from ``Σ (x − shift)`` and ``Σ (x − shift)²`` over ``count`` values."""
    n = jnp.maximum(count, 1)
    offset = sum_deviations / n
    mean = shift + offset
    # The remainder as a sum over the values, divided once: for a constant channel the sum
    # of (x − shift) is n·(x − shift) exactly, so this is exactly 0 (and y too), however the
    # division rounds.
    mean_tail = ((shift - mean) * n + sum_deviations) / n
    m2 = jnp.maximum(sum_squared_deviations - sum_deviations * offset, 0)
    return Statistics(count, count - 1, mean, mean_tail, m2)


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
