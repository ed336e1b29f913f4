"""Which values share one set of statistics, and the operations over them: sums over axes and
devices, and per-channel vectors broadcast against ``x``. Beneath both the statistics and the
normalization, which read it."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable
from typing import Any

import jax
import jax.numpy as jnp
from jax import Array, lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.typing import DTypeLike


@dataclasses.dataclass(frozen=True)
class Reduction:
    """Which values of ``x`` share one set of statistics: every axis but ``channel_axis``, on
    every device along ``axis_name`` (within its group of ``axis_index_groups``, a partition
    of the devices' indices); or, with ``virtual_batch_size = k`` (ghost batches), each group
    of ``k`` consecutive examples along axis 0 of this device's ``x``, every axis but
    ``channel_axis`` (never 0) within it.

    Static and hashable, so it can ride along as a non-differentiable argument.
    """

    ndim: int
    channel_axis: int
    axis_name: Hashable | tuple[Hashable, ...] | None = None
    axis_index_groups: tuple[tuple[int, ...], ...] | None = None
    virtual_batch_size: int | None = None
    # Under Explicit mesh axes, x's (abstract) mesh and the mesh axes of x's axis 0, split
    # between the ghost batches (major) and the examples within one (minor); None elsewhere.
    ghost_sharding: tuple[Any, tuple[str, ...], tuple[str, ...]] | None = None

    @classmethod
    def of(cls, x: Array, channel_axis: int, axis_name: Hashable | tuple[Hashable, ...] | None,
           axis_index_groups: tuple[tuple[int, ...], ...] | None,
           virtual_batch_size: int | None) -> Reduction:
        """The reduction over ``x``, with the sharding of its ghost batches where ``x`` lies
        on Explicit mesh axes."""
        return cls(x.ndim, channel_axis, axis_name, axis_index_groups, virtual_batch_size,
                   _ghost_sharding(x, virtual_batch_size))

    @property
    def reduce_axes(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.ndim) if i != self.channel_axis)

    @property
    def across_devices(self) -> bool:
        """Whether the statistics add up over devices (not those of ghost batches, which lie
        within one device)."""
        return self.axis_name is not None and self.virtual_batch_size is None

    def devices(self) -> int:
        """How many devices (or mapped examples) share the statistics; checks that the named
        axes are bound."""
        if self.axis_name is None:
            return 1
        if self.axis_index_groups is not None:
            return min(len(group) for group in self.axis_index_groups)
        return axis_size(self.axis_name)

    def per_channel(self, v: Array) -> Array:
        """A (C,) vector, or (G, C) per ghost batch, shaped to broadcast against ``x`` along
        the channel axis (and, per ghost batch, along axis 0)."""
        shape = [1] * self.ndim
        shape[self.channel_axis] = v.shape[-1]
        if v.ndim == 2:
            # Each ghost batch's row for each of its examples: a broadcast XLA fuses into its
            # user.
            v = jnp.repeat(v, self.virtual_batch_size, axis=0,
                           out_sharding=self.sharding_of(self.batch_axes()))
            shape[0] = v.shape[0]
        return v.reshape(shape)

    def batch_axes(self) -> tuple[str, ...] | None:
        """The mesh axes of x's axis 0 under Explicit axes, None elsewhere."""
        return None if self.ghost_sharding is None else sum(self.ghost_sharding[1:], ())

    def sharding_of(self, *leading: tuple[str, ...] | None) -> NamedSharding | None:
        """The sharding of an array whose leading axes lie on the ``leading`` mesh axes, on
        x's mesh; None (no constraint) without Explicit axes."""
        if self.ghost_sharding is None:
            return None
        return NamedSharding(self.ghost_sharding[0], P(*(axes or None for axes in leading)))

    def sum(self, v: Array, valid: Array | None) -> Array:
        """Σ over this device's valid positions, per channel: (C,), or (G, C) per ghost
        batch."""
        if valid is not None:
            v = jnp.where(valid, v, 0)
        if self.virtual_batch_size is None:
            return jnp.sum(v, axis=self.reduce_axes)
        # Per example first, (N, C), then per ghost batch: XLA's CPU backend runs these two
        # reductions faster than one over a (G, k, ...) view of x, close to the time without
        # ghost batches (python -m benchmarks, the ghost-batch rows).
        per_example = jnp.sum(v, axis=self.reduce_axes[1:])
        return jnp.sum(self.split_batch(per_example), axis=1)

    def split_batch(self, v: Array) -> Array:
        """``v`` with axis 0 split into (ghost batches, examples within one)."""
        _, major, minor = self.ghost_sharding or (None, None, None)
        shape = (v.shape[0] // self.virtual_batch_size, self.virtual_batch_size, *v.shape[1:])
        return v.reshape(shape, out_sharding=self.sharding_of(major, minor))

    def count(self, shape: tuple[int, ...], valid: Array | None, dtype: DTypeLike) -> Array:
        """Valid values per channel on this device: (), or (G, 1) per ghost batch."""
        if self.virtual_batch_size is not None:
            ones = jnp.ones([1 if i == self.channel_axis else n for i, n in enumerate(shape)],
                            dtype)
            return self.sum(ones, valid)
        if valid is None:
            return jnp.asarray(math.prod(shape[i] for i in self.reduce_axes), dtype)
        # Axes the mask does not cover (size 1 in ``valid``) multiply the count.
        uncovered = math.prod(shape[i] for i in self.reduce_axes if valid.shape[i] == 1)
        return jnp.sum(valid, dtype=dtype) * uncovered

    def psum(self, *values: Array) -> tuple[Array, ...]:
        """Σ over the devices that share the statistics (identity unless
        ``across_devices``): one all-reduce of all the values.

        Within groups, each device writes its values into its group's row of a block of one
        row per group, zeros elsewhere; one all-reduce of the block over every device; each
        reads its group's row back. Exact (the other rows add zeros) and the same on every
        device of a group, under ``jax.shard_map``, ``jax.vmap`` and ``jax.pmap`` alike
        (``lax.psum``'s own ``axis_index_groups`` works under ``jax.pmap`` only); it carries
        G times the values of one group's sums, G the number of groups."""
        if not self.across_devices:
            return values
        if self.axis_index_groups is None:
            return lax.psum(values, self.axis_name)
        group = jnp.asarray(self._group_of_device())[lax.axis_index(self.axis_name)]
        rows = jnp.arange(len(self.axis_index_groups)) == group
        blocks = lax.psum(tuple(jnp.where(rows.reshape(-1, *[1] * jnp.ndim(v)), v, 0)
                                for v in values), self.axis_name)
        return tuple(block[group] for block in blocks)

    def psum_all(self, *values: Array) -> tuple[Array, ...]:
        """Σ over every device along ``axis_name``, whatever the groups and ghost batches
        (identity without ``axis_name``): one all-reduce of all the values."""
        if self.axis_name is None:
            return values
        return lax.psum(values, self.axis_name)

    def first_of_group(self) -> Array | bool:
        """Whether this device is the first of its group of ``axis_index_groups`` (True
        without groups): one device speaks for the statistics its group shares."""
        if self.axis_name is None or self.axis_index_groups is None:
            return True
        firsts = [min(group) for group in self.axis_index_groups]
        table = [i in firsts for i in range(len(self._group_of_device()))]
        return jnp.asarray(table)[lax.axis_index(self.axis_name)]

    def _group_of_device(self) -> list[int]:
        """The group of each device index."""
        groups = {i: g for g, group in enumerate(self.axis_index_groups) for i in group}
        return [groups[i] for i in range(len(groups))]


def compute_dtype(dtype: DTypeLike) -> jnp.dtype:
    """The dtype values are summed and normalized in: at least float32."""
    return jnp.promote_types(dtype, jnp.float32)


def axis_size(axis_name: Hashable | tuple[Hashable, ...]) -> int:
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
