"""Synchronized statistics: every way of splitting a batch over devices equals the
single-device call on the whole batch (outputs, running state, gradients)."""

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
from jbn._reduction import Reduction
from jbn._stats import CANCELLATION_BOUND, SHIFTED, plain_sums, plain_sums_suffice

pytestmark = pytest.mark.usefixtures("statistics_path")

DEVICES = 8
C, L = 3, 5
RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.normal(1.5, 2.0, (DEVICES * 4, C, L)))
PARAMS = {"weight": jnp.asarray(RNG.normal(1, 0.3, C)), "bias": jnp.asarray(RNG.normal(0, 0.3, C))}
STATE = {"running_mean": jnp.asarray(RNG.normal(size=C)),
         "running_var": jnp.asarray(RNG.uniform(0.5, 2, C)),
         "num_batches_tracked": jnp.asarray(4, jnp.int32)}
# Uneven shards: device 2 holds no valid example, device 5 one, the others from 2 to 4.
UNEVEN = jnp.asarray(np.array([[1, 1, 1, 1], [1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 0],
                               [0, 1, 1, 1], [0, 0, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]],
                              bool).reshape(-1))
MASKS = {"unmasked": None, "uneven": UNEVEN}
CLOSE = dict(rtol=1e-12, atol=1e-12)


def whole_batch(x=X, mask=None, training=True, momentum=0.1):
    return jbn.batchnorm(PARAMS, STATE, x, training, mask=mask, momentum=momentum)




def mesh(shape, names):
    return jax.make_mesh(shape, names, devices=jax.devices()[: np.prod(shape)])


def sharded(names, mesh_shape=(DEVICES,), mask=None, **kwargs):
    """jitted batchnorm under shard_map, batch split over the mesh axes `names`; takes
    (params, state, x, mask) and puts x and mask on the mesh first."""
    batch_mesh = mesh(mesh_shape, names if isinstance(names, tuple) else (names,))
    spec = P(names)
    call = functools.partial(jbn.batchnorm, axis_name=names, **kwargs)
    f = jax.jit(jax.shard_map(
        lambda p, s, x, m: call(p, s, x, mask=m),
        mesh=batch_mesh,
        in_specs=(P(), P(), spec, None if mask is None else spec),
        out_specs=(spec, P()),
    ))

    def on_mesh(params, state, x, mask, lower=False):
        put = functools.partial(jax.device_put, device=NamedSharding(batch_mesh, spec))
        args = (params, state, put(x), None if mask is None else put(mask))
        return f.lower(*args).compile().as_text() if lower else f(*args)
    return on_mesh


@pytest.mark.parametrize("mask", MASKS.values(), ids=MASKS.keys())
@pytest.mark.parametrize("training", [True, False])
def test_shard_map_on_a_1d_mesh_equals_the_whole_batch(mask, training):
    result = sharded("data", mask=mask, training=training)(PARAMS, STATE, X, mask)
    assert_trees_close(result, whole_batch(mask=mask, training=training), **CLOSE)


@pytest.mark.quick
@pytest.mark.parametrize("mask", MASKS.values(), ids=MASKS.keys())
def test_shard_map_on_a_2d_mesh_with_two_axis_names_equals_the_whole_batch(mask):
    f = sharded(("data", "replica"), (4, 2), mask=mask, training=True, momentum=None)
    result = f(PARAMS, STATE, X, mask)
    assert_trees_close(result, whole_batch(mask=mask, momentum=None), **CLOSE)


@pytest.mark.parametrize("mask", MASKS.values(), ids=MASKS.keys())
def test_pmap_equals_the_whole_batch(mask):
    def call(params, state, x, mask):
        return jbn.batchnorm(params, state, x, True, mask=mask, axis_name="devices")
    f = jax.pmap(call, axis_name="devices",
                 in_axes=(None, None, 0, 0 if mask is not None else None))
    shards = X.reshape(DEVICES, -1, C, L)
    y, state = f(PARAMS, STATE, shards, None if mask is None else mask.reshape(DEVICES, -1))
    expected_y, expected_state = whole_batch(mask=mask)
    np.testing.assert_allclose(y.reshape(X.shape), expected_y, **CLOSE)
    for device in range(DEVICES):
        assert_trees_close(index(state, device), expected_state, **CLOSE)


def test_pmap_axis_index_groups_normalize_each_group_on_its_own_and_pool_the_state():
    groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
    def call(params, state, x):
        return jbn.batchnorm(params, state, x, True, axis_name="devices", axis_index_groups=groups)
    f = jax.pmap(call, axis_name="devices", in_axes=(None, None, 0))
    y, state = f(PARAMS, STATE, X.reshape(DEVICES, -1, C, L))
    for g, half in enumerate(jnp.split(X, 2)):
        expected_y, _ = whole_batch(half)
        np.testing.assert_allclose(y[4 * g: 4 * g + 4].reshape(half.shape), expected_y, **CLOSE)
    # The running state learns from both groups, pooled as ghost batches are, on every device.
    _, pooled = reference.batchnorm(PARAMS, STATE, np.asarray(X), True,
                                    virtual_batch_size=X.shape[0] // 2)
    for device in range(DEVICES):
        assert_trees_close(index(state, device), {k: np.asarray(v) for k, v in pooled.items()},
                           **CLOSE)


@pytest.mark.parametrize("example_shape", [(C,), (C, L)])
def test_per_example_vmap_equals_the_whole_batch(example_shape):
    x = X[(slice(None),) + tuple(slice(0, n) for n in example_shape)]
    f = jax.vmap(functools.partial(jbn.batchnorm, training=True, axis=0, axis_name="batch"),
                 in_axes=(None, None, 0), out_axes=(0, None), axis_name="batch")
    assert_trees_close(f(PARAMS, STATE, x), whole_batch(x), **CLOSE)


def test_per_example_vmap_with_a_scalar_mask_per_example():
    def call(params, state, x, mask):
        return jbn.batchnorm(params, state, x, True, axis=0, mask=mask, axis_name="batch")
    f = jax.vmap(call, in_axes=(None, None, 0, 0), out_axes=(0, None), axis_name="batch")
    assert_trees_close(f(PARAMS, STATE, X, UNEVEN), whole_batch(mask=UNEVEN), **CLOSE)


def test_nested_vmaps_with_two_axis_names_equal_the_whole_batch():
    call = functools.partial(jbn.batchnorm, training=True, axis=0, axis_name=("outer", "inner"))
    inner = jax.vmap(call, in_axes=(None, None, 0), out_axes=(0, None), axis_name="inner")
    outer = jax.vmap(inner, in_axes=(None, None, 0), out_axes=(0, None), axis_name="outer")
    y, state = outer(PARAMS, STATE, X.reshape(DEVICES, -1, C, L))
    expected_y, expected_state = whole_batch()
    np.testing.assert_allclose(y.reshape(X.shape), expected_y, **CLOSE)
    assert_trees_close(state, expected_state, **CLOSE)


@pytest.mark.parametrize("axis_type", [jax.sharding.AxisType.Auto, jax.sharding.AxisType.Explicit])
def test_jit_over_a_batch_sharded_array_without_axis_name_equals_unsharded(axis_type):
    batch_mesh = jax.make_mesh((DEVICES,), ("data",), axis_types=(axis_type,))
    data = NamedSharding(batch_mesh, P("data"))
    x, mask = jax.device_put(X, data), jax.device_put(UNEVEN, data)
    with jax.set_mesh(batch_mesh):
        result = jax.jit(jbn.batchnorm, static_argnames="training")(
            PARAMS, STATE, x, training=True, mask=mask)
    assert result[0].sharding.is_equivalent_to(data, X.ndim)
    assert_trees_close(result, whole_batch(mask=UNEVEN), **CLOSE)


# Every axis divisible by the device count, so that any of them can be sharded.
SHARDABLE_X = jnp.asarray(RNG.normal(1.5, 2.0, (2 * DEVICES, DEVICES, DEVICES)))
SPECS = {"batch axis": P("data"), "axis 1": P(None, "data"), "axis 2": P(None, None, "data")}


def outputs_and_gradients(params, state, x, axis):
    def total(params, x):
        y, new_state = jbn.batchnorm(params, state, x, True, axis=axis)
        return jnp.sum(jnp.sin(y) * jnp.cos(x)), (y, new_state)
    (_, (y, new_state)), grads = jax.value_and_grad(total, (0, 1), has_aux=True)(params, x)
    return y, new_state, grads


@functools.cache
def unsharded(axis):
    x = SHARDABLE_X if axis == 1 else jnp.moveaxis(SHARDABLE_X, 1, -1)
    return jax.jit(outputs_and_gradients, static_argnames="axis")(
        *jbn.init(DEVICES, dtype=jnp.float64), x, axis=axis)


@pytest.mark.parametrize("with_set_mesh", [False, True], ids=["no mesh context", "set_mesh"])
@pytest.mark.parametrize("axis_type", [jax.sharding.AxisType.Explicit,
                                       jax.sharding.AxisType.Auto], ids=["Explicit", "Auto"])
@pytest.mark.parametrize("axis", [1, -1], ids=["channels first", "channels last"])
@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_jit_over_an_array_sharded_on_any_axis_equals_the_unsharded_call(spec, axis, axis_type,
                                                                         with_set_mesh):
    params, state = jbn.init(DEVICES, dtype=jnp.float64)
    x = SHARDABLE_X if axis == 1 else jnp.moveaxis(SHARDABLE_X, 1, -1)
    expected = unsharded(axis)
    # jax.make_mesh's default axis type is Explicit: sharding is then part of the types.
    data_mesh = jax.make_mesh((DEVICES,), ("data",), axis_types=(axis_type,))
    x = jax.device_put(x, NamedSharding(data_mesh, spec))
    f = jax.jit(outputs_and_gradients, static_argnames="axis")
    if with_set_mesh:
        with jax.set_mesh(data_mesh):
            result = f(params, state, x, axis=axis)
    else:
        result = f(params, state, x, axis=axis)
    assert result[0].sharding.is_equivalent_to(x.sharding, x.ndim)
    # NumPy, not jnp: eager jnp calls on these outputs need the mesh context.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, **CLOSE),
                 result, expected)


def loss(params, x, mask, axis_name=None):
    y, _ = jbn.batchnorm(params, STATE, x, True, mask=mask, axis_name=axis_name)
    return jnp.sum(jnp.sin(y) * jnp.cos(x))


@pytest.mark.parametrize("mask", MASKS.values(), ids=MASKS.keys())
def test_gradients_under_shard_map_equal_the_whole_batch(mask):
    def global_loss(params, x, mask):
        return jax.lax.psum(loss(params, x, mask, "data"), "data")
    f = jax.shard_map(global_loss, mesh=mesh((DEVICES,), ("data",)),
                      in_specs=(P(), P("data"), None if mask is None else P("data")),
                      out_specs=P())
    on_mesh = NamedSharding(mesh((DEVICES,), ("data",)), P("data"))
    x, mask_on_mesh = (None if v is None else jax.device_put(v, on_mesh) for v in (X, mask))
    grads = jax.jit(jax.grad(f, argnums=(0, 1)))(PARAMS, x, mask_on_mesh)
    assert_trees_close(grads, jax.grad(loss, argnums=(0, 1))(PARAMS, X, mask), **CLOSE)


@pytest.mark.parametrize("mask", MASKS.values(), ids=MASKS.keys())
def test_gradients_under_pmap_equal_the_whole_batch(mask):
    def local_grads(params, x, mask):
        dparams, dx = jax.grad(loss, argnums=(0, 1))(params, x, mask, "devices")
        return jax.lax.psum(dparams, "devices"), dx
    shards = X.reshape(DEVICES, -1, C, L)
    if mask is None:
        f = jax.pmap(lambda p, x: local_grads(p, x, None), axis_name="devices", in_axes=(None, 0))
        dparams, dx = f(PARAMS, shards)
    else:
        f = jax.pmap(local_grads, axis_name="devices", in_axes=(None, 0, 0))
        dparams, dx = f(PARAMS, shards, mask.reshape(DEVICES, -1))
    expected_dparams, expected_dx = jax.grad(loss, argnums=(0, 1))(PARAMS, X, mask)
    np.testing.assert_allclose(dx.reshape(X.shape), expected_dx, **CLOSE)
    assert_trees_close(index(dparams, 0), expected_dparams, **CLOSE)


# Uneven shards with counts that are no power of 2 (x/n then rounds): 230 valid examples,
# from 0 on the second device to all 32 on the last.
UNEVEN_1E4 = np.random.default_rng(1).random(256) < 0.8
UNEVEN_1E4[32:64] = False
UNEVEN_1E4[224:] = True


@pytest.mark.parametrize("mask", [None, UNEVEN_1E4], ids=["unmasked", "uneven"])
def test_float32_with_mean_1e4_times_spread_over_8_devices_stays_within_1e_5(mask):
    std = RNG.uniform(0.5, 2.0, (8, 1))
    x = (1e4 * std + std * RNG.normal(size=(256, 8, 9))).astype(np.float32)
    params, state = jbn.init(8)
    mask = None if mask is None else jnp.asarray(mask)
    y, _ = sharded("data", mask=mask, training=True)(params, state, jnp.asarray(x), mask)
    expected, _ = reference.batchnorm(params, state, x, True, mask=mask)
    assert np.max(np.abs(np.asarray(y, np.float64) - expected)) <= 1e-5


@pytest.mark.parametrize("mask", [None, UNEVEN_1E4], ids=["unmasked", "uneven"])
def test_constant_channel_over_devices_normalizes_to_exactly_zero(mask):
    x = jnp.full((256, 2), 12345.678, jnp.float32).at[:, 1].set(
        jnp.arange(256, dtype=jnp.float32) % 7)
    params, state = jbn.init(2)
    mask = None if mask is None else jnp.asarray(mask)
    y, new_state = sharded("data", mask=mask, training=True)(params, state, x, mask)
    assert np.all(np.asarray(y)[:, 0] == 0)
    assert all(np.all(np.isfinite(np.asarray(v))) for v in new_state.values())


@pytest.mark.parametrize("valid", [0, 1], ids=["no valid value", "one valid value"])
def test_fewer_than_two_valid_values_leave_the_running_statistics_and_count_the_batch(valid):
    # As PyTorch does with an empty batch: the running statistics stay, the count goes on.
    mask = jnp.zeros((X.shape[0], L), bool).at[3, :valid].set(True)
    y, state = sharded("data", mask=mask, training=True)(PARAMS, STATE, X, mask)
    assert jnp.all(jnp.isfinite(y))
    assert_trees_close(state, {**STATE, "num_batches_tracked": STATE["num_batches_tracked"] + 1},
                       **CLOSE)


def test_one_value_per_channel_across_all_devices_is_an_error():
    f = jax.vmap(functools.partial(jbn.batchnorm, training=True, axis=0, axis_name="batch"),
                 in_axes=(None, None, 0), out_axes=(0, None), axis_name="batch")
    with pytest.raises(ValueError, match=r"more than 1 value per channel.*\(3,\) over 1 device"):
        f(PARAMS, STATE, X[:1, :, 0])


def collectives(compiled_text):
    """(op, element count) for each cross-device collective in optimized HLO."""
    found = []
    for line in compiled_text.splitlines():
        op = re.search(r"= (.*?) (all-reduce|all-gather|reduce-scatter|all-to-all|"
                       r"collective-permute)(-start)?\(", line)
        if op:
            sizes = [np.prod([int(d) for d in dims.split(",") if d] or [1])
                     for dims in re.findall(r"[a-z]+\d+\[([\d,]*)\]", op.group(1))]
            found.append((op.group(2), int(sum(sizes))))
    return found


def computations(compiled_text):
    """The text of each computation of optimized HLO, by name; the entry's as "ENTRY"."""
    found, name = {}, None
    for line in compiled_text.splitlines():
        header = re.match(r"(ENTRY )?%(\S+) .*\{$", line)
        if header:
            name = "ENTRY" if header.group(1) else header.group(2)
            found[name] = []
        elif name is not None:
            found[name].append(line)
    return {name: "\n".join(lines) for name, lines in found.items()}


@pytest.mark.parametrize("mask", MASKS.values(), ids=MASKS.keys())
@pytest.mark.parametrize("channels", [3, 64])
def test_training_forward_communicates_order_c_values_in_the_all_reduces_of_its_path(
        mask, channels, statistics_path):
    x = jnp.ones((DEVICES * 4, channels, L))
    params, state = jbn.init(channels)
    text = sharded("data", mask=mask, training=True)(params, state, x, mask, lower=True)
    parts = computations(text)
    if statistics_path == SHIFTED:
        # The shift every device shares (the count and Σ n_d·K_d: C + 1 values), then the
        # sums about it, Σ(x − K) and Σ(x − K)² (2C); no branch.
        assert "conditional" not in text
        assert collectives(text) == [("all-reduce", channels + 1),
                                     ("all-reduce", 2 * channels)]
        return
    # The plain sums: count, Σx and Σx² in one all-reduce, before any branch.
    assert collectives(parts["ENTRY"]) == [("all-reduce", 2 * channels + 1)]
    branches = re.findall(r"conditional\(.*branch_computations=\{%(\S+), %(\S+)\}",
                          parts["ENTRY"])
    assert len(branches) == 1, branches
    # The sums about the mean, Σ(x − shift) and Σ(x − shift)², only on the exact path.
    found = sorted(collectives(parts[name]) for name in branches[0])
    assert found == [[], [("all-reduce", 2 * channels)]], found
    assert len(collectives(text)) == 2


@pytest.mark.parametrize("over_the_bound, exact_path", [(0.1, False), (0.98, False),
                                                         (1.02, True), (3.0, True)])
def test_the_exact_path_runs_exactly_when_a_channel_mean_exceeds_the_bound(over_the_bound,
                                                                          exact_path):
    z = RNG.standard_normal((DEVICES * 64, 4))
    z = (z - z.mean(0)) / z.std(0)  # mean 0 and σ 1 exactly, so the ratio is what is asked
    z[:, 2] += over_the_bound * np.sqrt(CANCELLATION_BOUND)
    shards = jnp.asarray(z.reshape(DEVICES, -1, 4))
    f = jax.pmap(lambda x: plain_sums_suffice(*plain_sums(x, None, Reduction(2, 1, "devices")),
                                              CANCELLATION_BOUND), axis_name="devices")
    assert np.all(np.asarray(f(shards)) != exact_path)


def test_forward_and_backward_together_communicate_order_c_values(statistics_path):
    def global_loss(params, x):
        return jax.lax.psum(loss(params, x, None, "data"), "data")
    f = jax.shard_map(global_loss, mesh=mesh((DEVICES,), ("data",)),
                      in_specs=(P(), P("data")), out_specs=P())
    x = jax.device_put(X, NamedSharding(mesh((DEVICES,), ("data",)), P("data")))
    text = jax.jit(jax.grad(f, argnums=(0, 1))).lower(PARAMS, x).compile().as_text()
    found = sorted(size for op, size in collectives(text) if op == "all-reduce")
    assert len(found) == len(collectives(text)), collectives(text)  # all-reduces only
    # Forward: the shift (C + 1), then the sums about it (2C); or, guarded, the plain sums
    # (2C + 1) and, in the exact branch, the sums about the mean (2C). Backward: Σ ct and
    # Σ ct·(x − shift) (2C), whose totals also give the gradients of weight and bias.
    forward = [C + 1, 2 * C] if statistics_path == SHIFTED else [2 * C + 1, 2 * C]
    assert found == sorted([*forward, 2 * C]), found
