"""What a GPU would run: ``python -m benchmarks.gpu_plan`` compiles for an H100 without one.

XLA's GPU compiler runs on a CPU-only machine against a description of the device
(``--target``; by default the H100's, ``benchmarks/h100.txtpb``) and writes the thunk
sequence a GPU would execute (``benchmarks.plans``). For each case this prints, per training
call:

* **conditionals**: ``kConditional`` thunks. On a GPU each one copies its predicate to the
  host and blocks until the stream drains: a host round trip per layer per step.
* **command buffers**: CUDA graphs (``kCommandBuffer``), launched as one unit.
* **launches in / outside**: kernels and copies inside command buffers, and outside any.
* **all-reduces**, **all-gathers**: collectives, with the values they carry.

Cases: one device (training forward; forward and backward together) on the benchmark's
shapes, and 8 devices under ``jax.shard_map`` with ``axis_name``: all 8, groups of 2 by
``group_size=2`` (one row per group in each all-reduce), and groups of 2 as the inner axis of
a (4, 2) mesh, that axis alone named (each group's own all-reduces). Each runs with the
statistics a GPU runs (``platform``) and with the guarded statistics of the CPU forced
(``guarded``, what GPUs ran before the platforms were told apart).

Set-up: ``python -m benchmarks.plans --help`` (the CUDA plugin of the installed jaxlib).
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

from benchmarks import plans  # isort: skip  (sets JAX up for deviceless compiles: first)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jaxlib  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jbn  # noqa: E402
from benchmarks import harness, model  # noqa: E402
from jbn import _stats  # noqa: E402

GPU_PLAN = pathlib.Path(__file__).with_name("GPU_PLAN.md")
DEVICES = 8
MODES = {"train": "training forward", "grad": "forward+backward"}
# The layers compared: jbn with the statistics a GPU runs, with the CPU's guarded statistics
# forced (what GPUs ran before the platforms were told apart), accumulating micro-batches
# (a call as each micro-batch makes it), and Flax linen's BatchNorm.
LAYERS = {"jbn": {}, "jbn, guarded": {"path": _stats.GUARDED},
          "jbn, accumulating 4": {"accumulation_steps": 4}, "flax": None}


class Case(NamedTuple):
    """One compilation: ``function`` of ``layer`` in ``mode``, its abstract arguments for the
    GPU and, on one device, for the CPU; ``shape``, one device's x."""

    name: str
    mode: str
    layer: str
    shape: tuple[int, ...]
    function: Callable
    arguments: tuple
    on_cpu: tuple | None


def cases(mesh, shapes):
    """Every case: on one device every layer, on 8 jbn and (without groups) Flax."""
    one = jax.sharding.Mesh(mesh.devices[:1], ("d",))
    cpu = jax.sharding.Mesh(jax.devices()[:1], ("d",))
    for shape in shapes:
        for mode in MODES:
            for layer in LAYERS:
                train, init = _layer(layer, shape[1])
                yield Case(f"1 device, {'×'.join(map(str, shape))}", mode, layer, shape,
                           _step(mode, train), _arguments(one, init, shape, P()),
                           _arguments(cpu, init, shape, P()))
    shape = (DEVICES * 8, 64, 32, 32)
    name = f"{'×'.join(map(str, shape))} (shard_map)"
    grid = jax.sharding.Mesh(mesh.devices.reshape(DEVICES // 2, 2), ("groups", "d"))
    for case, step_mesh, keywords in (
            (f"{DEVICES} devices, {name}", mesh, {}),
            (f"{DEVICES} devices in groups of 2 (group_size=2), {name}", mesh,
             {"group_size": 2}),
            (f"{DEVICES} devices in groups of 2 (a (4, 2) mesh, its inner axis named), {name}",
             grid, {})):
        spec = P(step_mesh.axis_names)
        # Flax's groups work under jax.pmap alone.
        for layer in ("jbn", "jbn, guarded") + (("flax",) if not keywords else ()):
            train, init = _layer(layer, shape[1], axis_name="d", **keywords)
            for mode in MODES:
                # y, or the gradients, alone: on the (4, 2) mesh each group keeps a running
                # state of its own, which no single out_spec describes.
                step = jax.shard_map(_first(_step(mode, train, step_mesh.axis_names)),
                                     mesh=step_mesh, in_specs=(P(), P(), spec),
                                     out_specs=(P(), spec) if mode == "grad" else spec)
                yield Case(case, mode, layer, (shape[0] // DEVICES, *shape[1:]), step,
                           _arguments(step_mesh, init, shape, spec), None)


def _first(function):
    """``function``'s first result alone."""
    return lambda *args: function(*args)[0]


def _layer(layer: str, channels: int, **keywords):
    """``layer``'s training call ``(params, state, x) -> (y, state)``, channel on axis 1, and
    a function making its params and state."""
    if LAYERS[layer] is None:
        flax = model.flax_norm(axis=1, axis_name=keywords.get("axis_name"))
        return flax.apply, partial(flax.init, channels)
    options = {key: value for key, value in LAYERS[layer].items() if key != "path"}
    train = partial(jbn.batchnorm, training=True, **options, **keywords)
    return train, partial(jbn.init, channels, accumulation_steps=options.get(
        "accumulation_steps"))


def _step(mode: str, train, devices=None):
    """The training call, or with its backward pass: the gradients of a loss summed over
    ``devices`` (mesh axes)."""
    if mode == "train":
        return train

    def forward_backward(params, state, x):
        def loss(params, x):
            y, new_state = train(params, state, x)
            total = jnp.sum(jnp.sin(y))
            if devices is not None:
                total = jax.lax.psum(total, devices)
            return total, new_state
        return jax.grad(loss, (0, 1), has_aux=True)(params, x)

    return forward_backward


def _arguments(mesh, init, shape, spec):
    replicated = NamedSharding(mesh, P())
    params, state = jax.eval_shape(init)
    abstract = partial(jax.tree.map, lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                                                    sharding=replicated))
    return (abstract(params), abstract(state),
            jax.ShapeDtypeStruct(shape, jnp.float32, sharding=NamedSharding(mesh, spec)))


def compile_case(case: Case) -> tuple[plans.Plan, int | None]:
    """The H100's plan of ``case`` and, on one device, the CPU's top-level operations, each
    compiled with its layer's statistics."""
    with _stats.scheme(path=(LAYERS[case.layer] or {}).get("path")):
        return (plans.compile_plan(case.function, case.arguments, "gpu"),
                None if case.on_cpu is None
                else plans.compile_plan(case.function, case.on_cpu, "cpu").top_level)


def main(argv: list[str] | None = None) -> list[tuple[Case, plans.Plan, int | None]]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=pathlib.Path, default=plans.H100,
                        help=f"GPU target configuration (default: {plans.H100.name} beside "
                        "this file)")
    parser.add_argument("--shapes", nargs="+", type=harness.parse_shape,
                        default=list(harness.SHAPES), metavar="NxCx...",
                        help="shapes of x on one device, channel on axis 1")
    harness.add_write_option(parser, GPU_PLAN)
    args = parser.parse_args(argv)
    if plans.missing("gpu"):
        raise SystemExit(plans.missing("gpu"))
    devices = plans.devices("gpu", DEVICES, args.target)
    mesh = jax.sharding.Mesh(devices, ("d",))
    command = " ".join(["python -m benchmarks.gpu_plan", *(sys.argv[1:] if argv is None
                                                            else argv)])
    lines = ["# What a GPU runs", "", f"`{command}`", "",
             f"- **target**: {devices[0].device_kind} ({args.target.name})",
             f"- **versions**: jax {jax.__version__}, jaxlib {jaxlib.__version__}", "",
             "\n\n".join(__doc__.split("\n\n")[1:5]).replace("``", "`"), "",
             "<!-- --8<-- [start:table] -->"]
    header = ["case", "mode", "layer", "conditionals", "command buffers",
              "launches in / outside", "traffic (copies of x)", "all-reduces (values)",
              "all-gathers (values)", "CPU top-level ops"]
    lines += harness.table(header, [])
    print("\n".join(lines), flush=True)
    rows = []
    for case in cases(mesh, args.shapes):
        found, cpu = compile_case(case)
        rows.append((case, found, cpu))
        lines.append(harness.table_line([
            case.name, MODES[case.mode], case.layer, str(found.conditionals),
            str(found.command_buffers), f"{found.launches_inside} / {found.launches_outside}",
            f"{found.traffic / (4 * math.prod(case.shape)):.2f}",
            *(f"{len(sizes)} ({', '.join(map(str, sizes))})" if sizes else "0"
              for sizes in (found.collectives.get(name, [])
                            for name in ("all-reduces", "all-gathers"))),
            "—" if cpu is None else str(cpu)]))
        print(lines[-1], flush=True)
    lines.append("<!-- --8<-- [end:table] -->")
    if args.write:
        GPU_PLAN.write_text("\n".join(lines) + "\n")
        print(f"wrote {GPU_PLAN}", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
