"""Whole models: every batch norm of a PyTorch state_dict in and out, each layer's options
read from the live module, states threaded through many layers, and the ResNet example.

References are real ``torch.nn`` models (their state_dicts, ``load_state_dict(strict=True)``
and training-mode forward passes) and the functional ``jbn.batchnorm``.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jbn
from helpers import FrozenBatchNorm2d, assert_same_arrays

pytestmark = pytest.mark.usefixtures("statistics_path")

C = 4

# Every batch norm variant PyTorch writes, among modules with look-alike entries.
BATCH_NORMS = {  # path → (affine, track_running_stats)
    "stem.1": (True, True), "blocks.0.bn": (True, True), "blocks.1.bn": (True, True),
    "head_norm": (False, True), "no_stats": (True, False), "neither": (False, False),
    "sync": (True, True), "no_bias": (True, True), "volume": (True, True),
    "frozen": (True, True),
}
WITH_RUNNING_STATS = [path for path, (_, stats) in BATCH_NORMS.items() if stats]


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(C, C, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(C, momentum=None)


class Zoo(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(2, C, 3), torch.nn.BatchNorm2d(C))
        self.blocks = torch.nn.ModuleList([Block(), Block()])
        self.head_norm = torch.nn.BatchNorm1d(C, affine=False, eps=1e-3)
        self.no_stats = torch.nn.BatchNorm1d(C, track_running_stats=False)
        self.neither = torch.nn.BatchNorm1d(C, affine=False, track_running_stats=False)
        self.sync = torch.nn.SyncBatchNorm(C, momentum=0.3)
        self.no_bias = torch.nn.BatchNorm1d(C, bias=False)
        self.volume = torch.nn.BatchNorm3d(C)
        self.frozen = FrozenBatchNorm2d(C, eps=0.0)
        # Entries shaped like a batch norm's without being one.
        self.layer_norm = torch.nn.LayerNorm(C)
        self.group_norm = torch.nn.GroupNorm(2, C)
        self.instance_norm = torch.nn.InstanceNorm1d(C, affine=True)
        self.fc = torch.nn.Linear(C, 3)


def zoo(seed=0, dtype=torch.float64) -> Zoo:
    """A Zoo whose every entry holds its own random values, as after training."""
    torch.manual_seed(seed)
    model = Zoo().to(dtype)
    with torch.no_grad():
        for name, value in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                value.fill_(int(torch.randint(1, 100, ())))
            elif name.endswith("running_var"):
                value.uniform_(0.5, 3.0)
            else:
                value.normal_()
    return model


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
# Threading many layers


def model_of_three(params, state, x, forget=""):
    """bn1, then the two layers of block, each returning its new state unless forgotten."""
    x, new = jbn.batchnorm(params["bn1"], state["bn1"], x, True)
    new_state = {"bn1": state["bn1"] if forget == "bn1" else new, "block": []}
    for i, (p, s) in enumerate(zip(params["block"], state["block"], strict=True)):
        x, new = jbn.batchnorm(p, s, x, True)
        new_state["block"].append(s if forget == f"block.{i}" else new)
    return x, new_state


@pytest.mark.parametrize("forget", ["", "bn1", "block.1"])
def test_stale_layers_names_each_layer_whose_new_state_was_not_threaded(forget):
    (p1, s1), (p2, s2), (p3, s3) = (jbn.init(C) for _ in range(3))
    params, state = {"bn1": p1, "block": [p2, p3]}, {"bn1": s1, "block": [s2, s3]}
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, C)), jnp.float32)
    _, new_state = model_of_three(params, state, x, forget)
    assert jbn.stale_layers(state, new_state) == ([forget] if forget else [])


def test_stale_layers_names_layers_missing_from_the_new_state_and_takes_one_layer():
    params, state, _ = jbn.from_torch_model(zoo().state_dict())
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, C)))
    new_state = {path: jbn.batchnorm(params[path], state[path], x, True)[1]
                 for path in ("head_norm", "no_bias")}
    # The frozen layer counts no batches: it is never stale.
    assert jbn.stale_layers(state, new_state) == sorted(
        path for path in WITH_RUNNING_STATS if path not in new_state and path != "frozen")
    assert jbn.stale_layers(state["no_bias"], new_state["no_bias"]) == []
    assert jbn.stale_layers(state["no_bias"], state["no_bias"]) == [""]
