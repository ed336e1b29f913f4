"""``python -m benchmarks``: prints the table; ``--write`` also records it in RESULTS.md."""

from __future__ import annotations

import argparse
import pathlib
import sys

from benchmarks import harness

RESULTS = pathlib.Path(__file__).with_name("RESULTS.md")


def main(argv: list[str] | None = None) -> harness.Report:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--shapes", nargs="+", type=harness.parse_shape,
                        default=list(harness.SHAPES),
                        metavar="NxCx...", help="shapes of x, channel on axis 1 "
                        "(default: 256x128 4096x1024 64x256x256 64x64x32x32)")
    parser.add_argument("--reps", type=int, default=10,
                        help="least number of timed calls per job (default: 10)")
    parser.add_argument("--budget", type=float, default=10.0,
                        help="seconds of timed calls per shape; fast shapes get more calls "
                        "(default: 10)")
    harness.add_write_option(parser, RESULTS)
    parser.add_argument("--compile-reps", type=int, default=harness.COMPILE_REPS,
                        help="compilations timed per job, their median reported "
                        f"(default: {harness.COMPILE_REPS})")
    args = parser.parse_args(argv)
    command = " ".join(["python -m benchmarks", *(sys.argv[1:] if argv is None else argv)])

    def log(line):
        print(line, file=sys.stderr, flush=True)

    report = harness.run(args.shapes, reps=args.reps, budget=args.budget,
                         compile_reps=args.compile_reps, log=log)
    harness.publish(harness.markdown(report, command), RESULTS, args.write)
    return report


if __name__ == "__main__":
    main()
