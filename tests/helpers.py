"""What several test files share: comparisons of trees and arrays, running an example,
torchvision's FrozenBatchNorm2d, a zoo of PyTorch batch norms, and the data and functional
references of the framework layers' tests."""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jbn

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
EXAMPLE_TIMEOUT_S = 300


def index(tree, i):
    """Member (or device) i of a pytree of stacked arrays."""
    return jax.tree.map(lambda v: v[i], tree)


def assert_trees_close(actual, expected, *, rtol=1e-7, atol=0.0):
    """The same tree, leaf for leaf within ``rtol`` (relative) and ``atol`` (absolute)."""
    jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, rtol=rtol, atol=atol),
                 actual, expected)


def assert_close_ulps(actual, expected, ulps=8):
    """The same tree: floating leaves equal up to a few units of rounding of the expected
    leaf's magnitude, integer leaves exactly."""
    def check(a, e):
        e = np.asarray(e)
        if jnp.issubdtype(e.dtype, jnp.integer):
            np.testing.assert_array_equal(np.asarray(a), e)
            return
        atol = ulps * np.finfo(e.dtype).eps * max(np.max(np.abs(e)), 1.0)
        np.testing.assert_allclose(np.asarray(a), e, rtol=0, atol=atol)

    jax.tree.map(check, actual, expected)


def assert_same_arrays(actual: dict, expected: dict):
    """Same keys, and bitwise the same values and dtypes."""
    assert set(actual) == set(expected)
    for key, value in expected.items():
        a, e = np.asarray(actual[key]), np.asarray(value)
        assert a.dtype == e.dtype, key
        np.testing.assert_array_equal(a, e, err_msg=key)


def run_example(name: str, *args: str) -> str:
    """Runs ``examples/<name>`` with ``args``; returns its output, failing on error."""
    # On the CPU, with the device count the examples choose, not this test session's.
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    try:
        done = subprocess.run([sys.executable, os.path.join(EXAMPLES, name), *args],
                              capture_output=True, text=True, timeout=EXAMPLE_TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"{name} {' '.join(args)} took more than {EXAMPLE_TIMEOUT_S} s:\n"
                    f"{error.stdout}")
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return done.stdout


class FrozenBatchNorm2d(torch.nn.Module):
    """torchvision's ``FrozenBatchNorm2d`` (``torchvision/ops/misc.py``), under its module name.

    torchvision is not installed beside the CPU build of torch (its wheels are CUDA builds),
    so the class is written here as torchvision has it: weight, bias, running_mean and
    running_var as buffers (nothing to train, and no ``num_batches_tracked``, which loading
    drops), ``eps`` an attribute, and the folded ``x·scale + shift`` as its forward."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)

    def forward(self, x):
        w, b, rv, rm = (value.reshape(1, -1, 1, 1) for value in (
            self.weight, self.bias, self.running_var, self.running_mean))
        scale = w * (rv + self.eps).rsqrt()
        return x * scale + (b - rm * scale)


FrozenBatchNorm2d.__module__ = "torchvision.ops.misc"


# ---------------------------------------------------------------------------------------
# A zoo of PyTorch batch norms (test_models, test_running_stats)


ZOO_CHANNELS = 4
# Every batch norm variant PyTorch writes, among modules with look-alike entries.
BATCH_NORMS = {  # path → (affine, track_running_stats)
    "stem.1": (True, True), "blocks.0.bn": (True, True), "blocks.1.bn": (True, True),
    "head_norm": (False, True), "no_stats": (True, False), "neither": (False, False),
    "sync": (True, True), "no_bias": (True, True), "volume": (True, True),
    "frozen": (True, True),
}
WITH_RUNNING_STATS = [path for path, (_, stats) in BATCH_NORMS.items() if stats]


class ZooBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(ZOO_CHANNELS, ZOO_CHANNELS, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(ZOO_CHANNELS, momentum=None)


class Zoo(torch.nn.Module):
    def __init__(self):
        super().__init__()
        c = ZOO_CHANNELS
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(2, c, 3), torch.nn.BatchNorm2d(c))
        self.blocks = torch.nn.ModuleList([ZooBlock(), ZooBlock()])
        self.head_norm = torch.nn.BatchNorm1d(c, affine=False, eps=1e-3)
        self.no_stats = torch.nn.BatchNorm1d(c, track_running_stats=False)
        self.neither = torch.nn.BatchNorm1d(c, affine=False, track_running_stats=False)
        self.sync = torch.nn.SyncBatchNorm(c, momentum=0.3)
        self.no_bias = torch.nn.BatchNorm1d(c, bias=False)
        self.volume = torch.nn.BatchNorm3d(c)
        self.frozen = FrozenBatchNorm2d(c, eps=0.0)
        # Entries shaped like a batch norm's without being one.
        self.layer_norm = torch.nn.LayerNorm(c)
        self.group_norm = torch.nn.GroupNorm(2, c)
        self.instance_norm = torch.nn.InstanceNorm1d(c, affine=True)
        self.fc = torch.nn.Linear(c, 3)


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


# ---------------------------------------------------------------------------------------
# The framework layers (test_nnx, test_equinox, test_layers, test_models): data, and the
# functional call they must equal


LAYER_CHANNELS = 3
KEYWORDS = {"momentum": None, "eps": 1e-3}  # not the defaults, so passing them on shows
NNX_KEYWORDS = {"momentum": None, "epsilon": 1e-3}  # the same, by Flax's names


def data(shape=(6, LAYER_CHANNELS, 5), seed=0):
    """x, channels first, each channel with its own mean and spread; and a mask."""
    rng = np.random.default_rng(seed)
    c = LAYER_CHANNELS
    x = rng.normal(np.linspace(-2, 3, c)[:, None], np.linspace(0.5, 2, c)[:, None], shape)
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
    return jbn.batchnorm(*jbn.init(LAYER_CHANNELS, dtype=jnp.float64), x, True, mask=mask,
                         **KEYWORDS)


def nhwc_images(seed=0, shape=(4, 8, 8, 8)):
    """Channels last, each channel with its own mean and spread; H = W = C = 8."""
    rng = np.random.default_rng(seed)
    channels = shape[-1]
    return jnp.asarray(rng.normal(np.linspace(-3, 3, channels), np.linspace(0.5, 2, channels),
                                  shape), jnp.float32)


def numpy_init(key, shape, dtype):
    """Kernels drawn by NumPy, the same for every model of one shape (and quicker to make on
    a CPU than jax.random's, compiled for each shape)."""
    del key
    fan_in = np.prod(shape[:-1])
    return jnp.asarray(np.random.default_rng(shape).normal(0, fan_in**-0.5, shape), dtype)


def reference_training(kernel, batches, target, learning_rate=0.1):
    """Losses, final params and state of ``bn(x @ kernel)`` trained on mean squared error,
    in functional jbn."""
    bn_params, state = jbn.init(LAYER_CHANNELS, dtype=jnp.float64)
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
    """A kernel into LAYER_CHANNELS channels, three batches for it, and a target."""
    rng = np.random.default_rng(3)
    kernel = jnp.asarray(rng.normal(size=(4, LAYER_CHANNELS)))
    batches = [jnp.asarray(rng.normal(1, 2, (8, 4))) for _ in range(3)]
    return kernel, batches, jnp.asarray(rng.normal(size=(8, LAYER_CHANNELS)))
