"""The guard of the statistics: ``python -m benchmarks.guard`` prints what chose its bound.

jbn's statistics take the plain sums Σx, Σx² when every channel has |mean| ≤ √τ·σ
(τ = ``jbn._stats.CANCELLATION_BOUND``), and a second, exact pass otherwise. For candidate
values of τ this prints:

* the max abs error of ``y`` against float64 where the plain sums are used at their worst,
  on float32 data whose every channel has |mean| = √τ·σ (shapes (4096, 8) and (2²⁰, 2));
* how often real activations would take the exact path: over the training runs of
  ``examples/train.py`` (the digits MLP) and ``examples/resnet_from_torch.py`` (ResNet-18,
  float64, random images), the share of batch-norm calls in which some channel has
  |mean| > √τ·σ, from the statistics of each call's input, and their share of the elements
  normalized (what the second pass costs).
"""

from __future__ import annotations

import argparse
import importlib
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
    # A hair above the bound, so that rounding cannot tip it; traces read the bound, so the
    # cached ones go, before and after.
    previous, _stats.CANCELLATION_BOUND = _stats.CANCELLATION_BOUND, bound * 1.001
    jax.clear_caches()
    try:
        y = jbn.batchnorm({}, {}, jnp.asarray(x), True)[0]
        taken = _stats.moments(jnp.asarray(x), None, _stats.Batch(2, 1)).exact
    finally:
        _stats.CANCELLATION_BOUND = previous
        jax.clear_caches()
    assert not taken, "the plain path was meant to run"
    return float(np.max(np.abs(np.asarray(y, np.float64) - expected)))


def training_ratios(example: str, argv: list[str]) -> np.ndarray:
    """(max over channels of |mean|/σ, size) of each batch norm's input, for every training
    call of ``examples/<example>.py`` run with ``argv``."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    module = importlib.import_module(example)
    ratios = []

    def recording(params, state, x, training, *, mask=None, axis=1, **kwargs):
        if training:
            batch = _stats.Batch(x.ndim, axis % x.ndim)
            valid = None if mask is None else jnp.expand_dims(
                mask, tuple(range(mask.ndim, x.ndim)))
            m = _stats.moments(x, valid, batch)
            ratio = jnp.max(jnp.abs(m.mean) / jnp.sqrt(m.variance))
            jax.debug.callback(lambda r, size=x.size: ratios.append((float(r), size)), ratio)
        return original(params, state, x, training, mask=mask, axis=axis, **kwargs)

    original, module.jbn.batchnorm = jbn.batchnorm, recording
    try:
        module.main(argv)
    finally:
        module.jbn.batchnorm = original
    return np.asarray(ratios)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.guard", description=__doc__)
    parser.add_argument("--epochs", type=int, default=15, help="of examples/train.py")
    parser.add_argument("--steps", type=int, default=10, help="of examples/resnet_from_torch.py")
    args = parser.parse_args(argv)
    # The ResNet runs second: it turns on float64, which the digits MLP does not use.
    runs = {"digits MLP": training_ratios("train", ["--epochs", str(args.epochs)]),
            "ResNet-18": training_ratios("resnet_from_torch", ["--steps", str(args.steps)])}
    print()
    for name, calls in runs.items():
        ratios = calls[:, 0]
        print(f"{name}: {len(ratios)} batch-norm calls in training; max |mean|/σ over the "
              f"channels of a call: median {np.median(ratios):.2f}, 95th percentile "
              f"{np.percentile(ratios, 95):.2f}, max {ratios.max():.2f}")
    header = ["τ (bound on mean²/σ²)"] + [f"y error at the bound, {m}×{c}" for m, c in SHAPES]
    header += [f"exact path, {name}: calls (elements)" for name in runs]
    print("\n| " + " | ".join(header) + " |\n" + "|---" * len(header) + "|")
    for bound in CANDIDATES:
        errors = [f"{boundary_error(bound, shape):.1e}" for shape in SHAPES]
        rates = []
        for calls in runs.values():
            exact = calls[:, 0] > math.sqrt(bound)
            rates.append(f"{np.mean(exact):.1%} ({calls[exact, 1].sum() / calls[:, 1].sum():.1%})")
        marker = " (jbn)" if bound == _stats.CANCELLATION_BOUND else ""
        print(f"| {bound:g}{marker} | " + " | ".join(errors + rates) + " |")


if __name__ == "__main__":
    main()
