"""What the Flax NNX and Equinox layers share, each test run on both: the layer core forwards
every keyword of ``jbn.batchnorm``, which the layers take when built or called;
per-call options; the untracked mode.

The reference is the functional ``jbn.batchnorm`` call.
"""

import inspect

import equinox as eqx
import jax.numpy as jnp
import pytest

import jbn
import jbn.equinox
import jbn.nnx
from helpers import LAYER_CHANNELS, assert_close_ulps, assert_trees_close, data
from jbn import _layer

C = LAYER_CHANNELS


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


@pytest.mark.quick
@pytest.mark.parametrize("framework", LAYERS)
def test_layers_take_momentum_and_renorm_per_call(framework):
    x, _ = data()
    call, state = LAYERS[framework]()
    params, initial = jbn.init(C, dtype=jnp.float64)
    y = call(x, momentum=None, renorm=(2.0, 0.5))
    expected, expected_state = jbn.batchnorm(params, initial, x, True, momentum=None,
                                             renorm=(2.0, 0.5))
    assert_trees_close((y, state()), (expected, expected_state), rtol=0)
    call(x)  # the layer's own again: momentum 0.1
    assert_close_ulps(state(), jbn.batchnorm(params, expected_state, x, True)[1])


@pytest.mark.parametrize("framework", LAYERS)
def test_untracked_layers_normalize_with_the_batch_and_keep_their_state(framework):
    x, _ = data()
    call, state = LAYERS[framework](mode="untracked")
    before = state()
    expected, _ = jbn.batchnorm(*jbn.init(C, dtype=jnp.float64), x, True)
    assert_trees_close(call(x), expected, rtol=0)
    assert_trees_close(state(), before, rtol=0)


def test_the_layer_core_forwards_every_keyword_of_batchnorm():
    keywords = {name for name, parameter in inspect.signature(jbn.batchnorm).parameters.items()
                if parameter.kind is inspect.Parameter.KEYWORD_ONLY}
    # eps is the one each framework names its own way (epsilon in NNX).
    assert set(_layer.OPTIONS) | {"eps"} | set(_layer.PER_CALL) == keywords


@pytest.mark.parametrize("layer", [jbn.nnx.BatchNorm, jbn.equinox.BatchNorm],
                         ids=["nnx", "equinox"])
def test_layers_take_the_cores_options_when_built_and_its_per_call_keywords_when_called(layer):
    assert set(_layer.OPTIONS) <= set(inspect.signature(layer.__init__).parameters)
    assert set(_layer.PER_CALL) <= set(inspect.signature(layer.__call__).parameters)
