"""The modes of a layer (tracked, untracked, frozen), a weight without bias, a state without a
count, and the precision of the running statistics: outputs, gradients and state.

References are real ``torch.nn`` modules in float64 (``BatchNorm2d`` in training and eval,
with ``track_running_stats=False`` and ``bias=False``; torchvision's ``FrozenBatchNorm2d``,
written in ``helpers``) and a NumPy float64 moving average.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jbn
from helpers import FrozenBatchNorm2d, assert_close_ulps, assert_same_arrays

C = 3
SHAPE = (6, C, 4, 3)


def trained_module(module, seed=0):
    """``module`` (float64) with weight, bias and running statistics far from their initial
    values."""
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, value in module.state_dict().items():
            if name == "running_var":
                value.copy_(torch.from_numpy(rng.uniform(0.5, 3.0, C)))
            elif name != "num_batches_tracked":
                value.copy_(torch.from_numpy(rng.normal(0.5, 1.0, C)))
    return module


def data(seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(np.linspace(-2, 3, C)[:, None, None], 1.5, SHAPE)
    return x, rng.normal(size=SHAPE)


def jbn_layer(module):
    """The module's params and state as jbn takes them (``from_torch``'s own tests are in
    test_interop)."""
    return jbn.from_torch(module.state_dict())


@functools.partial(jax.jit, static_argnames=("training", "mode", "eps"))
def outputs_and_gradients(params, state, x, cotangent, training, mode, eps=1e-5):
    """y, the new state, and the gradients of Σ y·cotangent for params and x."""
    def loss(params, x):
        y, new_state = jbn.batchnorm(params, state, x, training, mode=mode, eps=eps)
        return jnp.sum(y * cotangent), (y, new_state)

    (params_grad, x_grad), (y, new_state) = jax.grad(loss, (0, 1), has_aux=True)(params, x)
    return y, new_state, params_grad, x_grad


def torch_outputs_and_gradients(module, x, cotangent, training):
    module.train(training)
    tx = torch.from_numpy(x).requires_grad_(True)
    y = module(tx)
    y.backward(torch.from_numpy(cotangent))
    params_grad = {name: value.grad.numpy() for name, value in module.named_parameters()}
    return y.detach().numpy(), params_grad, tx.grad.numpy()


def assert_matches(actual, expected):
    y, params_grad, x_grad = expected
    np.testing.assert_allclose(actual[0], y, rtol=1e-12, atol=1e-12)
    assert set(actual[2]) == set(params_grad)
    for name, grad in params_grad.items():
        np.testing.assert_allclose(actual[2][name], grad, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(actual[3], x_grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("training", [True, False])
def test_untracked_normalizes_with_the_batch_in_both_phases_and_leaves_the_state(training):
    module = trained_module(torch.nn.BatchNorm2d(C, dtype=torch.float64))
    params, state = jbn_layer(module)
    x, cotangent = data()
    actual = outputs_and_gradients(params, state, jnp.asarray(x), jnp.asarray(cotangent),
                                   training, "untracked")
    # PyTorch's batch norm without running statistics normalizes with the batch in both.
    untracked = torch.nn.BatchNorm2d(C, track_running_stats=False, dtype=torch.float64)
    untracked.load_state_dict({"weight": module.weight, "bias": module.bias})
    assert_matches(actual, torch_outputs_and_gradients(untracked, x, cotangent, training))
    assert_same_arrays(actual[1], state)


@pytest.mark.parametrize("eps", [1e-5, 0.0])
@pytest.mark.parametrize("training", [True, False])
def test_frozen_is_frozen_batchnorm2d_with_constant_weight_and_bias(training, eps):
    frozen = FrozenBatchNorm2d(C, eps=eps).double()
    trained_module(frozen)
    params, state = jbn_layer(frozen)
    assert "num_batches_tracked" not in state  # FrozenBatchNorm2d keeps no count
    x, cotangent = data()
    y, new_state, params_grad, x_grad = outputs_and_gradients(
        params, state, jnp.asarray(x), jnp.asarray(cotangent), training, "frozen", eps)
    expected_y, buffers_grad, expected_x_grad = torch_outputs_and_gradients(
        frozen, x, cotangent, training)
    assert buffers_grad == {}  # nothing to train in PyTorch either
    # FrozenBatchNorm2d computes the folded x·scale + shift; jbn centers first.
    np.testing.assert_allclose(y, expected_y, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(x_grad, expected_x_grad, rtol=1e-12, atol=1e-12)
    assert_same_arrays(params_grad, {"weight": np.zeros(C), "bias": np.zeros(C)})
    assert_same_arrays(new_state, state)


def test_frozen_keeps_a_trainable_layers_state_and_stops_only_the_affine_gradients():
    module = trained_module(torch.nn.BatchNorm2d(C, dtype=torch.float64))
    params, state = jbn_layer(module)
    x, cotangent = data()
    frozen = outputs_and_gradients(params, state, jnp.asarray(x), jnp.asarray(cotangent),
                                   True, "frozen")
    evaluated = outputs_and_gradients(params, state, jnp.asarray(x), jnp.asarray(cotangent),
                                      False, "tracked")
    assert_same_arrays(frozen[1], state)
    np.testing.assert_array_equal(frozen[0], evaluated[0])
    np.testing.assert_array_equal(frozen[3], evaluated[3])
    assert all(np.any(grad != 0) for grad in evaluated[2].values())
    assert all(np.all(grad == 0) for grad in frozen[2].values())


@pytest.mark.parametrize("training", [True, False])
def test_a_weight_without_bias_is_pytorchs_bias_false(training):
    module = trained_module(torch.nn.BatchNorm2d(C, bias=False, dtype=torch.float64))
    params, state = jbn_layer(module)
    assert set(params) == {"weight"}
    x, cotangent = data()
    actual = outputs_and_gradients(params, state, jnp.asarray(x), jnp.asarray(cotangent),
                                   training, "tracked")
    assert_matches(actual, torch_outputs_and_gradients(module, x, cotangent, training))
    expected_state = jbn.from_torch(module.state_dict())[1]  # after PyTorch's update
    for name, value in expected_state.items():
        np.testing.assert_allclose(actual[1][name], value, rtol=1e-12)


def test_a_state_without_a_count_normalizes_as_one_with_a_count():
    module = trained_module(torch.nn.BatchNorm2d(C, dtype=torch.float64))
    params, state = jbn_layer(module)
    countless = {key: state[key] for key in ("running_mean", "running_var")}
    x = jnp.asarray(data()[0])
    for mode in ("tracked", "untracked", "frozen"):
        y, new_state = jbn.batchnorm(params, countless, x, False, mode=mode)
        np.testing.assert_array_equal(y, jbn.batchnorm(params, state, x, False, mode=mode)[0])
        assert new_state is countless


@pytest.mark.parametrize("training, mode", [(False, "tracked"), (True, "frozen")])
def test_running_statistics_need_no_bound_axis_name(training, mode):
    params, state = jbn.init(C)
    state = {**state, "running_mean": jnp.arange(C, dtype=jnp.float32)}
    examples = jnp.linspace(-1, 1, 4 * C * 5).reshape(4, C, 5)

    def per_example(x):
        return jbn.batchnorm(params, state, x, training, mode=mode, axis=0,
                             axis_name="batch")[0]

    expected = jbn.batchnorm(params, state, examples, False, axis=1)[0]
    np.testing.assert_array_equal(per_example(examples[0]), expected[0])  # outside jax.vmap
    np.testing.assert_array_equal(jax.vmap(per_example)(examples), expected)  # no axis named


# ---------------------------------------------------------------------------------------
# The precision of the running statistics


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32, jnp.float64])
def test_running_statistics_are_at_least_float32_whatever_the_params_dtype(dtype):
    params, state = jbn.init(C, dtype=dtype)
    assert all(value.dtype == dtype for value in params.values())
    finer = jnp.float64 if dtype == jnp.float64 else jnp.float32
    assert state["running_mean"].dtype == state["running_var"].dtype == finer


def test_bfloat16_training_keeps_the_float64_moving_average_in_its_float32_state():
    steps, momentum = 300, 0.01
    params, state = jbn.init(C, dtype=jnp.bfloat16)
    batches = jnp.asarray(np.random.default_rng(0).normal(3.0, 2.0, (steps, 32, C)),
                          jnp.bfloat16)

    def step(state, x):
        return jbn.batchnorm(params, state, x, True, momentum=momentum)[1], None

    state, _ = jax.jit(lambda state: jax.lax.scan(step, state, batches))(state)
    expected_mean, expected_var = np.zeros(C), np.ones(C)
    for x in np.asarray(batches, np.float64):
        expected_mean = (1 - momentum) * expected_mean + momentum * x.mean(0)
        expected_var = (1 - momentum) * expected_var + momentum * x.var(0, ddof=1)
    assert state["running_mean"].dtype == jnp.float32
    assert_close_ulps(state["running_mean"], expected_mean.astype(np.float32), ulps=64)
    assert_close_ulps(state["running_var"], expected_var.astype(np.float32), ulps=64)


@pytest.mark.parametrize("training, mode", [(False, "tracked"), (True, "untracked"),
                                            (True, "frozen")])
def test_a_bfloat16_state_normalizes_where_it_is_not_updated_as_in_float32(training, mode):
    module = trained_module(torch.nn.BatchNorm2d(C))
    params, state = jbn_layer(module.to(torch.bfloat16))
    assert state["running_mean"].dtype == jnp.bfloat16
    x = jnp.asarray(data()[0], jnp.float32)
    wide = {key: value.astype(jnp.float32) if key != "num_batches_tracked" else value
            for key, value in state.items()}
    y, new_state = jbn.batchnorm(params, state, x, training, mode=mode)
    np.testing.assert_array_equal(y, jbn.batchnorm(params, wide, x, training, mode=mode)[0])
    assert new_state is state
