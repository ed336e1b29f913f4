"""What choosing the statistics' path costs: ``python -m benchmarks.branch``.

jbn's training forward takes the plain sums Σx, Σx² and then, under ``lax.cond``, either
keeps them or runs the exact pass about the mean. This times jbn as it is against the same
function with the ``lax.cond`` replaced by its plain branch (what jbn would be if it never
needed the exact path): the run time of each call, in turn on the same machine, and the
compile time of a fresh jit, where the exact branch is compiled too. On inputs that take the
plain path both compute the same; the difference is the branch itself.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from functools import partial
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

import jbn
from benchmarks import harness
from benchmarks.ensemble import median_seconds
from jbn import _stats


def _plain_branch_only(pred, true_fun, false_fun, *operands):
    return true_fun(*operands)


def compiled(plain_only: bool, params, state, x):
    """A training forward traced and compiled afresh, with its ``lax.cond`` or, if
    ``plain_only``, with the plain branch in its place."""
    jax.clear_caches()
    with (mock.patch.object(_stats.lax, "cond", _plain_branch_only) if plain_only
          else contextlib.nullcontext()):
        return jax.jit(partial(jbn.batchnorm, training=True)).lower(params, state, x).compile()


def compile_seconds(plain_only: bool, params, state, x, reps: int) -> float:
    """Median seconds to trace, lower and compile a fresh training forward."""
    seconds = []
    for _ in range(reps):
        start = time.perf_counter()
        compiled(plain_only, params, state, x)
        seconds.append(time.perf_counter() - start)
    return float(np.median(seconds))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.branch", description=__doc__)
    parser.add_argument("--shapes", nargs="+", type=harness.parse_shape,
                        default=list(harness.SHAPES),
                        metavar="NxCx...", help="shapes of x, channel on axis 1")
    parser.add_argument("--reps", type=int, default=300)
    parser.add_argument("--compile-reps", type=int, default=5)
    args = parser.parse_args(argv)
    print("| shape | with the branch | plain path only | ratio | compile with | compile without |")
    print("|---|---|---|---|---|---|")
    for shape in args.shapes:
        x = jnp.asarray(np.random.default_rng(0).standard_normal(shape, np.float32))
        params, state = jbn.init(shape[1])
        executables = {"with": compiled(False, params, state, x),
                       "without": compiled(True, params, state, x)}
        assert "conditional" in executables["with"].as_text()
        assert "conditional" not in executables["without"].as_text()
        seconds = median_seconds(
            {key: partial(_call, executable, params, state, x)
             for key, executable in executables.items()}, args.reps)
        compiles = [compile_seconds(plain_only, params, state, x, args.compile_reps)
                    for plain_only in (False, True)]
        print(f"| {'×'.join(map(str, shape))} | {seconds['with'] * 1e6:.1f} µs | "
              f"{seconds['without'] * 1e6:.1f} µs | {seconds['with'] / seconds['without']:.2f} | "
              f"{compiles[0] * 1e3:.0f} ms | {compiles[1] * 1e3:.0f} ms |")


def _call(executable, *args):
    return jax.block_until_ready(executable(*args))


if __name__ == "__main__":
    main()
