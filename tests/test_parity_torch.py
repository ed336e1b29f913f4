"""jbn against real PyTorch BatchNorm1d/2d/3d, over every constructor argument, in float64."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jbn

pytestmark = pytest.mark.usefixtures("statistics_path")

TORCH_MODULES = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d,
                 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}
SHAPES = {2: (7, 3), 3: (4, 3, 5), 4: (3, 3, 4, 2), 5: (2, 3, 3, 2, 2)}
TIGHT = dict(rtol=1e-10, atol=1e-10)


def torch_layer(rank, affine, track, momentum, eps, rng):
    layer = TORCH_MODULES[rank](3, eps=eps, momentum=momentum, affine=affine,
                                track_running_stats=track).double()
    if affine:
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(rng.normal(1.0, 0.5, 3)))
            layer.bias.copy_(torch.from_numpy(rng.normal(0.0, 0.5, 3)))
    return layer


def jbn_params(layer):
    if layer.weight is None:
        return {}
    return {"weight": jnp.asarray(layer.weight.detach().numpy()),
            "bias": jnp.asarray(layer.bias.detach().numpy())}


def assert_state_equal(state, layer):
    if not layer.track_running_stats:
        assert state == {}
        return
    np.testing.assert_allclose(state["running_mean"], layer.running_mean.numpy(), **TIGHT)
    np.testing.assert_allclose(state["running_var"], layer.running_var.numpy(), **TIGHT)
    assert int(state["num_batches_tracked"]) == int(layer.num_batches_tracked)


# Jitted whole: one compilation per configuration for y, the state and the pullback, where
# eager calls compile the forward and the backward pass apart (what jit and eager agree on is
# tested elsewhere).
@functools.partial(jax.jit, static_argnames=("training", "momentum", "eps"))
def jbn_step(x, params, state, ct, training, momentum, eps):
    """y, the gradients of Σ y·ct with respect to x and params, and the new state."""
    def f(x, params):
        return jbn.batchnorm(params, state, x, training, momentum=momentum, eps=eps)

    y, vjp, new_state = jax.vjp(f, x, params, has_aux=True)
    return y, vjp(ct), new_state


def step_both(layer, params, state, training, momentum, eps, rng, rank, shape=None):
    """One call of each on the same data; compares y and the gradients of Σ y·ct."""
    x = rng.normal(rng.uniform(-3, 3), rng.uniform(0.5, 4), shape or SHAPES[rank])
    ct = rng.normal(size=x.shape)
    layer.train(training)
    tx = torch.from_numpy(x).requires_grad_(True)
    ty = layer(tx)
    ty.backward(torch.from_numpy(ct))

    y, (dx, dparams), new_state = jbn_step(jnp.asarray(x), params, state, jnp.asarray(ct),
                                           training, momentum, eps)
    np.testing.assert_allclose(y, ty.detach().numpy(), **TIGHT)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-9, atol=1e-9)
    if params:
        np.testing.assert_allclose(dparams["weight"], layer.weight.grad.numpy(), **TIGHT)
        np.testing.assert_allclose(dparams["bias"], layer.bias.grad.numpy(), **TIGHT)
        layer.weight.grad = layer.bias.grad = None
    assert_state_equal(new_state, layer)
    return new_state


@pytest.mark.parametrize("rank", [2, 3, 4, 5])
@pytest.mark.parametrize("momentum", [0.1, 0.37, None])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("eps", [1e-5, 0.1])
def test_training_eval_training_matches_torch(rank, momentum, affine, track, eps):
    rng = np.random.default_rng([rank, affine, track, int(eps * 1e5)])
    layer = torch_layer(rank, affine, track, momentum, eps, rng)
    params = jbn_params(layer)
    _, state = jbn.init(3, track_running_stats=track, dtype=jnp.float64)
    for training in [True, True, True, False, True, True, False]:
        state = step_both(layer, params, state, training, momentum, eps, rng, rank)


@pytest.mark.quick
def test_init_matches_torch_initial_state_dict():
    params, state = jbn.init(5)
    torch_state = torch.nn.BatchNorm1d(5).state_dict()
    for name, value in {**params, **state}.items():
        np.testing.assert_array_equal(value, torch_state[name].numpy())
    assert state["num_batches_tracked"].dtype == jnp.int32
    assert jbn.init(5, affine=False)[0] == {}
    assert jbn.init(5, track_running_stats=False)[1] == {}


EMPTY_SHAPES = {2: (0, 3), 3: (0, 3, 5), 4: (0, 3, 4, 2), 5: (2, 3, 0, 2, 2)}


@pytest.mark.quick
@pytest.mark.parametrize("rank", [2, 3, 4, 5])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_an_empty_batch_counts_but_leaves_the_running_statistics_as_torch(rank, momentum):
    rng = np.random.default_rng(rank)
    layer = torch_layer(rank, True, True, momentum, 1e-5, rng)
    params = jbn_params(layer)
    _, state = jbn.init(3, dtype=jnp.float64)
    for shape in (SHAPES[rank], EMPTY_SHAPES[rank], SHAPES[rank]):  # momentum=None counts it
        state = step_both(layer, params, state, True, momentum, 1e-5, rng, rank, shape)


def empty_batch_call(params, state, x, mask=None):
    def loss(params):
        y, new_state = jbn.batchnorm(params, state, x, True, mask=mask)
        return jnp.sum(y), (y, new_state)
    return jax.grad(loss, has_aux=True)(params)


@pytest.mark.parametrize("mode", ["eager", "jit", "mask", "vmap"])
def test_an_empty_batch_gives_empty_y_zero_gradients_and_counts_under_transforms(mode):
    rng = np.random.default_rng(0)
    params = {"weight": jnp.asarray(rng.normal(size=3)), "bias": jnp.asarray(rng.normal(size=3))}
    state = {"running_mean": jnp.asarray(rng.normal(size=3)),
             "running_var": jnp.asarray(rng.uniform(0.5, 2, 3)),
             "num_batches_tracked": jnp.asarray(5, jnp.int32)}
    x = jnp.zeros((0, 3, 4))
    if mode == "vmap":
        members = jax.tree.map(lambda v: jnp.stack([v, v]), (params, state))
        grads, (y, new_state) = jax.vmap(empty_batch_call)(*members, jnp.stack([x, x]))
        grads, y, new_state = jax.tree.map(lambda v: v[1], (grads, y, new_state))
    else:
        call = jax.jit(empty_batch_call) if mode == "jit" else empty_batch_call
        mask = jnp.zeros((0, 4), bool) if mode == "mask" else None
        grads, (y, new_state) = call(params, state, x, mask)
    assert y.shape == x.shape
    assert all(np.all(np.asarray(g) == 0) for g in grads.values())
    np.testing.assert_array_equal(new_state["running_mean"], state["running_mean"])
    np.testing.assert_array_equal(new_state["running_var"], state["running_var"])
    assert int(new_state["num_batches_tracked"]) == 6
