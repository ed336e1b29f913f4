"""Numerical edges: large mean relative to spread, constant channels, half precision."""

import warnings

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jbn
import reference
from jbn import _stats
from jbn._reduction import Reduction

pytestmark = pytest.mark.usefixtures("statistics_path")


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


def float32_running_statistics(x):
    """The state a long training run would reach: the true statistics, rounded to float32."""
    values = x.astype(np.float64)
    return {"running_mean": jnp.asarray(values.mean(0), jnp.float32),
            "running_var": jnp.asarray(values.var(0, ddof=1), jnp.float32),
            "num_batches_tracked": jnp.asarray(100, jnp.int32)}


@pytest.mark.parametrize("ratio", [1e2, 1e3, 1e4])
def test_eval_with_running_statistics_keeps_error_below_1e_5_at_large_mean(ratio):
    x = offset_data(ratio)
    params, state = jbn.init(8)
    state = float32_running_statistics(x)
    y, _ = jbn.batchnorm(params, state, jnp.asarray(x), False)
    expected, _ = reference.batchnorm(params, state, x, False)
    assert np.max(np.abs(np.asarray(y, np.float64) - expected)) <= 1e-5


def test_folding_cancels_where_eval_mode_does_not():
    """What the README says folding costs: x·s + t loses |mean|/σ ulps."""
    x = offset_data(1e4)
    params, state = jbn.init(8)
    state = float32_running_statistics(x)
    expected, _ = reference.batchnorm(params, state, x, False)
    scale, shift = jbn.fold(params, state)
    folded_error = np.max(np.abs(np.asarray(x * scale + shift, np.float64) - expected))
    y, _ = jbn.batchnorm(params, state, jnp.asarray(x), False)
    eval_error = np.max(np.abs(np.asarray(y, np.float64) - expected))
    assert folded_error > 1e-4 > 100 * eval_error


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


def with_an_outlier(n, seed=3):
    """N(0, 1) float32 data with one value √n σ out, and the results of jbn and of the float64
    reference."""
    x = np.random.default_rng(seed).normal(size=(n, 2)).astype(np.float32)
    x[0] = np.sqrt(n)
    params, state = jbn.init(2)
    with warnings.catch_warnings():  # momentum=1.0 on purpose: the state is the batch's own
        warnings.filterwarnings("ignore", "momentum=1.0", UserWarning)
        y, new_state = jbn.batchnorm(params, state, jnp.asarray(x), True, momentum=1.0)
    expected_y, expected_state = reference.batchnorm(params, state, x, True, momentum=1.0)
    return y, new_state, expected_y, expected_state


@pytest.mark.parametrize("n", [10_000, 1_000_000])
def test_an_outlier_costs_the_variance_no_accuracy(n):
    # A one-pass sum of squares about that value loses 5e-2 relative at n = 1e6.
    _, state, _, expected = with_an_outlier(n)
    np.testing.assert_allclose(state["running_var"], expected["running_var"], rtol=1e-6)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("n", [10_000, 100_000])
def test_an_outlier_keeps_y_within_1e_5_and_the_rounding_of_its_size(n, seed):
    # The outlier's own y is √n: float32 statistics carry a relative error of about one
    # float32 epsilon, which at |y| = 316 alone is 4e-5, whatever the algorithm.
    y, _, expected, _ = with_an_outlier(n, seed)
    error = np.abs(np.asarray(y, np.float64) - expected)
    assert np.all(error <= 1e-5 + np.finfo(np.float32).eps * np.abs(expected))


def within_the_promise(y, expected):
    """What jbn promises for float32 x: y within 1e-5 of float64 where |y| ≤ 10, within
    1e-6·|y| beyond."""
    error = np.abs(np.asarray(y, np.float64) - expected)
    return np.all(error <= np.maximum(1e-5, 1e-6 * np.abs(expected)))


def batch_norm_float64(x, axis=1):
    values = np.moveaxis(np.asarray(x, np.float64), axis, -1)
    flat = values.reshape(-1, values.shape[-1])
    return np.moveaxis((values - flat.mean(0)) / np.sqrt(flat.var(0) + 1e-5), -1, axis)


@pytest.mark.parametrize("shape", [(4096, 8), (256, 128), (4096, 1024), (64, 16, 32, 32)])
def test_every_channel_at_the_guard_bound_keeps_error_below_1e_5(shape, statistics_path):
    """Where the CPU's plain sums are at their worst: every channel's |mean| just inside
    √CANCELLATION_BOUND·σ."""
    rng = np.random.default_rng(4)
    axes = tuple(i for i in range(len(shape)) if i != 1)
    z = rng.standard_normal(shape)
    z = (z - z.mean(axes, keepdims=True)) / z.std(axes, keepdims=True)
    scale = rng.uniform(0.5, 2.0, [shape[1] if i == 1 else 1 for i in range(len(shape))])
    x = jnp.asarray(scale * (z + 0.999 * np.sqrt(_stats.CANCELLATION_BOUND)), jnp.float32)
    if statistics_path is None:  # the CPU's guard lets the plain sums serve here
        assert _stats.plain_sums_suffice(*_stats.plain_sums(x, None, Reduction(x.ndim, 1)),
                                         _stats.CANCELLATION_BOUND)
    y, _ = jbn.batchnorm({}, {}, x, True)
    assert np.max(np.abs(np.asarray(y, np.float64) - batch_norm_float64(x))) <= 1e-5


def sampled(x, how_many, offset):
    """x (N, C) with the first ``how_many`` values the accelerators' shift samples moved
    ``offset`` standard deviations up."""
    x = x.copy()
    x[_stats.sample_starts(len(x), _stats.SHIFT_SAMPLES)[:how_many]] += offset * x.std(0)
    return x


EDGE_DATA = {
    "outliers at all but the median's sampled positions": lambda rng: sampled(
        1e4 + rng.normal(size=(4096, 8)), _stats.SHIFT_SAMPLES // 2, 100),
    "sorted by value": lambda rng: np.sort(1e4 + rng.normal(size=(4096, 8)), axis=0),
    "sorted in reverse": lambda rng: np.sort(1e4 + rng.normal(size=(4096, 8)), axis=0)[::-1],
    "Student-t(2)": lambda rng: 1e4 + rng.standard_t(2, (4096, 8)),
    "lognormal(0, 2)": lambda rng: 1e4 + rng.lognormal(0, 2, (4096, 8)),
    "the first position of every sequence far off": lambda rng: (
        1e4 + rng.normal(size=(72, 8, 64)) + 100 * (np.arange(64) == 0)),
    "spread 1e-3 at mean 1e4σ": lambda rng: 1e-3 * (1e4 + rng.normal(size=(4096, 8))),
    "spread 1e3 at mean 1e4σ": lambda rng: 1e3 * (1e4 + rng.normal(size=(4096, 8))),
}


@pytest.mark.parametrize("make", EDGE_DATA.values(), ids=EDGE_DATA.keys())
def test_data_chosen_against_the_shift_stays_within_the_promise(make):
    x = make(np.random.default_rng(5)).astype(np.float32)
    y, _ = jbn.batchnorm({}, {}, jnp.asarray(x), True)
    assert within_the_promise(y, batch_norm_float64(x))
