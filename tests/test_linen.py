"""The Flax linen layer: a drop-in for ``flax.linen.BatchNorm`` (its fields, ``init``,
``mutable``, collections) with PyTorch's batch norm inside, under linen's transforms, and
whole linen models' batch norms in and out.

References are PyTorch's ``BatchNorm2d`` fed the same batches, ``flax.linen.BatchNorm``
where their semantics agree, and the functional ``jbn.batchnorm``.
"""

import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from jax.sharding import PartitionSpec as P

import jbn
import jbn.linen
from helpers import assert_trees_close, nhwc_images
from jbn import _layer

C = 8


class CNN(nn.Module):
    """A convolution, a batch norm (``norm``), ReLU, pooling and a linear head, NHWC."""

    norm: type = jbn.linen.BatchNorm
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(C, (3, 3), dtype=self.dtype, param_dtype=self.dtype)(x)
        x = self.norm(use_running_average=not train, param_dtype=self.dtype)(x)
        x = jnp.mean(nn.relu(x), axis=(1, 2))
        return nn.Dense(3, dtype=self.dtype, param_dtype=self.dtype)(x)


def train(model, batches, labels):
    """Trains ``model`` with SGD on ``batches``: per step, the batch norm's input, output and
    params (those the step used), and its batch statistics after it; the final variables."""
    variables = model.init(jax.random.key(0), batches[0], train=False)
    optimizer = optax.sgd(0.1)
    opt_state = optimizer.init(variables["params"])

    @jax.jit
    def step(variables, opt_state, x):
        def loss(params):
            logits, updates = model.apply(
                {**variables, "params": params}, x, train=True,
                mutable=["batch_stats", "intermediates"],
                capture_intermediates=lambda module, _: module.name in ("Conv_0", "BatchNorm_0"))
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates

        (_, updates), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
        changes, opt_state = optimizer.update(grads, opt_state)
        seen = updates["intermediates"]
        return ({"params": optax.apply_updates(variables["params"], changes),
                 "batch_stats": updates["batch_stats"]}, opt_state,
                (seen["Conv_0"]["__call__"][0], seen["BatchNorm_0"]["__call__"][0]))

    steps = []
    for x in batches:
        used = variables["params"]["BatchNorm_0"]
        variables, opt_state, (bn_input, bn_output) = step(variables, opt_state, x)
        steps.append((bn_input, bn_output, used, variables["batch_stats"]["BatchNorm_0"]))
    return steps, variables


def batches(dtype, count=3):
    rng = np.random.default_rng(1)
    return [jnp.asarray(rng.normal(2, 3, (8, 6, 6, 3)), dtype) for _ in range(count)]


def nchw(x):
    return torch.from_numpy(np.array(x)).permute(0, 3, 1, 2)


@pytest.mark.parametrize("dtype, rtol", [(jnp.float64, 1e-10), (jnp.float32, 1e-5)])
def test_a_linen_cnn_trained_with_optax_matches_torch_batchnorm2d_fed_the_same_batches(
        dtype, rtol):
    xs = batches(dtype)
    labels = jnp.asarray([0, 1, 2, 0, 1, 2, 0, 1])
    model = CNN(dtype=dtype)
    steps, variables = train(model, xs, labels)
    reference = torch.nn.BatchNorm2d(C, dtype={jnp.float64: torch.float64,
                                               jnp.float32: torch.float32}[dtype])
    for bn_input, bn_output, used, stats in steps:
        with torch.no_grad():
            reference.weight.copy_(torch.from_numpy(np.array(used["weight"])))
            reference.bias.copy_(torch.from_numpy(np.array(used["bias"])))
            expected = reference(nchw(bn_input)).permute(0, 2, 3, 1).numpy()
        scale = np.abs(expected).max()
        np.testing.assert_allclose(bn_output, expected, rtol=rtol, atol=rtol * scale)
        np.testing.assert_allclose(stats["running_mean"], reference.running_mean, rtol=rtol,
                                   atol=rtol * np.abs(reference.running_mean.numpy()).max())
        np.testing.assert_allclose(stats["running_var"], reference.running_var, rtol=rtol)
        assert int(stats["num_batches_tracked"]) == int(reference.num_batches_tracked)

    # Eval: the running statistics normalize, as torch's eval.
    _, seen = model.apply(variables, xs[0] + 1, train=False, mutable=["intermediates"],
                          capture_intermediates=lambda module, _: module.name in (
                              "Conv_0", "BatchNorm_0"))
    seen = seen["intermediates"]
    reference.eval()
    with torch.no_grad():
        reference.weight.copy_(torch.from_numpy(np.array(variables["params"]["BatchNorm_0"][
            "weight"])))
        reference.bias.copy_(torch.from_numpy(np.array(variables["params"]["BatchNorm_0"][
            "bias"])))
        expected = reference(nchw(seen["Conv_0"]["__call__"][0])).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(seen["BatchNorm_0"]["__call__"][0], expected, rtol=rtol,
                               atol=rtol * np.abs(expected).max())


def test_the_same_model_with_flax_batchnorm_gives_the_same_y_and_a_biased_running_var():
    x = batches(jnp.float32, 1)[0]
    outputs = {}
    for name, norm in (("jbn", jbn.linen.BatchNorm),
                       ("flax", lambda **kwargs: nn.BatchNorm(momentum=0.9, **kwargs))):
        model = CNN(norm=norm)
        variables = model.init(jax.random.key(0), x, train=False)
        _, updates = model.apply(variables, x, train=True, mutable=["batch_stats",
                                                                    "intermediates"],
                                 capture_intermediates=lambda module, _: module.name == (
                                     "BatchNorm_0"))
        outputs[name] = (updates["intermediates"]["BatchNorm_0"]["__call__"][0],
                         updates["batch_stats"]["BatchNorm_0"])
    (y, stats), (flax_y, flax_stats) = outputs["jbn"], outputs["flax"]
    np.testing.assert_allclose(y, flax_y, rtol=1e-5, atol=1e-5)
    n = x.shape[0] * x.shape[1] * x.shape[2]  # values per channel ("SAME" convolution)
    np.testing.assert_allclose(stats["running_mean"], flax_stats["mean"], rtol=1e-5, atol=1e-6)
    # From 1, one step of momentum 0.1: 0.9 + 0.1·var, the batch's variance unbiased here.
    np.testing.assert_allclose(stats["running_var"] - 0.9,
                               (flax_stats["var"] - 0.9) * n / (n - 1), rtol=1e-4)


def test_init_learns_nothing_and_needs_no_bound_axis():
    x = nhwc_images()
    layer = jbn.linen.BatchNorm(use_running_average=False, axis_name="batch", group_size=2)
    variables = layer.init(jax.random.key(0), x)
    params, state = jbn.init(C)
    assert_trees_close(variables, {"params": params, "batch_stats": state}, rtol=0)
    shapes = jax.eval_shape(layer.init, jax.random.key(0), x)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), shapes) == jax.tree.map(
        lambda a: (a.shape, a.dtype), variables)


def test_layer_fields_and_call_hold_every_keyword_of_batchnorm_through_the_core():
    fields = set(jbn.linen.BatchNorm.__dataclass_fields__)
    assert set(_layer.OPTIONS) | {"epsilon"} <= fields
    assert set(_layer.PER_CALL) <= set(inspect.signature(jbn.linen.BatchNorm.__call__).parameters)
    linen_fields = {"use_running_average", "axis", "momentum", "epsilon", "dtype", "param_dtype",
                    "use_bias", "use_scale", "bias_init", "scale_init", "axis_name",
                    "axis_index_groups"}
    assert linen_fields <= fields & set(nn.BatchNorm.__dataclass_fields__)


@pytest.mark.quick
def test_the_layer_is_the_functional_call_with_its_options_and_per_call_overrides():
    x = nhwc_images()
    mask = jnp.asarray(np.random.default_rng(2).random(x.shape[:1]) < 0.7)
    layer = jbn.linen.BatchNorm(momentum=None, epsilon=1e-3, renorm=(2.0, 0.5))
    variables = layer.init(jax.random.key(0), x, use_running_average=False)
    params, state = jbn.init(C)
    for per_call, keywords in (({}, dict(momentum=None, renorm=(2.0, 0.5))),
                               (dict(momentum=0.3, renorm=None, mask=mask),
                                dict(momentum=0.3, mask=mask))):
        y, updates = layer.apply(variables, x, use_running_average=False,
                                 mutable=["batch_stats"], **per_call)
        expected, new_state = jbn.batchnorm(params, state, x, True, eps=1e-3, axis=-1,
                                            **keywords)
        assert_trees_close((y, updates["batch_stats"]), (expected, new_state), rtol=0)


def test_modes_frozen_keeps_weight_and_bias_out_of_params_and_untracked_learns_nothing():
    x = nhwc_images()
    frozen = jbn.linen.BatchNorm(mode="frozen", use_running_average=False)
    variables = frozen.init(jax.random.key(0), x)
    assert "params" not in variables
    assert set(variables["batch_stats"]) == {"weight", "bias", "running_mean", "running_var"}
    y = frozen.apply(variables, x)  # no state to update: no mutable collection needed
    stats = variables["batch_stats"]
    expected, _ = jbn.batchnorm({"weight": stats["weight"], "bias": stats["bias"]},
                                {"running_mean": stats["running_mean"],
                                 "running_var": stats["running_var"]}, x, False, axis=-1)
    assert_trees_close(y, expected, rtol=0)
    untracked = jbn.linen.BatchNorm(mode="untracked", use_running_average=True)
    variables = untracked.init(jax.random.key(0), x)
    y = untracked.apply(variables, x)
    expected, _ = jbn.batchnorm(*jbn.init(C), x, True, axis=-1, mode="untracked")
    assert_trees_close(y, expected, rtol=0)


class PerExample(nn.Module):
    """One example (H, W, C) through the layer, the batch a mapped axis."""

    @nn.compact
    def __call__(self, x):
        return jbn.linen.BatchNorm(use_running_average=False, axis_name="batch")(x)


def test_nn_vmap_and_shard_map_give_the_whole_batchs_statistics():
    x = nhwc_images()  # float32: the sums over devices round in another order
    whole = jbn.linen.BatchNorm(use_running_average=False)
    variables = whole.init(jax.random.key(0), x)
    expected, expected_updates = whole.apply(variables, x, mutable=["batch_stats"])

    mapped = nn.vmap(PerExample, variable_axes={"params": None, "batch_stats": None},
                     split_rngs={"params": False}, in_axes=0, axis_name="batch")()
    mapped_variables = mapped.init(jax.random.key(0), x)
    assert_trees_close(mapped_variables["batch_stats"]["BatchNorm_0"], variables["batch_stats"],
                       rtol=0)
    y, updates = mapped.apply(mapped_variables, x, mutable=["batch_stats"])
    assert_trees_close(y, expected, rtol=1e-5, atol=1e-5)
    assert_trees_close(updates["batch_stats"]["BatchNorm_0"], expected_updates["batch_stats"],
                       rtol=1e-5)

    sharded = jbn.linen.BatchNorm(use_running_average=False, axis_name="batch")
    mesh = jax.make_mesh((4,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:4])
    y, updates = jax.shard_map(
        lambda x: sharded.apply(variables, x, mutable=["batch_stats"]), mesh=mesh,
        in_specs=P("batch"), out_specs=(P("batch"), P()))(x)
    assert_trees_close(y, expected, rtol=1e-5, atol=1e-5)
    assert_trees_close(updates, expected_updates, rtol=1e-5)


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return nn.relu(jbn.linen.BatchNorm(use_running_average=False)(nn.Dense(C)(x))), None


def test_nn_scan_over_blocks_carries_each_blocks_own_state():
    x = nhwc_images()[:, 0, 0, :]
    scanned = nn.scan(Block, variable_axes={"params": 0, "batch_stats": 0},
                      split_rngs={"params": True}, length=3)()
    variables = scanned.init(jax.random.key(0), x, None)
    (y, _), updates = scanned.apply(variables, x, None, mutable=["batch_stats"])
    stats = updates["batch_stats"]["BatchNorm_0"]
    assert stats["running_mean"].shape == (3, C)
    np.testing.assert_array_equal(stats["num_batches_tracked"], [1, 1, 1])
    # Block by block, unrolled: the same outputs and states.
    h = x
    for i in range(3):
        block = jax.tree.map(lambda a, i=i: a[i], variables)
        (h, _), block_updates = Block().apply(block, h, None, mutable=["batch_stats"])
        assert_trees_close(jax.tree.map(lambda a, i=i: a[i], stats),
                           block_updates["batch_stats"]["BatchNorm_0"], rtol=1e-12)
    assert_trees_close(y, h, rtol=1e-12, atol=1e-12)


def test_nn_remat_changes_no_result_nor_gradient():
    x = batches(jnp.float64, 1)[0]
    outputs = []
    for norm in (jbn.linen.BatchNorm, nn.remat(jbn.linen.BatchNorm)):
        model = CNN(norm=norm, dtype=jnp.float64)
        variables = model.init(jax.random.key(0), x, train=False)

        def loss(params, model=model, variables=variables):
            y, updates = model.apply({**variables, "params": params}, x, train=True,
                                     mutable=["batch_stats"])
            return jnp.sum(y ** 2), updates

        # The leaves: remat renames the module (CheckpointBatchNorm_0), not its place.
        outputs.append(jax.tree.leaves(jax.value_and_grad(loss, has_aux=True)(
            variables["params"])))
    assert_trees_close(outputs[0], outputs[1], rtol=1e-12)


def test_a_flax_model_converts_to_the_layer_and_back_with_the_same_eval_outputs():
    x = batches(jnp.float64, 1)[0]
    flax_model = CNN(norm=lambda **kwargs: nn.BatchNorm(momentum=0.9, **kwargs),
                     dtype=jnp.float64)
    flax_variables = flax_model.init(jax.random.key(0), x, train=False)
    _, trained = flax_model.apply(flax_variables, x, train=True, mutable=["batch_stats"])
    flax_variables = {**flax_variables, **trained}
    variables = jbn.linen.from_linen(flax_variables)
    assert set(variables["batch_stats"]["BatchNorm_0"]) == {"running_mean", "running_var",
                                                            "num_batches_tracked"}
    model = CNN(dtype=jnp.float64)
    assert_trees_close(model.apply(variables, x + 1, train=False),
                       flax_model.apply(flax_variables, x + 1, train=False), rtol=1e-12)
    assert_trees_close(jbn.linen.to_linen(variables), flax_variables, rtol=0)


def test_a_models_layers_go_to_a_torch_state_dict_and_back_by_path():
    x = batches(jnp.float64, 1)[0]
    model = CNN(dtype=jnp.float64)
    variables = model.init(jax.random.key(0), x, train=False)
    _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    variables = {**variables, **updates}
    params, state = jbn.linen.get_layers(variables)
    assert set(params) == set(state) == {"BatchNorm_0"}
    state_dict = jbn.to_torch_model(params, state)
    assert int(state_dict["BatchNorm_0.num_batches_tracked"]) == 1
    loaded_params, loaded_state, _ = jbn.from_torch_model(state_dict)
    fresh = model.init(jax.random.key(1), x, train=False)
    loaded = jbn.linen.set_layers(fresh, loaded_params, loaded_state)
    assert_trees_close(loaded["batch_stats"], variables["batch_stats"], rtol=0)
    assert_trees_close(loaded["params"]["BatchNorm_0"], variables["params"]["BatchNorm_0"],
                       rtol=0)
    with pytest.raises(ValueError, match=r"missing \['BatchNorm_0'\], unknown \['bn'\]"):
        jbn.linen.set_layers(fresh, {"bn": loaded_params["BatchNorm_0"]},
                             {"bn": loaded_state["BatchNorm_0"]})


def test_a_linen_users_momentum_warns_at_their_line():
    x = nhwc_images()
    layer = jbn.linen.BatchNorm(momentum=0.99, use_running_average=False)
    variables = layer.init(jax.random.key(0), x)
    with pytest.warns(UserWarning, match="momentum=0.99") as caught:
        layer.apply(variables, x, mutable=["batch_stats"])
    assert [w.filename for w in caught] == [__file__]


def test_the_layer_checks_its_options_when_built():
    with pytest.raises(ValueError, match=r"^mode must be one of"):
        jbn.linen.BatchNorm(mode="batch")
    with pytest.raises(TypeError, match=r"^virtual_batch_size must be an int or None"):
        jbn.linen.BatchNorm(virtual_batch_size=2.0)
    with pytest.raises(ValueError, match=r"use_bias=True with use_scale=False"):
        jbn.linen.BatchNorm(use_scale=False)


def test_nn_jit_changes_no_result():
    x = nhwc_images()
    plain = jbn.linen.BatchNorm(use_running_average=False)
    jitted = nn.jit(jbn.linen.BatchNorm)(use_running_average=False)
    variables = plain.init(jax.random.key(0), x)
    assert_trees_close(jitted.init(jax.random.key(0), x), variables, rtol=0)
    assert_trees_close(jitted.apply(variables, x, mutable=["batch_stats"]),
                       plain.apply(variables, x, mutable=["batch_stats"]), rtol=1e-6,
                       atol=1e-6)
