"""Batch norm fused with a residual and an activation, ``act(BN(x) + residual)``: it equals
the unfused composition (``jbn.batchnorm``, + residual, then ``jax.nn``'s activation) in
its outputs, state and every derivative, under every option; its backward pass keeps the
output, not the input; and a weight at or near zero gives finite results.

References are the unfused composition and mathematics (what ``jax.vjp`` keeps).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jbn
from helpers import assert_trees_close

pytestmark = pytest.mark.usefixtures("statistics_path")  # each test on both paths

ACTIVATIONS = {"identity": lambda z: z, "relu": jax.nn.relu,
               "leaky_relu": functools.partial(jax.nn.leaky_relu, negative_slope=0.01),
               "elu": jax.nn.elu}
C = 3
RNG = np.random.default_rng(5)
X = jnp.asarray(RNG.normal(np.array([1.0, -2.0, 4.0])[:, None], 1.5, (16, C, 5)))
RESIDUAL = jnp.asarray(RNG.normal(size=X.shape))
COTANGENT = jnp.asarray(RNG.normal(size=X.shape))
MASK = jnp.asarray(RNG.random(X.shape[:1]) < 0.7)
PARAMS = {"weight": jnp.asarray([1.5, -0.7, 0.3]), "bias": jnp.asarray([0.2, -1.0, 0.5])}
STATE = jbn.init(C, dtype=jnp.float64)[1]


def unfused(params, state, x, residual, training, activation, **options):
    y, state = jbn.batchnorm(params, state, x, training, **options)
    return ACTIVATIONS[activation](y if residual is None else y + residual), state


def fused(params, state, x, residual, training, activation, **options):
    return jbn.batchnorm(params, state, x, training, activation=activation, residual=residual,
                         **options)


def outputs_and_gradients(call, params, state, x, residual, training=True, cotangent=COTANGENT,
                          **options):
    """y, the new state, and the gradients of Σ y·cotangent for params, x and residual."""
    def loss(params, x, residual):
        y, new_state = call(params, state, x, residual, training, **options)
        return jnp.sum(y * cotangent), (y, new_state)

    grads, (y, new_state) = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(params, x, residual)
    return y, new_state, grads


def assert_relatively_close(actual, expected, rtol):
    """Each leaf within rtol of the largest magnitude of its reference."""
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        scale = max(float(np.max(np.abs(np.asarray(e, np.float64)))), 1e-300)
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(e, np.float64),
                                   rtol=0, atol=rtol * scale)


OPTIONS = {
    "plain": {},
    "mask": {"mask": MASK},
    "momentum None": {"momentum": None},
    "untracked": {"mode": "untracked"},
    "renorm": {"renorm": (1.5, 0.5)},
    "ghost": {"virtual_batch_size": 4},
    "given statistics": {"statistics": {"mean": jnp.asarray([0.5, -1.0, 3.0]),
                                        "var": jnp.asarray([2.0, 1.0, 3.0])}},
}


@pytest.mark.parametrize("with_residual", [False, True], ids=["alone", "residual"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_fused_equals_the_unfused_composition_in_float64(options, activation, with_residual):
    residual = RESIDUAL if with_residual else None
    expected = outputs_and_gradients(unfused, PARAMS, STATE, X, residual,
                                     activation=activation, **options)
    actual = outputs_and_gradients(fused, PARAMS, STATE, X, residual, activation=activation,
                                   **options)
    assert_relatively_close(actual, expected, 1e-10)


@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
@pytest.mark.parametrize("mode", ["tracked", "frozen"])
@pytest.mark.parametrize("activation", ["leaky_relu", "elu"])
def test_fused_equals_unfused_in_each_phase_and_mode_without_affine_too(activation, mode,
                                                                        training):
    for params in (PARAMS, {}):
        options = dict(activation=activation, mode=mode, training=training)
        assert_relatively_close(
            outputs_and_gradients(fused, params, STATE, X, RESIDUAL, **options),
            outputs_and_gradients(unfused, params, STATE, X, RESIDUAL, **options), 1e-10)


@pytest.mark.parametrize("group_size", [None, 2])
@pytest.mark.parametrize("activation", ["leaky_relu", "elu", "relu"])
def test_fused_equals_unfused_across_8_devices_with_a_mask(activation, group_size):
    mesh = jax.make_mesh((8,), ("data",))
    put = functools.partial(jax.device_put, device=NamedSharding(mesh, P("data")))

    def on_devices(call):
        def per_device(x, residual, mask, cotangent):
            y, state, grads = outputs_and_gradients(
                call, PARAMS, STATE, x, residual, cotangent=cotangent, activation=activation,
                mask=mask, axis_name="data", group_size=group_size)
            return y, state, grads[0], grads[1:]  # params' gradient: summed over devices
        return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=P("data"),
                                     out_specs=(P("data"), P(), P(), P("data"))))(
            put(X), put(RESIDUAL), put(MASK), put(COTANGENT))

    assert_relatively_close(on_devices(fused), on_devices(unfused), 1e-10)


@pytest.mark.parametrize("activation", ["leaky_relu", "elu"])
def test_accumulated_micro_batches_learn_as_unfused(activation):
    def accumulate(call):
        state = jbn.init(C, dtype=jnp.float64, accumulation_steps=2)[1]
        results = []
        for rows in (slice(0, 8), slice(8, 16)):
            y, state, grads = outputs_and_gradients(
                call, PARAMS, state, X[rows], RESIDUAL[rows], cotangent=COTANGENT[rows],
                activation=activation, accumulation_steps=2)
            results.append((y, grads))
        return results, state

    fused_run = accumulate(fused)
    assert_relatively_close(fused_run, accumulate(unfused), 1e-10)
    assert int(fused_run[1]["num_batches_tracked"]) == 1


@pytest.mark.parametrize("activation", ["leaky_relu", "elu"])
def test_per_example_vmap_with_a_named_batch_axis_equals_unfused(activation):
    def per_example(call):
        return outputs_and_gradients(
            lambda params, state, x, residual, training, activation: jax.vmap(
                lambda x, residual: call(params, state, x, residual, training, activation,
                                         axis=0, axis_name="batch"),
                axis_name="batch", out_axes=(0, None))(x, residual),
            PARAMS, STATE, X, RESIDUAL, activation=activation)
    assert_relatively_close(per_example(fused), per_example(unfused), 1e-10)
    assert_relatively_close(per_example(fused), outputs_and_gradients(
        unfused, PARAMS, STATE, X, RESIDUAL, activation=activation), 1e-10)


@pytest.mark.quick
@pytest.mark.parametrize("activation", ["leaky_relu", "elu"])
def test_forward_mode_and_second_derivatives_equal_the_unfused_ones(activation):
    def loss(call):
        return lambda w: jnp.sum(jnp.sin(call({**PARAMS, "weight": w}, STATE, X, RESIDUAL, True,
                                              activation)[0]))
    w = PARAMS["weight"]
    tangent = jnp.asarray([0.3, -1.0, 2.0])
    assert_relatively_close(jax.jvp(loss(fused), (w,), (tangent,)),
                            jax.jvp(loss(unfused), (w,), (tangent,)), 1e-10)
    assert_relatively_close(jax.hessian(loss(fused))(w), jax.hessian(loss(unfused))(w), 1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ratio", [1.0, 10.0, 100.0])
@pytest.mark.parametrize("activation", ["leaky_relu", "elu"])
def test_float32_at_mean_1e3_times_the_spread_stays_close_to_float64(activation, ratio, seed):
    """Data whose mean is 1e3 times its spread, and biases ``ratio`` times the weights in
    magnitude (the documented range reaches 100): the fused float32 gradients against the
    float64 ones, within 5e-5 of the largest of each."""
    rng = np.random.default_rng(seed)
    x = rng.normal(1e3, 1.0, (64, C, 8))
    weight = np.asarray([0.8, -0.5, 1.2])
    params = {"weight": weight, "bias": ratio * np.abs(weight) * np.asarray([1, -1, -1])}
    residual, cotangent = rng.normal(size=x.shape), rng.normal(size=x.shape)

    def run(call, dtype):  # on the float32 values, so that only the arithmetic differs
        def cast(value):
            return jnp.asarray(np.asarray(value, np.float32), dtype)
        return outputs_and_gradients(call, jax.tree.map(cast, params), {}, cast(x),
                                     cast(residual), cotangent=cast(cotangent),
                                     activation=activation)[2]

    assert_relatively_close(run(fused, jnp.float32), run(unfused, jnp.float64), 5e-5)


@pytest.mark.parametrize("weight", [0.0, -0.0, 1e-30, -1e-4, -2.0])
@pytest.mark.parametrize("activation", ["leaky_relu", "elu", "identity"])
def test_a_weight_at_or_near_zero_or_negative_gives_finite_outputs_and_gradients(activation,
                                                                                 weight):
    params = {"weight": jnp.asarray([weight, 1.0, weight]), "bias": PARAMS["bias"]}
    y, state, grads = outputs_and_gradients(fused, params, STATE, X, RESIDUAL,
                                            activation=activation)
    for leaf in jax.tree.leaves((y, state, grads)):
        assert np.all(np.isfinite(leaf))


def test_below_the_floor_the_weight_acts_with_the_floors_magnitude_and_still_learns():
    """A weight under 1e-3 in magnitude acts as ±1e-3 (0 as +), and its gradient is the one
    the floored weight has: a zero-initialized weight learns."""
    floor = 1e-3
    params = {"weight": jnp.asarray([0.0, -1e-5, 1e-5]), "bias": PARAMS["bias"]}
    floored = {"weight": jnp.asarray([floor, -floor, floor]), "bias": PARAMS["bias"]}
    actual = outputs_and_gradients(fused, params, STATE, X, RESIDUAL, activation="leaky_relu")
    expected = outputs_and_gradients(unfused, floored, STATE, X, RESIDUAL,
                                     activation="leaky_relu")
    assert_relatively_close(actual, expected, 1e-9)
    assert np.all(np.abs(actual[2][0]["weight"]) > 0)


def saved(function, *args):
    """The output of ``function`` and the arrays ``jax.vjp`` keeps for its backward pass."""
    y, backward = jax.vjp(function, *args)
    return y, jax.tree.leaves(backward)


def saved_bytes(function, *args):
    return sum(leaf.nbytes for leaf in saved(function, *args)[1])


@pytest.mark.parametrize("with_residual", [False, True], ids=["alone", "residual"])
@pytest.mark.parametrize("activation", ["leaky_relu", "elu", "identity"])
def test_the_backward_keeps_the_output_and_vectors_where_unfused_keeps_the_input(
        activation, with_residual):
    """Of x's size, the fused backward keeps y (which the next layer keeps) and the residual
    (an input the network holds: the block's input or its shortcut), nothing else."""
    x = jnp.asarray(RNG.normal(2, 1, (32, 16, 8, 8)), jnp.float32)
    residual = jnp.asarray(RNG.normal(size=x.shape), jnp.float32) if with_residual else None
    params, state = jbn.init(16)
    y, kept = saved(lambda p, x: fused(p, state, x, residual, True, activation)[0], params, x)
    large = [leaf for leaf in kept if leaf.size >= x.size]
    assert len(large) == 1 + with_residual
    assert all(leaf is y or leaf is residual for leaf in large)
    assert sum(leaf.nbytes for leaf in kept) - (residual.nbytes if with_residual else 0) <= (
        1.05 * x.nbytes)
    y, kept = saved(lambda p, x: unfused(p, state, x, residual, True, activation)[0], params, x)
    assert not any(leaf is y for leaf in kept)
    assert sum(leaf.nbytes for leaf in kept if leaf.size >= x.size) >= x.nbytes


@pytest.mark.parametrize("with_residual", [False, True], ids=["alone", "residual"])
def test_relu_keeps_no_more_than_the_unfused_composition(with_residual):
    x = jnp.asarray(RNG.normal(2, 1, (32, 16, 8, 8)), jnp.float32)
    residual = jnp.ones_like(x) if with_residual else None
    params, state = jbn.init(16)
    kept = saved_bytes(lambda p, x: fused(p, state, x, residual, True, "relu")[0], params, x)
    kept_unfused = saved_bytes(lambda p, x: unfused(p, state, x, residual, True, "relu")[0],
                               params, x)
    assert kept <= kept_unfused


BAD = [
    (dict(activation="gelu"), ValueError,
     r"^activation must be one of \['identity', 'relu', 'leaky_relu', 'elu'\] or None, "
     r"got 'gelu'$"),
    (dict(activation=1), TypeError, r"^activation must be a str"),
    (dict(activation="leaky_relu", activation_param=0.0), ValueError,
     r"^activation_param of 'leaky_relu' must be > 0 \(invertible\), got 0.0$"),
    (dict(activation="elu", activation_param=True), TypeError,
     r"^activation_param must be a float, got True$"),
    (dict(activation="relu", activation_param=0.1), ValueError,
     r"^activation 'relu' takes no activation_param, got 0.1$"),
    (dict(activation_param=0.1), ValueError, r"^activation_param=0.1 goes with activation"),
    (dict(residual=jnp.ones((16, C, 1))), ValueError,
     r"^residual must have x's shape and dtype, \(16, 3, 5\) float64; got \(16, 3, 1\) "
     r"float64$"),
    (dict(residual=jnp.ones((16, C, 5), jnp.float32)), ValueError,
     r"^residual must have x's shape and dtype"),
    (dict(residual=[1.0]), TypeError, r"^residual must be an array, got list$"),
]


@pytest.mark.parametrize("keywords, error, message", BAD)
def test_bad_activation_or_residual_is_a_clear_error(keywords, error, message):
    with pytest.raises(error, match=message):
        jbn.batchnorm(PARAMS, STATE, X, True, **keywords)


def test_the_layers_take_the_activation_when_built_and_the_residual_per_call():
    import equinox as eqx

    import jbn.equinox
    import jbn.linen
    import jbn.nnx

    x = jnp.moveaxis(X, 1, -1)  # channels last, as the Flax layers default
    residual = jnp.moveaxis(RESIDUAL, 1, -1)
    expected, expected_state = fused(jbn.init(C, dtype=jnp.float64)[0], STATE, X, RESIDUAL,
                                     True, "elu", activation_param=0.5)
    expected = jnp.moveaxis(expected, 1, -1)

    layer = jbn.nnx.BatchNorm(C, param_dtype=jnp.float64, activation="elu",
                              activation_param=0.5)
    assert_trees_close(layer(x, residual=residual), expected, rtol=1e-12)
    assert_trees_close(layer.state, expected_state, rtol=1e-12)

    linen = jbn.linen.BatchNorm(param_dtype=jnp.float64, activation="elu", activation_param=0.5)
    variables = linen.init(jax.random.key(0), x, use_running_average=True, residual=residual)
    y, updates = linen.apply(variables, x, use_running_average=False, residual=residual,
                             mutable=["batch_stats"])
    assert_trees_close((y, updates["batch_stats"]), (expected, expected_state), rtol=1e-12)

    equinox, state = eqx.nn.make_with_state(jbn.equinox.BatchNorm)(
        C, dtype=jnp.float64, axis=1, activation="elu", activation_param=0.5)
    y, state = equinox(X, state, residual=RESIDUAL)
    assert_trees_close(y, jnp.moveaxis(expected, -1, 1), rtol=1e-12)
    with pytest.raises(ValueError, match=r"^activation must be one of"):
        jbn.nnx.BatchNorm(C, activation="gelu")


def test_whole_model_folding_keeps_the_activation_and_residual_after_the_folded_layer():
    import equinox as eqx
    from flax import nnx

    import jbn.equinox
    import jbn.nnx

    class Block(nnx.Module):
        def __init__(self):
            self.conv = nnx.Conv(3, 3, (1, 1), rngs=nnx.Rngs(0))
            self.bn = jbn.nnx.BatchNorm(3, activation="elu", activation_param=0.5)

        def __call__(self, x):
            return self.bn(self.conv(x), residual=x)

    model = Block()
    model.bn.running_mean[...] = jnp.asarray([0.3, -0.2, 0.1], jnp.float32)
    model.bn.running_var[...] = jnp.asarray([2.0, 0.5, 1.5], jnp.float32)
    model.eval()
    x = jnp.asarray(RNG.normal(size=(2, 5, 5, 3)), jnp.float32)
    folded, report = jbn.nnx.fold_model(model, x)
    assert report.pairs == (("conv", "bn"),) and report.left == {}
    np.testing.assert_allclose(folded(x), model(x), rtol=1e-5, atol=1e-6)
    assert report.max_difference <= 1e-5

    class Stem(eqx.Module):
        conv: eqx.nn.Conv2d
        bn: jbn.equinox.BatchNorm

        def __init__(self):
            self.conv = eqx.nn.Conv2d(3, 3, 1, key=jax.random.key(0))
            self.bn = jbn.equinox.BatchNorm(3, "batch", inference=True,
                                            activation="leaky_relu")

        def __call__(self, x, state):
            return self.bn(self.conv(x), state)

    stem, state = eqx.nn.make_with_state(Stem)()
    images = jnp.moveaxis(x, -1, 1).astype(jnp.float64)  # Equinox layers: float64 here
    def forward(model, state, x):
        return jax.vmap(lambda x: model(x, state)[0], axis_name="batch")(x)

    folded, report = jbn.equinox.fold_model(stem, state, images, forward=forward)
    assert report.pairs == (("conv", "bn"),) and report.left == {}
    np.testing.assert_allclose(forward(folded, state, images), forward(stem, state, images),
                               rtol=1e-5, atol=1e-6)
