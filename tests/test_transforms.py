"""jbn.batchnorm under jit, every kind of differentiation, vmap, checkpoint and scan."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jbn
import reference
from helpers import assert_trees_close, index

pytestmark = pytest.mark.usefixtures("statistics_path")

RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.normal(2.0, 1.5, (6, 3, 4)))
MASK = jnp.asarray(RNG.random((6, 4)) < 0.7).at[0, :2].set(True)
PARAMS = {"weight": jnp.asarray(RNG.normal(1, 0.3, 3)), "bias": jnp.asarray(RNG.normal(0, 0.3, 3))}
STATE = {"running_mean": jnp.asarray(RNG.normal(size=3)),
         "running_var": jnp.asarray(RNG.uniform(0.5, 2, 3)),
         "num_batches_tracked": jnp.asarray(2, jnp.int32)}




def loss(x, params, training, mask=None, state=STATE):
    """A scalar that depends on y nonlinearly, so second derivatives are non-trivial."""
    y, _ = jbn.batchnorm(params, state, x, training, mask=mask)
    return jnp.sum(jnp.sin(y) * jnp.arange(y.size).reshape(y.shape))


def test_jit_with_static_training_equals_eager():
    f = jax.jit(jbn.batchnorm, static_argnames=("training", "momentum", "eps", "axis"))
    for training in (True, False):
        channels_last = jnp.moveaxis(X, 1, -1)
        jitted = f(PARAMS, STATE, channels_last, training, momentum=None, axis=-1)
        eager = jbn.batchnorm(PARAMS, STATE, channels_last, training, momentum=None, axis=-1)
        assert_trees_close(jitted, eager)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("mask", [None, MASK], ids=["unmasked", "masked"])
@pytest.mark.parametrize("state", [STATE, {}], ids=["running", "batch-only"])
def test_derivatives_up_to_second_order_match_finite_differences(training, mask, state):
    # Jitted: each derivative compiles once, where eager calls trace it on every evaluation.
    f = jax.jit(functools.partial(loss, training=training, mask=mask, state=state))
    check_grads(f, (X, PARAMS), order=2, modes=("fwd", "rev"))


def test_grad_matches_reference_finite_differences_of_float64_formula():
    """The custom rule against central differences of the NumPy reference, masked."""
    g = jax.grad(loss)(X, PARAMS, True, MASK)
    h, x = 1e-6, np.asarray(X)
    expected = np.zeros_like(x)
    weights = np.arange(x.size).reshape(x.shape)
    for position in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[position] = h
        plus = reference.batchnorm(PARAMS, STATE, x + step, True, mask=MASK)[0]
        minus = reference.batchnorm(PARAMS, STATE, x - step, True, mask=MASK)[0]
        expected[position] = np.sum((np.sin(plus) - np.sin(minus)) * weights) / (2 * h)
    np.testing.assert_allclose(g, expected, rtol=1e-6, atol=1e-6)


def test_forward_and_reverse_jacobians_and_hessian_agree():
    f = lambda x: jbn.batchnorm(PARAMS, {}, x, True)[0]  # noqa: E731
    x = X[:3, :, :2]
    # Jitted: each Jacobian compiles once instead of running operation by operation.
    np.testing.assert_allclose(jax.jit(jax.jacfwd(f))(x), jax.jit(jax.jacrev(f))(x),
                               rtol=1e-12, atol=1e-12)
    s = lambda x: loss(x, PARAMS, True)  # noqa: E731
    hess_fwd_rev = jax.jit(jax.hessian(s))(x)
    hess_rev_rev = jax.jit(jax.jacrev(jax.jacrev(s)))(x)
    np.testing.assert_allclose(hess_fwd_rev, hess_rev_rev, rtol=1e-10, atol=1e-10)
    flat = hess_fwd_rev.reshape(x.size, x.size)
    np.testing.assert_allclose(flat, flat.T, rtol=1e-10, atol=1e-10)


def test_jvp_equals_vjp_transpose():
    f = lambda x: jbn.batchnorm(PARAMS, STATE, x, True, mask=MASK)[0]  # noqa: E731
    u, v = jnp.asarray(RNG.normal(size=X.shape)), jnp.asarray(RNG.normal(size=X.shape))
    _, jvp_u = jax.jvp(f, (X,), (u,))
    _, vjp = jax.vjp(f, X)
    np.testing.assert_allclose(jnp.vdot(v, jvp_u), jnp.vdot(vjp(v)[0], u), rtol=1e-12)


def test_running_state_carries_no_derivative():
    def new_mean(x):
        return jbn.batchnorm(PARAMS, STATE, x, True)[1]["running_mean"].sum()
    assert jnp.all(jax.grad(new_mean)(X) == 0)


def test_vmap_over_an_ensemble_equals_each_member():
    members = 4
    xs = jnp.asarray(RNG.normal(size=(members,) + X.shape))
    params = jax.tree.map(lambda v: jnp.stack([v * (1 + i) for i in range(members)]), PARAMS)
    states = jax.tree.map(lambda v: jnp.stack([v] * members), STATE)
    f = functools.partial(jbn.batchnorm, training=True, momentum=None)
    ys, new_states = jax.vmap(f)(params, states, xs)
    grads = jax.vmap(jax.grad(loss), in_axes=(0, 0, None))(xs, params, True)
    for i in range(members):
        member = index(params, i)
        y, state = f(member, STATE, xs[i])
        np.testing.assert_allclose(ys[i], y, rtol=1e-12)
        assert_trees_close(index(new_states, i), state)
        assert_trees_close(index(grads, i), jax.grad(loss)(xs[i], member, True), rtol=1e-10)


def test_vmap_over_an_ensemble_keeps_one_branch_for_every_member(statistics_path):
    """A member whose channel mean is far from 0 sends the whole ensemble down the exact
    path, so vmap keeps lax.cond (one branch runs) instead of a select that runs both; the
    shifted path has no branch at all."""
    xs = jnp.asarray(RNG.normal(size=(3,) + X.shape)).at[1, :, 0].add(50.0)
    f = functools.partial(jbn.batchnorm, training=True)
    ensemble = jax.vmap(f, in_axes=(None, None, 0))
    compiled = jax.jit(ensemble).lower(PARAMS, STATE, xs).compile().as_text()
    assert ("conditional" in compiled) == (statistics_path is None)
    ys, states = ensemble(PARAMS, STATE, xs)
    for i in range(3):
        y, state = f(PARAMS, STATE, xs[i])
        np.testing.assert_allclose(ys[i], y, rtol=1e-12, atol=1e-12)
        assert_trees_close(index(states, i), state, rtol=1e-12)


def test_checkpoint_gives_the_same_gradients():
    g = jax.grad(loss, argnums=(0, 1))(X, PARAMS, True, MASK)
    remat = jax.checkpoint(loss, static_argnums=(2,))
    assert_trees_close(jax.grad(remat, argnums=(0, 1))(X, PARAMS, True, MASK), g)


def test_scan_over_a_stack_of_layers_equals_a_python_loop():
    layers = 3
    params = jax.tree.map(lambda v: jnp.stack([v + 0.1 * i for i in range(layers)]), PARAMS)
    states = jax.tree.map(lambda v: jnp.stack([v] * layers), STATE)

    def step(x, layer):
        y, state = jbn.batchnorm(layer[0], layer[1], x, True)
        return jnp.tanh(y), state

    def total(x, params):
        y, new_states = jax.lax.scan(step, x, (params, states))
        return jnp.sum(y ** 2), new_states

    (value, new_states), grads = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(X, params)

    def looped(x, params):
        out = []
        for i in range(layers):
            x, state = step(x, index((params, states), i))
            out.append(state)
        return jnp.sum(x ** 2), out

    (expected, expected_states), expected_grads = jax.value_and_grad(
        looped, argnums=(0, 1), has_aux=True)(X, params)
    np.testing.assert_allclose(value, expected, rtol=1e-12)
    for i in range(layers):
        assert_trees_close(index(new_states, i), expected_states[i])
    assert_trees_close(grads, expected_grads, rtol=1e-10)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_backward_pass_keeps_only_x_and_per_channel_vectors(dtype, masked):
    x = jnp.asarray(RNG.normal(size=(64, 32, 16)), dtype)
    mask = jnp.asarray(RNG.random((64,)) < 0.5) if masked else None
    params, state = jbn.init(32)
    _, vjp = jax.vjp(lambda x, p: jbn.batchnorm(p, state, x, True, mask=mask)[0], x, params)
    residual_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(vjp))
    assert residual_bytes <= 1.1 * x.nbytes
