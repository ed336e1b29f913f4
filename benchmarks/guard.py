"""The guard of the statistics: ``python -m benchmarks.guard`` prints what chose its bound;
``--write`` also records it in ``benchmarks/GUARD.md``.

On a CPU, jbn's statistics take the plain sums Σx, Σx² when every channel has
|mean| ≤ √τ·σ (τ = ``jbn._stats.CANCELLATION_BOUND``), and a second, exact pass otherwise.
For candidate values of τ this prints:

* the max abs error of ``y`` against float64 where the plain sums are used at their worst,
  on float32 data whose every channel has |mean| = √τ·σ (shapes (4096, 8), (2²⁰, 2) and
  the benchmark's);
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

import jax.numpy as jnp
import numpy as np

import jbn
from benchmarks import harness
from jbn import _stats
from jbn._reduction import Reduction

GUARD = Path(__file__).with_name("GUARD.md")

CANDIDATES = (4.0, 9.0, 12.0, 16.0, 20.0, 25.0)
SEEDS = 3
SHAPES = ((4096, 8), (2**20, 2), *harness.SHAPES)


def boundary_error(bound: float, shape: tuple[int, ...]) -> float:
    """Max abs error of y with the plain sums, every channel's mean at √bound·σ, the worst
    over a few data sets."""
    return max(_boundary_error(bound, shape, seed) for seed in range(SEEDS))


def _boundary_error(bound: float, shape: tuple[int, ...], seed: int) -> float:
    rng = np.random.default_rng(seed)
    axes = tuple(i for i in range(len(shape)) if i != 1)
    per_channel = [1] * len(shape)
    per_channel[1] = shape[1]
    std = rng.uniform(0.5, 2.0, per_channel)
    z = rng.standard_normal(shape)
    z = (z - z.mean(axes, keepdims=True)) / z.std(axes, keepdims=True)  # mean 0, σ 1 exactly
    x = (std * (z + math.sqrt(bound))).astype(np.float32)
    values = x.astype(np.float64)
    expected = ((values - values.mean(axes, keepdims=True))
                / np.sqrt(values.var(axes, keepdims=True) + 1e-5))
    # A hair above the bound, so that rounding cannot tip it.
    with _stats.scheme(path=_stats.GUARDED, bound=bound * 1.001) as scheme:
        y = jbn.batchnorm({}, {}, jnp.asarray(x), True)[0]
        plain = _stats.plain_sums_suffice(
            *_stats.plain_sums(jnp.asarray(x), None, Reduction(len(shape), 1)), scheme.bound)
    assert plain, "the plain path was meant to run"
    return float(np.max(np.abs(np.asarray(y, np.float64) - expected)))


def training_ratios(example: str, argv: list[str]) -> np.ndarray:
    """(max over channels of |mean|/σ, values normalized) of each batch-statistics call of
    ``examples/<example>.py`` run with ``argv``."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    module = importlib.import_module(example)
    ratios = []

    def record(count, mean, variance):
        ratio = np.max(np.abs(mean) / np.sqrt(np.maximum(variance, np.finfo(np.float32).tiny)))
        ratios.append((float(ratio), float(np.sum(count)) * mean.shape[-1]))

    with _stats.scheme(observe=record):
        module.main(argv)
    return np.asarray(ratios)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.guard", description=__doc__)
    parser.add_argument("--epochs", type=int, default=15, help="of examples/train.py")
    parser.add_argument("--steps", type=int, default=10, help="of examples/resnet_from_torch.py")
    harness.add_write_option(parser, GUARD)
    args = parser.parse_args(argv)
    command = " ".join(["python -m benchmarks.guard", *(sys.argv[1:] if argv is None else argv)])
    # The ResNet runs second: it turns on float64, which the digits MLP does not use.
    runs = {"digits MLP": training_ratios("train", ["--epochs", str(args.epochs)]),
            "ResNet-18": training_ratios("resnet_from_torch", ["--steps", str(args.steps)])}
    lines = [*harness.heading("jbn's guard", command, __doc__), ""]
    for name, calls in runs.items():
        ratios = calls[:, 0]
        lines.append(f"- {name}: {len(ratios)} batch-norm calls in training; max |mean|/σ over "
                     f"the channels of a call: median {np.median(ratios):.2f}, 95th percentile "
                     f"{np.percentile(ratios, 95):.2f}, max {ratios.max():.2f}")
    header = ["τ (bound on mean²/σ²)"] + [f"y error at the bound, {'×'.join(map(str, s))}"
                                          for s in SHAPES]
    header += [f"exact path, {name}: calls (elements)" for name in runs]
    rows = []
    for bound in CANDIDATES:
        errors = [f"{boundary_error(bound, shape):.1e}" for shape in SHAPES]
        rates = []
        for calls in runs.values():
            exact = calls[:, 0] > math.sqrt(bound)
            rates.append(f"{np.mean(exact):.1%} ({calls[exact, 1].sum() / calls[:, 1].sum():.1%})")
        marker = " (jbn)" if bound == _stats.CANCELLATION_BOUND else ""
        rows.append([f"{bound:g}{marker}", *errors, *rates])
    lines += ["", "<!-- --8<-- [start:table] -->", *harness.table(header, rows),
              "<!-- --8<-- [end:table] -->"]
    text = "\n".join(lines) + "\n"
    harness.publish(text, GUARD, args.write)
    return text


if __name__ == "__main__":
    main()
