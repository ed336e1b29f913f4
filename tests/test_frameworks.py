"""The Flax NNX and Equinox layers: each is the functional ``jbn.batchnorm`` call (outputs,
state, gradients), switches mode the framework's way, trains under the framework's own
transforms, and converts to and from a PyTorch state_dict through ``from_torch_model``.

References are the functional call and real ``torch.nn`` modules, in float64.
"""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import jbn
import jbn.equinox
import jbn.nnx
from helpers import assert_close_ulps

C = 3
KEYWORDS = {"momentum": None, "eps": 1e-3}  # not the defaults, so passing them on shows


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


# ---------------------------------------------------------------------------------------
# Flax NNX


@pytest.mark.parametrize("axis", [1, -1])
def test_nnx_layer_is_the_functional_call_in_outputs_state_and_gradients(axis):
    x, mask = data()
    x = jnp.moveaxis(x, 1, axis)
    layer = jbn.nnx.BatchNorm(C, dtype=jnp.float64, axis=axis, **KEYWORDS)
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
    layer = jbn.nnx.BatchNorm(C, dtype=jnp.float64, **KEYWORDS)
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
        self.bn = jbn.nnx.BatchNorm(C, dtype=jnp.float64, **KEYWORDS)

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
    layer = jbn.nnx.BatchNorm(C, dtype=jnp.float64, axis=0, axis_name="batch", **KEYWORDS)
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


# ---------------------------------------------------------------------------------------
# Equinox


@pytest.mark.parametrize("axis", [1, -1])
def test_equinox_layer_is_the_functional_call_in_outputs_state_and_gradients(axis):
    x, mask = data()
    x = jnp.moveaxis(x, 1, axis)
    layer, state = eqx.nn.make_with_state(jbn.equinox.BatchNorm)(
        C, dtype=jnp.float64, axis=axis, **KEYWORDS)
    y, new_state, grads, x_grad = functional(layer.params, layer.layer_state(state), x, mask,
                                             axis)

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
    layer, state = eqx.nn.make_with_state(jbn.equinox.BatchNorm)(C, dtype=jnp.float64,
                                                                  **KEYWORDS)
    _, state = layer(x, state)
    trained = layer.layer_state(state)
    expected, _ = jbn.batchnorm(layer.params, trained, x + 1, False, **KEYWORDS)

    inference = eqx.nn.inference_mode(layer)
    y, state = inference(x + 1, state)
    assert_same(y, expected)
    assert_same(inference.layer_state(state), trained)
    _, state = layer(x + 1, state, inference=False)
    assert int(layer.layer_state(state)["num_batches_tracked"]) == 2



def test_equinox_sequential_threads_the_layer_state():
    x, _ = data()
    model, state = eqx.nn.make_with_state(eqx.nn.Sequential)(
        [jbn.equinox.BatchNorm(C, dtype=jnp.float64, **KEYWORDS), eqx.nn.Lambda(jnp.tanh)])
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
        self.bn = jbn.equinox.BatchNorm(C, dtype=jnp.float64, **KEYWORDS)

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
    assert_close((model.kernel, model.bn.params, model.bn.layer_state(state)),
                 (params["kernel"], params["bn"], expected_state))


def test_equinox_layer_passes_mask_and_axis_name_on_per_example_under_vmap():
    x, mask = data()
    layer, state = eqx.nn.make_with_state(jbn.equinox.BatchNorm)(
        C, dtype=jnp.float64, axis=0, axis_name="batch", **KEYWORDS)
    per_example = jax.vmap(lambda x, state, mask: layer(x, state, mask=mask),
                           axis_name="batch", in_axes=(0, None, 0), out_axes=(0, None))
    y, state = eqx.filter_jit(per_example)(x, state, mask)
    expected, expected_state = functional_from_init(x, mask)
    assert_close(y, expected)
    assert_close(layer.layer_state(state), expected_state)


# ---------------------------------------------------------------------------------------
# Both: PyTorch state_dicts through from_torch_model, and construction errors


class TorchBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = torch.nn.BatchNorm1d(C, affine=False, dtype=torch.float64)


class TorchModel(torch.nn.Module):
    """bn1 and blocks.0.bn: paths the NNX and Equinox models below mirror."""

    def __init__(self):
        super().__init__()
        self.bn1 = torch.nn.BatchNorm1d(C, dtype=torch.float64, **KEYWORDS)
        self.blocks = torch.nn.ModuleList([TorchBlock()])

    def forward(self, x):
        return self.blocks[0].bn(self.bn1(x))


def trained_torch_model():
    torch.manual_seed(0)
    model = TorchModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    for seed in range(3):
        x = torch.from_numpy(np.array(data(seed=seed)[0]))
        loss = (model(x) - x.flip(0)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


class NNXBlock(nnx.Module):
    def __init__(self):
        self.bn = jbn.nnx.BatchNorm(C, affine=False, dtype=jnp.float64)


class NNXModel(nnx.Module):
    def __init__(self, dtype=jnp.float64):
        self.bn1 = jbn.nnx.BatchNorm(C, dtype=dtype, **KEYWORDS)
        self.blocks = nnx.List([NNXBlock()])

    def __call__(self, x):
        return self.blocks[0].bn(self.bn1(x))


class EquinoxBlock(eqx.Module):
    bn: jbn.equinox.BatchNorm

    def __init__(self):
        self.bn = jbn.equinox.BatchNorm(C, affine=False, dtype=jnp.float64)


class EquinoxModel(eqx.Module):
    bn1: jbn.equinox.BatchNorm
    blocks: list

    def __init__(self, dtype=jnp.float64):
        self.bn1 = jbn.equinox.BatchNorm(C, dtype=dtype, **KEYWORDS)
        self.blocks = [EquinoxBlock()]

    def __call__(self, x, state):
        x, state = self.bn1(x, state)
        return self.blocks[0].bn(x, state)


def torch_outputs(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(np.array(x))).numpy()


def assert_same_state_dicts(actual, expected):
    assert list(actual) == list(expected)
    for key in expected:
        assert actual[key].dtype == expected[key].dtype, key
        np.testing.assert_array_equal(actual[key].numpy(), expected[key].numpy(), key)


def test_nnx_model_converts_to_and_from_a_torch_state_dict():
    original = trained_torch_model()
    params, state, rest = jbn.from_torch_model(original.state_dict())
    assert rest == {} and list(params) == ["bn1", "blocks.0.bn"]
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


@pytest.mark.parametrize("layer", [jbn.nnx.BatchNorm, jbn.equinox.BatchNorm])
def test_layers_take_batchnorm_keywords_and_reject_others_by_name(layer):
    with pytest.raises(TypeError, match=r"got unexpected keyword arguments \['epsilon', "
                                        r"'mask'\]; it takes the keywords of jbn.batchnorm "
                                        r"\['momentum', 'eps', 'axis'"):
        layer(C, epsilon=1e-3, mask=None)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\] or None, got 2"):
        build_and_call(layer, jnp.ones((4, C)), momentum=2)


def build_and_call(layer, x, **keywords):
    if layer is jbn.nnx.BatchNorm:
        return layer(C, **keywords)(x)
    built, state = eqx.nn.make_with_state(layer)(C, **keywords)
    return built(x, state)[0]
