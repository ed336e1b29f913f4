"""What a GPU would run: ``python -m benchmarks.gpu_plan`` compiles for an H100 without one.

XLA's GPU compiler (the ``jax-cuda12-plugin`` and ``jax-cuda12-pjrt`` wheels of the installed
jaxlib) runs on a CPU-only machine against a target description of the device
(``--target``: a ``GpuTargetConfigProto`` in text form, such as the H100's below) and writes
the thunk sequence a GPU would execute. For each case this prints, per training call:

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

Set-up, once, in the project's virtual environment (about 480 MB)::

    pip install "jax-cuda12-plugin==$(python -c 'import jaxlib; print(jaxlib.__version__)')" \\
                "jax-cuda12-pjrt==$(python -c 'import jaxlib; print(jaxlib.__version__)')"

The plugin then makes plain JAX look for a GPU at start-up: set ``JAX_PLATFORMS=cpu`` for
other commands in that environment, or install it in a separate one.
"""

from __future__ import annotations

import os

# Read when JAX starts: no GPU to look for, no check of CUDA libraries that are not there.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from functools import partial  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jaxlib  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jbn  # noqa: E402
from benchmarks import harness  # noqa: E402
from jbn import _stats  # noqa: E402

TARGET = pathlib.Path(__file__).resolve().parents[2] / "shared" / "gpu" / "h100.txtpb"
GPU_PLAN = pathlib.Path(__file__).with_name("GPU_PLAN.md")
DEVICES = 8
PATHS = {"platform": None, "guarded": _stats.GUARDED}
MODES = {"train": "training forward", "grad": "forward+backward"}
# Thunks that hold others, or only order them: not launches of their own.
CONTAINERS = {"kCommandBuffer", "kConditional", "kAsyncStart", "kAsyncDone", "kWhile",
              "kSequential", "kWaitForStreams"}
COLLECTIVES = {"kAllReduce": "all-reduces", "kAllReduceStart": "all-reduces",
               "kAllGather": "all-gathers", "kAllGatherStart": "all-gathers"}


@dataclasses.dataclass
class Plan:
    """What one compiled call runs, from its thunk sequence and optimized HLO."""

    conditionals: int = 0
    command_buffers: int = 0
    launches_inside: int = 0
    launches_outside: int = 0
    collectives: dict[str, list[int]] = dataclasses.field(default_factory=dict)


def plan(thunks: str, hlo: str) -> Plan:
    """Counts a thunk sequence, as XLA dumps it: each top-level thunk is a line
    ``NNN: kName``, the thunks it holds are indented below it."""
    found = Plan()
    container = None
    for line in thunks.splitlines():
        match = re.match(r"(\s*)\d+: (k\w+)", line)
        if not match:
            continue
        indent, kind = match.groups()
        if not indent:
            container = kind
        if kind == "kConditional":
            found.conditionals += 1
        elif kind == "kCommandBuffer":
            found.command_buffers += 1
        elif kind not in CONTAINERS and kind not in COLLECTIVES:
            if indent and container == "kCommandBuffer":
                found.launches_inside += 1
            else:
                found.launches_outside += 1
    # Sizes from the HLO: the values each collective carries.
    for op, name in (("all-reduce", "all-reduces"), ("all-gather", "all-gathers")):
        for shapes in re.findall(rf"= (.*?) {op}(?:-start)?\(", hlo):
            sizes = [_elements(dims) for dims in re.findall(r"[a-z]+\d+\[([\d,]*)\]", shapes)]
            found.collectives.setdefault(name, []).append(sum(sizes))
    return found


def _elements(dims: str) -> int:
    count = 1
    for d in dims.split(","):
        if d:
            count *= int(d)
    return count


def compile_plan(function, args, path: str | None) -> Plan:
    """Compiles ``function`` for the target and reads what it runs from XLA's dump: the
    thunk sequence after XLA's passes over it (which form the command buffers)."""
    with tempfile.TemporaryDirectory() as dump, _stats.scheme(path=path):
        compiled = jax.jit(function).lower(*args).compile(
            compiler_options={"xla_dump_to": dump, "xla_dump_hlo_as_text": True})
        found = sorted(pathlib.Path(dump).glob("*.thunk_sequence*.txt"))
        if not found:
            raise RuntimeError(f"XLA wrote no thunk sequence to {dump}")
        # The sequence after the thunk passes, where there is one, sorts last.
        return plan(found[-1].read_text(), compiled.as_text())


def cases(mesh, shapes):
    """(case, mode, function, abstract arguments) of every case."""
    one = jax.sharding.Mesh(mesh.devices[:1], ("d",))
    for shape in shapes:
        for mode in MODES:
            yield (f"1 device, {'×'.join(map(str, shape))}", mode,
                   _step(mode, None), _arguments(one, shape, P()))
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
        for mode in MODES:
            # y, or the gradients, alone: on the (4, 2) mesh each group keeps a running state
            # of its own, which no single out_spec describes.
            step = jax.shard_map(_first(_step(mode, "d", step_mesh.axis_names, **keywords)),
                                 mesh=step_mesh, in_specs=(P(), P(), spec),
                                 out_specs=(P(), spec) if mode == "grad" else spec)
            yield case, mode, step, _arguments(step_mesh, shape, spec)


def _first(function):
    """``function``'s first result alone."""
    return lambda *args: function(*args)[0]


def _step(mode: str, axis_name, devices=None, **keywords):
    """The training call, or with its backward pass: the gradients of a loss summed over
    ``devices`` (mesh axes)."""
    train = partial(jbn.batchnorm, training=True, axis_name=axis_name, **keywords)
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


def _arguments(mesh, shape, spec):
    replicated = NamedSharding(mesh, P())
    params, state = jax.eval_shape(partial(jbn.init, shape[1]))
    abstract = partial(jax.tree.map, lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                                                    sharding=replicated))
    return (abstract(params), abstract(state),
            jax.ShapeDtypeStruct(shape, jnp.float32, sharding=NamedSharding(mesh, spec)))


def main(argv: list[str] | None = None) -> list[tuple[str, str, str, Plan]]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=pathlib.Path, default=TARGET,
                        help=f"GPU target configuration (default: {TARGET})")
    parser.add_argument("--shapes", nargs="+", type=harness.parse_shape,
                        default=list(harness.SHAPES), metavar="NxCx...",
                        help="shapes of x on one device, channel on axis 1")
    harness.add_write_option(parser, GPU_PLAN)
    args = parser.parse_args(argv)
    from jax.experimental.topologies import get_topology_desc

    try:
        topology = get_topology_desc("h100", "cuda", target_config=args.target.read_text(),
                                     topology=f"1x1x{DEVICES}")
    except Exception as error:  # the plugin's errors have no common type
        raise SystemExit("python -m benchmarks.gpu_plan needs the CUDA plugin of the "
                         f"installed jaxlib ({jax.__version__}): see its --help. "
                         f"({error})") from None
    mesh = jax.sharding.Mesh(topology.devices, ("d",))
    command = " ".join(["python -m benchmarks.gpu_plan", *(sys.argv[1:] if argv is None
                                                            else argv)])
    lines = ["# What a GPU runs", "", f"`{command}`", "",
             f"- **target**: {topology.devices[0].device_kind} ({args.target.name})",
             f"- **versions**: jax {jax.__version__}, jaxlib {jaxlib.__version__}", "",
             "\n\n".join(__doc__.split("\n\n")[1:4]).replace("``", "`"), "",
             "<!-- --8<-- [start:table] -->"]
    header = ["case", "mode", "statistics", "conditionals", "command buffers",
              "launches in / outside", "all-reduces (values)", "all-gathers (values)"]
    lines += harness.table(header, [])
    print("\n".join(lines), flush=True)
    rows = []
    for case, mode, function, arguments in cases(mesh, args.shapes):
        for path_name, path in PATHS.items():
            found = compile_plan(function, arguments, path)
            rows.append((case, mode, path_name, found))
            lines.append(harness.table_line([
                case, MODES[mode], path_name, str(found.conditionals),
                str(found.command_buffers),
                f"{found.launches_inside} / {found.launches_outside}",
                *(f"{len(sizes)} ({', '.join(map(str, sizes))})" if sizes else "0"
                  for sizes in (found.collectives.get(name, [])
                                for name in ("all-reduces", "all-gathers")))]))
            print(lines[-1], flush=True)
    lines.append("<!-- --8<-- [end:table] -->")
    if args.write:
        GPU_PLAN.write_text("\n".join(lines) + "\n")
        print(f"wrote {GPU_PLAN}", file=sys.stderr)
    return rows

if __name__ == "__main__":
    main()
