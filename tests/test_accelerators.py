"""The statistics of GPUs and TPUs: what they compile to, and their worst case.

Every accuracy, parity, transform and cross-device test runs on this path too (the
``statistics_path`` fixture); here are the tests of what is particular to it: no
data-dependent conditional in what is exported for ``cuda``, ``rocm`` and ``tpu``, the plan
XLA's GPU compiler makes for an H100, how the shift is sampled, and the documented worst
case."""

import functools
import importlib.util
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jbn
from jbn import _stats
from jbn._reduction import Reduction

C = 4
RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.normal(3.0, 2.0, (16, C, 5)), jnp.float32)
MASK = jnp.asarray(RNG.random((16, 5)) < 0.6)


def data_dependent_conditionals(module: str) -> list[str]:
    """The ``stablehlo.case`` ops of an exported module whose index is not fixed when it is
    compiled: neither a constant nor the platform index (nor a case of those)."""
    found = []
    static = set()
    for line in module.splitlines():
        if "func.func" in line:  # SSA names are local to a function
            static = set(re.findall(r"(%arg\d+): tensor<i32> \{jax.global_constant = "
                                    r"\"_platform_index\"", line))
        defined = re.match(r"\s*(%[\w#]+)(?::\d+)? = (.*)", line)
        if not defined:
            continue
        name, operation = defined.groups()
        if operation.startswith("stablehlo.constant"):
            static.add(name)
        case = re.match(r"\"stablehlo.case\"\((%[\w#]+)\)", operation)
        if case:
            if case.group(1) in static:
                static.add(name)
            else:
                found.append(line.strip())
    if re.search(r"stablehlo\.(if|while)\b", module):
        found.append("stablehlo.if or stablehlo.while")
    return found


def training_forward(params, state, x, mask):
    return jbn.batchnorm(params, state, x, True, mask=mask)


def forward_backward(params, state, x, mask):
    def loss(params, x):
        y, new_state = training_forward(params, state, x, mask)
        return jnp.sum(jnp.sin(y)), new_state
    return jax.grad(loss, (0, 1), has_aux=True)(params, x)


MESH = jax.make_mesh((8,), ("data",))


def per_device(step):
    """``step`` under ``jax.shard_map`` over 8 devices, batch split on axis 0."""
    def synchronized(params, state, x, mask):
        return jbn.batchnorm(params, state, x, True, mask=mask, axis_name="data")

    def forward_backward(params, state, x, mask):
        def loss(params, x):
            y, new_state = synchronized(params, state, x, mask)
            return jax.lax.psum(jnp.sum(jnp.sin(y)), "data"), new_state
        return jax.grad(loss, (0, 1), has_aux=True)(params, x)

    body = synchronized if step is training_forward else forward_backward
    out = (P("data"), P()) if step is training_forward else ((P(), P("data")), P())
    return jax.shard_map(body, mesh=MESH, in_specs=(P(), P(), P("data"), P("data")),
                         out_specs=out)


STEPS = {"training forward": training_forward, "forward+backward": forward_backward}


@pytest.mark.parametrize("devices", [1, 8])
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("step", STEPS.values(), ids=STEPS.keys())
def test_what_is_exported_for_gpus_and_tpus_has_no_data_dependent_conditional(step, masked,
                                                                            devices):
    params, state = jbn.init(C, dtype=jnp.float32)
    f = jax.jit(step if devices == 1 else per_device(step))
    args = (params, state, X, MASK if masked else None)
    if devices == 8:
        on_mesh = functools.partial(jax.device_put, device=NamedSharding(MESH, P("data")))
        args = (params, state, on_mesh(X), on_mesh(MASK if masked else jnp.ones_like(MASK)))
    for platforms in (["cuda"], ["rocm"], ["tpu"], ["cuda", "rocm", "tpu"]):
        module = jax.export.export(f, platforms=platforms)(*args).mlir_module()
        assert data_dependent_conditionals(module) == [], platforms
    # The check finds the CPU's guard, which is such a conditional.
    cpu = jax.export.export(f, platforms=["cpu"])(*args).mlir_module()
    assert len(data_dependent_conditionals(cpu)) == 1


CUDA_PLUGIN = importlib.util.find_spec("jax_cuda12_plugin") is not None
# Launches of one call on the H100 plan beyond Flax linen's, as recorded (python -m
# benchmarks.costs shows each piece): the step counter (an int32 scalar, a kernel of its own
# beside any vector), the shift's gather, copy and sort; on a 2-D x the shifted sums' x − K,
# which XLA keeps out of a tall column reduction; less, with the backward, the one reduction
# of Flax's three that jbn's derivative does without.
EXTRA_LAUNCHES = {("training forward", "2-D"): 5, ("training forward", "N-D"): 4,
                  ("forward+backward", "2-D"): 5, ("forward+backward", "N-D"): 3}


@pytest.mark.skipif(not CUDA_PLUGIN, reason="the deviceless GPU compile needs the "
                    "jax-cuda12-plugin and jax-cuda12-pjrt wheels of the installed jaxlib "
                    "(about 480 MB; see python -m benchmarks.plans --help)")
def test_an_h100_runs_each_training_call_as_one_cuda_graph_with_no_more_launches_than_recorded():
    environment = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    output = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_plan", "--shapes", "64x64x32x32", "256x128"],
        capture_output=True, text=True, check=True, env=environment,
        cwd=os.path.dirname(os.path.dirname(__file__))).stdout
    rows = [[cell.strip() for cell in line.strip("|").split("|")]
            for line in output.splitlines() if line.startswith("| ") and "---" not in line]
    header, rows = rows[0], rows[1:]
    rows = [dict(zip(header, row, strict=True)) for row in rows]
    platform = [row for row in rows if row["layer"] == "jbn"]
    assert len(platform) == 2 * 2 + 2 * 3, output  # 2 shapes, 3 cases on 8 devices; 2 modes
    assert all(row["conditionals"] == "0" for row in platform), output
    launches = {(row["case"], row["mode"], row["layer"]): sum(
        int(n) for n in row["launches in / outside"].split(" / ")) for row in rows}
    for row in platform:
        if row["case"].startswith("1 device"):
            assert row["command buffers"] == "1", row
            assert row["launches in / outside"].endswith("/ 0"), row
            key = row["case"], row["mode"]
            rank = "2-D" if row["case"].count("×") == 1 else "N-D"
            assert launches[(*key, "jbn")] <= launches[(*key, "flax")] + EXTRA_LAUNCHES[
                row["mode"], rank], row
            assert launches[(*key, "jbn, accumulating 4")] <= launches[(*key, "jbn")] + 3, row
    # The guarded statistics, compiled for the GPU, keep their branch: the plan sees it.
    assert all(row["conditionals"] == "1" for row in rows if row["layer"] == "jbn, guarded")


def shift_of(x, mask=None, **batch):
    """The accelerators' shift of x (float64, channels on axis 1 unless said otherwise)."""
    spec = Reduction(x.ndim, batch.pop("channel_axis", 1), **batch)
    valid = None if mask is None else jnp.expand_dims(mask, 1)
    return np.asarray(_stats._sampled_shift(jnp.asarray(x), valid, spec,
                                            _stats.SHIFT_SAMPLES))


def test_the_shift_is_the_median_of_the_values_at_the_sampled_positions():
    x = RNG.normal(size=(300, C))
    positions = _stats.sample_starts(300, _stats.SHIFT_SAMPLES)
    assert len(set(positions)) == _stats.SHIFT_SAMPLES
    np.testing.assert_array_equal(shift_of(x), np.median(x[positions], axis=0))


def test_with_a_mask_each_sample_is_the_first_valid_value_at_or_after_its_start():
    x = RNG.normal(size=(300, C))
    mask = RNG.random(300) < 0.3
    starts = _stats.sample_starts(300, _stats.SHIFT_SAMPLES)
    valid = np.flatnonzero(mask)
    taken = [valid[valid >= start][0] if np.any(valid >= start) else valid[0]
             for start in starts]
    np.testing.assert_array_equal(shift_of(x, mask), np.median(x[taken], axis=0))


def test_ghost_groups_sample_each_group_on_its_own():
    x = RNG.normal(size=(4 * 50, C, 3))
    shifts = shift_of(x, virtual_batch_size=50)
    assert shifts.shape == (4, C)
    for g in range(4):
        np.testing.assert_array_equal(shifts[g], shift_of(x[50 * g: 50 * (g + 1)]))


def test_channels_first_on_axis_0_give_the_same_shift_as_channels_on_axis_1():
    x = RNG.normal(size=(C, 40, 3))
    np.testing.assert_array_equal(shift_of(x, channel_axis=0),
                                  shift_of(np.moveaxis(x, 0, 1)))


def test_more_than_half_of_the_sampled_values_far_off_is_the_worst_case_documented():
    """All the sampled positions d σ above the mean: y's error grows as about d²·1e-6, past
    the 1e-5 of every other case; the CPU's guarded path does not care."""
    n = 4096
    x = (1e4 + RNG.normal(size=(n, C))).astype(np.float32)
    x[_stats.sample_starts(n, _stats.SHIFT_SAMPLES)] += 10
    values = x.astype(np.float64)
    expected = (values - values.mean(0)) / np.sqrt(values.var(0) + 1e-5)
    d = np.max(np.abs(values[_stats.sample_starts(n, _stats.SHIFT_SAMPLES)].mean(0)
                      - values.mean(0)) / values.std(0))
    errors = {}
    for path in (_stats.SHIFTED, _stats.GUARDED):
        with _stats.scheme(path=path):
            y = jbn.batchnorm({}, {}, jnp.asarray(x), True)[0]
        errors[path] = np.max(np.abs(np.asarray(y, np.float64) - expected))
    assert 1e-5 < errors[_stats.SHIFTED] <= 2e-6 * d ** 2
    assert errors[_stats.GUARDED] <= 1e-5
