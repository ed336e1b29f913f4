"""What several test files share: comparisons of trees and arrays, running an example, and
torchvision's FrozenBatchNorm2d."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

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
    """Equal up to a few units of rounding of the expected values' magnitude."""
    expected = np.asarray(expected)
    atol = ulps * np.finfo(expected.dtype).eps * max(np.max(np.abs(expected)), 1.0)
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=0, atol=atol)


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
