"""On a GPU: ``python -m benchmarks.gpu_run`` times jbn against Flax where users train;
``--write`` also records it in ``benchmarks/GPU_RUN.md``.

Made to finish within 8 minutes on one GPU. Every job of a table is timed round-robin in
one window (``harness.round_robin``):

* **one layer**, on the benchmark's shapes (channel on axis 1): the training forward with the
  state update, and the forward+backward with a cotangent given, jbn and Flax linen's
  default. *Bandwidth* is the bytes a pass must move ÷ the median time: 3 copies of x for
  the training forward (the statistics read x, the normalization reads x and writes y) and
  8 for the forward+backward (the backward's sums read x and the cotangent, ``dx`` reads
  them again and is written), as a share of the device's peak where it is known (the H100's
  from ``benchmarks/h100.txtpb``, or ``--peak-gbps``);
* **the whole model** (``benchmarks.model``): the ResNet-50-style training step, jbn, Flax
  and no batch norm, in float32 and bfloat16.

Without a GPU it stops and says so; ``--any-device`` runs it where JAX runs (small, to test
the command itself).
"""

from __future__ import annotations

import argparse
import math
import pathlib
import re
import sys
from functools import partial

# JAX first: its platforms are fixed when it is imported, before benchmarks.plans (through
# benchmarks.model) would set JAX_PLATFORMS=cpu for deviceless compiles.
import jax
import numpy as np

from benchmarks import harness, model, plans
from benchmarks.peers import flax_jobs, jbn_jobs

GPU_RUN = pathlib.Path(__file__).with_name("GPU_RUN.md")
COPIES = {"train": 3, "grad": 8}  # copies of x a pass must move, at the least


def peak_bandwidth(device, given: float | None) -> float | None:
    """Bytes per second the device's memory moves at its peak: ``given`` (GB/s), the H100's
    description for an H100, or None."""
    if given is not None:
        return given * 1e9
    if "H100" in device.device_kind:
        return float(re.search(r"memory_bandwidth: (\d+)", plans.H100.read_text()).group(1))
    return None


def layer_rows(shapes, budget: float, peak: float | None) -> list[list[str]]:
    """One row per shape, mode and layer: median time, × jbn, bandwidth."""
    rows = []
    rng = np.random.default_rng(0)
    for shape in shapes:
        x = jax.numpy.asarray(rng.standard_normal(shape, np.float32))
        ct = jax.numpy.asarray(rng.standard_normal(shape, np.float32))
        jobs = {"jbn": jbn_jobs(x, ct), "flax": flax_jobs(x, ct)}
        timed = {(name, mode): getattr(job, mode) for name, job in jobs.items()
                 for mode in COPIES}
        seconds = {key: float(np.median(v))
                   for key, v in harness.round_robin(timed, 10, budget).items()}
        for mode, copies in COPIES.items():
            for name in jobs:
                rate = copies * 4 * math.prod(shape) / seconds[name, mode]
                rows.append([harness._shape(shape), harness.MODES[mode].split(" (")[0], name,
                             harness._duration(seconds[name, mode]),
                             f"{seconds[name, mode] / seconds['jbn', mode]:.2f}",
                             f"{rate / 1e9:.0f} GB/s"
                             + ("" if peak is None else f" ({rate / peak:.0%} of peak)")])
    return rows


def model_rows(dtypes, blocks, batch: int, size: int, budget: float) -> list[list[str]]:
    """One row per dtype and variant: median step time, and what batch norm adds."""
    rows = []
    for dtype in dtypes:
        jobs = {}
        for variant in ("jbn", "flax", model.CONTROL):
            step, arguments = model.step_and_arguments(variant, dtype, blocks, batch, size,
                                                       concrete=True)
            compiled = jax.jit(step).lower(*arguments).compile()
            jobs[variant] = partial(lambda c, a: jax.block_until_ready(c(*a)), compiled,
                                    arguments)
        seconds = {key: float(np.median(v))
                   for key, v in harness.round_robin(jobs, 10, budget).items()}
        added = {v: seconds[v] - seconds[model.CONTROL] for v in ("jbn", "flax")}
        for variant, value in seconds.items():
            rows.append([dtype, variant, harness._duration(value),
                         "—" if variant == model.CONTROL else harness._duration(added[variant]),
                         "—" if variant == model.CONTROL or not added["flax"] > 0
                         else f"{added[variant] / added['flax']:.2f}"])
    return rows


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", type=harness.parse_shape,
                        default=list(harness.SHAPES), metavar="NxCx...")
    parser.add_argument("--blocks", nargs=4, type=int, default=list(model.BLOCKS), metavar="B")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--budget", type=float, default=20.0,
                        help="seconds of timed calls per table section (default: 20)")
    parser.add_argument("--peak-gbps", type=float, help="the device's peak memory bandwidth")
    parser.add_argument("--any-device", action="store_true",
                        help="run where JAX runs, GPU or not (to test the command)")
    harness.add_write_option(parser, GPU_RUN)
    args = parser.parse_args(argv)
    device = jax.devices()[0]
    if device.platform != "gpu" and not args.any_device:
        raise SystemExit(f"python -m benchmarks.gpu_run times a GPU, and JAX runs on "
                         f"{device.platform} here ({device.device_kind})")
    command = " ".join(["python -m benchmarks.gpu_run", *(sys.argv[1:] if argv is None
                                                          else argv)])
    peak = peak_bandwidth(device, args.peak_gbps)
    lines = harness.heading("On a GPU", command, __doc__)
    lines += ["", "- **peak bandwidth**: "
              + ("unknown (--peak-gbps)" if peak is None else f"{peak / 1e9:.0f} GB/s"),
              "", "## One layer", "",
              *harness.table(["shape", "mode", "layer", "median", "× jbn", "bandwidth"],
                             layer_rows(args.shapes, args.budget, peak)),
              "", f"## The whole model (blocks {args.blocks}, batch {args.batch} of "
              f"{args.size}×{args.size})", "",
              *harness.table(["dtype", "batch norm", "step", "what batch norm adds",
                              "÷ Flax's"],
                             model_rows(model.DTYPES, args.blocks, args.batch, args.size,
                                        args.budget))]
    text = "\n".join(lines) + "\n"
    harness.publish(text, GPU_RUN, args.write)
    return text


if __name__ == "__main__":
    main()
