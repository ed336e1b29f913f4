"""The guard of the statistics: ``python -m benchmarks.guard`` prints what chose its bound.

jbn's statistics take the plain sums Σx, Σx² when every channel has |mean| ≤ √τ·σ
(τ = ``jbn._stats.CANCELLATION_BOUND``), and a second, exact pass otherwise. For candidate
values of τ this prints:

* the max abs error of ``y`` against float64 where the plain sums are used at their worst,
  on float32 data whose every channel has |mean| = √τ·σ (shapes (4096, 8) and (2²⁰, 2));
* how often real activations would take the exact path: over the training run of
  ``examples/train.py`` (the digits MLP), the share of batch-norm calls in which some
  channel has |mean| > √τ·σ, from the statistics of each call's input.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jbn
from jbn import _stats

CANDIDATES = (4.0, 10.0, 16.0, 25.0, 36.0, 100.0)
SEEDS = 3
SHAPES = ((4096, 8), (2**20, 2))


def boundary_error(bound: float, shape: tuple[int, int]) -> float:
    """Max abs error of y with the plain sums forced, every channel's mean at √bound·σ, the
    worst over a few data sets."""
    return max(_boundary_error(bound, shape, seed) for seed in range(SEEDS))


def _boundary_error(bound: float, shape: tuple[int, int], seed: int) -> float:
    rng = np.random.default_rng(seed)
    std = rng.uniform(0.5, 2.0, shape[1])
    z = rng.standard_normal(shape)
    z = (z - z.mean(0)) / z.std(0)  # mean 0 and σ 1 exactly, before scaling
    x = (std * (z + math.sqrt(bound))).astype(np.float32)
    values = x.astype(np.float64)
    expected = (values - values.mean(0)) / np.sqrt(values.var(0) + 1e-5)
    previous, _stats.CANCELLATION_BOUND = _stats.CANCELLATION_BOUND, bound * 1.001
    try:  # a fresh trace reads the bound; a hair above it, so that rounding cannot tip it
        y = jax.jit(lambda x: jbn.batchnorm({}, {}, x, True)[0])(jnp.asarray(x))
        taken = jax.jit(lambda x: _stats.moments(x, None, _stats.Batch(2, 1)).exact)(x)
    finally:
        _stats.CANCELLATION_BOUND = previous
    assert not taken, "the plain path was meant to run"
    return float(np.max(np.abs(np.asarray(y, np.float64) - expected)))


def digits_ratios(epochs: int) -> np.ndarray:
    """max over channels of |mean|/σ of each batch norm's input, for every call of the
    training run of examples/train.py (float32)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    import train

    ratios = []

    def recording(params, state, x, training, *, mask=None, **kwargs):
        if training:
            valid = None if mask is None else mask[:, None]
            m = _stats.moments(x, valid, _stats.Batch(x.ndim, 1))
            ratio = jnp.max(jnp.abs(m.mean) / jnp.sqrt(m.variance))
            jax.debug.callback(lambda r: ratios.append(float(r)), ratio)
        return original(params, state, x, training, mask=mask, **kwargs)

    original, train.jbn.batchnorm = jbn.batchnorm, recording
    try:
        train.main(["--epochs", str(epochs)])
    finally:
        train.jbn.batchnorm = original
    return np.asarray(ratios)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.guard", description=__doc__)
    parser.add_argument("--epochs", type=int, default=15, help="of examples/train.py")
    args = parser.parse_args(argv)
    ratios = digits_ratios(args.epochs)
    print(f"\n{len(ratios)} batch-norm calls in training; max |mean|/σ per call: median "
          f"{np.median(ratios):.2f}, 95th percentile {np.percentile(ratios, 95):.2f}, "
          f"max {ratios.max():.2f}\n")
    header = ["τ (bound on mean²/σ²)"] + [f"y error at the bound, {m}×{c}" for m, c in SHAPES]
    header += ["exact path, digits MLP"]
    print("| " + " | ".join(header) + " |\n" + "|---" * len(header) + "|")
    for bound in CANDIDATES:
        errors = [f"{boundary_error(bound, shape):.1e}" for shape in SHAPES]
        rate = np.mean(ratios > math.sqrt(bound))
        marker = " (jbn)" if bound == _stats.CANCELLATION_BOUND else ""
        print(f"| {bound:g}{marker} | " + " | ".join(errors) + f" | {rate:.1%} |")


if __name__ == "__main__":
    main()
