"""Memory of batch norm fused with its residual and activation: ``python -m benchmarks.memory``
prints what a training step holds with every batch norm fused, against the same network
unfused and against Flax; ``--write`` also records it in ``benchmarks/MEMORY.md``.

The network is ``benchmarks.model``'s ResNet-50-style one with leaky ReLU (slope 0.01) in
place of ReLU (``--activation identity``: none, the floor of what fusing can reach).
**jbn fused** calls ``jbn.batchnorm(..., activation=...)`` at every batch norm followed by
the activation, ``activation="identity"`` at the projection shortcut's, and
``residual=shortcut`` at the block's last, so that each keeps its output for the backward
pass; **jbn** and **flax** normalize, add and activate as three operations; **none** is the
control without batch norm.

* **H100 plan** (``benchmarks.plans``: XLA's GPU compiler, without a GPU): peak temporary
  memory of the step, and the largest batch whose footprint (temporaries, arguments,
  outputs) fits in the H100's 80 GB (80·10⁹ bytes), linear in the batch between the plans
  at the batch and at twice it.
* **CPU**: XLA:CPU's peak temporary memory, and the step's time on this machine (a smaller
  input), every variant timed round-robin in one process.
"""

from __future__ import annotations

from benchmarks import plans  # isort: skip  (sets JAX up for deviceless compiles: first)

import argparse  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402
from collections.abc import Sequence  # noqa: E402

from benchmarks import harness, model  # noqa: E402

MEMORY = pathlib.Path(__file__).with_name("MEMORY.md")
VARIANTS = ("jbn fused", "jbn", "flax", model.CONTROL)
DEVICE_BYTES = 80e9
# (measure, what is compared, bound on the ratio)
TARGETS = (("H100 peak temporaries", "flax", 0.6), ("CPU peak temporaries", "flax", None),
           ("CPU step", "jbn", 1.10))


def largest_batch(at_batch: plans.Plan, at_twice: plans.Plan, batch: int) -> int:
    """The largest batch whose footprint fits in ``DEVICE_BYTES``, the footprint linear in
    the batch through the plans at ``batch`` and ``2·batch``."""
    per_example = (at_twice.footprint - at_batch.footprint) / batch
    fixed = at_batch.footprint - per_example * batch
    return int((DEVICE_BYTES - fixed) // per_example)


def measure(dtypes: Sequence[str], parts: Sequence[str], *, activation: str, blocks,
            batch: int, size: int, cpu_batch: int, cpu_size: int, budget: float, log) -> dict:
    """figures[dtype][measure][variant]."""
    results = model.measure(VARIANTS, dtypes, parts, blocks=blocks, batch=batch, size=size,
                            cpu_batch=cpu_batch, cpu_size=cpu_size, budget=budget,
                            activation=activation, log=log)
    twice = (model.measure(VARIANTS, dtypes, ["gpu"], blocks=blocks, batch=2 * batch,
                           size=size, activation=activation, log=log) if "gpu" in parts else {})
    figures = {}
    for dtype in dtypes:
        found = figures[dtype] = {}
        for variant in VARIANTS:
            result = results[variant, dtype]
            if "gpu" in parts:
                found.setdefault("H100 peak temporaries", {})[variant] = (
                    result["gpu"].temporaries / 2**20)
                found.setdefault("H100 largest batch in 80 GB", {})[variant] = largest_batch(
                    result["gpu"], twice[variant, dtype]["gpu"], batch)
            if "cpu" in parts:
                found.setdefault("CPU peak temporaries", {})[variant] = (
                    result["cpu"].temporaries / 2**20)
                found.setdefault("CPU step", {})[variant] = result["cpu step"] * 1e3
    return figures


UNITS = {"H100 peak temporaries": "MiB", "CPU peak temporaries": "MiB", "CPU step": "ms",
         "H100 largest batch in 80 GB": ""}


def markdown(figures: dict, shapes: str, command: str) -> str:
    lines = harness.heading("Memory of the fused batch norm", command, __doc__)
    target_rows = []
    for measure, against, bound in TARGETS:
        for dtype, found in figures.items():
            if measure in found:
                ratio = found[measure]["jbn fused"] / found[measure][against]
                target_rows.append([f"{measure}, {dtype}: jbn fused ÷ {against}"
                                    + (f" ≤ {bound}" if bound else " (reported)"),
                                    f"{ratio:.2f}×",
                                    "—" if bound is None else "yes" if ratio <= bound
                                    else "**no**"])
    lines += ["", shapes, "", "<!-- --8<-- [start:tables] -->", "", "## Targets", "",
              *harness.table(["target", "measured", "met"], target_rows)]
    for dtype, found in figures.items():
        lines += ["", f"## {dtype}", "",
                  *harness.table(["", *VARIANTS, "jbn fused ÷ flax"],
                                 [[f"{measure} ({UNITS[measure]})" if UNITS[measure]
                                   else measure,
                                   *(_figure(values[v]) for v in VARIANTS),
                                   f"{values['jbn fused'] / values['flax']:.2f}×"]
                                  for measure, values in found.items()])]
    lines += ["", "<!-- --8<-- [end:tables] -->"]
    return "\n".join(lines) + "\n"


def _figure(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=("cpu", "gpu"), default=["cpu", "gpu"])
    parser.add_argument("--dtypes", nargs="+", choices=list(model.DTYPES),
                        default=list(model.DTYPES))
    parser.add_argument("--activation", choices=("leaky_relu", "identity"),
                        default="leaky_relu", help="after each batch norm (default: leaky_relu)")
    parser.add_argument("--blocks", nargs=4, type=int, default=list(model.BLOCKS), metavar="B")
    parser.add_argument("--batch", type=int, default=32, help="the plan's batch (default: 32)")
    parser.add_argument("--size", type=int, default=128, help="the plan's image size")
    parser.add_argument("--cpu-batch", type=int, default=8, help="the CPU's batch")
    parser.add_argument("--cpu-size", type=int, default=64, help="the CPU's image size")
    parser.add_argument("--budget", type=float, default=60.0,
                        help="seconds of timed CPU steps per dtype (default: 60)")
    harness.add_write_option(parser, MEMORY)
    args = parser.parse_args(argv)
    command = " ".join(["python -m benchmarks.memory", *(sys.argv[1:] if argv is None
                                                         else argv)])
    parts = [part for part in args.parts if part == "cpu" or not plans.missing(part)]
    for part in set(args.parts) - set(parts):
        print(f"skipped: {plans.missing(part)}", file=sys.stderr)

    def log(line):
        print(line, file=sys.stderr, flush=True)

    figures = measure(args.dtypes, parts, activation=args.activation, blocks=args.blocks,
                      batch=args.batch,
                      size=args.size, cpu_batch=args.cpu_batch, cpu_size=args.cpu_size,
                      budget=args.budget, log=log)
    shapes = (f"Activation {args.activation}; blocks {args.blocks}; the plan compiles a step "
              f"on a batch of {args.batch} images of {args.size}×{args.size} (and "
              f"{2 * args.batch}, for the largest batch), the CPU runs one of {args.cpu_batch} "
              f"of {args.cpu_size}×{args.cpu_size}, timed for {args.budget:g} s per dtype.")
    harness.publish(markdown(figures, shapes, command), MEMORY, args.write)
    return figures


if __name__ == "__main__":
    main()
