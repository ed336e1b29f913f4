"""Statistics within groups of devices: under jax.shard_map, jax.vmap and jax.pmap each group's
output is single-device batch norm on the group's examples; the running statistics pool all
groups and are the same on every device; what crosses devices, from the compiled HLO."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jbn
import reference
from helpers import assert_trees_close, index

pytestmark = pytest.mark.usefixtures("statistics_path")

DEVICES, C, L = 8, 3, 5
RNG = np.random.default_rng(4)
X = jnp.asarray(RNG.normal(1.5, 2.0, (DEVICES * 4, C, L)))
PARAMS = {"weight": jnp.asarray(RNG.normal(1, 0.3, C)), "bias": jnp.asarray(RNG.normal(0, 0.3, C))}
STATE = jbn.init(C, dtype=jnp.float64)[1]
# 4 examples per device; device 2 holds no valid value, device 5 one example.
UNEVEN = jnp.asarray(np.repeat([1, 1, 0, 1, 1, 1, 1, 1], 4).astype(bool)).at[21:24].set(False)
MASKS = {"unmasked": None, "uneven": UNEVEN}
CLOSE = dict(rtol=1e-12, atol=1e-12)


def expected(group_size, mask):
    """Each group of ``group_size`` devices alone, and the running state pooled over groups:
    the float64 reference with one ghost batch per group."""
    return reference.batchnorm(PARAMS, STATE, np.asarray(X), True, mask=mask,
                               virtual_batch_size=4 * group_size)


def on_devices(mapping, group_size, mask):
    """y and the state of every device (stacked), the batch split over 8 devices."""
    def call(x, m):
        return jbn.batchnorm(PARAMS, STATE, x, True, mask=m, axis_name="data",
                             group_size=group_size)
    m = jnp.ones(X.shape[0], bool) if mask is None else mask
    if mapping == "shard_map":
        mesh = jax.make_mesh((DEVICES,), ("data",))
        f = jax.jit(jax.shard_map(lambda x, m: jax.tree.map(lambda v: v[None], call(x, m)),
                                  mesh=mesh, in_specs=P("data"), out_specs=P("data")))
        put = functools.partial(jax.device_put, device=NamedSharding(mesh, P("data")))
        y, state = f(put(X), put(m))
        return np.asarray(y).reshape(X.shape), jax.tree.map(np.asarray, state)
    if mapping == "pmap":
        y, state = jax.pmap(call, axis_name="data")(X.reshape(DEVICES, -1, C, L),
                                                    m.reshape(DEVICES, -1))
        return np.asarray(y).reshape(X.shape), state
    # vmap over devices' slices, the axis named as a device axis would be.
    y, state = jax.vmap(call, axis_name="data")(X.reshape(DEVICES, -1, C, L),
                                                m.reshape(DEVICES, -1))
    return np.asarray(y).reshape(X.shape), state


@pytest.mark.parametrize("mask", MASKS.values(), ids=MASKS.keys())
@pytest.mark.parametrize("group_size", [2, 4])
@pytest.mark.parametrize("mapping", ["shard_map", "vmap", "pmap"])
def test_each_group_of_devices_is_batch_norm_on_its_examples_and_the_state_pools_them(
        mapping, group_size, mask):
    y, states = on_devices(mapping, group_size, mask)
    expected_y, expected_state = expected(group_size, mask)
    np.testing.assert_allclose(y, expected_y, **CLOSE)
    for device in range(DEVICES):
        assert_trees_close({k: v for k, v in index(states, device).items()},
                           {k: np.asarray(v) for k, v in expected_state.items()}, **CLOSE)


def test_per_example_vmap_groups_examples():
    def call(x):
        return jbn.batchnorm(PARAMS, STATE, x, True, axis=0, axis_name="batch", group_size=4)
    y, state = jax.vmap(call, axis_name="batch", out_axes=(0, None))(X[:16])
    expected_y, expected_state = reference.batchnorm(PARAMS, STATE, np.asarray(X[:16]), True,
                                                     virtual_batch_size=4)
    np.testing.assert_allclose(y, expected_y, **CLOSE)
    assert_trees_close(state, {k: np.asarray(v) for k, v in expected_state.items()}, **CLOSE)


def test_axis_index_groups_of_any_devices_work_under_shard_map():
    groups = [[0, 5], [1, 2, 3, 4], [6, 7]]
    mesh = jax.make_mesh((DEVICES,), ("data",))
    f = jax.jit(jax.shard_map(
        lambda x: jbn.batchnorm(PARAMS, STATE, x, True, axis_name="data",
                                axis_index_groups=groups)[0],
        mesh=mesh, in_specs=P("data"), out_specs=P("data")))
    y = np.asarray(f(jax.device_put(X, NamedSharding(mesh, P("data")))))
    for group in groups:
        rows = np.concatenate([np.arange(4 * d, 4 * d + 4) for d in group])
        np.testing.assert_allclose(y[rows], jbn.batchnorm(PARAMS, STATE, X[rows], True)[0],
                                   **CLOSE)


def all_reduces(text):
    """(values carried, devices per group) of each all-reduce of optimized HLO."""
    found = []
    for line in text.splitlines():
        op = re.search(r"= (.*?) all-reduce(?:-start)?\(", line)
        if op:
            sizes = [int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
                     for dims in re.findall(r"[a-z]+\d+\[([\d,]*)\]", op.group(1))]
            found.append(sum(sizes))
    return found


@pytest.mark.parametrize("group_size", [2, 4])
def test_forward_within_groups_carries_a_row_per_group_and_pools_the_state_once(
        group_size, statistics_path):
    mesh = jax.make_mesh((DEVICES,), ("data",))
    f = jax.jit(jax.shard_map(
        lambda x: jbn.batchnorm(PARAMS, STATE, x, True, axis_name="data",
                                group_size=group_size),
        mesh=mesh, in_specs=P("data"), out_specs=(P("data"), P())))
    text = f.lower(jax.device_put(X, NamedSharding(mesh, P("data")))).compile().as_text()
    groups = DEVICES // group_size
    # One row per group: the shift (C + 1) and the sums about it (2C); or, guarded, the plain
    # sums (2C + 1), the branch every device takes (1) and the exact sums (2C). The running
    # state pools every group once: 2C + 2.
    forward = ([groups * (C + 1), groups * 2 * C] if statistics_path
               else [groups * (2 * C + 1), 1, groups * 2 * C])
    assert sorted(all_reduces(text)) == sorted([*forward, 2 * C + 2])


def test_group_size_must_divide_the_devices_and_goes_with_axis_name():
    with pytest.raises(ValueError, match=r"group_size 2 needs axis_name"):
        jbn.batchnorm(PARAMS, STATE, X, True, group_size=2)
    f = jax.vmap(lambda x: jbn.batchnorm(PARAMS, STATE, x, True, axis=0, axis_name="b",
                                         group_size=3), axis_name="b")
    with pytest.raises(ValueError, match=r"group_size must be positive and divide the 8 "
                                         r"devices along axis_name 'b', got 3"):
        f(X[:8])


def replica_group_sizes(text):
    """(values carried, devices per replica group) of each all-reduce of optimized HLO."""
    found = []
    for line in text.splitlines():
        op = re.search(r"= (.*?) all-reduce(?:-start)?\(.*replica_groups=(\S+)( \{[^}]*\})?",
                       line)
        if not op:
            continue
        values = sum(int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
                     for dims in re.findall(r"[a-z]+\d*\[([\d,]*)\]", op.group(1)))
        groups = op.group(2)
        iota = re.match(r"\[(\d+),(\d+)\]<=", groups)
        if iota:
            size = int(iota.group(2))
        else:  # mesh['axis_0'=4,'axis_1'=2] {'axis_1'}: the sizes of the named axes
            sizes = dict((name, int(n)) for name, n in re.findall(r"'(\w+)'=(\d+)", groups))
            size = int(np.prod([sizes[name] for name in re.findall(r"'(\w+)'",
                                                                    op.group(3) or "")]))
        found.append((values, size))
    return found


@pytest.mark.parametrize("mask", MASKS.values(), ids=MASKS.keys())
@pytest.mark.parametrize("axis_type", [jax.sharding.AxisType.Explicit,
                                       jax.sharding.AxisType.Auto], ids=["Explicit", "Auto"])
@pytest.mark.parametrize("group_size", [1, 2, 4])
def test_automatic_sharding_with_ghost_batches_of_a_group_communicates_within_it(
        group_size, axis_type, mask, statistics_path):
    """No axis_name: ghost batches of k devices' examples, on a mesh whose batch axis is split
    into groups of k devices (k = 1: one device, a 1-D mesh)."""
    shape, names = (((DEVICES,), ("data",)) if group_size == 1 else
                    ((DEVICES // group_size, group_size), ("groups", "group")))
    mesh = jax.make_mesh(shape, names, axis_types=(axis_type,) * len(shape))
    put = functools.partial(jax.device_put, device=NamedSharding(mesh, P(names)))
    f = jax.jit(lambda x, m: jbn.batchnorm(PARAMS, STATE, x, True, mask=m,
                                           virtual_batch_size=4 * group_size))
    m = jnp.ones(X.shape[0], bool) if mask is None else mask
    y, state = f(put(X), put(m))
    expected_y, expected_state = expected(group_size, mask)
    # A ghost batch with no valid value has no statistics (the reference's NaN); jbn's output
    # stays finite there.
    defined = np.isfinite(expected_y)
    assert np.all(np.isfinite(np.asarray(y)))
    np.testing.assert_allclose(np.asarray(y)[defined], expected_y[defined], **CLOSE)
    assert_trees_close(jax.tree.map(np.asarray, state),
                       {k: np.asarray(v) for k, v in expected_state.items()}, **CLOSE)
    reduces = replica_group_sizes(f.lower(put(X), put(m)).compile().as_text())
    # The running state pools every group (2C + 2 values); on the CPU path the guard's one
    # decision spans every device too (1 value). Everything else stays within a group.
    shared = [2 * C + 2] + ([] if statistics_path else [1])
    within = [(values, size) for values, size in reduces if values not in shared]
    assert all(size == group_size for _, size in within), reduces
    assert (within == []) == (group_size == 1), reduces


def test_the_equinox_layer_groups_the_examples_of_its_vmap():
    import equinox as eqx

    import jbn.equinox

    layer, state = eqx.nn.make_with_state(jbn.equinox.BatchNorm)(
        X.shape[1], "batch", dtype=jnp.float64, group_size=4)
    layer, state = jbn.equinox.set_layers(layer, state, {"": PARAMS}, {"": STATE})
    y, state = jax.vmap(layer, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(
        X[:16], state)
    expected_y, expected_state = reference.batchnorm(PARAMS, STATE, np.asarray(X[:16]), True,
                                                     virtual_batch_size=4)
    np.testing.assert_allclose(y, expected_y, **CLOSE)
    assert_trees_close(jbn.equinox.get_layers(layer, state)[1][""],
                       {k: np.asarray(v) for k, v in expected_state.items()}, **CLOSE)


@pytest.mark.parametrize("mask", MASKS.values(), ids=MASKS.keys())
def test_the_linen_layer_groups_devices_under_shard_map(mask):
    import jbn.linen

    layer = jbn.linen.BatchNorm(axis=1, use_running_average=False, axis_name="data",
                                group_size=2, param_dtype=jnp.float64)
    variables = jbn.linen.set_layers(layer.init(jax.random.key(0), X), {"": PARAMS},
                                     {"": STATE})
    m = jnp.ones(X.shape[0], bool) if mask is None else mask
    mesh = jax.make_mesh((DEVICES,), ("data",))
    f = jax.jit(jax.shard_map(
        lambda x, m: layer.apply(variables, x, mask=m, mutable=["batch_stats"]), mesh=mesh,
        in_specs=P("data"), out_specs=(P("data"), P())))
    put = functools.partial(jax.device_put, device=NamedSharding(mesh, P("data")))
    y, updates = f(put(X), put(m))
    expected_y, expected_state = expected(2, mask)
    np.testing.assert_allclose(y, expected_y, **CLOSE)
    assert_trees_close(jbn.linen.get_layers(updates)[1][""],
                       {k: np.asarray(v) for k, v in expected_state.items()}, **CLOSE)
