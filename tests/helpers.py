"""What several test files share: comparisons of trees and arrays, and running an example."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

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
