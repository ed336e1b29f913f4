"""Running statistics in half precision: ``python -m benchmarks.running_stats`` prints the
table; ``--write`` also records it in ``benchmarks/RUNNING_STATS.md``.

A batch norm over 8 channels trained 1000 steps at momentum 0.01 (Flax's 0.99) on batches
of 32 values per channel drawn from N(3, σ²), float32, σ = 0.1 or 2. Its running mean and
running variance start at 0 and 1 and learn ``running ← (1 − m)·running + m·batch`` (the
batch's mean and unbiased variance), kept:

* in float64, the reference;
* in float32 by ``jbn.batchnorm`` itself, as ``jbn.init`` keeps them for params of any dtype;
* in bfloat16 and in float16, updated in float32 and rounded back to the state's dtype after
  each step: what a library that updates in float32 and keeps the caller's dtype does;
* in bfloat16, with ``(1 − m)·running`` computed in bfloat16: what ``jbn.batchnorm`` did
  before it kept the running statistics in float32, and what a whole model cast to
  bfloat16 (state included) does.

Each cell is the largest error over the channels against the float64 running value after
1000 steps, and in brackets the value of channel 0 (float64: what the others approach). The
noise of the batches' statistics moves a half-precision value across its rounding steps
now and then: the less noise, the sooner it stops short.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jbn
from benchmarks import harness

RUNNING_STATS = pathlib.Path(__file__).with_name("RUNNING_STATS.md")

STEPS, MOMENTUM, BATCH, CHANNELS = 1000, 0.01, 32, 8
MEAN = 3.0
KEYS = ("running_mean", "running_var")
# (the data's σ, the statistic) of each column
COLUMNS = ((0.1, "running_mean"), (2.0, "running_mean"), (2.0, "running_var"))


def batches(std: float, seed: int = 0) -> np.ndarray:
    """(STEPS, BATCH, CHANNELS) float32 values of N(MEAN, std²)."""
    rng = np.random.default_rng(seed)
    return rng.normal(MEAN, std, (STEPS, BATCH, CHANNELS)).astype(np.float32)


def reference(x: np.ndarray) -> dict[str, np.ndarray]:
    """The running statistics in float64."""
    values = x.astype(np.float64)
    running = {"running_mean": np.zeros(CHANNELS), "running_var": np.ones(CHANNELS)}
    for batch in values:
        for key, statistic in zip(KEYS, (batch.mean(0), batch.var(0, ddof=1)), strict=True):
            running[key] = (1 - MOMENTUM) * running[key] + MOMENTUM * statistic
    return running


@jax.jit
def with_jbn(x: jax.Array) -> dict[str, jax.Array]:
    """The running statistics ``jbn.batchnorm`` keeps, trained over the batches."""
    params, state = jbn.init(CHANNELS)

    def step(state, batch):
        return jbn.batchnorm(params, state, batch, True, momentum=MOMENTUM)[1], None

    return {key: value for key, value in jax.lax.scan(step, state, x)[0].items()
            if key in KEYS}


@jax.jit
def batch_statistics(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Each batch's mean and unbiased variance, in float32, as the update receives them."""
    return jnp.mean(x, axis=1), jnp.var(x, axis=1, ddof=1)


def rounded_back(x: jax.Array, dtype, *, half_arithmetic: bool) -> dict[str, jax.Array]:
    """The running statistics kept in ``dtype``: each update in float32 and rounded back, or
    with ``(1 − m)·running`` in ``dtype`` itself (``half_arithmetic``)."""
    statistics = batch_statistics(x)

    def run(statistics, start):
        def step(running, batch):
            kept = (1 - MOMENTUM) * running if half_arithmetic else (
                (1 - MOMENTUM) * running.astype(jnp.float32))
            return (kept + MOMENTUM * batch).astype(dtype), None

        return jax.lax.scan(step, jnp.full(CHANNELS, start, dtype), statistics)[0]

    return {key: jax.jit(run, static_argnums=1)(value, start)
            for key, value, start in zip(KEYS, statistics, (0.0, 1.0), strict=True)}


def rows(std: float) -> list[tuple[str, str, dict[str, np.ndarray]]]:
    """(state dtype, how it is updated, the final running statistics) per way of keeping,
    on data of spread ``std``."""
    x = batches(std)
    return [
        ("float64", "float64 (reference)", reference(x)),
        ("float32", "jbn.batchnorm", with_jbn(jnp.asarray(x))),
        ("bfloat16", "in float32, rounded back",
         rounded_back(jnp.asarray(x), jnp.bfloat16, half_arithmetic=False)),
        ("float16", "in float32, rounded back",
         rounded_back(jnp.asarray(x), jnp.float16, half_arithmetic=False)),
        ("bfloat16", "(1 − m)·running in bfloat16",
         rounded_back(jnp.asarray(x), jnp.bfloat16, half_arithmetic=True)),
    ]


def errors(running: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> dict[str, float]:
    """The largest error over the channels, per statistic."""
    return {key: float(np.max(np.abs(np.asarray(running[key], np.float64) - expected[key])))
            for key in KEYS}


def markdown(command: str = "python -m benchmarks.running_stats") -> str:
    found = {std: rows(std) for std in sorted({std for std, _ in COLUMNS})}
    lines = harness.heading("Running statistics in half precision", command, __doc__)
    lines += ["", "<!-- --8<-- [start:table] -->"]
    cells = []
    for i, (dtype, update, _) in enumerate(found[COLUMNS[0][0]]):
        cells.append([dtype, update])
        for std, key in COLUMNS:
            running, expected = found[std][i][2], found[std][0][2]
            cells[-1].append(f"{errors(running, expected)[key]:.1e} "
                             f"({float(np.asarray(running[key], np.float64)[0]):.4f})")
    lines += harness.table(["state dtype", "update", *(f"{key}, σ = {std:g}: error (channel 0)"
                                                       for std, key in COLUMNS)], cells)
    lines.append("<!-- --8<-- [end:table] -->")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.running_stats",
                                     description=__doc__.split("\n\n")[0])
    harness.add_write_option(parser, RUNNING_STATS)
    argv = [] if argv is None else argv  # called from code (the tests): no options
    args = parser.parse_args(argv)
    text = markdown(" ".join(["python -m benchmarks.running_stats", *argv]))
    harness.publish(text, RUNNING_STATS, args.write)
    return text


if __name__ == "__main__":
    main(sys.argv[1:])
