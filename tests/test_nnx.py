"""The Flax NNX layer: it follows Flax's conventions (arguments, channels last), matches
``nnx.BatchNorm`` where their semantics agree, is the functional ``jbn.batchnorm`` call
(outputs, state, gradients), trains under ``nnx.jit``, switches phase the NNX way (``eval``,
``nnx.view``, a per-call ``use_running_average``), and takes per-call options and modes.

References are ``nnx.BatchNorm`` itself and the functional call.
"""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jbn
import jbn.nnx
from helpers import (
    KEYWORDS,
    LAYER_CHANNELS,
    NNX_KEYWORDS,
    assert_close_ulps,
    assert_trees_close,
    cotangent_like,
    data,
    functional,
    functional_from_init,
    nhwc_images,
    numpy_init,
    reference_training,
    training_data,
)

C = LAYER_CHANNELS


class NNXCNN(nnx.Module):
    """An NHWC convolution followed by a batch norm built by ``norm``."""

    def __init__(self, norm):
        rngs = nnx.Rngs(0)
        self.conv1 = nnx.Conv(3, 8, (3, 3), kernel_init=numpy_init, rngs=rngs)
        self.bn1 = norm(8)
        self.head = nnx.Linear(8, 2, kernel_init=numpy_init, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.bn1(self.conv1(x))).mean(axis=(1, 2)))


def train_nnx(model, batches, target):
    """The model's outputs before each SGD step under nnx.jit."""
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x):
        def loss(model):
            y = model(x)
            return jnp.mean((y - target) ** 2), y

        (_, y), grads = nnx.value_and_grad(loss, has_aux=True)(model)
        optimizer.update(model, grads)
        return y

    return [step(model, optimizer, x) for x in batches]


# ---------------------------------------------------------------------------------------
# Flax's conventions, and nnx.BatchNorm


def test_nnx_cnn_trained_under_nnx_jit_matches_nnx_batchnorm():
    batches = [nhwc_images(seed)[..., :3] for seed in range(3)]
    target = jnp.asarray(np.random.default_rng(9).normal(size=(4, 2)), jnp.float32)
    # Flax's momentum 0.9 is jbn's 0.1.
    flax_model = NNXCNN(lambda c: nnx.BatchNorm(c, momentum=0.9, use_fast_variance=False,
                                                rngs=nnx.Rngs(1)))
    jbn_model = NNXCNN(lambda c: jbn.nnx.BatchNorm(c, rngs=nnx.Rngs(1)))
    flax_outputs = train_nnx(flax_model, batches, target)
    jbn_outputs = train_nnx(jbn_model, batches, target)
    # float32 rounding, through three steps of training
    np.testing.assert_allclose(jbn_outputs, flax_outputs, rtol=1e-5, atol=1e-6)
    flax_bn, jbn_bn = flax_model.bn1, jbn_model.bn1
    np.testing.assert_allclose(jbn_bn.running_mean[...], flax_bn.mean[...], rtol=1e-5,
                               atol=1e-6)
    # Both average from 1 with weight 0.1 per step, Flax the biased batch variance, jbn the
    # unbiased one, n/(n − 1) times larger (docs/frameworks.md).
    n, start = 4 * 8 * 8, 0.9 ** len(batches)
    np.testing.assert_allclose(jbn_bn.running_var[...] - start,
                               (flax_bn.var[...] - start) * n / (n - 1), rtol=1e-5)
    assert int(jbn_bn.num_batches_tracked[...]) == len(batches)


def test_nnx_layer_normalizes_the_last_axis_of_nhwc_where_h_equals_c():
    x = nhwc_images()  # (4, 8, 8, 8): axis 1 (H) has C's size, nothing tells them apart
    y = jbn.nnx.BatchNorm(8)(x)
    np.testing.assert_allclose(y.mean(axis=(0, 1, 2)), 0, atol=1e-6)
    np.testing.assert_allclose(y.var(axis=(0, 1, 2)), 1, atol=1e-4)
    expected = nnx.BatchNorm(8, use_fast_variance=False, rngs=nnx.Rngs(0))(x)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.quick
def test_nnx_layer_names_the_axis_to_pass_for_channels_first_input():
    with pytest.raises(ValueError, match=r"x has 5 channels at axis -1 \(x of shape "
                                         r"\(4, 8, 5, 5\)\), params\['weight'\] has 8; axis 1 "
                                         r"of x has size 8: pass axis=1"):
        jbn.nnx.BatchNorm(8)(jnp.ones((4, 8, 5, 5)))


def test_nnx_layer_takes_flax_arguments_and_shows_them_in_its_signature():
    parameters = inspect.signature(jbn.nnx.BatchNorm.__init__).parameters
    flax_parameters = inspect.signature(nnx.BatchNorm.__init__).parameters
    shared = {"num_features", "use_running_average", "axis", "momentum", "epsilon", "dtype",
              "param_dtype", "use_bias", "use_scale", "axis_name", "axis_index_groups", "rngs"}
    assert shared <= set(parameters) & set(flax_parameters)
    assert {"track_running_stats", "mode", "renorm", "virtual_batch_size"} <= set(parameters)
    assert parameters["axis"].default == flax_parameters["axis"].default == -1

    layer = jbn.nnx.BatchNorm(C, epsilon=0.5, use_bias=False, param_dtype=jnp.bfloat16,
                              dtype=jnp.float16, rngs=nnx.Rngs(0))
    assert layer.bias is None and layer.weight[...].dtype == jnp.bfloat16
    assert layer.running_mean[...].dtype == jnp.float32  # statistics in float32 (Numerics)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, C)), jnp.float32)
    y = layer(x)
    assert y.dtype == jnp.float16
    expected, _ = jbn.batchnorm({"weight": jnp.ones(C, jnp.bfloat16)}, jbn.init(C)[1],
                                x.astype(jnp.float16), True, eps=0.5, axis=-1)
    np.testing.assert_array_equal(y, expected)
    with pytest.raises(ValueError, match=r"use_bias=True with use_scale=False is a bias "
                                         r"without a weight"):
        jbn.nnx.BatchNorm(C, use_scale=False)


# ---------------------------------------------------------------------------------------
# The functional call, under NNX's transforms


@pytest.mark.parametrize("axis", [1, -1])
def test_nnx_layer_is_the_functional_call_in_outputs_state_and_gradients(axis):
    x, mask = data()
    x = jnp.moveaxis(x, 1, axis)
    layer = jbn.nnx.BatchNorm(C, param_dtype=jnp.float64, axis=axis, **NNX_KEYWORDS)
    y, new_state, grads, x_grad = functional(layer.params, layer.state, x, mask, axis)

    @nnx.jit
    def gradients(layer, x, mask):  # mask an argument, as in the reference: the same program
        def loss(layer, x):
            y = layer(x, mask=mask)
            return jnp.sum(y * cotangent_like(x)), y

        return nnx.grad(loss, argnums=(0, 1), has_aux=True)(layer, x)

    (layer_grads, layer_x_grad), layer_y = gradients(layer, x, mask)
    assert_trees_close(layer_y, y, rtol=0)
    # The update inside nnx.grad reached the layer.
    assert_trees_close(layer.state, new_state, rtol=0)
    assert_trees_close((layer_grads["weight"][...], layer_grads["bias"][...], layer_x_grad),
                       (grads["weight"], grads["bias"], x_grad), rtol=0)


@pytest.mark.quick
def test_nnx_eval_and_view_switch_to_the_running_statistics():
    x, _ = data()
    layer = jbn.nnx.BatchNorm(C, param_dtype=jnp.float64, axis=1, **NNX_KEYWORDS)
    layer(x)
    trained = layer.state
    expected, _ = jbn.batchnorm(layer.params, trained, x + 1, False, **KEYWORDS)

    layer.eval()
    assert_trees_close(layer(x + 1), expected, rtol=0)
    assert_trees_close(layer.state, trained, rtol=0)  # eval leaves the state alone
    in_training = nnx.view(layer, use_running_average=False)
    in_training(x + 1)
    assert int(in_training.num_batches_tracked[...]) == 2
    count = int(layer.num_batches_tracked[...])
    layer(x + 1, use_running_average=False)  # this call only
    assert int(layer.num_batches_tracked[...]) == count + 1 and layer.use_running_average


class NNXNet(nnx.Module):
    def __init__(self, kernel):
        self.kernel = nnx.Param(kernel)
        self.bn = jbn.nnx.BatchNorm(C, param_dtype=jnp.float64, **NNX_KEYWORDS)

    def __call__(self, x):
        return self.bn(x @ self.kernel[...])


def test_nnx_model_trains_under_nnx_jit_and_value_and_grad_as_the_functional_model():
    kernel, batches, target = training_data()
    model = NNXNet(kernel)

    @nnx.jit
    def step(model, x):
        def loss(model):
            return jnp.mean((model(x) - target) ** 2)

        value, grads = nnx.value_and_grad(loss)(model)
        nnx.update(model, jax.tree.map(lambda p, g: p - 0.1 * g, nnx.state(model, nnx.Param),
                                       grads))
        return value

    losses = [step(model, x) for x in batches]
    expected_losses, params, state = reference_training(kernel, batches, target)
    assert_close_ulps(losses, expected_losses)
    assert_close_ulps((model.kernel[...], model.bn.params, model.bn.state),
                      (params["kernel"], params["bn"], state))
    assert int(model.bn.num_batches_tracked[...]) == 3


def test_nnx_layer_passes_mask_and_axis_name_on_under_vmap():
    x, mask = data()
    layer = jbn.nnx.BatchNorm(C, param_dtype=jnp.float64, axis=0, axis_name="batch",
                              **NNX_KEYWORDS)
    graphdef, variables = nnx.split(layer)

    def per_example(variables, x, mask):  # NNX's functional API: merge, call, split
        layer = nnx.merge(graphdef, variables)
        return layer(x, mask=mask), nnx.state(layer)

    y, variables = jax.jit(jax.vmap(per_example, axis_name="batch", in_axes=(None, 0, 0),
                                    out_axes=(0, None)))(variables, x, mask)
    nnx.update(layer, variables)
    expected, expected_state = functional_from_init(x, mask)
    assert_close_ulps(y, expected)
    assert_close_ulps(layer.state, expected_state)


def test_nnx_layer_and_its_call_work_under_nnx_eval_shape_and_jax_eval_shape():
    for eval_shape in (nnx.eval_shape, jax.eval_shape):
        layer = eval_shape(lambda: jbn.nnx.BatchNorm(8, rngs=nnx.Rngs(0)))
        leaves = jax.tree.leaves(nnx.state(layer))
        assert len(leaves) == 5
        assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves)
    y = nnx.eval_shape(lambda layer, x: layer(x), jbn.nnx.BatchNorm(8), nhwc_images())
    assert y.shape == (4, 8, 8, 8) and y.dtype == jnp.float32


# ---------------------------------------------------------------------------------------
# Per-call options and modes


def test_a_renorm_schedule_under_nnx_jit_compiles_once():
    traces = []
    layer = jbn.nnx.BatchNorm(C, axis=1, renorm=(jnp.asarray(1.0), jnp.asarray(0.0)))

    @nnx.jit
    def step(layer, x, limits):
        traces.append(None)
        return layer(x), layer(x, renorm=limits)

    x = data()[0].astype(jnp.float32)
    for t in range(3):
        step(layer, x, (jnp.asarray(1.0 + t), jnp.asarray(0.5 * t)))
        layer.renorm = (jnp.asarray(1.0 + t), jnp.asarray(0.5 * t))  # the layer's, as data
    assert len(traces) == 1


def test_a_trained_nnx_layer_set_to_untracked_adapts_to_each_batch_and_keeps_its_state():
    x, _ = data()
    layer = jbn.nnx.BatchNorm(C, axis=1, param_dtype=jnp.float64)
    layer(x)
    trained = layer.state
    layer.eval()
    layer.mode = "untracked"  # test-time adaptation
    expected, _ = jbn.batchnorm(layer.params, {}, x + 1, True)
    assert_trees_close(layer(x + 1), expected, rtol=0)
    assert_trees_close(layer.state, trained, rtol=0)


def test_frozen_nnx_layers_hold_no_params_and_an_optimizer_leaves_them_alone():
    model = NNXCNN(lambda c: jbn.nnx.BatchNorm(c, mode="frozen"))
    model.bn1.running_mean[...] = jnp.linspace(-1, 1, 8, dtype=jnp.float32)
    assert nnx.state(model.bn1, nnx.Param) == nnx.State({})
    assert set(model.bn1.state) == {"running_mean", "running_var"}
    before = nnx.clone(nnx.state(model, nnx.BatchStat))
    x = nhwc_images()[..., :3]
    train_nnx(model, [x], jnp.zeros((4, 2)))
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model, nnx.BatchStat), before)
    model.eval()
    h = model.conv1(x)
    np.testing.assert_array_equal(model.bn1(h), jbn.batchnorm(
        model.bn1.params, model.bn1.state, h, True, mode="frozen", axis=-1)[0])
