"""What each piece of a batch norm's statistics costs where users train:
``python -m benchmarks.costs``; ``--write`` also records it in ``benchmarks/COSTS.md``.

Small programs, each one choice in isolation, compiled for an H100 and a TPU v5e without
either (``benchmarks.plans``): kernel launches and memory traffic on the H100's plan, bytes
accessed by the TPU compiler's cost model, in copies of x. In a network, x is what a
convolution makes (NHWC), so the statistics can be computed in the convolution's epilogue
where nothing about them waits for x; the rows say where that holds.

* **sums about 0**: ``Σx``, ``Σx²`` (Flax's default);
* **sums about a given K**: ``Σ(x − K)``, ``Σ(x − K)²``, K an argument (say, a running mean);
* **sums about one value of x**, and **about the median of 33 values of x** (jbn's shift on
  GPUs and TPUs): K depends on x, so the sums wait for it;
* **one-pass Welford**: count, a compensated mean and ``M2`` as one variadic reduction
  (Chan's pairwise merge), no shift at all;
* **a step counter**: a per-channel update alone, and with an int32 scalar ``+ 1`` beside it;
* **a 2-D x**: the sums about a given K of an (N, C) array, against the sums about 0.
"""

from __future__ import annotations

from benchmarks import plans  # isort: skip  (sets JAX up for deviceless compiles: first)

import argparse  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from benchmarks import harness  # noqa: E402
from jbn import _stats  # noqa: E402

COSTS = pathlib.Path(__file__).with_name("COSTS.md")
IMAGES = (32, 32, 32, 64)  # NHWC: what the convolution makes
FLAT = (4096, 1024)
SAMPLES = _stats.SHIFT_SAMPLES


def _conv(h, w):
    return lax.conv_general_dilated(h, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO",
                                                                                  "NHWC"))


def _sums(x, k):
    axes = tuple(range(x.ndim - 1))
    return jnp.sum(x - k, axis=axes), jnp.sum(jnp.square(x - k), axis=axes)


def _median_of_samples(x):
    flat = x.reshape(-1, x.shape[-1])
    values = flat[_stats.sample_starts(flat.shape[0], SAMPLES)]
    return jnp.sort(values, axis=0, stable=False)[SAMPLES // 2]


def _welford(x):
    """Count, mean (a compensated pair) and M2 of each channel in one reduction."""
    def merge(a, b):
        (na, ha, la, ma), (nb, hb, lb, mb) = a, b
        n = na + nb
        share = nb / jnp.maximum(n, 1)
        d = (hb - ha) + (lb - la)
        hi = ha + d * share
        lo = la + ((ha - hi) + d * share)
        m2 = ma + mb + d * d * na * share
        return tuple(jnp.where(na == 0, vb, jnp.where(nb == 0, va, v))
                     for va, vb, v in ((na, nb, n), (ha, hb, hi), (la, lb, lo), (ma, mb, m2)))

    zeros = jnp.zeros_like(x)
    return lax.reduce((jnp.ones_like(x), x, zeros, zeros), (jnp.float32(0),) * 4, merge,
                      tuple(range(x.ndim - 1)))


CASES = {  # name -> (shape of x, function of (h, w, k, count))
    "sums about 0": (IMAGES, lambda h, w, k, n: _sums(_conv(h, w), 0.0)),
    "sums about a given K": (IMAGES, lambda h, w, k, n: _sums(_conv(h, w), k)),
    "sums about one value of x": (IMAGES, lambda h, w, k, n: (
        lambda x: _sums(x, x[0, 0, 0]))(_conv(h, w))),
    "sums about the median of 33 values of x": (IMAGES, lambda h, w, k, n: (
        lambda x: _sums(x, _median_of_samples(x)))(_conv(h, w))),
    "one-pass Welford": (IMAGES, lambda h, w, k, n: _welford(_conv(h, w))),
    "per-channel update": (IMAGES, lambda h, w, k, n: (0.9 * k + 0.1,)),
    "per-channel update and a step counter": (IMAGES, lambda h, w, k, n: (0.9 * k + 0.1,
                                                                          n + 1)),
    "2-D x, sums about 0": (FLAT, lambda h, w, k, n: _sums(h, 0.0)),
    "2-D x, sums about a given K": (FLAT, lambda h, w, k, n: _sums(h, k)),
}


def measure(parts):
    """{case: {part: Plan}}."""
    found = {}
    for part in parts:
        replicated = NamedSharding(jax.sharding.Mesh(plans.devices(part), ("d",)), P())
        for name, (shape, function) in CASES.items():
            channels = shape[-1]
            arguments = (jax.ShapeDtypeStruct(shape, jnp.float32, sharding=replicated),
                         jax.ShapeDtypeStruct((3, 3, channels, channels), jnp.float32,
                                              sharding=replicated),
                         jax.ShapeDtypeStruct((channels,), jnp.float32, sharding=replicated),
                         jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated))
            found.setdefault(name, {})[part] = plans.compile_plan(function, arguments, part)
    return found


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.costs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_write_option(parser, COSTS)
    args = parser.parse_args(argv)
    parts = [part for part in ("gpu", "tpu") if not plans.missing(part)]
    if not parts:
        raise SystemExit(plans.missing("gpu"))
    found = measure(parts)
    command = " ".join(["python -m benchmarks.costs", *(sys.argv[1:] if argv is None else argv)])
    header = ["program", "H100 launches", "H100 traffic (copies of x)",
              "TPU v5e bytes accessed (copies of x)"]
    rows = []
    for name, (shape, _) in CASES.items():
        size = 4 * math.prod(shape)
        gpu, tpu = found[name].get("gpu"), found[name].get("tpu")
        rows.append([name, "—" if gpu is None else str(gpu.launches),
                     *("—" if plan is None else f"{plan.traffic / size:.2f}"
                       for plan in (gpu, tpu))])
    lines = [*harness.heading("What the pieces of the statistics cost", command, __doc__), "",
             f"x: {'×'.join(map(str, IMAGES))} (NHWC, a 3×3 convolution's output) or "
             f"{'×'.join(map(str, FLAT))} (2-D); float32.", "", *harness.table(header, rows)]
    missing = [plans.missing(part) for part in ("gpu", "tpu") if plans.missing(part)]
    lines += [f"\nSkipped: {why}" for why in missing]
    harness.publish("\n".join(lines) + "\n", COSTS, args.write)
    return {name: {part: plan.traffic for part, plan in by.items()} for name, by in found.items()}


if __name__ == "__main__":
    main()
