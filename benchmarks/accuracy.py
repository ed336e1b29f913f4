"""Accuracy at the edges: ``python -m benchmarks.accuracy`` prints the error tables;
``--write`` also records them in ``benchmarks/ACCURACY.md``.

Max abs error of y against float64 arithmetic on the same float32 input. jbn runs on both
paths of its statistics: ``cpu`` (the guarded sums a CPU runs) and ``accelerator`` (the
shifted sums of GPUs and TPUs, forced here on the CPU), on one device and with the batch
split over all devices (8 virtual CPU devices unless ``XLA_FLAGS`` says otherwise).

* **training**, data of shape (4096, 8) whose mean is r × its standard deviation (σ in
  [0.5, 2] per channel): batch statistics, in every library;
* **eval**, the same data with running statistics equal to its own, rounded to float32
  (what a long run converges to): jbn's eval mode and its folded multiply-add
  (``jbn.fold``), and the eval modes of PyTorch and Flax;
* **edges**, jbn's training mode on data chosen against its statistics: spreads from 10⁻³
  to 10³ at mean 10⁴σ, outliers at the very positions the accelerators' shift is sampled
  from (all but the median, and all of them), batches sorted by value, heavy tails, the
  first position of every sequence far off, a constant channel, and a mask that leaves the
  devices' shards uneven and one empty. Each cell is the error and, in brackets, its ratio
  to what jbn promises: 1e-5 where |y| ≤ 10, 1e-6·|y| beyond;
* **fused**, the fused form ``act(BN(x) + residual)`` on float32 data of shape (4096, 8)
  whose mean is 10³ × its spread, a residual and a cotangent of unit spread, weights of
  magnitude in [0.5, 2] and biases (bias ÷ weight) times theirs: the largest error of the
  gradients (x, weight, bias, residual) against the float64 ones of the unfused composition,
  relative to the largest of each; beside it, the unfused float32 composition's.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

# XLA reads the flag once, when JAX starts: the multi-device column needs it first.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jbn  # noqa: E402
from benchmarks import harness  # noqa: E402
from jbn import _stats  # noqa: E402

ACCURACY = pathlib.Path(__file__).with_name("ACCURACY.md")

RATIOS = (1e2, 1e3, 1e4)
EPS = 1e-5
PATHS = {"cpu": None, "accelerator": _stats.SHIFTED}


def data(ratio: float, shape=(4096, 8), seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    std = rng.uniform(0.5, 2.0, shape[1])
    return (ratio * std + std * rng.normal(size=shape)).astype(np.float32)


def running_statistics(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The data's mean and unbiased variance, rounded to float32."""
    values = x.astype(np.float64)
    return values.mean(0).astype(np.float32), values.var(0, ddof=1).astype(np.float32)


def exact(x: np.ndarray, training: bool, mask: np.ndarray | None = None) -> np.ndarray:
    """float64 batch norm of (N, C) or (N, C, L) x over its valid values; no affine."""
    values = np.moveaxis(x.astype(np.float64), 1, -1)
    if training:
        valid = values[np.ones(values.shape[:-1], bool) if mask is None else mask]
        mean, var = valid.mean(0), valid.var(0)
    else:
        mean, var = (v.astype(np.float64) for v in running_statistics(x))
    return np.moveaxis((values - mean) / np.sqrt(var + EPS), -1, 1)


def jbn_training(x, mask=None, devices: int = 1) -> np.ndarray:
    """jbn's y in training mode, no affine, on one device or split over ``devices``."""
    if devices == 1:
        return jbn.batchnorm({}, {}, jnp.asarray(x), True, mask=mask)[0]
    mesh = jax.make_mesh((devices,), ("data",), devices=jax.devices()[:devices])
    split = jax.jit(jax.shard_map(
        lambda x, m: jbn.batchnorm({}, {}, x, True, axis_name="data", mask=m)[0],
        mesh=mesh, in_specs=(P("data"), None if mask is None else P("data")),
        out_specs=P("data")))
    on_mesh = NamedSharding(mesh, P("data"))
    return split(jax.device_put(x, on_mesh),
                 None if mask is None else jax.device_put(mask, on_mesh))


def training_outputs(x: np.ndarray) -> dict[str, np.ndarray]:
    """y of each library on x in training mode, with no affine transform."""
    import flax.linen as nn
    import haiku as hk
    import torch

    results = {}
    for name, path in PATHS.items():
        with _stats.scheme(path=path):
            results[f"jbn, {name}"] = np.asarray(jbn_training(x))
            results[f"jbn, {name}, {jax.device_count()} devices"] = np.asarray(
                jbn_training(x, devices=jax.device_count()))
    results["torch"] = torch.nn.functional.batch_norm(torch.from_numpy(x), None, None,
                                                      training=True).numpy()
    for name, fast in (("flax", True), ("flax two-pass", False)):
        module = nn.BatchNorm(use_running_average=False, use_bias=False, use_scale=False,
                              use_fast_variance=fast)
        variables = module.init(jax.random.key(0), x)
        results[name] = module.apply(variables, x, mutable=["batch_stats"])[0]
    haiku = hk.transform_with_state(lambda x: hk.BatchNorm(False, False, 0.9)(x, True))
    params, state = haiku.init(None, x)
    results["haiku"] = haiku.apply(params, state, None, x)[0]
    return results


def eval_outputs(x: np.ndarray) -> dict[str, np.ndarray]:
    """y of each library on x in eval mode, running statistics those of x."""
    import flax.linen as nn
    import torch

    mean, var = running_statistics(x)
    state = {"running_mean": jnp.asarray(mean), "running_var": jnp.asarray(var),
             "num_batches_tracked": jnp.asarray(1, jnp.int32)}
    scale, shift = jbn.fold({}, state, eps=EPS)
    module = nn.BatchNorm(use_running_average=True, use_bias=False, use_scale=False)
    return {
        "jbn": jbn.batchnorm({}, state, jnp.asarray(x), False)[0],
        "jbn folded": x * scale + shift,
        "torch": torch.nn.functional.batch_norm(
            torch.from_numpy(x), torch.from_numpy(mean), torch.from_numpy(var),
            training=False).numpy(),
        "flax": module.apply({"batch_stats": {"mean": mean, "var": var}}, x),
    }


def error_table(outputs, training: bool) -> list[str]:
    rows, header = [], None
    for ratio in RATIOS:
        x = data(ratio)
        errors = {name: np.max(np.abs(np.asarray(y, np.float64) - exact(x, training)))
                  for name, y in outputs(x).items()}
        header = ["r", *errors]
        rows.append([f"{ratio:.0e}", *(f"{e:.1e}" for e in errors.values())])
    return harness.table(header, rows)


def at_sampled_positions(x: np.ndarray, how_many: int, offset: float) -> np.ndarray:
    """x with the values at the first ``how_many`` positions the accelerators' shift samples
    moved ``offset`` standard deviations up."""
    x = x.copy()
    positions = _stats.sample_starts(x.shape[0], _stats.SHIFT_SAMPLES)[:how_many]
    x[positions] += offset * x.std(0)
    return x


def edge_cases(rng: np.random.Generator) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """Name → (x, mask or None): float32 data chosen against the statistics."""
    n, c = 4096, 8
    normal = rng.normal(size=(n, c))
    half = _stats.SHIFT_SAMPLES // 2
    cases = {f"mean 1e4σ, σ = {sigma:g}": (((1e4 + normal) * sigma).astype(np.float32), None)
             for sigma in (1e-3, 1.0, 1e3)}
    cases.update({
        f"{half} of {_stats.SHIFT_SAMPLES} sampled values at +100σ": (
            at_sampled_positions((1e4 + normal).astype(np.float32), half, 100), None),
        f"all {_stats.SHIFT_SAMPLES} sampled values at +3σ": (
            at_sampled_positions((1e4 + normal).astype(np.float32), n, 3), None),
        f"all {_stats.SHIFT_SAMPLES} sampled values at +10σ": (
            at_sampled_positions((1e4 + normal).astype(np.float32), n, 10), None),
        "sorted by value, mean 1e4σ": (np.sort(1e4 + normal, axis=0).astype(np.float32), None),
        "Student-t(2) at 1e4": ((1e4 + rng.standard_t(2, (n, c))).astype(np.float32), None),
        "lognormal(0, 2) at 1e4": ((1e4 + rng.lognormal(0, 2, (n, c))).astype(np.float32),
                                   None),
    })
    sequences = 1e4 + rng.normal(size=(72, c, 64))
    sequences[:, :, 0] += 100  # the first position of every sequence, far off
    cases["first of each sequence at +100σ, (72, 8, 64)"] = (sequences.astype(np.float32), None)
    constant = (1e4 + normal).astype(np.float32)
    constant[:, 0] = np.float32(12345.678)
    cases["a constant channel, 12345.678"] = (constant, None)
    uneven = rng.random(n) < 0.5
    uneven[n // 8: n // 4] = False  # the second device's shard holds no valid value
    cases["masked, uneven shards, one empty"] = ((1e4 + normal).astype(np.float32), uneven)
    return cases


def edge_table() -> list[str]:
    devices = jax.device_count()
    cases = edge_cases(np.random.default_rng(0))
    cells = {case: [case] for case in cases}
    header = ["data"]
    for name, path in PATHS.items():
        with _stats.scheme(path=path):  # once per path: it drops the compiled code
            for d in (1, devices):
                header.append(f"jbn, {name}{'' if d == 1 else f', {d} devices'}")
                for case, (x, mask) in cases.items():
                    expected = exact(x, True, mask)
                    error = np.abs(np.asarray(jbn_training(x, mask, d), np.float64) - expected)
                    allowed = np.maximum(1e-5, 1e-6 * np.abs(expected))
                    cells[case].append(f"{error.max():.1e} ({(error / allowed).max():.2f})")
    return harness.table(header, list(cells.values()))


BIAS_RATIOS = (1, 10, 100, 1e3, 1e4)
FUSED = {"leaky_relu": jax.nn.leaky_relu, "elu": jax.nn.elu}


def fused_gradients(params, x, residual, cotangent, activation: str, fused: bool):
    """Gradients of Σ act(BN(x) + residual)·cotangent for params, x and residual."""
    def loss(params, x, residual):
        if fused:
            y = jbn.batchnorm(params, {}, x, True, activation=activation, residual=residual)[0]
        else:
            y = FUSED[activation](jbn.batchnorm(params, {}, x, True)[0] + residual)
        return jnp.sum(y * cotangent)
    return jax.grad(loss, argnums=(0, 1, 2))(params, x, residual)


def fused_table() -> list[str]:
    rng = np.random.default_rng(2)
    x = data(1e3)
    residual, cotangent = (rng.normal(size=x.shape).astype(np.float32) for _ in range(2))
    weight = rng.uniform(0.5, 2.0, x.shape[1]) * rng.choice([-1, 1], x.shape[1])
    sign = rng.choice([-1, 1], x.shape[1])
    columns = [(activation, fused) for activation in FUSED for fused in (True, False)]
    header = ["bias ÷ weight", *(f"{'jbn fused' if fused else 'unfused'}, {activation}"
                           for activation, fused in columns)]
    rows = []
    with jax.enable_x64(True):
        for ratio in BIAS_RATIOS:
            params = {"weight": weight, "bias": ratio * np.abs(weight) * sign}
            row = [f"{ratio:.0e}"]
            for activation, fused in columns:
                arrays = [params, x, residual, cotangent]
                exact = fused_gradients(*jax.tree.map(lambda v: jnp.asarray(v, jnp.float64),
                                                      arrays), activation, False)
                found = fused_gradients(*jax.tree.map(lambda v: jnp.asarray(v, jnp.float32),
                                                      arrays), activation, fused)
                errors = [float(jnp.max(jnp.abs(f - e)) / jnp.max(jnp.abs(e))) for f, e in
                          zip(jax.tree.leaves(found), jax.tree.leaves(exact), strict=True)]
                row.append(f"{max(errors):.1e}")
            rows.append(row)
    return harness.table(header, rows)


def markdown(command: str = "python -m benchmarks.accuracy") -> str:
    """The three tables, each between snippet markers (``--8<-- [start:training]`` …) so that
    a page can include one alone, under the machine they were computed on."""
    lines = harness.heading("jbn accuracy", command, __doc__)
    for name, title, rows in (
            ("training", "Training (batch statistics)", error_table(training_outputs, True)),
            ("eval", "Eval (running statistics)", error_table(eval_outputs, False)),
            ("edges", "Edges (training; error, and its ratio to the promise)", edge_table()),
            ("fused", "Fused (gradients' error relative to their largest)", fused_table())):
        lines += ["", f"## {title}", "", f"<!-- --8<-- [start:{name}] -->", *rows,
                  f"<!-- --8<-- [end:{name}] -->"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.accuracy",
                                     description=__doc__.split("\n\n")[0])
    harness.add_write_option(parser, ACCURACY)
    argv = [] if argv is None else argv  # called from code (the tests): no options
    args = parser.parse_args(argv)
    text = markdown(" ".join(["python -m benchmarks.accuracy", *argv]))
    harness.publish(text, ACCURACY, args.write)
    return text


if __name__ == "__main__":
    main(sys.argv[1:])
