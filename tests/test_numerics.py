"""Numerical edges: large mean relative to spread, constant channels, half precision."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jbn
import reference


def offset_data(ratio, shape=(4096, 8), seed=0):
    """float32 data whose mean is `ratio` × its standard deviation."""
    rng = np.random.default_rng(seed)
    std = rng.uniform(0.5, 2.0, shape[1])
    return (ratio * std + std * rng.normal(size=shape)).astype(np.float32)


@pytest.mark.parametrize("ratio", [1e2, 1e3, 1e4])
@pytest.mark.parametrize("training", [True, False])
def test_large_mean_over_spread_keeps_error_below_1e_5(ratio, training):
    x = offset_data(ratio)
    params, state = jbn.init(8)
    if not training:  # no running statistics: eval normalizes with the batch's own
        state = {}
    y, _ = jbn.batchnorm(params, state, jnp.asarray(x), training)
    expected, _ = reference.batchnorm(params, state, x, training)
    assert np.max(np.abs(np.asarray(y, np.float64) - expected)) <= 1e-5


def test_large_mean_running_statistics_match_float64():
    x = offset_data(1e4)
    params, state = jbn.init(8)
    _, new_state = jbn.batchnorm(params, state, jnp.asarray(x), True)
    _, expected = reference.batchnorm(params, state, x, True)
    # The running state is float32: one rounding of values of magnitude 1e3.
    np.testing.assert_allclose(new_state["running_mean"], expected["running_mean"], rtol=2e-7)
    np.testing.assert_allclose(new_state["running_var"], expected["running_var"], rtol=1e-5)


def test_torch_loses_accuracy_where_jbn_does_not():
    """Documents the gap the README quotes: PyTorch's float32 CPU kernel at mean/std 1e4."""
    x = offset_data(1e4)
    expected, _ = reference.batchnorm({}, {}, x, True)
    torch_y = torch.nn.functional.batch_norm(torch.from_numpy(x), None, None, training=True)
    jbn_y, _ = jbn.batchnorm({}, {}, jnp.asarray(x), True)
    torch_error = np.max(np.abs(torch_y.numpy() - expected))
    jbn_error = np.max(np.abs(np.asarray(jbn_y, np.float64) - expected))
    assert jbn_error * 100 < torch_error


@pytest.mark.parametrize("value", [0.0, 3.0, -1e4, 12345.678])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16, jnp.float64])
def test_constant_channel_normalizes_to_exactly_zero(value, dtype):
    x = jnp.full((16, 3, 5), value, dtype).at[:, 1].set(jnp.arange(16.0, dtype=dtype)[:, None])
    params, state = jbn.init(3)
    y, new_state = jbn.batchnorm(params, state, x, True)
    assert jnp.all(y[:, 0] == 0) and jnp.all(y[:, 2] == 0)
    assert all(jnp.all(jnp.isfinite(v)) for v in new_state.values())


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_half_precision_accumulates_in_float32(dtype):
    # Σx² of these values is ~1e9, far past float16's maximum of 65504.
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(200.0, 20.0, (4096, 4)), dtype)
    params, state = jbn.init(4)
    y, new_state = jbn.batchnorm(params, state, x, True)
    expected_y, expected_state = reference.batchnorm(params, state, np.asarray(x, np.float64), True)
    assert y.dtype == dtype
    assert new_state["running_mean"].dtype == jnp.float32
    # y is rounded once to the half dtype; |y| ≲ 4.
    np.testing.assert_allclose(np.asarray(y, np.float64), expected_y, atol=4 * jnp.finfo(dtype).eps)
    np.testing.assert_allclose(new_state["running_var"], expected_state["running_var"], rtol=1e-5)


def test_float64_params_and_state_keep_their_dtype_with_float32_x():
    params, state = jbn.init(3, dtype=jnp.float64)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(8, 3)), jnp.float32)
    y, new_state = jbn.batchnorm(params, state, x, True)
    assert y.dtype == jnp.float32
    assert {k: v.dtype for k, v in new_state.items()} == {k: v.dtype for k, v in state.items()}


def outlier_first(n):
    """N(0, 1) float32 data whose first value, about which the mean is taken, is √n σ out."""
    x = np.random.default_rng(3).normal(size=(n, 2)).astype(np.float32)
    x[0] = np.sqrt(n)
    params, state = jbn.init(2)
    y, new_state = jbn.batchnorm(params, state, jnp.asarray(x), True, momentum=1.0)
    expected_y, expected_state = reference.batchnorm(params, state, x, True, momentum=1.0)
    return y, new_state, expected_y, expected_state


@pytest.mark.parametrize("n", [10_000, 1_000_000])
def test_an_outlier_first_value_costs_the_variance_no_accuracy(n):
    # A one-pass sum of squares about that value loses 5e-2 relative at n = 1e6.
    _, state, _, expected = outlier_first(n)
    np.testing.assert_allclose(state["running_var"], expected["running_var"], rtol=1e-6)


@pytest.mark.parametrize("n", [10_000, 100_000])
def test_an_outlier_first_value_keeps_y_within_1e_5(n):
    y, _, expected, _ = outlier_first(n)
    assert np.max(np.abs(np.asarray(y, np.float64) - expected)) <= 1e-5
