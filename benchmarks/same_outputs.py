"""Whether a change of jbn changed what users get: ``python -m benchmarks.same_outputs REV``.

Computes y, the new state and the gradients of x, weight and bias (of Σ y·ct) with the jbn
of git revision ``REV`` and with the working tree's, on a grid of calls through the public
API only, in float64 (and float32 and bfloat16 where said), and compares them bit for bit.
The grid: PyTorch's parity grid (ranks 2 to 5, momentum 0.1, 0.37 and None, affine or not,
running statistics or not, eps 1e-5 and 0.1, training and eval), masks, channels-last, data
whose mean is far from 0 (the CPU's exact path), bfloat16 data, batch renormalization, ghost
batches, and the batch split over 8 devices under ``jax.shard_map``; each on both paths of
the statistics (the CPU's, and the accelerators' forced on the CPU).

Prints, per group of calls, how many are bit-identical and the largest difference in units
in the last place. ``--record FILE`` only computes the grid with whichever jbn is importable
and writes it to FILE (the command runs itself that way for both revisions).
"""

from __future__ import annotations

import argparse
import itertools
import os
import pathlib
import subprocess
import sys
import tarfile
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEVICES = 8
# Both paths of the statistics: the CPU's own, and the accelerators' forced on the CPU.
PATHS = {"cpu path": None, "accelerator path": "shifted"}
BFLOAT16 = "(bfloat16)"


def grid():
    """(group, name, call) of every case; ``call()`` returns a dict of arrays."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import jbn

    def case(x, training, *, channels, affine=True, track=True, seed=0, **keywords):
        rng = np.random.default_rng(seed)
        params, state = jbn.init(channels, affine=affine, track_running_stats=track,
                                 dtype=x.dtype)
        if affine:
            params = {"weight": jnp.asarray(rng.normal(1, 0.5, channels), x.dtype),
                      "bias": jnp.asarray(rng.normal(0, 0.5, channels), x.dtype)}
        if track:  # running statistics in at least float32, as jbn.init keeps them
            wide = jnp.promote_types(x.dtype, jnp.float32)
            state = {"running_mean": jnp.asarray(rng.normal(0, 1, channels), wide),
                     "running_var": jnp.asarray(rng.uniform(0.5, 2, channels), wide),
                     "num_batches_tracked": jnp.asarray(3, jnp.int32)}
        ct = jnp.asarray(rng.normal(size=x.shape), x.dtype)

        def run():
            def loss(x, params):
                y, new_state = jbn.batchnorm(params, state, x, training, **keywords)
                return jnp.sum(y * ct), (y, new_state)
            (_, (y, new_state)), (dx, dparams) = jax.value_and_grad(
                loss, (0, 1), has_aux=True)(x, params)
            return {"y": y, "dx": dx, **{f"d{k}": v for k, v in dparams.items()},
                    **{f"state.{k}": v for k, v in new_state.items()}}
        return run

    rng = np.random.default_rng(0)
    shapes = {2: (7, 3), 3: (4, 3, 5), 4: (3, 3, 4, 2), 5: (2, 3, 3, 2, 2)}
    for rank, momentum, affine, track, eps, training in itertools.product(
            shapes, (0.1, 0.37, None), (True, False), (True, False), (1e-5, 0.1),
            (True, False)):
        x = jnp.asarray(rng.normal(rng.uniform(-3, 3), rng.uniform(0.5, 4), shapes[rank]))
        yield ("parity grid", f"rank {rank} m {momentum} affine {affine} track {track} "
               f"eps {eps} training {training}",
               case(x, training, channels=3, affine=affine, track=track, momentum=momentum,
                    eps=eps))
    x = jnp.asarray(rng.normal(1.5, 2.0, (16, 3, 5)))
    mask = jnp.asarray(rng.random((16, 5)) < 0.6)
    for training in (True, False):
        yield "masks", f"training {training}", case(x, training, channels=3, mask=mask)
        yield "masks", f"per example, training {training}", case(x, training, channels=3,
                                                                 mask=mask[:, 0])
        yield ("channels last", f"training {training}",
               case(jnp.moveaxis(x, 1, -1), training, channels=3, axis=-1))
    for ratio in (0, 4, 10, 1e4):
        for dtype in (jnp.float64, jnp.float32):
            data = jnp.asarray(ratio + rng.normal(size=(64, 4, 3)), dtype)
            yield ("mean far from 0", f"mean {ratio}σ {jnp.dtype(dtype).name}",
                   case(data, True, channels=4))
    far = jnp.asarray(1e4 + rng.normal(size=(4096, 8)), jnp.float32)
    far_mask = jnp.asarray(rng.random(4096) < 0.5)
    yield "mean far from 0", "mean 1e4σ float32, masked", case(far, True, channels=8,
                                                                 mask=far_mask)
    for ratio in (0, 1e2):
        data = jnp.asarray(ratio + rng.normal(size=(64, 4, 3)), jnp.bfloat16)
        for training in (True, False):
            yield ("bfloat16", f"mean {ratio}σ training {training}",
                   case(data, training, channels=4))
    yield "renorm", "(2, 0.5)", case(x, True, channels=3, mask=mask, renorm=(2.0, 0.5))
    for size in (2, 4):
        yield ("ghost batches", f"virtual_batch_size {size}",
               case(x, True, channels=3, mask=mask, virtual_batch_size=size))
        yield ("ghost batches", f"virtual_batch_size {size} with renorm",
               case(x, True, channels=3, renorm=(1.5, 1.0), virtual_batch_size=size))

    mesh = jax.make_mesh((DEVICES,), ("data",))
    split = NamedSharding(mesh, P("data"))
    for masked in (False, True):
        params, state = jbn.init(3, dtype=jnp.float64)

        def on_devices(x, mask, params=params, state=state):
            def loss(params, x, mask):
                y, new_state = jbn.batchnorm(params, state, x, True, mask=mask,
                                             axis_name="data")
                return jax.lax.psum(jnp.sum(jnp.sin(y)), "data"), (y, new_state)
            (_, (y, new_state)), (dparams, dx) = jax.value_and_grad(
                loss, (0, 1), has_aux=True)(params, x, mask)
            return {"y": y, "dx": dx, **{f"d{k}": v for k, v in dparams.items()},
                    **{f"state.{k}": v for k, v in new_state.items()}}

        f = jax.jit(jax.shard_map(on_devices, mesh=mesh, in_specs=(P("data"), P("data")),
                                  out_specs={"y": P("data"), "dx": P("data"), "dweight": P(),
                                             "dbias": P(), **{f"state.{k}": P() for k in state}}))
        m = mask if masked else jnp.ones_like(mask)
        yield ("8 devices (shard_map)", f"masked {masked}",
               lambda f=f, m=m: f(jax.device_put(x, split), jax.device_put(m, split)))


def record(path: str) -> None:
    import jax
    import numpy as np

    from jbn import _stats

    jax.config.update("jax_enable_x64", True)
    results = {}
    for label, forced in PATHS.items():
        with _stats.scheme(path=forced):
            for group, name, run in grid():
                for key, value in run().items():
                    value = np.asarray(value)
                    if value.dtype.name == "bfloat16":  # NumPy saves float32 (exactly)
                        key, value = f"{key} {BFLOAT16}", value.astype(np.float32)
                    results[f"{group}, {label}|{name}|{key}"] = value
    np.savez(path, **results)


def compare(before: dict, after: dict) -> list[str]:
    import numpy as np

    from benchmarks.harness import table

    groups: dict[str, dict] = {}
    for key in before:
        group, name, _ = key.split("|")
        found = groups.setdefault(group, {"cases": set(), "differ": set(), "ulps": 0.0,
                                          "outputs": set()})
        found["cases"].add(name)
        a, b = before[key], after[key]
        if a.shape != b.shape or a.dtype != b.dtype:
            found["differ"].add(name)
            found["ulps"] = float("inf")
        elif not np.array_equal(a, b, equal_nan=True):
            found["differ"].add(name)
            found["outputs"].add(key.split("|")[2])
            if np.issubdtype(a.dtype, np.floating):
                spacing = np.spacing(np.maximum(np.abs(a), np.abs(b)).astype(a.dtype))
                if key.endswith(BFLOAT16):  # bfloat16 has 16 fewer bits than float32
                    spacing = spacing * 2.0**16
                found["ulps"] = max(found["ulps"], float(np.nanmax(np.abs(a - b) / spacing)))
            else:
                found["ulps"] = float("inf")
    missing = sorted(set(after) ^ set(before))
    lines = table(["calls", "cases", "bit-identical", "largest difference (ulps)",
                   "outputs that differ"],
                  [[group, str(len(found["cases"])),
                    str(len(found["cases"]) - len(found["differ"])), f"{found['ulps']:.3g}",
                    ", ".join(sorted(found["outputs"])) or "—"] for group, found in groups.items()])
    if missing:
        lines.append(f"\nresults of one revision only: {missing}")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.same_outputs",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("revision", nargs="?", help="the git revision to compare with")
    parser.add_argument("--record", metavar="FILE", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.record:
        record(args.record)
        return
    if not args.revision:
        parser.error("give a revision, such as HEAD or main")
    import numpy as np

    with tempfile.TemporaryDirectory() as folder:
        old = pathlib.Path(folder) / "old"
        old.mkdir()
        archive = subprocess.run(["git", "archive", args.revision, "jbn"], cwd=ROOT,
                                 check=True, capture_output=True).stdout
        archive_path = pathlib.Path(folder) / "old.tar"
        archive_path.write_bytes(archive)
        with tarfile.open(archive_path) as tar:
            tar.extractall(old, filter="data")
        results = {}
        for label, path in (("before", old), ("after", ROOT)):
            out = pathlib.Path(folder) / f"{label}.npz"
            environment = {**os.environ, "PYTHONPATH": str(path), "JAX_PLATFORMS": "cpu",
                           "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES}"}
            subprocess.run([sys.executable, __file__, "--record", str(out)], check=True,
                           env=environment, cwd=folder)
            results[label] = dict(np.load(out))
    print(f"jbn at {args.revision} (before) and in the working tree (after):\n")
    print("\n".join(compare(results["before"], results["after"])))


if __name__ == "__main__":
    main()
