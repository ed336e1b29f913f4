"""Batch renormalization, ghost batches and recalibrated running statistics, against the
float64 reference (Algorithm 1 of Ioffe 2017; plain batch norm on each group), finite
differences, plain batch norm where they must coincide, and across devices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

import jbn
import reference
from helpers import assert_trees_close

pytestmark = pytest.mark.usefixtures("statistics_path")

RNG = np.random.default_rng(11)
C, L = 3, 4
X = jnp.asarray(RNG.normal(2.0, 1.5, (8, C, L)))
# Group 0 (examples 0-3) is full, group 1 partly masked; in groups of 2, example 6 and 7 are
# masked out entirely, example 5 has one valid value.
MASK = jnp.asarray(np.array([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1],
                             [1, 1, 0, 1], [0, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]], bool))
PARAMS = {"weight": jnp.asarray(RNG.normal(1, 0.3, C)), "bias": jnp.asarray(RNG.normal(0, 0.3, C))}
# Against the batch (mean ≈ 2, σ_B ≈ 1.5) and LIMITS: channel 0 clips r and d above,
# channel 1 clips neither, channel 2 clips both below.
STATE = {"running_mean": jnp.asarray([-1.0, 2.1, 5.0]),
         "running_var": jnp.asarray([0.2, 2.0, 16.0]),
         "num_batches_tracked": jnp.asarray(3, jnp.int32)}
LIMITS = (2.0, 0.5)


def loss(y):
    """A scalar that depends on y nonlinearly, so second derivatives are non-trivial."""
    return jnp.sum(jnp.sin(y) * jnp.arange(y.size).reshape(y.shape))


@functools.partial(jax.jit, static_argnames="virtual_batch_size")
def run(params, state, x, mask, limits, virtual_batch_size=None):
    """y, the new state, and the gradients of ``loss`` with respect to x and params; the
    limits are traced (None: no renormalization)."""
    def total(x, params):
        y, new_state = jbn.batchnorm(params, state, x, True, mask=mask, renorm=limits,
                                     virtual_batch_size=virtual_batch_size)
        return loss(y), (y, new_state)
    (_, (y, new_state)), grads = jax.value_and_grad(total, (0, 1), has_aux=True)(x, params)
    return y, new_state, grads


@jax.jit
def run_per_group(params, state, x, mask, limits):
    """y and the gradients of ``loss`` with each group of 4 examples normalized alone, by
    its own plain call."""
    def total(x, params):
        y = jnp.concatenate([
            jbn.batchnorm(params, state, x[i: i + 4], True, renorm=limits,
                          mask=None if mask is None else mask[i: i + 4])[0] for i in (0, 4)])
        return loss(y), y
    (_, y), grads = jax.value_and_grad(total, (0, 1), has_aux=True)(x, params)
    return y, grads


def assert_state_matches(state, expected, atol=1e-14):
    for key in ("running_mean", "running_var"):
        np.testing.assert_allclose(state[key], expected[key], rtol=0, atol=atol)
    assert int(state["num_batches_tracked"]) == int(expected["num_batches_tracked"])


def test_renorm_with_rmax_1_and_dmax_0_is_plain_batch_norm():
    renormalized = run(PARAMS, STATE, X, MASK, (1.0, 0.0))
    plain = run(PARAMS, STATE, X, MASK, None)
    assert_trees_close(renormalized, plain, rtol=1e-14, atol=1e-14)


def test_renorm_with_the_batch_statistics_as_running_statistics_is_plain_batch_norm():
    values = np.moveaxis(np.asarray(X), 1, -1).reshape(-1, C)
    state = {**STATE, "running_mean": jnp.asarray(values.mean(0)),
             "running_var": jnp.asarray(values.var(0))}  # biased: the one that normalizes
    assert_trees_close(run(PARAMS, state, X, None, (3.0, 5.0)),
                       run(PARAMS, state, X, None, None), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("virtual_batch_size", [None, 4], ids=["whole batch", "ghost batches"])
def test_renorm_matches_algorithm_1_in_float64_and_treats_r_and_d_as_constants(
        virtual_batch_size):
    options = dict(mask=MASK, renorm=LIMITS, virtual_batch_size=virtual_batch_size)
    r, d = reference.renorm_correction(STATE, X, **options)
    # Each regime is present: clipped above, free, clipped below (r in channel 0, 1, 2).
    assert np.all(r[:, 0] == 2.0) and np.all(np.abs(r[:, 1] - 1) < 0.5) and np.all(r[:, 2] == 0.5)
    assert np.all(d[:, 0] == 0.5) and np.all(np.abs(d[:, 1]) < 0.5) and np.all(d[:, 2] == -0.5)
    y, state, (dx, dparams) = run(PARAMS, STATE, X, MASK, LIMITS, virtual_batch_size)
    expected_y, expected_state = reference.batchnorm(PARAMS, STATE, X, True, **options)
    np.testing.assert_allclose(y, expected_y, rtol=0, atol=1e-14)
    assert_state_matches(state, expected_state)

    # The derivative is that of the reference with r and d held at their values.
    def reference_loss(x, params):
        y, _ = reference.batchnorm(params, STATE, x, True, correction=(r, d), **options)
        return np.sum(np.sin(y) * np.arange(y.size).reshape(y.shape))

    h, x = 1e-6, np.asarray(X)
    for index in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[index] = h
        difference = (reference_loss(x + step, PARAMS) - reference_loss(x - step, PARAMS)) / (2 * h)
        np.testing.assert_allclose(dx[index], difference, rtol=1e-6, atol=1e-6)
    for key in PARAMS:
        for c in range(C):
            step = {k: np.asarray(v) for k, v in PARAMS.items()}
            step[key] = step[key] + h * (np.arange(C) == c)
            back = {k: np.asarray(v) - (step[k] - np.asarray(v)) for k, v in PARAMS.items()}
            difference = (reference_loss(x, step) - reference_loss(x, back)) / (2 * h)
            np.testing.assert_allclose(dparams[key][c], difference, rtol=1e-6, atol=1e-6)


def test_renorm_derivatives_up_to_second_order_where_r_and_d_clip():
    # Running statistics far from the batch's: r and d sit at their limits in every channel
    # of both groups, clear of the edges, so the function itself has constant r and d there
    # and finite differences see them so.
    state = {**STATE, "running_mean": jnp.asarray([-3.0, 6.0, -4.0]),
             "running_var": jnp.asarray([0.1, 30.0, 0.01])}
    r, d = reference.renorm_correction(state, X, (np.inf, np.inf), mask=MASK,
                                       virtual_batch_size=4)
    assert np.all((r > 1.1 * LIMITS[0]) | (r < 0.9 / LIMITS[0])), r
    assert np.all(np.abs(d) > 1.1 * LIMITS[1]), d

    @jax.jit
    def f(x, params):
        y, _ = jbn.batchnorm(params, state, x, True, mask=MASK, renorm=LIMITS,
                             virtual_batch_size=4)
        return loss(y)

    check_grads(f, (X, PARAMS), order=2, modes=("fwd", "rev"))


def test_ghost_batch_derivatives_up_to_second_order_match_finite_differences():
    f = jax.jit(lambda x, params: loss(jbn.batchnorm(params, STATE, x, True, mask=MASK,
                                                     virtual_batch_size=4)[0]))
    check_grads(f, (X, PARAMS), order=2, modes=("fwd", "rev"))


def test_renorm_limits_may_be_traced_and_a_schedule_does_not_recompile():
    f = jax.jit(lambda limits: jbn.batchnorm(PARAMS, STATE, X, True, renorm=limits)[0])
    for limits in [(1.5, 0.25), (3.0, 2.0), (1.0, 0.0)]:
        limits = tuple(jnp.asarray(limit) for limit in limits)  # as a schedule computes them
        expected, _ = reference.batchnorm(PARAMS, STATE, X, True, renorm=limits)
        np.testing.assert_allclose(f(limits), expected, rtol=0, atol=1e-14)
    assert f._cache_size() == 1


@pytest.mark.parametrize("options", [dict(renorm=LIMITS), dict(virtual_batch_size=16)],
                         ids=["renorm", "ghost batches"])
def test_backward_pass_keeps_only_x_and_per_channel_vectors(options):
    x = jnp.asarray(RNG.normal(size=(64, 32, 16)), jnp.float32)
    params, state = jbn.init(32)
    # Jitted: the same residuals as eager, found faster.
    f = jax.jit(lambda x, p: jbn.batchnorm(p, state, x, True, **options)[0])
    _, vjp = jax.vjp(f, x, params)
    residual_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(vjp))
    assert residual_bytes <= 1.1 * x.nbytes


@pytest.mark.parametrize("limits", [None, LIMITS], ids=["plain", "renorm"])
def test_ghost_batches_are_batch_norm_on_each_group_alone_with_masks_too(limits):
    y, _, grads = run(PARAMS, STATE, X, MASK, limits, 4)
    assert_trees_close((y, grads), run_per_group(PARAMS, STATE, X, MASK, limits), rtol=1e-12,
                       atol=1e-12)


def test_ghost_running_statistics_are_the_mean_of_all_values_and_the_pooled_variance():
    # Groups of 2 examples: 8, 8, 4 and 0 valid values with MASK; 8, 8, 4 and 1 with the
    # other mask. Groups of 0 or 1 valid values add nothing to the variance.
    for mask, momentum in [(MASK, 0.1), (MASK.at[6, 2].set(True), None)]:
        f = functools.partial(jbn.batchnorm, PARAMS, STATE, X, True, mask=mask,
                              virtual_batch_size=2, momentum=momentum)
        y, state = jax.jit(f)()
        expected_y, expected_state = reference.batchnorm(
            PARAMS, STATE, X, True, mask=mask, virtual_batch_size=2, momentum=momentum)
        assert_state_matches(state, expected_state)
        np.testing.assert_allclose(y[:6], expected_y[:6], rtol=0, atol=1e-14)
    # The reference's estimate, from its definition: the mean of all valid values, and
    # Σ M2 over the groups / Σ (n − 1) = Σ M2 / (7 + 7 + 3 + 0).
    values = np.moveaxis(np.asarray(X), 1, -1)
    groups = [values[i: i + 2][np.asarray(mask)[i: i + 2]] for i in range(0, 8, 2)]
    pooled = sum(((g - g.mean(0)) ** 2).sum(0) for g in groups) / 17
    factor = 1 / (int(STATE["num_batches_tracked"]) + 1)
    np.testing.assert_allclose(expected_state["running_var"],
                               (1 - factor) * np.asarray(STATE["running_var"]) + factor * pooled)
    np.testing.assert_allclose(expected_state["running_mean"], (1 - factor) * np.asarray(
        STATE["running_mean"]) + factor * values[np.asarray(mask)].mean(0))


def test_ghost_batches_with_uneven_masks_match_the_float64_reference():
    y, state, _ = run(PARAMS, STATE, X, MASK, None, 4)
    expected_y, expected_state = reference.batchnorm(PARAMS, STATE, X, True, mask=MASK,
                                                     virtual_batch_size=4)
    np.testing.assert_allclose(y, expected_y, rtol=0, atol=1e-14)
    assert_state_matches(state, expected_state)


DEVICES = 4


@pytest.mark.parametrize("options", [dict(renorm=LIMITS), dict(virtual_batch_size=1,
                                                                 renorm=LIMITS)],
                         ids=["renorm", "ghost batches of 1 example, renorm"])
def test_across_devices_ghost_groups_lie_within_each_slice_and_renorm_uses_global_statistics(
        options):
    """shard_map over 4 devices, 2 examples each, uneven mask: the same as one device on the
    whole batch. Renorm's μ_B and σ_B are the global batch's; ghost groups lie in each
    device's slice (2 each), and the running statistics learn from the groups of every
    device."""
    mesh = jax.make_mesh((DEVICES,), ("data",), devices=jax.devices()[:DEVICES])
    call = functools.partial(jbn.batchnorm, training=True, axis_name="data", **options)
    f = jax.jit(jax.shard_map(lambda p, s, x, m: call(p, s, x, mask=m), mesh=mesh,
                              in_specs=(P(), P(), P("data"), P("data")),
                              out_specs=(P("data"), P())))
    on_mesh = functools.partial(jax.device_put, device=NamedSharding(mesh, P("data")))
    y, state = f(PARAMS, STATE, on_mesh(X), on_mesh(MASK))
    expected_y, expected_state = jbn.batchnorm(PARAMS, STATE, X, True, mask=MASK, **options)
    assert_trees_close((y, state), (expected_y, expected_state), rtol=1e-13, atol=1e-13)


def test_vmap_over_an_ensemble_with_its_own_renorm_limits_equals_each_member():
    members = 3
    xs = jnp.asarray(RNG.normal(2.0, 1.5, (members,) + X.shape))
    limits = (jnp.asarray([1.0, 2.0, 4.0]), jnp.asarray([0.0, 0.5, 3.0]))
    f = jax.jit(lambda x, limits: jbn.batchnorm(PARAMS, STATE, x, True, mask=MASK,
                                                renorm=limits, virtual_batch_size=4))
    ys, states = jax.jit(jax.vmap(f))(xs, limits)
    for i in range(members):
        y, state = f(xs[i], (limits[0][i], limits[1][i]))
        member = jax.tree.map(functools.partial(jnp.take, indices=i, axis=0), (ys, states))
        assert_trees_close(member, (y, state), rtol=1e-13, atol=1e-13)


def test_eval_with_running_statistics_ignores_renorm_and_virtual_batch_size():
    x = X[:7]  # 7 examples: no group size of 4 divides them, and none needs to in eval
    y, state = jbn.batchnorm(PARAMS, STATE, x, False, renorm=LIMITS, virtual_batch_size=4)
    expected_y, _ = reference.batchnorm(PARAMS, STATE, x, False)
    np.testing.assert_allclose(y, expected_y, rtol=0, atol=1e-14)
    assert state is STATE


def test_an_empty_batch_in_ghost_groups_with_renorm_counts_and_keeps_the_statistics():
    y, state = jbn.batchnorm(PARAMS, STATE, X[:0], True, renorm=LIMITS, virtual_batch_size=4)
    assert y.shape == X[:0].shape
    assert_state_matches(state, {**STATE, "num_batches_tracked": 4}, atol=0)


def test_framework_layers_pass_renorm_and_virtual_batch_size_on():
    import equinox as eqx

    import jbn.equinox
    import jbn.nnx

    options = dict(renorm=LIMITS, virtual_batch_size=4)
    params, state = jbn.init(C, dtype=jnp.float64)
    expected, _ = jbn.batchnorm(params, state, X, True, **options)
    nnx_layer = jbn.nnx.BatchNorm(C, axis=1, param_dtype=jnp.float64, **options)
    eqx_layer, eqx_state = eqx.nn.make_with_state(jbn.equinox.BatchNorm)(
        C, axis=1, dtype=jnp.float64, **options)
    np.testing.assert_array_equal(nnx_layer(X), expected)
    np.testing.assert_array_equal(eqx_layer(X, eqx_state)[0], expected)
    # Eval with running statistics: 7 examples, which no group of 4 divides.
    nnx_layer.eval()
    np.testing.assert_array_equal(nnx_layer(X[:7]), jbn.batchnorm(
        params, {**state, "running_mean": nnx_layer.running_mean[...],
                 "running_var": nnx_layer.running_var[...]}, X[:7], False)[0])
