"""The Equinox layer: it follows Equinox's conventions (arguments, one example under
``jax.vmap`` with a named batch axis, the state threaded through calls), matches
``eqx.nn.BatchNorm`` where their semantics agree, is the functional ``jbn.batchnorm`` call
(outputs, state, gradients), trains under ``eqx.filter_jit``, switches phase with
``eqx.nn.inference_mode``, and takes per-call options and modes.

References are ``eqx.nn.BatchNorm`` itself and the functional call.
"""

import inspect

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbn
import jbn.equinox
from helpers import (
    KEYWORDS,
    LAYER_CHANNELS,
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


# ---------------------------------------------------------------------------------------
# Equinox's conventions, and eqx.nn.BatchNorm


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


@pytest.mark.quick
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


# ---------------------------------------------------------------------------------------
# The functional call, under Equinox's transforms


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
    assert_trees_close(layer_y, y, rtol=0)
    assert_trees_close(layer.layer_state(state), new_state, rtol=0)
    assert_trees_close((layer_grads.weight, layer_grads.bias, layer_x_grad),
                       (grads["weight"], grads["bias"], x_grad), rtol=0)


@pytest.mark.quick
def test_equinox_inference_mode_switches_to_the_running_statistics():
    x, _ = data()
    layer, state = eqx.nn.make_with_state(jbn.equinox.BatchNorm)(C, dtype=jnp.float64, axis=1,
                                                                  **KEYWORDS)
    _, state = layer(x, state)
    trained = layer.layer_state(state)
    expected, _ = jbn.batchnorm(layer.layer_params(state), trained, x + 1, False, **KEYWORDS)

    inference = eqx.nn.inference_mode(layer)
    y, state = inference(x + 1, state)
    assert_trees_close(y, expected, rtol=0)
    assert_trees_close(inference.layer_state(state), trained, rtol=0)
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
    assert_trees_close(y, jnp.tanh(expected), rtol=0)
    assert_trees_close(model.layers[0].layer_state(state), expected_state, rtol=0)


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
    assert_close_ulps(losses, expected_losses)
    assert_close_ulps((model.kernel, model.bn.layer_params(state), model.bn.layer_state(state)),
                      (params["kernel"], params["bn"], expected_state))


def test_equinox_layer_passes_mask_and_axis_name_on_per_example_under_vmap():
    x, mask = data()
    layer, state = eqx.nn.make_with_state(jbn.equinox.BatchNorm)(
        C, "batch", dtype=jnp.float64, **KEYWORDS)
    per_example = jax.vmap(lambda x, state, mask: layer(x, state, mask=mask),
                           axis_name="batch", in_axes=(0, None, 0), out_axes=(0, None))
    y, state = eqx.filter_jit(per_example)(x, state, mask)
    expected, expected_state = functional_from_init(x, mask)
    assert_close_ulps(y, expected)
    assert_close_ulps(layer.layer_state(state), expected_state)


def test_equinox_layer_and_its_call_work_under_eval_shape():
    layer = eqx.filter_eval_shape(jbn.equinox.BatchNorm, 8, "batch")
    assert isinstance(layer.weight, jax.ShapeDtypeStruct) and layer.weight.shape == (8,)
    model, state = eqx.nn.make_with_state(jbn.equinox.BatchNorm)(8, "batch")
    batched = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    y, new_state = jax.eval_shape(batched, jnp.ones((4, 8, 5)), state)
    assert y.shape == (4, 8, 5)
    assert model.layer_state(new_state)["running_mean"].shape == (8,)


# ---------------------------------------------------------------------------------------
# Per-call options and modes


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


def test_frozen_equinox_layers_hold_no_trainable_arrays_and_keep_theirs_in_the_state():
    model, state = eqx.nn.make_with_state(EquinoxCNN)(
        lambda c: jbn.equinox.BatchNorm(c, mode="frozen"))
    trainable = eqx.filter(model.bn, eqx.is_inexact_array)
    assert jax.tree.leaves(trainable) == []
    assert set(model.bn.layer_params(state)) == {"weight", "bias"}
    _, _, new_state = train_equinox(model, state, [jnp.ones((4, 3, 8, 8), jnp.float32)],
                                    jnp.zeros((4, 2), jnp.float32))
    assert_trees_close(model.bn.layer_state(new_state), model.bn.layer_state(state), rtol=0)
