"""Accuracy at the edges: `python -m benchmarks.accuracy` prints the README's tables.

Max abs error of y against float64 arithmetic on the same float32 input of shape (4096, 8)
whose mean is r × its standard deviation (per channel, σ in [0.5, 2]):

* training: batch statistics, in every library; jbn also with the batch split over all
  devices (8 virtual CPU devices unless ``XLA_FLAGS`` says otherwise);
* eval: running statistics equal to the data's own, rounded to float32 (what a long run
  converges to); jbn's eval mode and its folded multiply-add (``jbn.fold``), and the eval
  modes of PyTorch and Flax.
"""

from __future__ import annotations

import os

# XLA reads the flag once, when JAX starts: the multi-device column needs it first.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jbn  # noqa: E402

RATIOS = (1e2, 1e3, 1e4)
EPS = 1e-5


def data(ratio: float, shape=(4096, 8), seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    std = rng.uniform(0.5, 2.0, shape[1])
    return (ratio * std + std * rng.normal(size=shape)).astype(np.float32)


def running_statistics(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The data's mean and unbiased variance, rounded to float32."""
    values = x.astype(np.float64)
    return values.mean(0).astype(np.float32), values.var(0, ddof=1).astype(np.float32)


def exact(x: np.ndarray, training: bool) -> np.ndarray:
    values = x.astype(np.float64)
    if training:
        mean, var = values.mean(0), values.var(0)
    else:
        mean, var = (v.astype(np.float64) for v in running_statistics(x))
    return (values - mean) / np.sqrt(var + EPS)


def training_outputs(x: np.ndarray) -> dict[str, np.ndarray]:
    """y of each library on x in training mode, with no affine transform."""
    import flax.linen as nn
    import haiku as hk
    import torch

    devices = jax.device_count()
    mesh = jax.make_mesh((devices,), ("data",))
    split = jax.jit(jax.shard_map(
        lambda x: jbn.batchnorm({}, {}, x, True, axis_name="data")[0],
        mesh=mesh, in_specs=P("data"), out_specs=P("data")))
    results = {"jbn": jbn.batchnorm({}, {}, jnp.asarray(x), True)[0],
               f"jbn, {devices} devices": split(jax.device_put(
                   x, jax.sharding.NamedSharding(mesh, P("data")))),
               "torch": torch.nn.functional.batch_norm(torch.from_numpy(x), None, None,
                                                       training=True).numpy()}
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


def table(outputs, training: bool) -> list[str]:
    rows = []
    for ratio in RATIOS:
        x = data(ratio)
        errors = {name: np.max(np.abs(np.asarray(y, np.float64) - exact(x, training)))
                  for name, y in outputs(x).items()}
        if not rows:
            rows.append("| r | " + " | ".join(errors) + " |")
            rows.append("|---" * (len(errors) + 1) + "|")
        rows.append(f"| {ratio:.0e} | " + " | ".join(f"{e:.1e}" for e in errors.values())
                    + " |")
    return rows


def main() -> None:
    print("Training (batch statistics):\n")
    print("\n".join(table(training_outputs, True)))
    print("\nEval (running statistics):\n")
    print("\n".join(table(eval_outputs, False)))


if __name__ == "__main__":
    main()
