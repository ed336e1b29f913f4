"""jbn against real PyTorch BatchNorm1d/2d/3d, over every constructor argument, in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jbn

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


def step_both(layer, params, state, training, momentum, eps, rng, rank):
    """One call of each on the same data; compares y and the gradients of Σ y·ct."""
    x = rng.normal(rng.uniform(-3, 3), rng.uniform(0.5, 4), SHAPES[rank])
    ct = rng.normal(size=x.shape)
    layer.train(training)
    tx = torch.from_numpy(x).requires_grad_(True)
    ty = layer(tx)
    ty.backward(torch.from_numpy(ct))

    def f(x, params):
        return jbn.batchnorm(params, state, x, training, momentum=momentum, eps=eps)

    y, vjp, new_state = jax.vjp(f, jnp.asarray(x), params, has_aux=True)
    dx, dparams = vjp(jnp.asarray(ct))
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


def test_init_matches_torch_initial_state_dict():
    params, state = jbn.init(5)
    torch_state = torch.nn.BatchNorm1d(5).state_dict()
    for name, value in {**params, **state}.items():
        np.testing.assert_array_equal(value, torch_state[name].numpy())
    assert state["num_batches_tracked"].dtype == jnp.int32
    assert jbn.init(5, affine=False)[0] == {}
    assert jbn.init(5, track_running_stats=False)[1] == {}
