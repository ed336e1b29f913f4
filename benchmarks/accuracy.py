"""Accuracy at the edges: `python -m benchmarks.accuracy` prints the README's table.

Max abs error of y, in training mode, against float64 arithmetic on the same float32 input of
shape (4096, 8) whose mean is r × its standard deviation (per channel, σ in [0.5, 2]).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jbn

RATIOS = (1e2, 1e3, 1e4)


def data(ratio: float, shape=(4096, 8), seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    std = rng.uniform(0.5, 2.0, shape[1])
    return (ratio * std + std * rng.normal(size=shape)).astype(np.float32)


def exact(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5)


def outputs(x: np.ndarray) -> dict[str, np.ndarray]:
    """y of each library on x, with no affine transform."""
    import flax.linen as nn
    import haiku as hk
    import torch

    results = {"jbn": jbn.batchnorm({}, {}, jnp.asarray(x), True)[0],
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


def main() -> None:
    rows = []
    for ratio in RATIOS:
        x = data(ratio)
        errors = {name: np.max(np.abs(np.asarray(y, np.float64) - exact(x)))
                  for name, y in outputs(x).items()}
        if not rows:
            rows.append("| r | " + " | ".join(errors) + " |")
            rows.append("|---" * (len(errors) + 1) + "|")
        rows.append(f"| {ratio:.0e} | " + " | ".join(f"{e:.1e}" for e in errors.values()) + " |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
