"""Random shapes, channel axes, masks and dtypes against the NumPy float64 reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import jbn
import reference

pytestmark = pytest.mark.usefixtures("statistics_path")

# Tolerance on y for each input dtype, relative to |y| (eval with running statistics can give
# |y| ≫ 1): one rounding of the half-precision output; for float32 and float64, the rounding
# of the statistics.
Y_TOLERANCE = {jnp.float64: 1e-10, jnp.float32: 2e-5,
               jnp.float16: float(jnp.finfo(jnp.float16).eps),
               jnp.bfloat16: float(jnp.finfo(jnp.bfloat16).eps)}


@st.composite
def cases(draw):
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=2, max_size=5)))
    axis = draw(st.integers(-len(shape), len(shape) - 1))
    channels = shape[axis]
    others = tuple(s for i, s in enumerate(shape) if i != axis % len(shape))
    prefix = draw(st.one_of(st.none(), st.integers(1, len(others))))
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    mask = None
    if prefix is not None:
        mask = rng.random(others[:prefix]) < 0.6
    values_per_channel = np.prod(others) if mask is None else (
        mask.sum() * np.prod(others[prefix:]))
    assume(values_per_channel >= 2)  # fewer is an error in training, tested elsewhere
    return dict(
        x=rng.normal(rng.uniform(-5, 5), rng.uniform(0.1, 3), shape),
        axis=axis,
        mask=mask,
        channels=channels,
        dtype=draw(st.sampled_from(list(Y_TOLERANCE))),
        training=draw(st.booleans()),
        momentum=draw(st.sampled_from([0.1, 0.9, None])),
        affine=draw(st.booleans()),
        rng=rng,
    )


@pytest.mark.filterwarnings("ignore:momentum=0.9 is the weight")
@settings(max_examples=60, deadline=None)
@given(cases())
def test_matches_float64_reference(case):
    rng, channels = case["rng"], case["channels"]
    params = {}
    if case["affine"]:
        params = {"weight": jnp.asarray(rng.normal(1, 0.3, channels), jnp.float32),
                  "bias": jnp.asarray(rng.normal(0, 0.3, channels), jnp.float32)}
    state = {"running_mean": jnp.asarray(rng.normal(0, 1, channels), jnp.float32),
             "running_var": jnp.asarray(rng.uniform(0.5, 2, channels), jnp.float32),
             "num_batches_tracked": jnp.asarray(3, jnp.int32)}
    x = jnp.asarray(case["x"], case["dtype"])
    kwargs = dict(momentum=case["momentum"], axis=case["axis"], mask=case["mask"])

    # Jitted: one compilation per example, where eager calls compile each operation anew for
    # every new shape (what jit and eager agree on is tested elsewhere).
    call = jax.jit(jbn.batchnorm, static_argnames=("training", "momentum", "axis"))
    y, new_state = call(params, state, x, case["training"], **kwargs)
    expected_y, expected_state = reference.batchnorm(
        params, state, np.asarray(x.astype(jnp.float64)), case["training"], **kwargs)

    assert y.dtype == x.dtype and y.shape == x.shape
    np.testing.assert_allclose(np.asarray(y, np.float64), expected_y,
                               rtol=Y_TOLERANCE[case["dtype"]], atol=Y_TOLERANCE[case["dtype"]])
    for key in ("running_mean", "running_var"):
        assert new_state[key].dtype == jnp.float32
        np.testing.assert_allclose(new_state[key], expected_state[key], rtol=2e-5, atol=2e-5)
    assert int(new_state["num_batches_tracked"]) == int(expected_state["num_batches_tracked"])
