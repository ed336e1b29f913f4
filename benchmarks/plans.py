"""Compiling for a GPU and a TPU without one, and reading what the compiled program does.

XLA's GPU compiler (the ``jax-cuda12-plugin`` and ``jax-cuda12-pjrt`` wheels of the installed
jaxlib) runs on a CPU-only machine against a description of the device, ``h100.txtpb`` beside
this file (a ``GpuTargetConfigProto`` in text form: an NVIDIA H100 80GB HBM3, CUDA 12.8,
cuDNN 9.7). XLA's TPU compiler ships in ``libtpu`` (``jax[tpu]`` at the installed jax's
version), which compiles for a TPU v5e without one. Nothing runs: a plan gives the program's
structure and the compiler's estimates, not time.

Set-up, once, in the project's virtual environment (the two coexist)::

    pip install "jax-cuda12-plugin==$(python -c 'import jaxlib; print(jaxlib.__version__)')" \\
                "jax-cuda12-pjrt==$(python -c 'import jaxlib; print(jaxlib.__version__)')"
    pip install "jax[tpu]==$(python -c 'import jax; print(jax.__version__)')"

Either makes plain JAX look for its device at start-up: the benchmarks set
``JAX_PLATFORMS=cpu`` before JAX starts; set it for other commands in that environment.
"""

from __future__ import annotations

import os

# Read when JAX starts: no device to look for, no check of CUDA libraries that are not here,
# no TPU host to find.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
# libtpu takes a lock file by default: one process at a time on the machine.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import dataclasses  # noqa: E402
import importlib.util  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

H100 = pathlib.Path(__file__).with_name("h100.txtpb")
TPU_TOPOLOGY = "v5e:2x2"
COMPILERS = {"gpu": ("jax_cuda12_plugin", "the jax-cuda12-plugin and jax-cuda12-pjrt wheels "
                     "of the installed jaxlib"),
             "tpu": ("libtpu", "libtpu, from jax[tpu] at the installed jax's version")}
# Thunks that hold others, or only order them: not launches of their own.
CONTAINERS = {"kCommandBuffer", "kConditional", "kAsyncStart", "kAsyncDone", "kWhile",
              "kSequential", "kWaitForStreams"}
COLLECTIVES = {"kAllReduce": "all-reduces", "kAllReduceStart": "all-reduces",
               "kAllGather": "all-gathers", "kAllGatherStart": "all-gathers"}
# Operations of an optimized program that move no data of their own.
FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all"}
ITEM_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
              "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}


def missing(platform: str) -> str | None:
    """Why the compiler for ``platform`` ("gpu" or "tpu") cannot run here, or None."""
    module, what = COMPILERS[platform]
    if importlib.util.find_spec(module) is None:
        return f"the {platform.upper()} plan needs {what} (python -m benchmarks.plans --help)"
    return None


def devices(platform: str, count: int = 1, target: pathlib.Path = H100) -> list:
    """``count`` devices of an H100 (``target``) or a TPU v5e, to compile for."""
    from jax.experimental.topologies import get_topology_desc

    if platform == "gpu":
        topology = get_topology_desc("h100", "cuda", target_config=target.read_text(),
                                     topology=f"1x1x{count}")
    else:
        topology = get_topology_desc(topology_name=TPU_TOPOLOGY, platform="tpu")
    return list(topology.devices)[:count]


@dataclasses.dataclass
class Plan:
    """What one compiled program does, from its thunk sequence (GPU) and its optimized HLO.

    ``traffic``: bytes the top-level operations of the optimized program read and write (a
    gather counts what it returns); on a TPU, the compiler's own cost model ("bytes
    accessed"). ``temporaries``: peak bytes of temporary buffers (XLA's memory analysis);
    ``footprint``: those and the arguments and outputs, what the device must hold.
    ``top_level``: operations of the optimized program's entry that do work (those in
    ``FREE`` do not)."""

    compile_seconds: float = 0.0
    traffic: float = 0.0
    temporaries: int = 0
    footprint: int = 0
    top_level: int = 0
    conditionals: int = 0
    command_buffers: int = 0
    launches_inside: int = 0
    launches_outside: int = 0
    collectives: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    executable: Any = dataclasses.field(default=None, repr=False)  # what was compiled

    @property
    def launches(self) -> int:
        return self.launches_inside + self.launches_outside


def compile_plan(function: Callable, args, platform: str) -> Plan:
    """Compiles ``function`` for ``args`` (abstract, placed on the devices of ``platform``:
    "gpu", "tpu" or "cpu") and reads its plan; on a GPU, from XLA's dump the thunk sequence
    after XLA's passes over it (which form the command buffers)."""
    with tempfile.TemporaryDirectory() as dump:
        options = {"xla_dump_to": dump, "xla_dump_hlo_as_text": True} if platform == "gpu" else {}
        lowered = jax.jit(function).lower(*args)
        start = time.perf_counter()
        compiled = lowered.compile(compiler_options=options)
        seconds = time.perf_counter() - start
        hlo = compiled.as_text()
        found = Plan(compile_seconds=seconds, traffic=float(hlo_traffic(hlo)),
                     top_level=top_level_operations(hlo), executable=compiled)
        memory = compiled.memory_analysis()
        found.temporaries = int(getattr(memory, "temp_size_in_bytes", 0) or 0)
        found.footprint = found.temporaries + sum(
            int(getattr(memory, name, 0) or 0) for name in ("argument_size_in_bytes",
                                                             "output_size_in_bytes"))
        if platform == "tpu":
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, list) else cost
            found.traffic = float(cost["bytes accessed"])
        if platform == "gpu":
            sequences = sorted(pathlib.Path(dump).glob("*.thunk_sequence*.txt"))
            if not sequences:
                raise RuntimeError(f"XLA wrote no thunk sequence to {dump}")
            # The sequence after the thunk passes, where there is one, sorts last.
            _count_thunks(sequences[-1].read_text(), found)
        for op, name in (("all-reduce", "all-reduces"), ("all-gather", "all-gathers")):
            for shapes in re.findall(rf"= (.*?) {op}(?:-start)?\(", hlo):
                found.collectives.setdefault(name, []).append(
                    sum(int(np.prod(dims)) for dims, _ in _arrays(shapes)))
    return found


def _count_thunks(thunks: str, found: Plan) -> None:
    """Counts a thunk sequence, as XLA dumps it: each top-level thunk is a line
    ``NNN: kName``, the thunks it holds are indented below it."""
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


def _arrays(text: str) -> list[tuple[list[int], str]]:
    """The (dimensions, element type) of each array type written in ``text``."""
    return [([int(d) for d in dims.split(",") if d], kind)
            for kind, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", text)
            if kind in ITEM_BYTES]


def _bytes(text: str) -> int:
    return sum(int(np.prod(dims)) * ITEM_BYTES[kind] for dims, kind in _arrays(text))


def _entry(hlo: str) -> list[tuple[str, str, str, list[str]]]:
    """(name, result type, operation, operand names) of each instruction of the entry."""
    entry = hlo[hlo.index("\nENTRY"):]
    entry = entry[:entry.index("\n}")]
    found = []
    for line in entry.splitlines()[2:]:
        match = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (.+?) ([a-z][\w\-]*)\((.*)$", line)
        if match:
            name, result, op, rest = match.groups()
            found.append((name, result, op, re.findall(r"%([\w.\-]+)", rest.split(")")[0])))
    return found


def hlo_traffic(hlo: str) -> int:
    """Bytes the top-level operations of an optimized program read and write: each reads
    its operands whole and writes its result, but a gather reads only what it returns."""
    sizes, total = {}, 0
    for name, result, op, operands in _entry(hlo):
        sizes[name] = written = _bytes(result)
        if op in FREE:
            continue
        read = written if "gather" in name else sum(sizes.get(a, 0) for a in operands)
        total += read + written
    return total


def top_level_operations(hlo: str) -> int:
    """How many operations of an optimized program's entry do work: on a CPU, each runs as a
    loop or a library call of its own."""
    return sum(op not in FREE for _, _, op, _ in _entry(hlo))


if __name__ == "__main__":  # python -m benchmarks.plans --help: how to install the compilers
    import argparse

    argparse.ArgumentParser(prog="python -m benchmarks.plans", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    for name in COMPILERS:
        print(f"{name}: {missing(name) or 'installed'}")
