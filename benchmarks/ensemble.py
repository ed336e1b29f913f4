"""Ensembles under ``jax.vmap``: ``python -m benchmarks.ensemble``.

jbn chooses the branch of its statistics once for the whole ensemble (the exact path if any
member needs it), so that ``lax.cond`` stays a branch under ``vmap``. This times an
ensemble of members, training forward and forward+backward, with that choice and with a
per-member predicate, which ``vmap`` turns into a select that computes both branches.
"""

from __future__ import annotations

import argparse
import time
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

import jbn
from jbn import _stats


def jobs(members: int, shape: tuple[int, ...]):
    rng = np.random.default_rng(0)
    xs = jnp.asarray(rng.standard_normal((members, *shape), np.float32) * 2 + 0.5)
    cts = jnp.asarray(rng.standard_normal((members, *shape), np.float32))
    params, state = jbn.init(shape[1])
    stack = jax.tree.map(lambda v: jnp.stack([v] * members), (params, state))

    def train(params, state, x):
        return jbn.batchnorm(params, state, x, True)

    def grad(params, state, x, ct):
        y, vjp, new_state = jax.vjp(lambda x, p: train(p, state, x), x, params, has_aux=True)
        return y, vjp(ct), new_state

    forward, backward = jax.jit(jax.vmap(train)), jax.jit(jax.vmap(grad))
    return {"train": lambda: jax.block_until_ready(forward(*stack, xs)),
            "grad": lambda: jax.block_until_ready(backward(*stack, xs, cts))}


def median_seconds(jobs: dict, reps: int) -> dict:
    """Median seconds of each job, timed in turn so that all see the same machine."""
    for job in jobs.values():
        job()
        job()
    times = {key: [] for key in jobs}
    for _ in range(reps):
        for key, job in jobs.items():
            start = time.perf_counter()
            job()
            times[key].append(time.perf_counter() - start)
    return {key: float(np.median(values)) for key, values in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ensemble", description=__doc__)
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args(argv)
    print("| shape of a member | mode | one branch for all | a select of both | ratio |")
    print("|---|---|---|---|---|")
    for shape in ((256, 128), (512, 256), (64, 64, 16, 16)):
        shared = jobs(args.members, shape)
        for job in shared.values():
            job()  # traced and compiled with the shared choice
        # A predicate per member: what vmap makes of lax.cond without the shared choice.
        with mock.patch.object(_stats._for_every_member, "vmap_rule",
                               lambda size, batched, condition: (condition, batched[0])):
            jax.clear_caches()
            per_member = jobs(args.members, shape)
            for job in per_member.values():
                job()
        for mode in shared:
            seconds = median_seconds({"one": shared[mode], "both": per_member[mode]}, args.reps)
            print(f"| {args.members}×{'×'.join(map(str, shape))} | {mode} | "
                  f"{seconds['one'] * 1e3:.2f} ms | {seconds['both'] * 1e3:.2f} ms | "
                  f"{seconds['both'] / seconds['one']:.2f} |")


if __name__ == "__main__":
    main()
