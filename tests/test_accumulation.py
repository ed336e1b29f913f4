"""Statistics across the micro-batches of gradient accumulation: the running statistics learn
once per optimizer step, from the statistics of all the step's values, against PyTorch on
the concatenated micro-batches; the whole-batch statistics of many micro-batches."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jbn
import reference
from helpers import assert_trees_close

pytestmark = pytest.mark.usefixtures("statistics_path")

C, L = 3, 4
RNG = np.random.default_rng(0)
# Uneven micro-batches, the third empty.
SIZES = (5, 3, 0, 6)
MICRO = [RNG.normal(2.0, 1.5, (n, C, L)) for n in SIZES]
CLOSE = dict(rtol=1e-12, atol=1e-12)


def accumulate(micro_batches, steps, masks=None, **keywords):
    """(outputs, state) after each micro-batch of ``steps`` optimizer steps, float64."""
    params, state = jbn.init(C, dtype=jnp.float64, accumulation_steps=len(micro_batches))
    ys, states = [], []
    for _ in range(steps):
        for i, x in enumerate(micro_batches):
            mask = None if masks is None else jnp.asarray(masks[i])
            y, state = jbn.batchnorm(params, state, jnp.asarray(x), True, mask=mask,
                                     accumulation_steps=len(micro_batches), **keywords)
            ys.append(y)
            states.append(state)
    return ys, states


@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_statistics_are_those_of_one_torch_call_on_the_concatenated_micro_batches(
        momentum):
    ys, states = accumulate(MICRO, steps=2, momentum=momentum)
    layer = torch.nn.BatchNorm1d(C, momentum=momentum).double()
    for step in range(2):
        layer(torch.from_numpy(np.concatenate(MICRO)))
        state = states[(step + 1) * len(MICRO) - 1]
        np.testing.assert_allclose(state["running_mean"], layer.running_mean.numpy(), **CLOSE)
        np.testing.assert_allclose(state["running_var"], layer.running_var.numpy(), **CLOSE)
        assert int(state["num_batches_tracked"]) == int(layer.num_batches_tracked) == step + 1
        assert int(state["accumulator"]["micro_batches"]) == 0
    # Between the step's ends the running statistics stay, and the count with them.
    fresh = jbn.init(C, dtype=jnp.float64)[1]
    for state in states[: len(MICRO) - 1]:
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            np.testing.assert_array_equal(state[key], fresh[key])


def test_each_micro_batch_is_normalized_with_its_own_statistics_as_torch_does():
    ys, _ = accumulate(MICRO, steps=1)
    layer = torch.nn.BatchNorm1d(C).double()
    for x, y in zip(MICRO, ys, strict=True):
        np.testing.assert_allclose(y, layer(torch.from_numpy(x)).detach().numpy(), **CLOSE)


MOMENTUM_1 = pytest.mark.filterwarnings("ignore:momentum=1.0")  # the state is the step's own


@MOMENTUM_1
def test_masked_positions_enter_no_statistic_of_the_step():
    masks = [RNG.random((n, L)) < 0.6 for n in SIZES]
    _, states = accumulate(MICRO, steps=1, masks=masks, momentum=1.0)
    valid = np.concatenate([np.moveaxis(x, 1, -1)[m] for x, m in zip(MICRO, masks, strict=True)])
    np.testing.assert_allclose(states[-1]["running_mean"], valid.mean(0), **CLOSE)
    np.testing.assert_allclose(states[-1]["running_var"], valid.var(0, ddof=1), **CLOSE)


@MOMENTUM_1
def test_micro_batches_pooling_is_the_mean_and_the_pooled_within_variance():
    _, states = accumulate(MICRO, steps=1, momentum=1.0, accumulation_pooling="micro-batches")
    values = [np.moveaxis(x, 1, -1).reshape(-1, C) for x in MICRO if len(x)]
    within = sum(((v - v.mean(0)) ** 2).sum(0) for v in values)
    degrees = sum(len(v) - 1 for v in values)
    np.testing.assert_allclose(states[-1]["running_mean"], np.concatenate(values).mean(0),
                               **CLOSE)
    np.testing.assert_allclose(states[-1]["running_var"], within / degrees, **CLOSE)


@MOMENTUM_1
@pytest.mark.parametrize("seed", range(4))
def test_accumulated_float32_statistics_keep_their_accuracy_at_mean_1e4(seed):
    """As one call's (test_numerics): the mean within one rounding, the variance within
    2e-6, which merging about rounded means (1.2e-5 with seed 0) would miss."""
    rng = np.random.default_rng(seed)
    std = rng.uniform(0.5, 2.0, (C, 1))
    micro = [(1e4 * std + std * rng.normal(size=(512, C, L))).astype(np.float32)
             for _ in range(4)]
    params, state = jbn.init(C, accumulation_steps=4)
    for x in micro:
        _, state = jbn.batchnorm(params, state, jnp.asarray(x), True, momentum=1.0,
                                 accumulation_steps=4)
    values = np.moveaxis(np.concatenate(micro).astype(np.float64), 1, -1).reshape(-1, C)
    np.testing.assert_allclose(state["running_mean"], values.mean(0), rtol=2e-7)
    np.testing.assert_allclose(state["running_var"], values.var(0, ddof=1), rtol=2e-6)


def test_under_scan_and_jit_the_accumulation_equals_the_python_loop():
    micro = jnp.asarray(np.stack([RNG.normal(1.0, 2.0, (6, C, L)) for _ in range(3)]))
    params, state = jbn.init(C, dtype=jnp.float64, accumulation_steps=3)

    @jax.jit
    def step(state, micro):
        def one(state, x):
            y, state = jbn.batchnorm(params, state, x, True, accumulation_steps=3)
            return state, y
        return jax.lax.scan(one, state, micro)

    scanned_state, scanned_ys = step(state, micro)
    ys, states = accumulate(list(np.asarray(micro)), steps=1)
    assert_trees_close(scanned_state, states[-1], **CLOSE)
    np.testing.assert_allclose(scanned_ys, jnp.stack(ys), **CLOSE)


def test_optax_multisteps_training_commits_once_per_optimizer_step():
    """optax.MultiSteps calls the step once per micro-batch: the state commits on the k-th."""
    k = 3
    x = jnp.asarray(RNG.normal(size=(k * 8, C)))
    params, state = jbn.init(C, dtype=jnp.float64, accumulation_steps=k)
    optimizer = optax.MultiSteps(optax.sgd(0.1), every_k_schedule=k)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, state, opt_state, x):
        def loss(params):
            y, state_ = jbn.batchnorm(params, state, x, True, accumulation_steps=k)
            return jnp.sum(jnp.sin(y)), state_
        grads, state = jax.grad(loss, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), state, opt_state

    counts = []
    for i in range(2 * k):
        params, state, opt_state = step(params, state, opt_state, x[8 * (i % k): 8 * (i % k + 1)])
        counts.append(int(state["num_batches_tracked"]))
    assert counts == [0, 0, 1, 1, 1, 2]
    expected = jbn.init(C, dtype=jnp.float64)[1]
    for _ in range(2):  # each optimizer step's statistics are those of all of x
        _, expected = reference.batchnorm({}, expected, np.asarray(x), True)
    for key in ("running_mean", "running_var"):
        np.testing.assert_allclose(state[key], expected[key], **CLOSE)


def test_8_devices_times_4_micro_batches_equal_the_whole_batch_on_one_device():
    micro = [RNG.normal(0.5, 2.0, (16, C, L)) for _ in range(4)]
    mask = jnp.asarray(RNG.random(16) < 0.7)
    mesh = jax.make_mesh((8,), ("data",))
    params, state = jbn.init(C, dtype=jnp.float64, accumulation_steps=4)
    call = jax.jit(jax.shard_map(
        lambda state, x, mask: jbn.batchnorm(params, state, x, True, mask=mask,
                                             axis_name="data", accumulation_steps=4),
        mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=(P("data"), P())))
    split = functools.partial(jax.device_put, device=NamedSharding(mesh, P("data")))
    for x in micro:
        _, state = call(state, split(jnp.asarray(x)), split(mask))
    whole = np.concatenate(micro)
    whole_mask = np.tile(np.asarray(mask), 4)
    _, expected = reference.batchnorm(params, jbn.init(C, dtype=jnp.float64)[1], whole, True,
                                      mask=whole_mask)
    np.testing.assert_allclose(state["running_mean"], expected["running_mean"], **CLOSE)
    np.testing.assert_allclose(state["running_var"], expected["running_var"], **CLOSE)
    assert int(state["num_batches_tracked"]) == 1


def test_accumulating_with_groups_of_devices_keeps_float32_accuracy_at_mean_1e4():
    """Each micro-batch's statistics pooled over groups before they merge: their mean kept
    fine (float32 against the same computation in float64; 1.1e-5 with a rounded mean)."""
    rng = np.random.default_rng(1)
    std = rng.uniform(0.5, 2.0, (C, 1))
    micro = [1e4 * std + std * rng.normal(size=(512, C, L)) for _ in range(4)]
    mesh = jax.make_mesh((8,), ("data",))
    split = functools.partial(jax.device_put, device=NamedSharding(mesh, P("data")))
    learnt = {}
    for dtype in (jnp.float32, jnp.float64):
        params, state = jbn.init(C, dtype=dtype, accumulation_steps=4)
        call = jax.jit(jax.shard_map(
            lambda params, state, x: jbn.batchnorm(params, state, x, True, axis_name="data",
                                                   group_size=2, accumulation_steps=4),
            mesh=mesh, in_specs=(P(), P(), P("data")), out_specs=(P("data"), P())))
        for x in micro:
            _, state = call(params, state, split(jnp.asarray(x.astype(np.float32), dtype)))
        learnt[dtype] = state
    for key in ("running_mean", "running_var"):
        np.testing.assert_allclose(learnt[jnp.float32][key], learnt[jnp.float64][key],
                                   rtol=2e-6)


def test_to_torch_leaves_the_accumulator_out():
    params, state = jbn.init(C, accumulation_steps=2)
    assert list(jbn.to_torch(params, state)) == list(torch.nn.BatchNorm1d(C).state_dict())


def test_batch_statistics_of_micro_batches_are_those_of_their_union_and_learnt_once():
    micro = jnp.asarray(np.stack([RNG.normal(3.0, 0.5, (6, C, L)) for _ in range(4)]))
    mask = jnp.asarray(RNG.random((4, 6, L)) < 0.7)
    state = jbn.init(C, dtype=jnp.float64)[1]
    stats, new_state = jax.jit(jbn.batch_statistics)(state, micro, mask=mask)
    valid = np.moveaxis(np.asarray(micro), 2, -1)[np.asarray(mask)]
    np.testing.assert_allclose(stats["mean"], valid.mean(0), **CLOSE)
    np.testing.assert_allclose(stats["var"], valid.var(0), **CLOSE)
    assert float(stats["count"]) == len(valid)
    _, expected = reference.batchnorm({}, state, np.concatenate(np.asarray(micro)), True,
                                      mask=np.concatenate(np.asarray(mask)))
    for key in ("running_mean", "running_var"):
        np.testing.assert_allclose(new_state[key], expected[key], **CLOSE)
    assert int(new_state["num_batches_tracked"]) == 1


def test_given_statistics_normalize_as_constants_keeping_only_the_direct_derivative_term():
    """With whole-batch statistics, each micro-batch's y is the whole batch's; the derivative
    keeps w·ẋ/√(var + eps) and drops −w/√(var + eps)·(⟨ẋ⟩ + x̂⟨x̂ẋ⟩), which the whole
    batch's own derivative has."""
    micro = jnp.asarray(np.stack([RNG.normal(3.0, 0.5, (6, C)) for _ in range(2)]))
    params = {"weight": jnp.asarray(RNG.normal(1, 0.3, C)), "bias": jnp.asarray(RNG.normal(size=C))}
    stats, _ = jbn.batch_statistics({}, micro)
    whole = micro.reshape(-1, C)
    y_whole, vjp_whole = jax.vjp(lambda x: jbn.batchnorm(params, {}, x, True)[0], whole)
    ct = jnp.asarray(RNG.normal(size=whole.shape))
    ys, dxs = [], []
    for i in range(2):
        y, vjp = jax.vjp(lambda x: jbn.batchnorm(params, {}, x, True, statistics=stats)[0],
                         micro[i])
        ys.append(y)
        dxs.append(vjp(ct[6 * i: 6 * i + 6])[0])
    np.testing.assert_allclose(jnp.concatenate(ys), y_whole, **CLOSE)
    scale = params["weight"] / jnp.sqrt(stats["var"] + 1e-5)
    np.testing.assert_allclose(jnp.concatenate(dxs), ct * scale, **CLOSE)
    xhat = (whole - stats["mean"]) / jnp.sqrt(stats["var"] + 1e-5)
    dropped = -scale * (ct.mean(0) + xhat * (ct * xhat).mean(0))
    np.testing.assert_allclose(vjp_whole(ct)[0], ct * scale + dropped, **CLOSE)


def test_the_nnx_layer_accumulates_under_nnx_jit_and_commits_once_per_step():
    from flax import nnx

    import jbn.nnx

    layer = jbn.nnx.BatchNorm(C, axis=1, param_dtype=jnp.float64, accumulation_steps=len(MICRO))
    call = nnx.jit(lambda layer, x: layer(x))
    fresh = layer.state
    for i, x in enumerate(MICRO):
        call(layer, jnp.asarray(x))
        if i < len(MICRO) - 1:
            assert_trees_close({k: v for k, v in layer.state.items() if k != "accumulator"},
                               {k: v for k, v in fresh.items() if k != "accumulator"}, rtol=0)
    torch_layer = torch.nn.BatchNorm1d(C).double()
    torch_layer(torch.from_numpy(np.concatenate(MICRO)))
    np.testing.assert_allclose(layer.running_mean[...], torch_layer.running_mean, **CLOSE)
    np.testing.assert_allclose(layer.running_var[...], torch_layer.running_var, **CLOSE)
    assert int(layer.num_batches_tracked[...]) == 1
    params, states = jbn.nnx.get_layers(layer)
    jbn.nnx.set_layers(layer, params, states)  # the accumulator loads back as it was built
    assert set(jbn.to_torch_model(params, states)) == {
        "weight", "bias", "running_mean", "running_var", "num_batches_tracked"}


def test_the_equinox_layer_accumulates_per_example_under_vmap():
    import equinox as eqx

    import jbn.equinox

    micro = [x for x in MICRO if len(x)]
    layer, state = eqx.nn.make_with_state(jbn.equinox.BatchNorm)(
        C, "batch", dtype=jnp.float64, accumulation_steps=len(micro))
    call = eqx.filter_jit(jax.vmap(layer, axis_name="batch", in_axes=(0, None),
                                   out_axes=(0, None)))
    for x in micro:
        _, state = call(jnp.asarray(x), state)
    torch_layer = torch.nn.BatchNorm1d(C).double()
    torch_layer(torch.from_numpy(np.concatenate(micro)))
    learnt = jbn.equinox.get_layers(layer, state)[1][""]
    np.testing.assert_allclose(learnt["running_mean"], torch_layer.running_mean, **CLOSE)
    np.testing.assert_allclose(learnt["running_var"], torch_layer.running_var, **CLOSE)
    assert int(learnt["num_batches_tracked"]) == 1
    assert int(learnt["accumulator"]["micro_batches"]) == 0


def test_the_linen_layer_accumulates_in_batch_stats_and_commits_once_per_step():
    import jbn.linen

    micro = [jnp.asarray(x) for x in MICRO if len(x)]
    layer = jbn.linen.BatchNorm(axis=1, param_dtype=jnp.float64,
                                accumulation_steps=len(micro))
    variables = layer.init(jax.random.key(0), micro[0], use_running_average=True)
    call = jax.jit(lambda variables, x: layer.apply(variables, x, use_running_average=False,
                                                    mutable=["batch_stats"])[1])
    fresh = variables["batch_stats"]
    for i, x in enumerate(micro):
        variables = {**variables, **call(variables, x)}
        learnt = variables["batch_stats"]
        if i < len(micro) - 1:
            assert_trees_close({k: v for k, v in learnt.items() if k != "accumulator"},
                               {k: v for k, v in fresh.items() if k != "accumulator"}, rtol=0)
    torch_layer = torch.nn.BatchNorm1d(C).double()
    torch_layer(torch.from_numpy(np.concatenate(micro)))
    np.testing.assert_allclose(learnt["running_mean"], torch_layer.running_mean, **CLOSE)
    np.testing.assert_allclose(learnt["running_var"], torch_layer.running_var, **CLOSE)
    assert int(learnt["num_batches_tracked"]) == 1
    assert int(learnt["accumulator"]["micro_batches"]) == 0
