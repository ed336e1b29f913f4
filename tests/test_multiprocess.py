"""Synchronized statistics across processes: 2 ``jax.distributed`` processes × 2 CPU
devices, talking over loopback through gloo, give what one call on the whole batch gives.

The batch is split over a global mesh of 4 devices, with a mask that leaves the shards
uneven (7, 0, 1 and 4 valid positions): a device with no valid value must count for
nothing, and one with a single value for one value, not for a device's worth.
"""

import os
import socket
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbn
import reference

WORKER = os.path.join(os.path.dirname(__file__), "_multiprocess_worker.py")
PROCESSES = 2
TIMEOUT_S = 120

N, C, L = 8, 3, 4  # 2 examples per device
# Per device (2 examples × L positions): 7 valid, none, 1, and 4.
MASK = np.array([[1, 1, 1, 1], [1, 1, 1, 0],
                 [0, 0, 0, 0], [0, 0, 0, 0],
                 [0, 0, 0, 0], [0, 1, 0, 0],
                 [1, 0, 1, 0], [0, 1, 0, 1]], bool)

# float32 throughout. The processes sum in another order than the single call (per-device
# partial sums, then all-reduces across processes), so results differ by float32 rounding:
# a few ulps (1.2e-7 relative each) through the sums, the inverse square root and the
# gradient's reductions, i.e. around 1e-6 relative, or absolute for values near 0 that are
# sums of O(1) terms. Measured, the largest difference is an eighth of the tolerance below
# (in dx). A wrong combination (equal weights per device, or the empty device's values
# counted) shifts the statistics by 1e-2 or more.
TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def make_inputs(rng: np.random.Generator) -> dict[str, np.ndarray]:
    x = rng.normal(0, 2, (N, C, L)) + np.array([0.0, 10.0, -50.0])[:, None]
    # Values in masked positions must not matter: make those of the empty device far off.
    x[2:4] += 1000
    return {
        "x": x.astype(np.float32),
        "mask": MASK,
        "cotangent": rng.normal(size=(N, C, L)).astype(np.float32),
        "weight": rng.normal(1, 0.3, C).astype(np.float32),
        "bias": rng.normal(0, 0.3, C).astype(np.float32),
        "running_mean": rng.normal(size=C).astype(np.float32),
        "running_var": rng.uniform(0.5, 2, C).astype(np.float32),
        "num_batches_tracked": np.asarray(3, np.int32),
    }


def whole_batch(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The reference: one call on the whole batch, on one device of this process."""
    params = {k: jnp.asarray(inputs[k]) for k in ("weight", "bias")}
    state = {k: jnp.asarray(inputs[k])
             for k in ("running_mean", "running_var", "num_batches_tracked")}
    x, mask, cotangent = (jnp.asarray(inputs[k]) for k in ("x", "mask", "cotangent"))

    def loss(x, params):
        y, new_state = jbn.batchnorm(params, state, x, True, mask=mask)
        return jnp.sum(y * cotangent), (y, new_state)

    (_, (y, new_state)), (dx, dparams) = jax.value_and_grad(
        loss, argnums=(0, 1), has_aux=True)(x, params)
    with warnings.catch_warnings():  # momentum=1 replaces the state by the batch statistics
        warnings.filterwarnings("ignore", "momentum=1.0", UserWarning)
        _, batch_stats = jbn.batchnorm(params, state, x, True, mask=mask, momentum=1.0)
    expected = {"y": y, "dx": dx}
    for group, values in {"state": new_state, "batch_stats": batch_stats,
                          "grad": dparams}.items():
        expected.update({f"{group}/{key}": value for key, value in values.items()})
    return {key: np.asarray(value) for key, value in expected.items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory, statistics_path):
    """Inputs, and each process's results, from one run of the 2 workers, on each path of
    the statistics."""
    directory = tmp_path_factory.mktemp("multiprocess")
    inputs = make_inputs(np.random.default_rng(0))
    np.savez(directory / "inputs.npz", **inputs)
    coordinator = f"127.0.0.1:{free_port()}"
    workers = [
        subprocess.Popen([sys.executable, WORKER, coordinator, str(PROCESSES), str(i),
                          str(directory), *([statistics_path] if statistics_path else [])],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
        for i in range(PROCESSES)
    ]
    outputs = []
    try:
        for worker in workers:
            outputs.append(worker.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        pytest.fail(f"the workers did not finish within {TIMEOUT_S} s")
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    for worker, output in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, output
    results = [dict(np.load(directory / f"result_{i}.npz")) for i in range(PROCESSES)]
    return inputs, results


@pytest.mark.parametrize("process", range(PROCESSES))
def test_every_process_sees_the_global_mesh(run, process):
    _, results = run
    assert int(results[process]["processes"]) == PROCESSES
    assert int(results[process]["devices"]) == 2 * PROCESSES


@pytest.mark.parametrize("process", range(PROCESSES))
def test_batch_statistics_are_those_of_the_valid_values_of_the_whole_batch(run, process):
    inputs, results = run
    # NumPy float64 over the valid values, the channel last after the transpose.
    valid = inputs["x"].astype(np.float64).transpose(0, 2, 1)[inputs["mask"]]
    np.testing.assert_allclose(results[process]["batch_stats/running_mean"],
                               valid.mean(axis=0), **TOLERANCE)
    np.testing.assert_allclose(results[process]["batch_stats/running_var"],
                               valid.var(axis=0, ddof=1), **TOLERANCE)


@pytest.mark.parametrize("process", range(PROCESSES))
def test_outputs_state_and_gradients_equal_one_call_on_the_whole_batch(run, process):
    inputs, results = run
    expected = whole_batch(inputs)
    result = results[process]
    assert set(expected) <= set(result)
    for key, value in expected.items():
        assert result[key].dtype == value.dtype, key
        np.testing.assert_allclose(result[key], value, **TOLERANCE, err_msg=key)
    assert int(result["state/num_batches_tracked"]) == int(inputs["num_batches_tracked"]) + 1


@pytest.mark.parametrize("process", range(PROCESSES))
@pytest.mark.parametrize("name, devices", [("group_size=2", [[0, 1], [2, 3]]),
                                           ("across processes", [[0, 2], [1, 3]])])
def test_each_group_of_devices_is_batch_norm_on_its_examples_in_every_process(run, process,
                                                                              name, devices):
    inputs, results = run
    result = results[process]
    params = {k: inputs[k] for k in ("weight", "bias")}
    state = {k: inputs[k] for k in ("running_mean", "running_var", "num_batches_tracked")}
    rows = [np.concatenate([np.arange(2 * d, 2 * d + 2) for d in group]) for group in devices]
    # The float64 reference with the groups' examples side by side, one ghost batch each.
    order = np.concatenate(rows)
    expected_y, expected_state = reference.batchnorm(
        params, state, inputs["x"][order], True, mask=inputs["mask"][order],
        virtual_batch_size=4)
    defined = np.isfinite(expected_y)  # a group of no valid value has no statistics
    np.testing.assert_allclose(result[f"{name} y"][order][defined], expected_y[defined],
                               **TOLERANCE)
    for key in ("running_mean", "running_var"):
        np.testing.assert_allclose(result[f"{name} state/{key}"], expected_state[key],
                                   **TOLERANCE)
