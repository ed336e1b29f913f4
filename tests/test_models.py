"""Whole models: every batch norm of a PyTorch state_dict in and out, each layer's options
read from the live module, ports that follow them, and Flax NNX and Equinox models loaded
from and written to a PyTorch state_dict through ``from_torch_model``.

References are real ``torch.nn`` models (their state_dicts, ``load_state_dict(strict=True)``
and training-mode forward passes; torchvision's ``FrozenBatchNorm2d``, in ``helpers``) and
the functional ``jbn.batchnorm``.
"""


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
from helpers import (
    BATCH_NORMS,
    KEYWORDS,
    LAYER_CHANNELS,
    NNX_KEYWORDS,
    WITH_RUNNING_STATS,
    ZOO_CHANNELS,
    FrozenBatchNorm2d,
    Zoo,
    assert_close_ulps,
    assert_same_arrays,
    data,
    zoo,
)

pytestmark = pytest.mark.usefixtures("statistics_path")

C = ZOO_CHANNELS


def as_tensors(entries):
    """Tensors for ``load_state_dict``, from NumPy arrays and tensors alike."""
    return {key: torch.as_tensor(value) for key, value in entries.items()}


# ---------------------------------------------------------------------------------------
# Whole state_dicts


def test_batch_norms_are_found_by_their_running_statistics_and_the_rest_left_untouched():
    state_dict = zoo().state_dict()
    params, state, rest = jbn.from_torch_model(state_dict)
    assert list(params) == list(state) == WITH_RUNNING_STATS
    for path in WITH_RUNNING_STATS:
        expected = {key[len(path) + 1:]: value for key, value in state_dict.items()
                    if key.startswith(path + ".")}
        assert_same_arrays(jbn.to_torch(params[path], state[path]),
                            {k: v.numpy() for k, v in expected.items()})
    taken = {f"{path}.{name}" for path in WITH_RUNNING_STATS
             for name in ("weight", "bias", "running_mean", "running_var",
                          "num_batches_tracked")}
    assert list(rest) == [key for key in state_dict if key not in taken]
    assert all(rest[key] is state_dict[key] for key in rest)
    # Without the module, a batch norm without running statistics looks like a LayerNorm.
    assert "no_stats.weight" in rest and "layer_norm.weight" in rest


def test_layers_read_from_the_module_add_batch_norms_without_running_statistics():
    model = zoo()
    layers, _ = jbn.options_from_torch(model)
    params, state, rest = jbn.from_torch_model(model.state_dict(), layers=layers)
    assert list(params) == list(state) == list(BATCH_NORMS)
    for path, (affine, stats) in BATCH_NORMS.items():
        assert bool(params[path]) == affine and bool(state[path]) == stats, path
    np.testing.assert_array_equal(params["no_stats"]["weight"], model.no_stats.weight.detach())
    assert not any(key.startswith(("no_stats.", "stem.1.")) for key in rest)
    assert {"layer_norm.weight", "group_norm.bias", "instance_norm.weight"} <= set(rest)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_whole_state_dict_round_trips_bit_exactly(dtype):
    model = zoo(dtype=dtype)
    layers, _ = jbn.options_from_torch(model)
    params, state, rest = jbn.from_torch_model(model.state_dict(), layers=layers)
    entries = {**rest, **jbn.to_torch_model(params, state)}
    assert set(entries) == set(model.state_dict())  # nothing added: no_bias writes no bias
    fresh = Zoo().to(dtype)
    fresh.load_state_dict(as_tensors(entries), strict=True)
    assert_same_arrays({k: v.numpy() for k, v in fresh.state_dict().items()},
                        {k: v.numpy() for k, v in model.state_dict().items()})


def test_jbn_layers_round_trip_through_a_whole_torch_model_bit_exactly():
    layers, options = jbn.options_from_torch(Zoo())
    rng = np.random.default_rng(1)
    params, state = {}, {}
    for path, built in layers.items():
        p, s = jbn.init(**built, dtype=jnp.float64)
        params[path] = {name: jnp.asarray(rng.normal(size=C)) for name in p}
        state[path] = {}
        if s:
            state[path] = {"running_mean": jnp.asarray(rng.normal(size=C)),
                           "running_var": jnp.asarray(rng.uniform(0.5, 2, C))}
            if options[path].get("mode") != "frozen":  # a frozen layer counts no batches
                state[path]["num_batches_tracked"] = jnp.asarray(7, jnp.int32)
    model = zoo()
    entries = jbn.to_torch_model(params, state)
    model.load_state_dict({**model.state_dict(), **as_tensors(entries)}, strict=True)

    new_params, new_state, _ = jbn.from_torch_model(model.state_dict(), layers=layers)
    jax.tree.map(lambda a, e: assert_same_arrays({"": a}, {"": e}),
                 (new_params, new_state), (params, state))


def test_from_torch_model_finds_a_model_that_is_itself_a_batch_norm_at_path_empty():
    bn = torch.nn.BatchNorm2d(C)
    params, state, rest = jbn.from_torch_model(bn.state_dict())
    assert list(params) == [""] and rest == {}
    assert list(jbn.to_torch_model(params, state)) == list(bn.state_dict())


def test_from_torch_model_checks_each_layer_against_how_it_was_built():
    layers, _ = jbn.options_from_torch(Zoo())
    state_dict = zoo().state_dict()
    built_otherwise = layers | {"head_norm": layers["head_norm"] | {"affine": True}}
    with pytest.raises(ValueError, match=r"layer 'head_norm' was built with affine=True, "
                                         r"but the state_dict has entries \['running_mean'"):
        jbn.from_torch_model(state_dict, layers=built_otherwise)
    with_bias = layers | {"no_bias": layers["no_bias"] | {"bias": True}}
    with pytest.raises(ValueError, match=r"layer 'no_bias' was built with bias=True, but the "
                                         r"state_dict has entries \['weight', 'running_mean'"):
        jbn.from_torch_model(state_dict, layers=with_bias)
    wider = layers | {"sync": layers["sync"] | {"num_features": C + 1}}
    with pytest.raises(ValueError, match=r"layer 'sync' was built with num_features=5, but "
                                         r"params\['weight'\] must have shape \(5,\) and a "
                                         r"floating dtype, got shape \(4,\)"):
        jbn.from_torch_model(state_dict, layers=wider)


def test_from_torch_model_wants_layers_as_options_from_torch_gives_them():
    with pytest.raises(TypeError, match=r"layers must map each batch norm's path to how it "
                                        r"was built, as options_from_torch\(model\)\[0\] "
                                        r"does; got list"):
        jbn.from_torch_model(zoo().state_dict(), layers=["stem.1"])


@pytest.mark.quick
def test_from_torch_model_names_the_key_of_a_broken_layer():
    state_dict = dict(zoo().state_dict())
    del state_dict["blocks.1.bn.running_var"]
    with pytest.raises(ValueError, match=r"'blocks\.1\.bn\.running_var' is missing while "
                                         r"'blocks\.1\.bn\.running_mean' is present"):
        jbn.from_torch_model(state_dict)


def test_to_torch_model_rejects_a_layer_left_out_of_the_state():
    params, state, _ = jbn.from_torch_model(zoo().state_dict())
    del state["volume"]
    with pytest.raises(ValueError, match=r"same layers; only in params: \['volume'\], only in "
                                         r"state: \[\]"):
        jbn.to_torch_model(params, state)


def test_to_torch_model_names_the_layer_of_a_bad_entry():
    params, state, _ = jbn.from_torch_model(zoo().state_dict())
    params["sync"] = {"bias": params["sync"]["bias"]}
    with pytest.raises(ValueError, match=r"layer 'sync': params must have keys"):
        jbn.to_torch_model(params, state)


# ---------------------------------------------------------------------------------------
# Layer options


@pytest.mark.quick
def test_options_from_torch_reads_every_batch_norm_as_built_and_configured():
    model = zoo()
    model.volume.momentum = None
    layers, options = jbn.options_from_torch(model)
    assert list(layers) == list(options) == list(BATCH_NORMS)
    for path, (affine, stats) in BATCH_NORMS.items():
        module = model.get_submodule(path)
        assert layers[path] == {"num_features": C, "affine": affine,
                                "bias": affine and path != "no_bias",
                                "track_running_stats": stats}
        if path != "frozen":
            assert options[path] == {"momentum": module.momentum, "eps": module.eps}
    assert options["frozen"] == {"eps": 0.0, "mode": "frozen"}
    assert options["head_norm"]["eps"] == 1e-3 and options["sync"]["momentum"] == 0.3
    assert options["blocks.0.bn"]["momentum"] is None and options["volume"]["momentum"] is None


def test_options_from_torch_rejects_what_is_not_a_module_and_an_unrun_lazy_layer():
    with pytest.raises(TypeError, match=r"torch.nn.Module \(the module itself, not its "
                                        r"state_dict\), got OrderedDict"):
        jbn.options_from_torch(zoo().state_dict())
    lazy = torch.nn.Sequential(torch.nn.LazyBatchNorm1d())
    with pytest.raises(ValueError, match=r"lazy batch norm '0' does not know"):
        jbn.options_from_torch(lazy)
    lazy(torch.randn(3, C))
    assert jbn.options_from_torch(lazy)[0] == {
        "0": {"num_features": C, "affine": True, "bias": True, "track_running_stats": True}}


def mlp():
    torch.manual_seed(0)
    layers = []
    for _ in range(3):
        layers += [torch.nn.Linear(C, C), torch.nn.BatchNorm1d(C), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers).double()  # batch norms "1", "4", "7"


def jax_mlp(model, options, batches):
    """The running statistics of ``model``'s batch norms after training-mode passes over
    ``batches``, in JAX with jbn and the given options."""
    params, state, weights = jbn.from_torch_model(model.state_dict())

    @jax.jit
    def forward(state, h):
        new_state = {}
        for name, module in model.named_children():
            if isinstance(module, torch.nn.Linear):
                h = h @ weights[f"{name}.weight"].numpy().T + weights[f"{name}.bias"].numpy()
            elif isinstance(module, torch.nn.ReLU):
                h = jax.nn.relu(h)
            else:
                h, new_state[name] = jbn.batchnorm(params[name], state[name], h, True,
                                                   **options[name])
        return new_state

    for x in batches:
        state = forward(state, x)
    return {f"{path}.{name}": value for path, layer in state.items()
            for name, value in layer.items() if name.startswith("running")}


def test_port_follows_a_layer_with_momentum_none_and_eps_1e_3():
    model = mlp()
    model[4].momentum, model[4].eps = None, 1e-3
    batches = [np.random.default_rng(seed).normal(1, 2, (8, C)) for seed in range(2)]
    _, options = jbn.options_from_torch(model)
    assert options["4"] == {"momentum": None, "eps": 1e-3}

    followed = jax_mlp(model, options, batches)
    defaults = jax_mlp(model, {path: {} for path in options}, batches)
    model.train()
    with torch.no_grad():
        for x in batches:
            model(torch.from_numpy(x))
    expected = {key: value.numpy() for key, value in model.state_dict().items()
                if "running" in key}
    assert followed.keys() == expected.keys()
    for key, value in expected.items():
        np.testing.assert_allclose(followed[key], value, rtol=1e-12, atol=1e-14, err_msg=key)

    # With jbn's defaults, layer 4 averages otherwise (momentum 0.1, not 1/count) and
    # normalizes otherwise (eps): it and the layer after it differ, the layer before not.
    def difference(key):
        return np.max(np.abs(defaults[key] - expected[key]))

    assert difference("4.running_mean") > 1e-3 and difference("7.running_var") > 1e-6
    assert difference("1.running_mean") < 1e-12


def test_port_of_a_model_with_frozen_layers_trains_them_frozen_with_one_training_flag():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, C, 3, bias=False), FrozenBatchNorm2d(C, 0.0),
                                torch.nn.ReLU(), torch.nn.Conv2d(C, C, 3, bias=False),
                                torch.nn.BatchNorm2d(C)).double()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
        model[1].weight.uniform_(0.5, 2)
    layers, options = jbn.options_from_torch(model)
    params, state, weights = jbn.from_torch_model(model.state_dict(), layers=layers)
    x = np.random.default_rng(0).normal(1, 2, (4, 2, 7, 7))

    def conv(h, key):
        return jax.lax.conv_general_dilated(h, jnp.asarray(weights[key].numpy()), (1, 1),
                                            "VALID", dimension_numbers=("NCHW", "OIHW", "NCHW"))

    def forward(params, state, x, training):
        h, frozen_state = jbn.batchnorm(params["1"], state["1"], conv(x, "0.weight"), training,
                                        **options["1"])
        y, bn_state = jbn.batchnorm(params["4"], state["4"], conv(jax.nn.relu(h), "3.weight"),
                                    training, **options["4"])
        return y, {"1": frozen_state, "4": bn_state}

    y, new_state = jax.jit(forward, static_argnames="training")(params, state, x, True)
    model.train()  # FrozenBatchNorm2d has no training behaviour: it stays as it is
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(y, expected, rtol=1e-10, atol=1e-10)
    assert_same_arrays(new_state["1"], state["1"])
    np.testing.assert_allclose(new_state["4"]["running_mean"], model[4].running_mean, rtol=1e-12)
    assert jbn.stale_layers(state, new_state) == []  # the frozen layer has no count to grow


# ---------------------------------------------------------------------------------------
# Flax NNX and Equinox models


class TorchBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = torch.nn.BatchNorm1d(LAYER_CHANNELS, affine=False, dtype=torch.float64)


class TorchModel(torch.nn.Module):
    """bn1, blocks.0.bn, frozen and no_bias: paths the NNX and Equinox models below mirror."""

    def __init__(self):
        super().__init__()
        self.bn1 = torch.nn.BatchNorm1d(LAYER_CHANNELS, dtype=torch.float64, **KEYWORDS)
        self.blocks = torch.nn.ModuleList([TorchBlock()])
        self.frozen = FrozenBatchNorm2d(LAYER_CHANNELS, eps=0.0).double()
        self.no_bias = torch.nn.BatchNorm1d(LAYER_CHANNELS, bias=False, dtype=torch.float64)

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
        self.bn = jbn.nnx.BatchNorm(LAYER_CHANNELS, axis=1, use_scale=False, use_bias=False,
                                    param_dtype=jnp.float64)


class NNXModel(nnx.Module):
    def __init__(self, dtype=jnp.float64):
        self.bn1 = jbn.nnx.BatchNorm(LAYER_CHANNELS, axis=1, param_dtype=dtype, **NNX_KEYWORDS)
        self.blocks = nnx.List([NNXBlock()])
        self.frozen = jbn.nnx.BatchNorm(LAYER_CHANNELS, axis=1, param_dtype=jnp.float64,
                                        epsilon=0.0, mode="frozen")
        self.no_bias = jbn.nnx.BatchNorm(LAYER_CHANNELS, axis=1, param_dtype=jnp.float64,
                                         use_bias=False)

    def __call__(self, x):
        return self.no_bias(self.frozen(self.blocks[0].bn(self.bn1(x))))


class EquinoxBlock(eqx.Module):
    bn: jbn.equinox.BatchNorm

    def __init__(self):
        self.bn = jbn.equinox.BatchNorm(LAYER_CHANNELS, channelwise_affine=False,
                                        dtype=jnp.float64, axis=1)


class EquinoxModel(eqx.Module):
    bn1: jbn.equinox.BatchNorm
    blocks: list
    frozen: jbn.equinox.BatchNorm
    no_bias: jbn.equinox.BatchNorm

    def __init__(self, dtype=jnp.float64):
        self.bn1 = jbn.equinox.BatchNorm(LAYER_CHANNELS, dtype=dtype, axis=1, **KEYWORDS)
        self.blocks = [EquinoxBlock()]
        self.frozen = jbn.equinox.BatchNorm(LAYER_CHANNELS, eps=0.0, dtype=jnp.float64, axis=1,
                                            mode="frozen")
        self.no_bias = jbn.equinox.BatchNorm(LAYER_CHANNELS, dtype=jnp.float64, axis=1,
                                             use_bias=False)

    def __call__(self, x, state):
        for layer in (self.bn1, self.blocks[0].bn, self.frozen, self.no_bias):
            x, state = layer(x, state)
        return x, state


def torch_outputs(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(np.array(x))).numpy()


@pytest.mark.quick
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
    assert_same_arrays(fresh.state_dict(), original.state_dict())


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
    assert_same_arrays(fresh.state_dict(), original.state_dict())


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
