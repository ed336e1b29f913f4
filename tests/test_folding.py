"""Whole models folded for inference, in Flax NNX and in Equinox: ``fold_model`` folds each
batch norm that right follows a convolution or a dense layer into it, says why it leaves each
other one, leaves the model it was given as it was, and the folded model computes what the
model computes in eval, up to float32 rounding.

The reference is the model itself, in eval (NNX) or inference mode (Equinox).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jbn
import jbn.equinox
import jbn.nnx
from helpers import nhwc_images, numpy_init

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


@pytest.mark.quick
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
