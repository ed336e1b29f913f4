"""The Flax NNX and Equinox layers: each follows its framework's conventions (arguments, channel
axis, per-example batches), matches the framework's own batch norm where their semantics
agree, is the functional ``jbn.batchnorm`` call (outputs, state, gradients), switches phase
and mode the framework's way, takes per-call options, and converts to and from a PyTorch
state_dict through ``from_torch_model``.

References are ``nnx.BatchNorm`` and ``eqx.nn.BatchNorm`` themselves, the functional call,
and real ``torch.nn`` modules (and torchvision's ``FrozenBatchNorm2d``, in ``helpers``).
"""

import functools
import inspect

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

import jbn
import jbn.equinox
import jbn.nnx
from helpers import FrozenBatchNorm2d, assert_close_ulps

C = 3
KEYWORDS = {"momentum": None, "eps": 1e-3}  # not the defaults, so passing them on shows
NNX_KEYWORDS = {"momentum": None, "epsilon": 1e-3}  # the same, by Flax's names


def data(shape=(6, C, 5), seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(np.linspace(-2, 3, C)[:, None], np.linspace(0.5, 2, C)[:, None], shape)
    mask = rng.random(shape[:1] + shape[2:]) < 0.7
    return jnp.asarray(x), jnp.asarray(mask)


def cotangent_like(x):
    return jnp.cos(jnp.arange(x.size).reshape(x.shape))


@functools.partial(jax.jit, static_argnames="axis")
def functional(params, state, x, mask, axis):
    """The reference, in training: y, the new state, and the gradients of
    sum(y · cotangent) with respect to params and x."""
    def loss(params, x):
        y, new_state = jbn.batchnorm(params, state, x, True, axis=axis, mask=mask, **KEYWORDS)
        return jnp.sum(y * cotangent_like(x)), (y, new_state)

    (grads, x_grad), (y, new_state) = jax.grad(loss, argnums=(0, 1), has_aux=True)(params, x)
    return y, new_state, grads, x_grad


@jax.jit
def functional_from_init(x, mask):
    """The reference for a fresh layer: y and the new state, in training."""
    return jbn.batchnorm(*jbn.init(C, dtype=jnp.float64), x, True, mask=mask, **KEYWORDS)


def assert_same(actual, expected):
    jax.tree.map(lambda a, e: np.testing.assert_array_equal(np.asarray(a), np.asarray(e)),
                 actual, expected)


def assert_close(actual, expected):
    """Floating leaves equal up to rounding (the same operations, traced otherwise), integer
    leaves exactly."""
    def check(a, e):
        if jnp.issubdtype(jnp.result_type(e), jnp.integer):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(e))
        else:
            assert_close_ulps(a, e)

    jax.tree.map(check, actual, expected)


def nhwc_images(seed=0, shape=(4, 8, 8, 8)):
    """Channels last, each channel with its own mean and spread; H = W = C = 8."""
    rng = np.random.default_rng(seed)
    channels = shape[-1]
    return jnp.asarray(rng.normal(np.linspace(-3, 3, channels), np.linspace(0.5, 2, channels),
                                  shape), jnp.float32)


# ---------------------------------------------------------------------------------------
# Flax NNX: its conventions, and nnx.BatchNorm


def numpy_init(key, shape, dtype):
    """Kernels drawn by NumPy, the same for every model of one shape (and quicker to make on
    a CPU than jax.random's, compiled for each shape)."""
    del key
    fan_in = np.prod(shape[:-1])
    return jnp.asarray(np.random.default_rng(shape).normal(0, fan_in**-0.5, shape), dtype)


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
    assert_same(layer_y, y)
    assert_same(layer.state, new_state)  # the update inside nnx.grad reached the layer
    assert_same((layer_grads["weight"][...], layer_grads["bias"][...], layer_x_grad),
                (grads["weight"], grads["bias"], x_grad))


def test_nnx_eval_and_view_switch_to_the_running_statistics():
    x, _ = data()
    layer = jbn.nnx.BatchNorm(C, param_dtype=jnp.float64, axis=1, **NNX_KEYWORDS)
    layer(x)
    trained = layer.state
    expected, _ = jbn.batchnorm(layer.params, trained, x + 1, False, **KEYWORDS)

    layer.eval()
    assert_same(layer(x + 1), expected)
    assert_same(layer.state, trained)  # eval leaves the state alone
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


def reference_training(kernel, batches, target, learning_rate=0.1):
    """Losses, final params and state of ``bn(x @ kernel)`` trained on mean squared error,
    in functional jbn."""
    bn_params, state = jbn.init(C, dtype=jnp.float64)
    params = {"kernel": kernel, "bn": bn_params}

    @jax.jit
    def step(params, state, x):
        def loss(params):
            y, new_state = jbn.batchnorm(params["bn"], state, x @ params["kernel"], True,
                                         **KEYWORDS)
            return jnp.mean((y - target) ** 2), new_state

        (value, state), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return value, jax.tree.map(lambda p, g: p - learning_rate * g, params, grads), state

    losses = []
    for x in batches:
        value, params, state = step(params, state, x)
        losses.append(value)
    return losses, params, state


def training_data():
    rng = np.random.default_rng(3)
    kernel = jnp.asarray(rng.normal(size=(4, C)))
    batches = [jnp.asarray(rng.normal(1, 2, (8, 4))) for _ in range(3)]
    return kernel, batches, jnp.asarray(rng.normal(size=(8, C)))


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
    assert_close(losses, expected_losses)
    assert_close((model.kernel[...], model.bn.params, model.bn.state),
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
    assert_close(y, expected)
    assert_close(layer.state, expected_state)


def test_nnx_layer_and_its_call_work_under_nnx_eval_shape_and_jax_eval_shape():
    for eval_shape in (nnx.eval_shape, jax.eval_shape):
        layer = eval_shape(lambda: jbn.nnx.BatchNorm(8, rngs=nnx.Rngs(0)))
        leaves = jax.tree.leaves(nnx.state(layer))
        assert len(leaves) == 5
        assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves)
    y = nnx.eval_shape(lambda layer, x: layer(x), jbn.nnx.BatchNorm(8), nhwc_images())
    assert y.shape == (4, 8, 8, 8) and y.dtype == jnp.float32


# ---------------------------------------------------------------------------------------
# Equinox: its conventions, and eqx.nn.BatchNorm


class EquinoxCNN(eqx.Module):
    """One example (channels first) through a 1×1 convolution and a batch norm built by
    ``norm``."""

    kernel: jax.Array
    bn: eqx.Module
    head: jax.Array

    def __init__(self, norm):
        self.kernel = numpy_init(None, (8, 3), jnp.float32)
        self.bn = norm(8)
        self.head = numpy_init(None, (2, 8), jnp.float32)

    def __call__(self, x, state):
        h, state = self.bn(jnp.einsum("oi,ihw->ohw", self.kernel, x), state)
        return self.head @ jax.nn.relu(h).mean(axis=(1, 2)), state


def train_equinox(model, state, batches, target):
    """The model's outputs before each SGD step under eqx.filter_jit, and the final model
    and state."""
    batched = jax.vmap(lambda model, x, state: model(x, state), axis_name="batch",
                       in_axes=(None, 0, None), out_axes=(0, None))

    @eqx.filter_jit
    def step(model, state, x):
        def loss(model):
            y, new_state = batched(model, x, state)
            return jnp.mean((y - target) ** 2), (y, new_state)

        (_, (y, state)), grads = eqx.filter_value_and_grad(loss, has_aux=True)(model)
        return y, eqx.apply_updates(model, jax.tree.map(lambda g: -0.1 * g, grads)), state

    outputs = []
    for x in batches:
        y, model, state = step(model, state, x)
        outputs.append(y)
    return outputs, model, state


def test_equinox_cnn_matches_eqx_batchnorm_batch_mode_and_runs_inference_outside_vmap():
    batches = [jnp.moveaxis(nhwc_images(seed)[..., :3], -1, 1) for seed in range(3)]
    target = jnp.asarray(np.random.default_rng(9).normal(size=(4, 2)), jnp.float32)
    eqx_model, eqx_state = eqx.nn.make_with_state(EquinoxCNN)(
        lambda c: eqx.nn.BatchNorm(c, "batch", momentum=0.9, mode="batch",
                                   dtype=jnp.float32))
    model, state = eqx.nn.make_with_state(EquinoxCNN)(
        lambda c: jbn.equinox.BatchNorm(c, "batch", dtype=jnp.float32))
    eqx_outputs, eqx_model, eqx_state = train_equinox(eqx_model, eqx_state, batches, target)
    outputs, model, state = train_equinox(model, state, batches, target)
    np.testing.assert_allclose(outputs, eqx_outputs, rtol=1e-5, atol=1e-6)
    eqx_mean, eqx_var = eqx_state.get(eqx_model.bn.batch_state_index)
    running = model.bn.layer_state(state)
    np.testing.assert_allclose(running["running_mean"], eqx_mean, rtol=1e-5, atol=1e-6)
    n, start = 4 * 8 * 8, 0.9 ** len(batches)  # biased against unbiased, as for NNX
    np.testing.assert_allclose(running["running_var"] - start, (eqx_var - start) * n / (n - 1),
                               rtol=1e-5)

    inference = eqx.nn.inference_mode(model)
    one, _ = inference(batches[0][0], state)  # one example, no vmap: no axis to bind
    unnamed, _ = jax.vmap(inference, in_axes=(0, None), out_axes=(0, None))(batches[0], state)
    named, _ = jax.vmap(inference, axis_name="batch", in_axes=(0, None),
                        out_axes=(0, None))(batches[0], state)
    np.testing.assert_allclose(one, named[0], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(unnamed, named)


def test_equinox_layer_takes_equinox_arguments_and_asks_for_the_batch_axis():
    parameters = inspect.signature(jbn.equinox.BatchNorm.__init__).parameters
    eqx_parameters = inspect.signature(eqx.nn.BatchNorm.__init__).parameters
    positional = ["self", "input_size", "axis_name", "eps", "channelwise_affine", "momentum",
                  "inference", "dtype"]
    assert list(parameters)[:8] == positional == list(eqx_parameters)[:8]
    layer, state = eqx.nn.make_with_state(jbn.equinox.BatchNorm)(
        C, "batch", 0.5, False, dtype=jnp.bfloat16)
    assert layer.weight is None and layer.eps == 0.5 and layer.axis == 0
    assert layer.layer_state(state)["running_mean"].dtype == jnp.float32
    with pytest.raises(ValueError, match=r"axis=0 is the channel axis of one example, whose "
                                         r"batch is a jax.vmap axis: name it"):
        jbn.equinox.BatchNorm(C)
    with pytest.raises(ValueError, match=r"got 'batch': eqx\.nn\.BatchNorm's mode chooses"):
        layer, state = eqx.nn.make_with_state(jbn.equinox.BatchNorm)(C, axis=1, mode="batch")
        layer(jnp.ones((4, C)), state)


@pytest.mark.parametrize("axis", [1, -1])
def test_equinox_layer_on_a_whole_batch_is_the_functional_call(axis):
    x, mask = data()
    x = jnp.moveaxis(x, 1, axis)
    layer, state = eqx.nn.make_with_state(jbn.equinox.BatchNorm)(
        C, dtype=jnp.float64, axis=axis, **KEYWORDS)
    y, new_state, grads, x_grad = functional(layer.layer_params(state),
                                             layer.layer_state(state), x, mask, axis)

    def loss(layer_and_x, state, mask):  # mask an argument, as in the reference
        layer, x = layer_and_x
        y, state = layer(x, state, mask=mask)
        return jnp.sum(y * cotangent_like(x)), (y, state)

    (layer_grads, layer_x_grad), (layer_y, state) = eqx.filter_jit(
        eqx.filter_grad(loss, has_aux=True))((layer, x), state, mask)
    assert_same(layer_y, y)
    assert_same(layer.layer_state(state), new_state)
    assert_same((layer_grads.weight, layer_grads.bias, layer_x_grad),
                (grads["weight"], grads["bias"], x_grad))


def test_equinox_inference_mode_switches_to_the_running_statistics():
    x, _ = data()
    layer, state = eqx.nn.make_with_state(jbn.equinox.BatchNorm)(C, dtype=jnp.float64, axis=1,
                                                                  **KEYWORDS)
    _, state = layer(x, state)
    trained = layer.layer_state(state)
    expected, _ = jbn.batchnorm(layer.layer_params(state), trained, x + 1, False, **KEYWORDS)

    inference = eqx.nn.inference_mode(layer)
    y, state = inference(x + 1, state)
    assert_same(y, expected)
    assert_same(inference.layer_state(state), trained)
    _, state = layer(x + 1, state, inference=False)
    assert int(layer.layer_state(state)["num_batches_tracked"]) == 2


def test_equinox_sequential_threads_the_layer_state():
    x, _ = data()
    model, state = eqx.nn.make_with_state(eqx.nn.Sequential)(
        [jbn.equinox.BatchNorm(C, dtype=jnp.float64, axis=1, **KEYWORDS),
         eqx.nn.Lambda(jnp.tanh)])
    y, state = model(x, state)
    expected, expected_state = jbn.batchnorm(*jbn.init(C, dtype=jnp.float64), x, True,
                                             **KEYWORDS)
    assert_same(y, jnp.tanh(expected))
    assert_same(model.layers[0].layer_state(state), expected_state)


class EquinoxNet(eqx.Module):
    kernel: jax.Array
    bn: jbn.equinox.BatchNorm

    def __init__(self, kernel):
        self.kernel = kernel
        self.bn = jbn.equinox.BatchNorm(C, dtype=jnp.float64, axis=-1, **KEYWORDS)

    def __call__(self, x, state):
        return self.bn(x @ self.kernel, state)


def test_equinox_model_trains_under_filter_jit_and_value_and_grad_as_the_functional_model():
    kernel, batches, target = training_data()
    model, state = eqx.nn.make_with_state(EquinoxNet)(kernel)

    @eqx.filter_jit
    def step(model, state, x):
        def loss(model):
            y, new_state = model(x, state)
            return jnp.mean((y - target) ** 2), new_state

        (value, state), grads = eqx.filter_value_and_grad(loss, has_aux=True)(model)
        model = eqx.apply_updates(model, jax.tree.map(lambda g: -0.1 * g, grads))
        return value, model, state

    losses = []
    for x in batches:
        value, model, state = step(model, state, x)
        losses.append(value)
    expected_losses, params, expected_state = reference_training(kernel, batches, target)
    assert_close(losses, expected_losses)
    assert_close((model.kernel, model.bn.layer_params(state), model.bn.layer_state(state)),
                 (params["kernel"], params["bn"], expected_state))


def test_equinox_layer_passes_mask_and_axis_name_on_per_example_under_vmap():
    x, mask = data()
    layer, state = eqx.nn.make_with_state(jbn.equinox.BatchNorm)(
        C, "batch", dtype=jnp.float64, **KEYWORDS)
    per_example = jax.vmap(lambda x, state, mask: layer(x, state, mask=mask),
                           axis_name="batch", in_axes=(0, None, 0), out_axes=(0, None))
    y, state = eqx.filter_jit(per_example)(x, state, mask)
    expected, expected_state = functional_from_init(x, mask)
    assert_close(y, expected)
    assert_close(layer.layer_state(state), expected_state)


def test_equinox_layer_and_its_call_work_under_eval_shape():
    layer = eqx.filter_eval_shape(jbn.equinox.BatchNorm, 8, "batch")
    assert isinstance(layer.weight, jax.ShapeDtypeStruct) and layer.weight.shape == (8,)
    model, state = eqx.nn.make_with_state(jbn.equinox.BatchNorm)(8, "batch")
    batched = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    y, new_state = jax.eval_shape(batched, jnp.ones((4, 8, 5)), state)
    assert y.shape == (4, 8, 5)
    assert model.layer_state(new_state)["running_mean"].shape == (8,)


# ---------------------------------------------------------------------------------------
# Both: per-call options, modes, PyTorch state_dicts


def nnx_layer(**options):
    layer = jbn.nnx.BatchNorm(C, axis=1, param_dtype=jnp.float64, **options)
    return lambda x, **call: layer(x, **call), lambda: layer.state


def equinox_layer(**options):
    layer, state = eqx.nn.make_with_state(jbn.equinox.BatchNorm)(C, axis=1, dtype=jnp.float64,
                                                                  **options)
    states = [state]

    def call(x, **call):
        y, states[0] = layer(x, states[0], **call)
        return y

    return call, lambda: layer.layer_state(states[0])


LAYERS = {"nnx": nnx_layer, "equinox": equinox_layer}


@pytest.mark.parametrize("framework", LAYERS)
def test_layers_take_momentum_and_renorm_per_call(framework):
    x, _ = data()
    call, state = LAYERS[framework]()
    params, initial = jbn.init(C, dtype=jnp.float64)
    y = call(x, momentum=None, renorm=(2.0, 0.5))
    expected, expected_state = jbn.batchnorm(params, initial, x, True, momentum=None,
                                             renorm=(2.0, 0.5))
    assert_same((y, state()), (expected, expected_state))
    call(x)  # the layer's own again: momentum 0.1
    assert_close(state(), jbn.batchnorm(params, expected_state, x, True)[1])


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


def test_a_renorm_schedule_under_filter_jit_compiles_once_and_warns_of_nothing(recwarn):
    traces = []
    layer, state = eqx.nn.make_with_state(jbn.equinox.BatchNorm)(
        C, axis=1, renorm=(jnp.asarray(1.0), jnp.asarray(0.0)))

    @eqx.filter_jit
    def step(layer, state, x, limits):
        traces.append(None)
        return layer(x, state, renorm=limits)

    x = data()[0].astype(jnp.float32)
    for t in range(3):
        _, state = step(layer, state, x, (jnp.asarray(1.0 + t), jnp.asarray(0.5 * t)))
        layer = eqx.tree_at(lambda layer: layer.renorm, layer,
                            (jnp.asarray(1.0 + t), jnp.asarray(0.5 * t)))
    assert len(traces) == 1
    assert [str(warning.message) for warning in recwarn] == []


@pytest.mark.parametrize("framework", LAYERS)
def test_untracked_layers_normalize_with_the_batch_and_keep_their_state(framework):
    x, _ = data()
    call, state = LAYERS[framework](mode="untracked")
    before = state()
    expected, _ = jbn.batchnorm(*jbn.init(C, dtype=jnp.float64), x, True)
    assert_same(call(x), expected)
    assert_same(state(), before)


def test_a_trained_nnx_layer_set_to_untracked_adapts_to_each_batch_and_keeps_its_state():
    x, _ = data()
    layer = jbn.nnx.BatchNorm(C, axis=1, param_dtype=jnp.float64)
    layer(x)
    trained = layer.state
    layer.eval()
    layer.mode = "untracked"  # test-time adaptation
    expected, _ = jbn.batchnorm(layer.params, {}, x + 1, True)
    assert_same(layer(x + 1), expected)
    assert_same(layer.state, trained)


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


def test_frozen_equinox_layers_hold_no_trainable_arrays_and_keep_theirs_in_the_state():
    model, state = eqx.nn.make_with_state(EquinoxCNN)(
        lambda c: jbn.equinox.BatchNorm(c, mode="frozen"))
    trainable = eqx.filter(model.bn, eqx.is_inexact_array)
    assert jax.tree.leaves(trainable) == []
    assert set(model.bn.layer_params(state)) == {"weight", "bias"}
    _, _, new_state = train_equinox(model, state, [jnp.ones((4, 3, 8, 8), jnp.float32)],
                                    jnp.zeros((4, 2), jnp.float32))
    assert_same(model.bn.layer_state(new_state), model.bn.layer_state(state))


# ---------------------------------------------------------------------------------------
# Both: whole models folded for inference


FOLDED = (("stem.layers.0", "stem.layers.1"), ("block.conv1", "block.bn1"),
          ("block.conv2", "block.bn2"), ("head", "head_bn"))
LEFT = {
    "after_relu": "does not directly follow a Conv or Linear",
    "after_sum": "does not directly follow a Conv or Linear",
    "untracked": "normalizes with the batch's statistics in eval (no running statistics, or "
                 "mode 'untracked')",
    "shared_bn": "follows 'shared', whose output is not its alone",
}


class NNXFoldable(nnx.Module):
    """Each way a batch norm may or may not follow a layer: a Sequential stem, a residual
    block, an activation or a sum in between, an untracked batch norm, a layer whose output
    another layer takes too, and a Linear head."""

    def __init__(self):
        rngs = nnx.Rngs(0)

        def conv(bias=True):
            return nnx.Conv(4, 4, (3, 3), use_bias=bias, kernel_init=numpy_init, rngs=rngs)

        self.stem = nnx.Sequential(nnx.Conv(3, 4, (3, 3), kernel_init=numpy_init, rngs=rngs),
                                   jbn.nnx.BatchNorm(4))
        self.block = nnx.Dict(conv1=conv(bias=False), bn1=jbn.nnx.BatchNorm(4), conv2=conv(),
                              bn2=jbn.nnx.BatchNorm(4))
        self.after_relu, self.after_sum = jbn.nnx.BatchNorm(4), jbn.nnx.BatchNorm(4)
        self.plain, self.untracked = conv(), jbn.nnx.BatchNorm(4, mode="untracked")
        self.shared, self.shared_bn, self.other = conv(), jbn.nnx.BatchNorm(4), conv()
        self.head = nnx.Linear(4, 2, kernel_init=numpy_init, rngs=rngs)
        self.head_bn = jbn.nnx.BatchNorm(2)

    def __call__(self, x):
        h = nnx.relu(self.stem(x))
        block = self.block
        r = nnx.relu(block["bn1"](block["conv1"](h)))
        h = nnx.relu(h + block["bn2"](block["conv2"](r)))
        h = self.after_sum(h + self.after_relu(nnx.relu(h)))
        h = self.untracked(self.plain(h))
        shared = self.shared(h)
        h = self.shared_bn(shared) + self.other(shared)
        return self.head_bn(self.head(h.mean(axis=(1, 2))))


def trained_layers(params, states, seed=0):
    """Each batch norm's params and running statistics far from 1 and 0, as after training."""
    rng = np.random.default_rng(seed)

    def moved(key, value):
        if key[-1].key == "num_batches_tracked":
            return value
        low = 0.5 if key[-1].key in ("weight", "running_var") else -1.0
        return jnp.asarray(rng.uniform(low, 2.0, value.shape), value.dtype)

    return jax.tree_util.tree_map_with_path(moved, (params, states))


def test_nnx_fold_model_folds_each_batch_norm_right_after_a_layer_and_leaves_the_rest():
    model = NNXFoldable()
    jbn.nnx.set_layers(model, *trained_layers(*jbn.nnx.get_layers(model)))
    x = nhwc_images(5, (4, 6, 6, 3))
    outputs = nnx.jit(lambda model, x: model(x))
    folded, report = jbn.nnx.fold_model(model, x, forward=outputs)
    assert sorted(report.pairs) == sorted(FOLDED) and report.left == LEFT
    assert isinstance(model.block["bn1"], jbn.nnx.BatchNorm)  # the model is left as it was
    assert not model.block["conv1"].use_bias
    assert all(isinstance(folded.block[name], jbn.nnx.Folded) for name in ("bn1", "bn2"))
    assert isinstance(folded.after_relu, jbn.nnx.BatchNorm)
    assert len(jax.tree.leaves(nnx.state(folded, nnx.BatchStat))) == 3 * len(LEFT)
    model.eval()
    for inputs in (x, nhwc_images(6, (4, 6, 6, 3))):  # the input folded on, and another
        expected = outputs(model, inputs)
        difference = np.max(np.abs(outputs(folded, inputs) - expected))
        assert difference <= 1e-5 * np.max(np.abs(expected))  # float32 rounding
    assert report.max_difference == np.max(np.abs(outputs(folded, x) - outputs(model, x)))


class EquinoxFoldable(eqx.Module):
    """NNXFoldable's layers for one example, channels first."""

    stem: eqx.nn.Sequential
    block: dict
    after_relu: jbn.equinox.BatchNorm
    after_sum: jbn.equinox.BatchNorm
    plain: eqx.nn.Conv2d
    untracked: jbn.equinox.BatchNorm
    shared: eqx.nn.Conv2d
    shared_bn: jbn.equinox.BatchNorm
    other: eqx.nn.Conv2d
    head: eqx.nn.Linear
    head_bn: jbn.equinox.BatchNorm

    def __init__(self):
        nnx_model = NNXFoldable()

        def conv(nnx_conv):  # the NNX model's weights, as Equinox lays them out
            # Built abstract (no random initialization to compile), then given its arrays.
            layer = eqx.filter_eval_shape(eqx.nn.Conv2d, nnx_conv.in_features, 4, 3, padding=1,
                                          use_bias=nnx_conv.bias is not None,
                                          key=jax.random.key(0), dtype=jnp.float32)
            weight = jnp.transpose(nnx_conv.kernel[...], (3, 2, 0, 1))
            if nnx_conv.bias is None:
                return eqx.tree_at(lambda layer: layer.weight, layer, weight)
            return eqx.tree_at(lambda layer: (layer.weight, layer.bias), layer,
                               (weight, nnx_conv.bias[...].reshape(4, 1, 1)))

        def bn(channels=4, **options):
            return jbn.equinox.BatchNorm(channels, "batch", dtype=jnp.float32, **options)

        self.stem = eqx.nn.Sequential([conv(nnx_model.stem.layers[0]), bn()])
        self.block = {"conv1": conv(nnx_model.block["conv1"]), "bn1": bn(),
                      "conv2": conv(nnx_model.block["conv2"]), "bn2": bn()}
        self.after_relu, self.after_sum = bn(), bn()
        self.plain, self.untracked = conv(nnx_model.plain), bn(mode="untracked")
        self.shared, self.shared_bn = conv(nnx_model.shared), bn()
        self.other = conv(nnx_model.other)
        self.head = eqx.tree_at(
            lambda layer: (layer.weight, layer.bias),
            eqx.filter_eval_shape(eqx.nn.Linear, 4, 2, key=jax.random.key(0), dtype=jnp.float32),
            (nnx_model.head.kernel[...].T, nnx_model.head.bias[...]))
        self.head_bn = bn(2)

    def __call__(self, x, state):
        h, state = self.stem(x, state)
        h = jax.nn.relu(h)
        r, state = self.block["bn1"](self.block["conv1"](h), state)
        r, state = self.block["bn2"](self.block["conv2"](jax.nn.relu(r)), state)
        h = jax.nn.relu(h + r)
        r, state = self.after_relu(jax.nn.relu(h), state)
        h, state = self.after_sum(h + r, state)
        h, state = self.untracked(self.plain(h), state)
        shared = self.shared(h)
        r, state = self.shared_bn(shared, state)
        y, state = self.head_bn(self.head((r + self.other(shared)).mean(axis=(1, 2))), state)
        return y, state


def test_equinox_fold_model_folds_each_batch_norm_right_after_a_layer_and_leaves_the_rest():
    model, state = eqx.nn.make_with_state(EquinoxFoldable)()
    model, state = jbn.equinox.set_layers(model, state, *trained_layers(
        *jbn.equinox.get_layers(model, state)))

    @eqx.filter_jit
    def forward(model, state, x):  # the untracked batch norm needs the batch in eval too
        return jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(
            x, state)[0]

    x = jnp.moveaxis(nhwc_images(5, (4, 6, 6, 3)), -1, 1)
    folded, report = jbn.equinox.fold_model(model, state, x, forward=forward)
    assert sorted(report.pairs) == sorted(FOLDED) and report.left == LEFT
    assert isinstance(model.block["bn1"], jbn.equinox.BatchNorm)  # left as it was
    assert folded.block["conv1"].use_bias and not model.block["conv1"].use_bias
    assert all(isinstance(folded.block[name], jbn.equinox.Folded) for name in ("bn1", "bn2"))
    inference = eqx.nn.inference_mode(model)
    for inputs in (x, jnp.moveaxis(nhwc_images(6, (4, 6, 6, 3)), -1, 1)):
        expected = forward(inference, state, inputs)
        difference = np.max(np.abs(forward(folded, state, inputs) - expected))
        assert difference <= 1e-5 * np.max(np.abs(expected))  # float32 rounding
    assert report.max_difference == np.max(np.abs(forward(folded, state, x)
                                                  - forward(inference, state, x)))


class TorchBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = torch.nn.BatchNorm1d(C, affine=False, dtype=torch.float64)


class TorchModel(torch.nn.Module):
    """bn1, blocks.0.bn, frozen and no_bias: paths the NNX and Equinox models below mirror."""

    def __init__(self):
        super().__init__()
        self.bn1 = torch.nn.BatchNorm1d(C, dtype=torch.float64, **KEYWORDS)
        self.blocks = torch.nn.ModuleList([TorchBlock()])
        self.frozen = FrozenBatchNorm2d(C, eps=0.0).double()
        self.no_bias = torch.nn.BatchNorm1d(C, bias=False, dtype=torch.float64)

    def forward(self, x):
        h = self.blocks[0].bn(self.bn1(x))
        return self.no_bias(self.frozen(h[..., None])[..., 0])


def trained_torch_model():
    torch.manual_seed(0)
    model = TorchModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    with torch.no_grad():
        model.frozen.running_mean.uniform_(-1, 1)
        model.frozen.weight.uniform_(0.5, 2)
    for seed in range(3):
        x = torch.from_numpy(np.array(data(seed=seed)[0]))
        loss = (model(x) - x.flip(0)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


class NNXBlock(nnx.Module):
    def __init__(self):
        self.bn = jbn.nnx.BatchNorm(C, axis=1, use_scale=False, use_bias=False,
                                    param_dtype=jnp.float64)


class NNXModel(nnx.Module):
    def __init__(self, dtype=jnp.float64):
        self.bn1 = jbn.nnx.BatchNorm(C, axis=1, param_dtype=dtype, **NNX_KEYWORDS)
        self.blocks = nnx.List([NNXBlock()])
        self.frozen = jbn.nnx.BatchNorm(C, axis=1, param_dtype=jnp.float64, epsilon=0.0,
                                        mode="frozen")
        self.no_bias = jbn.nnx.BatchNorm(C, axis=1, param_dtype=jnp.float64, use_bias=False)

    def __call__(self, x):
        return self.no_bias(self.frozen(self.blocks[0].bn(self.bn1(x))))


class EquinoxBlock(eqx.Module):
    bn: jbn.equinox.BatchNorm

    def __init__(self):
        self.bn = jbn.equinox.BatchNorm(C, channelwise_affine=False, dtype=jnp.float64, axis=1)


class EquinoxModel(eqx.Module):
    bn1: jbn.equinox.BatchNorm
    blocks: list
    frozen: jbn.equinox.BatchNorm
    no_bias: jbn.equinox.BatchNorm

    def __init__(self, dtype=jnp.float64):
        self.bn1 = jbn.equinox.BatchNorm(C, dtype=dtype, axis=1, **KEYWORDS)
        self.blocks = [EquinoxBlock()]
        self.frozen = jbn.equinox.BatchNorm(C, eps=0.0, dtype=jnp.float64, axis=1,
                                            mode="frozen")
        self.no_bias = jbn.equinox.BatchNorm(C, dtype=jnp.float64, axis=1, use_bias=False)

    def __call__(self, x, state):
        for layer in (self.bn1, self.blocks[0].bn, self.frozen, self.no_bias):
            x, state = layer(x, state)
        return x, state


def torch_outputs(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(np.array(x))).numpy()


def assert_same_state_dicts(actual, expected):
    assert sorted(actual) == sorted(expected)
    for key in expected:
        assert actual[key].dtype == expected[key].dtype, key
        np.testing.assert_array_equal(actual[key].numpy(), expected[key].numpy(), key)


def test_nnx_model_converts_to_and_from_a_torch_state_dict():
    original = trained_torch_model()
    params, state, rest = jbn.from_torch_model(original.state_dict())
    assert rest == {} and list(params) == ["bn1", "blocks.0.bn", "frozen", "no_bias"]
    model = NNXModel()
    jbn.nnx.set_layers(model, params, state)
    model.eval()
    x = data(seed=9)[0]
    assert_close_ulps(model(x), torch_outputs(original, x))

    fresh = TorchModel()
    fresh.load_state_dict({key: torch.from_numpy(value) for key, value in
                           jbn.to_torch_model(*jbn.nnx.get_layers(model)).items()}, strict=True)
    assert_same_state_dicts(fresh.state_dict(), original.state_dict())


def test_equinox_model_converts_to_and_from_a_torch_state_dict():
    original = trained_torch_model()
    params, layer_states, _ = jbn.from_torch_model(original.state_dict())
    model, state = eqx.nn.make_with_state(EquinoxModel)()
    model, state = jbn.equinox.set_layers(model, state, params, layer_states)
    x = data(seed=9)[0]
    y, _ = eqx.nn.inference_mode(model)(x, state)
    assert_close_ulps(y, torch_outputs(original, x))

    fresh = TorchModel()
    fresh.load_state_dict({key: torch.from_numpy(value) for key, value in
                           jbn.to_torch_model(*jbn.equinox.get_layers(model, state)).items()},
                          strict=True)
    assert_same_state_dicts(fresh.state_dict(), original.state_dict())


def test_set_layers_rejects_missing_paths_and_arrays_unlike_the_layer():
    params, state, _ = jbn.from_torch_model(trained_torch_model().state_dict())
    missing = {path: value for path, value in state.items() if path != "blocks.0.bn"}
    eqx_model, eqx_state = eqx.nn.make_with_state(EquinoxModel)()
    with pytest.raises(ValueError, match=r"state must have the paths of the model's batch "
                                         r"norms; missing \['blocks\.0\.bn'\], unknown \[\]"):
        jbn.nnx.set_layers(NNXModel(), params, missing)
    with pytest.raises(ValueError, match=r"layer_states must have the paths .* missing "
                                         r"\['blocks\.0\.bn'\]"):
        jbn.equinox.set_layers(eqx_model, eqx_state, params, missing)
    float32 = r"layer 'bn1': params has \{'weight': 'float64\[3\]'.*built with .*'float32\[3\]'"
    with pytest.raises(ValueError, match=float32):
        jbn.nnx.set_layers(NNXModel(jnp.float32), params, state)
    eqx_model, eqx_state = eqx.nn.make_with_state(EquinoxModel)(jnp.float32)
    with pytest.raises(ValueError, match=float32):
        jbn.equinox.set_layers(eqx_model, eqx_state, params, state)


# Each layer's name for a keyword of jbn.batchnorm, where it is its framework's own.
FRAMEWORK_NAMES = {jbn.nnx.BatchNorm: {"eps": "epsilon"}, jbn.equinox.BatchNorm: {}}


@pytest.mark.parametrize("layer", FRAMEWORK_NAMES, ids=["nnx", "equinox"])
def test_layers_take_every_keyword_of_batchnorm_when_built_or_called(layer):
    keywords = [name for name, parameter in inspect.signature(jbn.batchnorm).parameters.items()
                if parameter.kind is inspect.Parameter.KEYWORD_ONLY]
    taken = (set(inspect.signature(layer.__init__).parameters)
             | set(inspect.signature(layer.__call__).parameters))
    missing = [name for name in keywords if FRAMEWORK_NAMES[layer].get(name, name) not in taken]
    assert missing == [], f"{layer.__module__}.BatchNorm does not pass {missing} on"
