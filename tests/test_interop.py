"""Conversion to and from PyTorch and Flax, and folding batch norm for inference.

References are real ``torch.nn`` and ``flax.linen`` modules, NumPy float64 and the algebra
of eval-mode batch norm; each layer is trained a few steps first, so that its weights and
running statistics are far from their initial values.
"""

import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jbn
from helpers import FrozenBatchNorm2d, assert_close_ulps, assert_same_arrays

TORCH_BATCHNORMS = {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d}
TORCH_CONVS = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}
INPUT_SHAPES = {1: (6, 4, 5), 2: (4, 4, 3, 5), 3: (3, 4, 2, 3, 4)}  # N, C=4, spatial...
TORCH_DTYPES = {np.float32: torch.float32, np.float64: torch.float64}
C = 4



def torch_input(dims, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    # Channels with their own offsets and spreads, so no statistic stays near 0 or 1.
    offsets = torch.linspace(-3, 5, C).reshape((1, C) + (1,) * dims)
    spreads = torch.linspace(0.5, 4, C).reshape((1, C) + (1,) * dims)
    x = torch.randn(INPUT_SHAPES[dims], generator=generator, dtype=torch.float64)
    return (x * spreads + offsets).to(TORCH_DTYPES[dtype])


def trained_torch_batchnorm(dims=2, dtype=np.float64, *, affine=True, track_running_stats=True,
                            seed=0, **kwargs):
    """A BatchNorm{dims}d after three SGD steps: weights, biases and running statistics moved."""
    torch.manual_seed(seed)
    bn = TORCH_BATCHNORMS[dims](C, affine=affine, track_running_stats=track_running_stats,
            dtype=TORCH_DTYPES[dtype], **kwargs)
    train_torch(bn, dims, dtype, seed)
    return bn.eval()


def train_torch(module, dims, dtype, seed, steps=3):
    module.train()
    parameters = list(module.parameters())
    optimizer = torch.optim.SGD(parameters, lr=0.3) if parameters else None
    for step in range(steps):
        x = torch_input(dims, dtype, seed + step)
        loss = (module(x) - x.flip(0)).square().mean()
        if optimizer:
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def trained_jbn(dtype=np.float64, *, affine=True, track_running_stats=True, steps=3):
    """jbn params and state after three training steps of plain gradient descent."""
    params, state = jbn.init(C, affine=affine, track_running_stats=track_running_stats,
                             dtype=dtype)

    def loss(params, state, x):
        y, new_state = jbn.batchnorm(params, state, x, True)
        return jnp.mean((y - x[::-1]) ** 2), new_state

    for step in range(steps):
        x = jnp.asarray(torch_input(2, dtype, 10 + step).numpy())
        grads, state = jax.grad(loss, has_aux=True)(params, state, x)
        params = jax.tree.map(lambda p, g: p - 0.3 * g, params, grads)
    return params, state


def torch_eval(bn, x: np.ndarray) -> np.ndarray:
    bn.eval()
    with torch.no_grad():
        return bn(torch.from_numpy(x)).numpy()


def as_tensors(state_dict):
    return {key: torch.from_numpy(value) for key, value in state_dict.items()}



# ---------------------------------------------------------------------------------------
# PyTorch


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_layer_trained_in_pytorch_evaluates_identically_in_jbn(dims, dtype):
    bn = trained_torch_batchnorm(dims, dtype)
    params, state = jbn.from_torch(bn.state_dict())
    x = torch_input(dims, dtype, seed=99).numpy()
    y, new_state = jbn.batchnorm(params, state, jnp.asarray(x), False)
    assert new_state is state
    assert_close_ulps(y, torch_eval(bn, x))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_layer_trained_in_jbn_evaluates_identically_in_pytorch(dims, dtype):
    params, state = trained_jbn(dtype)
    bn = TORCH_BATCHNORMS[dims](C, dtype=TORCH_DTYPES[dtype])
    bn.load_state_dict(as_tensors(jbn.to_torch(params, state)), strict=True)
    assert int(bn.num_batches_tracked) == 3
    x = torch_input(dims, dtype, seed=99).numpy()
    y, _ = jbn.batchnorm(params, state, jnp.asarray(x), False)
    assert_close_ulps(torch_eval(bn, x), y)


@pytest.mark.quick
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_torch_state_dict_round_trips_through_jbn_exactly(dtype):
    bn = trained_torch_batchnorm(2, dtype)
    expected = {key: value.numpy() for key, value in bn.state_dict().items()}
    assert_same_arrays(jbn.to_torch(*jbn.from_torch(bn.state_dict())), expected)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_jbn_layer_round_trips_through_torch_state_dict_exactly(dtype):
    params, state = trained_jbn(dtype)
    bn = torch.nn.BatchNorm2d(C, dtype=TORCH_DTYPES[dtype])
    bn.load_state_dict(as_tensors(jbn.to_torch(params, state)), strict=True)
    new_params, new_state = jbn.from_torch(bn.state_dict())
    assert_same_arrays(new_params, params)
    assert_same_arrays(new_state, state)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track_running_stats", [True, False])
def test_to_torch_has_pytorch_names_order_and_dtypes(affine, track_running_stats):
    params, state = trained_jbn(np.float32, affine=affine,
                                track_running_stats=track_running_stats)
    bn = torch.nn.BatchNorm1d(C, affine=affine, track_running_stats=track_running_stats)
    state_dict = as_tensors(jbn.to_torch(params, state))
    assert [(k, v.dtype, v.shape) for k, v in state_dict.items()] == [
        (k, v.dtype, v.shape) for k, v in bn.state_dict().items()]
    if track_running_stats:
        assert state_dict["num_batches_tracked"].dtype == torch.int64
    bn.load_state_dict(state_dict, strict=True)


def test_to_torch_gives_writable_copies():
    params, state = trained_jbn()
    state_dict = jbn.to_torch(params, state)
    before = np.array(state["running_mean"])
    for value in state_dict.values():
        assert value.flags.writeable and value.flags.owndata
        value[...] = 0
    np.testing.assert_array_equal(state["running_mean"], before)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_from_torch_keeps_float_dtypes(dtype):
    torch_dtype = {np.float16: torch.float16}.get(dtype) or TORCH_DTYPES[dtype]
    bn = torch.nn.BatchNorm1d(C, dtype=torch_dtype)
    params, state = jbn.from_torch(bn.state_dict())
    for value in (*params.values(), state["running_mean"], state["running_var"]):
        assert value.dtype == dtype
    assert state["num_batches_tracked"].dtype == jnp.int32


def test_from_torch_keeps_bfloat16():
    bn = trained_torch_batchnorm(1, np.float32).to(torch.bfloat16)
    params, state = jbn.from_torch(bn.state_dict())
    for key, value in {**params, **state}.items():
        if key != "num_batches_tracked":
            assert value.dtype == jnp.bfloat16
            expected = bn.state_dict()[key].float().numpy()
            np.testing.assert_array_equal(value.astype(np.float32), expected)


def test_from_torch_takes_parameters_that_require_grad():
    bn = trained_torch_batchnorm(2)
    state_dict = bn.state_dict(keep_vars=True)
    assert state_dict["weight"].requires_grad
    params, _ = jbn.from_torch(state_dict)
    np.testing.assert_array_equal(params["weight"], bn.weight.detach().numpy())


def test_from_torch_takes_numpy_arrays():
    bn = trained_torch_batchnorm(2)
    arrays = {key: value.numpy() for key, value in bn.state_dict().items()}
    assert_same_arrays(jbn.to_torch(*jbn.from_torch(arrays)), arrays)


def test_from_torch_result_does_not_change_when_the_torch_module_trains_on():
    bn = trained_torch_batchnorm(2)
    params, state = jbn.from_torch(bn.state_dict())
    before = {key: np.array(value) for key, value in {**params, **state}.items()}
    train_torch(bn, 2, np.float64, seed=50)  # updates the tensors in place
    assert not np.array_equal(bn.running_mean.numpy(), before["running_mean"])
    assert_same_arrays({**params, **state}, before)


def test_torch_conversions_work_without_importing_torch_flax_or_equinox():
    code = (
        "import sys, numpy as np, jbn\n"
        "c = 3\n"
        "sd = {'bn.weight': np.ones(c, np.float32), 'bn.bias': np.zeros(c, np.float32),\n"
        "      'bn.running_mean': np.zeros(c, np.float32),\n"
        "      'bn.running_var': np.ones(c, np.float32),\n"
        "      'bn.num_batches_tracked': np.array(5)}\n"
        "out = jbn.to_torch(*jbn.from_torch(sd, 'bn.'))\n"
        "assert int(out['num_batches_tracked']) == 5\n"
        "params, state, rest = jbn.from_torch_model(sd)\n"
        "assert list(jbn.to_torch_model(params, state)) == list(sd) and rest == {}\n"
        "imported = [m for m in ('torch', 'flax', 'equinox') if m in sys.modules]\n"
        "assert not imported, imported\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def whole_model_state_dict():
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.encoder = torch.nn.Module()
    model.encoder.conv = torch.nn.Conv2d(2, 5, 3)
    model.encoder.bn1 = torch.nn.BatchNorm2d(5)
    model.bn1 = torch.nn.BatchNorm1d(7)
    for bn, scale in ((model.encoder.bn1, 1.0), (model.bn1, -2.0)):
        with torch.no_grad():
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.normal_()
            bn.running_mean.normal_().mul_(scale)
            bn.running_var.uniform_(0.5, 3.0)
            bn.num_batches_tracked.fill_(int(3 * abs(scale)))
    return model.state_dict()


@pytest.mark.parametrize("prefix", ["encoder.bn1.", "bn1."])
def test_from_torch_selects_the_layer_under_prefix_in_a_whole_model_state_dict(prefix):
    state_dict = whole_model_state_dict()
    layer = {key[len(prefix):]: value.numpy() for key, value in state_dict.items()
             if key.startswith(prefix)}
    assert len(layer) == 5
    assert_same_arrays(jbn.to_torch(*jbn.from_torch(state_dict, prefix)), layer)


def test_from_torch_with_a_misspelt_prefix_lists_the_layers_present():
    with pytest.raises(ValueError, match=r"'encoder\.bn\.'.*\['bn1\.', 'encoder\.bn1\.'\]"):
        jbn.from_torch(whole_model_state_dict(), "encoder.bn.")


def test_from_torch_without_affine_gives_empty_params_and_matches_pytorch():
    bn = trained_torch_batchnorm(2, affine=False)
    params, state = jbn.from_torch(bn.state_dict())
    assert params == {} and set(state) == {"running_mean", "running_var",
                                           "num_batches_tracked"}
    x = torch_input(2, np.float64, seed=99).numpy()
    assert_close_ulps(jbn.batchnorm(params, state, jnp.asarray(x), False)[0], torch_eval(bn, x))


def test_from_torch_without_running_stats_gives_empty_state_and_matches_pytorch():
    bn = trained_torch_batchnorm(2, track_running_stats=False)
    params, state = jbn.from_torch(bn.state_dict())
    assert state == {} and set(params) == {"weight", "bias"}
    # Without running statistics, eval mode normalizes with the batch's own, in both.
    x = torch_input(2, np.float64, seed=99).numpy()
    assert_close_ulps(jbn.batchnorm(params, state, jnp.asarray(x), False)[0], torch_eval(bn, x))
    assert jbn.to_torch(params, state).keys() == {"weight", "bias"}


def test_a_layer_built_without_bias_ports_as_its_weight_alone_and_back():
    bn = trained_torch_batchnorm(2, bias=False)
    params, state = jbn.from_torch(bn.state_dict())
    assert set(params) == {"weight"}  # no bias leaf for an optimizer to move
    x = torch_input(2, np.float64, seed=99).numpy()
    assert_close_ulps(jbn.batchnorm(params, state, jnp.asarray(x), False)[0], torch_eval(bn, x))
    state_dict = jbn.to_torch(params, state)
    assert_same_arrays(state_dict, {key: value.numpy() for key, value in bn.state_dict().items()})
    torch.nn.BatchNorm2d(C, bias=False, dtype=torch.float64).load_state_dict(
        as_tensors(state_dict), strict=True)


def test_a_state_dict_without_a_count_round_trips_without_one_and_loads_into_pytorch():
    state_dict = dict(trained_torch_batchnorm(1).state_dict())
    del state_dict["num_batches_tracked"]  # as in older checkpoints
    params, state = jbn.from_torch(state_dict)
    assert set(state) == {"running_mean", "running_var"}
    written = jbn.to_torch(params, state)
    assert_same_arrays(written, {key: value.numpy() for key, value in state_dict.items()})
    # A plain dict carries no version, so PyTorch accepts it, keeping a fresh layer's count.
    bn = torch.nn.BatchNorm1d(C, dtype=torch.float64)
    bn.load_state_dict(as_tensors(written), strict=True)
    assert int(bn.num_batches_tracked) == 0
    np.testing.assert_array_equal(state["running_var"], bn.running_var.numpy())


def test_frozen_batchnorm2d_state_dicts_round_trip_and_load_back():
    frozen = FrozenBatchNorm2d(C).double()
    with torch.no_grad():
        for i, buffer in enumerate(frozen.buffers()):
            buffer.copy_(torch.linspace(0.5, 2.0 + i, C))
    params, state = jbn.from_torch(frozen.state_dict())
    assert set(params) == {"weight", "bias"} and set(state) == {"running_mean", "running_var"}
    written = jbn.to_torch(params, state)
    assert_same_arrays(written, {key: value.numpy() for key, value in frozen.state_dict().items()})
    fresh = FrozenBatchNorm2d(C).double()
    fresh.load_state_dict(as_tensors(written), strict=True)
    assert_same_arrays({key: value.numpy() for key, value in fresh.state_dict().items()},
                       written)


def state_dict_with(**changes):
    state_dict = {f"bn.{k}": v for k, v in trained_torch_batchnorm(1).state_dict().items()}
    for key, value in changes.items():
        if value is None:
            del state_dict[f"bn.{key}"]
        else:
            state_dict[f"bn.{key}"] = value
    return state_dict


@pytest.mark.parametrize("changes, message", [
    ({"weight": None}, r"'bn\.weight' is missing while 'bn\.bias' is present"),
    ({"running_var": None}, r"'bn\.running_var' is missing while 'bn\.running_mean'"),
    ({"running_mean": None}, r"'bn\.running_mean' is missing while 'bn\.running_var'"),
    ({"running_mean": None, "running_var": None},
     r"'bn\.running_mean' is missing while 'bn\.num_batches_tracked'"),
])
@pytest.mark.quick
def test_from_torch_rejects_a_partial_state_dict_naming_the_missing_key(changes, message):
    with pytest.raises(ValueError, match=message):
        jbn.from_torch(state_dict_with(**changes), "bn.")


@pytest.mark.parametrize("changes, message", [
    ({"running_var": torch.ones(C, 1)},
     r"'bn\.running_var' must have shape \(4,\) \(the size of 'bn\.weight'\) and a floating "
     r"dtype, got shape \(4, 1\) float32"),
    ({"bias": torch.zeros(C + 1)},
     r"'bn\.bias' must have shape \(4,\) \(the size of 'bn\.weight'\) .*got shape \(5,\)"),
    ({"weight": torch.ones(C, C)},
     r"'bn\.weight' must have shape \(C,\) and a floating dtype, got shape \(4, 4\)"),
    ({"running_mean": torch.zeros(C, dtype=torch.int64)},
     r"'bn\.running_mean' must have .* a floating dtype, got shape \(4,\) int64"),
    ({"num_batches_tracked": torch.tensor([3])},
     r"'bn\.num_batches_tracked' must have shape \(\) and an int32 or int64 dtype, got shape "
     r"\(1,\) int64"),
    ({"num_batches_tracked": torch.tensor(3.0)}, r"'bn\.num_batches_tracked' .*float32"),
    ({"num_batches_tracked": torch.tensor(2**31)}, r"'bn\.num_batches_tracked' is 2147483648"),
])
def test_from_torch_rejects_a_misshaped_entry_naming_key_and_shapes(changes, message):
    with pytest.raises(ValueError, match=message):
        jbn.from_torch(state_dict_with(**changes), "bn.")


@pytest.mark.parametrize("params, state, message", [
    ({"bias": jnp.zeros(C)}, {}, r"params must have keys \['weight', 'bias'\]"),
    ({}, {"running_var": jnp.ones(C)}, r"state must have keys"),
    ({"weight": jnp.ones(C), "bias": jnp.zeros(C + 1)}, {},
     r"params\['bias'\] must have shape \(4,\).*got shape \(5,\)"),
])
def test_to_torch_rejects_params_or_state_batchnorm_would_not_accept(params, state, message):
    with pytest.raises(ValueError, match=message):
        jbn.to_torch(params, state)


# ---------------------------------------------------------------------------------------
# Flax

FLAX_SHAPE = (6, 3, 4, C)  # channels last, Flax's default axis


def flax_input(seed):
    rng = np.random.default_rng(seed)
    return rng.normal(np.linspace(-3, 5, C), np.linspace(0.5, 4, C), FLAX_SHAPE)


def flax_batchnorm(momentum=0.9, **kwargs):
    return nn.BatchNorm(momentum=momentum, epsilon=1e-5, dtype=jnp.float64,
                        param_dtype=jnp.float64, force_float32_reductions=False, **kwargs)


def trained_flax(module, steps=3):
    """Variables after three gradient steps in training mode, in float64."""
    variables = module.init(jax.random.key(0), jnp.zeros(FLAX_SHAPE), use_running_average=True)

    def loss(params, batch_stats, x):
        y, updates = module.apply({"params": params, "batch_stats": batch_stats}, x,
                                  use_running_average=False, mutable=["batch_stats"])
        return jnp.mean((y - x[::-1]) ** 2), updates["batch_stats"]

    params, batch_stats = variables.get("params", {}), variables["batch_stats"]
    for step in range(steps):
        grads, batch_stats = jax.grad(loss, has_aux=True)(params, batch_stats,
                                                          flax_input(step))
        params = jax.tree.map(lambda p, g: p - 0.3 * g, params, grads)
    return ({"params": params} if params else {}) | {"batch_stats": batch_stats}


def flax_eval(module, variables, x):
    return module.apply(variables, x, use_running_average=True)


@pytest.mark.parametrize("use_scale, use_bias", [(True, True), (False, True), (True, False),
                                                 (False, False)])
def test_layer_trained_in_flax_evaluates_identically_in_jbn(use_scale, use_bias):
    module = flax_batchnorm(use_scale=use_scale, use_bias=use_bias)
    variables = trained_flax(module)
    params, state = jbn.from_flax(variables)
    assert set(params) == ({"weight", "bias"} if use_bias else {"weight"} if use_scale else set())
    x = flax_input(99)
    y, _ = jbn.batchnorm(params, state, jnp.asarray(x), False, axis=-1)
    assert_close_ulps(y, flax_eval(module, variables, x))


def test_layer_trained_in_jbn_evaluates_identically_in_flax():
    params, state = trained_jbn(np.float64)
    module = flax_batchnorm(axis=1)
    x = torch_input(2, np.float64, seed=99).numpy()
    y, _ = jbn.batchnorm(params, state, jnp.asarray(x), False)
    assert_close_ulps(flax_eval(module, jbn.to_flax(params, state), x), y)


@pytest.mark.quick
@pytest.mark.parametrize("use_bias", [True, False])
def test_flax_variables_round_trip_through_jbn_exactly(use_bias):
    variables = trained_flax(flax_batchnorm(use_bias=use_bias))
    round_trip = jbn.to_flax(*jbn.from_flax(variables))
    assert jax.tree.structure(round_trip) == jax.tree.structure(variables)
    jax.tree.map(lambda a, e: assert_same_arrays({"": a}, {"": e}), round_trip, variables)


def test_jbn_layer_round_trips_through_flax_but_for_the_batch_count():
    params, state = trained_jbn(np.float64)
    new_params, new_state = jbn.from_flax(jbn.to_flax(params, state))
    assert_same_arrays(new_params, params)
    assert int(state["num_batches_tracked"]) == 3
    assert int(new_state.pop("num_batches_tracked")) == 0  # Flax keeps no count
    assert_same_arrays(new_state, {k: state[k] for k in ("running_mean", "running_var")})


def test_flax_momentum_is_one_minus_jbn_momentum_and_flax_averages_the_biased_variance():
    module = flax_batchnorm(momentum=0.9, use_scale=False, use_bias=False)
    variables = trained_flax(module, steps=2)
    x = flax_input(7)
    _, updates = module.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    params, state = jbn.from_flax(variables)
    _, new_state = jbn.batchnorm(params, state, jnp.asarray(x), True, momentum=0.1, axis=-1)

    assert_close_ulps(new_state["running_mean"], updates["batch_stats"]["mean"])
    # Each adds 0.1 × its batch variance to 0.9 × the old value: Flax the biased one, jbn
    # the unbiased one, n/(n − 1) times larger.
    n = x.size // C
    kept = 0.9 * np.asarray(state["running_var"])
    jbn_added = np.asarray(new_state["running_var"]) - kept
    flax_added = np.asarray(updates["batch_stats"]["var"]) - kept
    np.testing.assert_allclose(jbn_added, flax_added * n / (n - 1), rtol=1e-12)
    np.testing.assert_allclose(flax_added, 0.1 * x.reshape(-1, C).var(axis=0), rtol=1e-12)


def test_to_flax_leaves_out_what_jbn_does_not_have():
    params, state = trained_jbn(np.float32, affine=False)
    assert set(jbn.to_flax(params, state)) == {"batch_stats"}
    params, state = trained_jbn(np.float32, track_running_stats=False)
    assert set(jbn.to_flax(params, state)) == {"params"}


@pytest.mark.parametrize("variables, message", [
    (lambda v: {"params": {"BatchNorm_0": v["params"]},
                "batch_stats": {"BatchNorm_0": v["batch_stats"]}},
     r"variables\['params'\] has unexpected keys \['BatchNorm_0'\]"),
    (lambda v: {"params": v["params"], "batch_stats": {"mean": v["batch_stats"]["mean"]}},
     r"variables\['batch_stats'\]\['var'\] is missing"),
    (lambda v: v | {"cache": {}}, r"unexpected collections \['cache'\]"),
    (lambda v: {"params": v["params"] | {"scale": jnp.ones((C, 2))},
                "batch_stats": v["batch_stats"]},
     r"variables\['params'\]\['scale'\] must have shape \(C,\) and a floating dtype, got "
     r"shape \(4, 2\)"),
    (lambda v: {"params": v["params"],
                "batch_stats": v["batch_stats"] | {"var": jnp.ones(C + 1)}},
     r"variables\['batch_stats'\]\['var'\] must have shape \(4,\) \(the size of "
     r"variables\['params'\]\['scale'\]\) and a floating dtype, got shape \(5,\)"),
])
def test_from_flax_rejects_variables_that_are_not_one_batchnorm(variables, message):
    with pytest.raises(ValueError, match=message):
        jbn.from_flax(variables(trained_flax(flax_batchnorm(), steps=1)))


# ---------------------------------------------------------------------------------------
# Folding


def random_layer(dtype, *, affine=True, seed=0):
    rng = np.random.default_rng(seed)
    params = {}
    if affine:
        params = {"weight": jnp.asarray(rng.uniform(-2, 2, C), dtype),
                  "bias": jnp.asarray(rng.normal(size=C), dtype)}
    state = {"running_mean": jnp.asarray(rng.normal(0, 3, C), dtype),
             "running_var": jnp.asarray(rng.uniform(0.01, 5, C), dtype),
             "num_batches_tracked": jnp.asarray(9, jnp.int32)}
    return params, state


def per_channel(v, ndim, axis):
    shape = [1] * ndim
    shape[axis] = v.shape[0]
    return v.reshape(shape)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("axis", [1, -1])
def test_fold_equals_eval_mode_up_to_the_rounding_of_its_terms(dtype, affine, axis):
    params, state = random_layer(dtype, affine=affine)
    x = jnp.moveaxis(jnp.asarray(torch_input(2, dtype, seed=5).numpy()), 1, axis)
    scale, shift = jbn.fold(params, state, eps=1e-3)
    product = x * per_channel(scale, x.ndim, axis)
    folded = product + per_channel(shift, x.ndim, axis)
    expected, _ = jbn.batchnorm(params, state, x, False, eps=1e-3, axis=axis)
    assert folded.dtype == expected.dtype
    # x·s + t rounds at the size of its terms, which exceed y where the mean is large against
    # the spread (eval mode centers first and does not).
    terms = np.abs(np.asarray(product)) + np.abs(np.asarray(per_channel(shift, x.ndim, axis)))
    error = np.abs(np.asarray(folded, np.float64) - np.asarray(expected, np.float64))
    assert np.all(error <= 4 * np.finfo(dtype).eps * terms)


def test_fold_computes_weight_over_root_variance_and_bias_minus_mean_times_scale():
    params, state = random_layer(np.float64)
    scale, shift = jbn.fold(params, state, eps=0.5)
    w, b, mean, var = (np.asarray(a) for a in (*params.values(), state["running_mean"],
                                               state["running_var"]))
    expected_scale = w / np.sqrt(var + 0.5)
    assert_close_ulps(scale, expected_scale, ulps=2)
    assert_close_ulps(shift, b - mean * expected_scale, ulps=4)


def test_fold_works_under_jit():
    params, state = random_layer(np.float32)
    jitted = jax.jit(jbn.fold, static_argnames="eps")(params, state, eps=1e-5)
    eager = jbn.fold(params, state, eps=1e-5)
    for a, e in zip(jitted, eager, strict=True):
        assert_close_ulps(a, e, ulps=2)


def test_fold_without_running_statistics_raises():
    params, _ = random_layer(np.float32)
    with pytest.raises(ValueError, match="fold needs running statistics"):
        jbn.fold(params, {})


@pytest.mark.quick
@pytest.mark.parametrize("with_bias", [True, False])
def test_fold_into_a_dense_kernel_equals_dense_then_batchnorm(with_bias):
    rng = np.random.default_rng(1)
    params, state = random_layer(np.float64)
    x = jnp.asarray(rng.normal(size=(8, 6)))
    kernel = jnp.asarray(rng.normal(size=(6, C)))  # (in, out), as flax.linen.Dense
    bias = jnp.asarray(rng.normal(size=C)) if with_bias else None
    dense = x @ kernel + (0 if bias is None else bias)
    expected, _ = jbn.batchnorm(params, state, dense, False, axis=-1)

    new_kernel, new_bias = jbn.fold_into(kernel, bias, params, state, layout="io")
    assert_close_ulps(x @ new_kernel + new_bias, expected)


@pytest.mark.parametrize("with_bias", [True, False])
def test_fold_into_a_torch_linear_weight_equals_linear_then_batchnorm1d(with_bias):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, C, bias=with_bias, dtype=torch.float64),
                                torch.nn.BatchNorm1d(C, dtype=torch.float64))
    x = torch.randn(16, 6, dtype=torch.float64) * 3 + 1
    _train_on(model, x)
    params, state = jbn.from_torch(model.state_dict(), "1.")
    linear = model[0]
    bias = linear.bias.detach().numpy() if with_bias else None
    weight, bias = jbn.fold_into(linear.weight.detach().numpy(), bias, params, state,
                                 layout="oi")  # (out, in)
    with torch.no_grad():
        expected = model.eval()(x).numpy()
        folded = torch.nn.functional.linear(x, torch.from_numpy(np.array(weight)),
                                            torch.from_numpy(np.array(bias))).numpy()
    assert_close_ulps(folded, expected)


def _train_on(model, x, steps=3):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for step in range(steps):
        batch = x.roll(step, 0)
        loss = (model(batch) - 1).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("with_bias", [True, False])
def test_fold_into_an_hwio_conv_kernel_equals_conv_then_batchnorm(with_bias):
    rng = np.random.default_rng(2)
    params, state = random_layer(np.float64)
    x = jnp.asarray(rng.normal(size=(2, 7, 6, 3)))  # NHWC
    kernel = jnp.asarray(rng.normal(size=(3, 3, 3, C)))  # HWIO

    def conv(kernel, bias):
        z = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return z if bias is None else z + bias

    bias = jnp.asarray(rng.normal(size=C)) if with_bias else None
    expected, _ = jbn.batchnorm(params, state, conv(kernel, bias), False, axis=-1)
    new_kernel, new_bias = jbn.fold_into(kernel, bias, params, state, layout="hwio")
    assert_close_ulps(conv(new_kernel, new_bias), expected)


@pytest.mark.parametrize("dims, layout", [(1, "oil"), (2, "oihw"), (3, "oidhw")])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("groups", [1, 2])
def test_fold_into_a_torch_conv_weight_equals_conv_then_batchnorm(dims, layout, with_bias,
                                                                  groups):
    torch.manual_seed(dims)
    conv = TORCH_CONVS[dims](C, C, 3, padding=1, groups=groups, bias=with_bias,
                             dtype=torch.float64)
    model = torch.nn.Sequential(conv, TORCH_BATCHNORMS[dims](C, dtype=torch.float64))
    x = torch_input(dims, np.float64, seed=3)
    _train_on(model, x)
    params, state = jbn.from_torch(model.state_dict(), "1.")
    bias = conv.bias.detach().numpy() if with_bias else None
    weight, bias = jbn.fold_into(conv.weight.detach().numpy(), bias, params, state,
                                 layout=layout)
    functional = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d,
                  3: torch.nn.functional.conv3d}[dims]
    with torch.no_grad():
        expected = model.eval()(x).numpy()
        folded = functional(x, torch.from_numpy(np.array(weight)),
                            torch.from_numpy(np.array(bias)), padding=1, groups=groups).numpy()
    assert_close_ulps(folded, expected)


def test_fold_into_agrees_with_torch_fuse_conv_bn_weights():
    bn = trained_torch_batchnorm(2)
    weight = torch.randn(C, 3, 2, 2, dtype=torch.float64)
    bias = torch.randn(C, dtype=torch.float64)
    expected = torch.nn.utils.fusion.fuse_conv_bn_weights(
        weight, bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
    actual = jbn.fold_into(weight.numpy(), bias.numpy(), *jbn.from_torch(bn.state_dict()),
                           layout="oihw", eps=bn.eps)
    for a, e in zip(actual, expected, strict=True):
        assert_close_ulps(a, e.detach().numpy(), ulps=4)


def test_fold_into_keeps_the_dtypes_of_the_layer():
    params, state = random_layer(np.float64)
    kernel, bias = jbn.fold_into(jnp.ones((3, C), jnp.float32), None, params, state,
                                 layout="io")
    assert kernel.dtype == jnp.float32 and bias.dtype == jnp.float32
    kernel, bias = jbn.fold_into(jnp.ones((3, C), jnp.float32), jnp.ones(C, jnp.float16),
                                 params, state, layout="io")
    assert kernel.dtype == jnp.float32 and bias.dtype == jnp.float16


@pytest.mark.parametrize("kernel_shape, bias, layout, message", [
    ((3, C), None, "oihw", r"layout must name the 2 axes of the kernel \(shape \(3, 4\)\)"),
    ((3, C), None, "ab", r"one 'o' for the output channels"),
    ((3, C), None, "oi", r"has 3 output channels \(axis 0 in layout 'oi'\), the batch norm 4"),
    ((3, C), np.zeros(3), "io", r"bias must have shape \(4,\), got \(3,\)"),
])
def test_fold_into_rejects_a_kernel_that_does_not_match(kernel_shape, bias, layout, message):
    params, state = random_layer(np.float32)
    with pytest.raises(ValueError, match=message):
        jbn.fold_into(jnp.ones(kernel_shape), bias, params, state, layout=layout)


def test_port_from_torch_example_runs_and_agrees():
    example = Path(__file__).parent.parent / "examples" / "port_from_torch.py"
    result = subprocess.run([sys.executable, str(example)], capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "max |PyTorch − JAX/jbn|" in result.stdout
