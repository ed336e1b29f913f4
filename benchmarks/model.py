"""The whole model: ``python -m benchmarks.model`` prints what batch norm adds to a training
step, jbn against its peers; ``--write`` also records it in ``benchmarks/MODEL.md``.

A ResNet-50-style network (bottleneck blocks [3, 4, 6, 3] of widths 64 to 512, expansion 4,
NHWC, a 7×7 stem and a max pool, global average pooling, 1000 classes) takes one SGD step of
softmax cross-entropy, with its batch norm swapped: jbn, Flax linen (its default variance
``E[x²] − E[x]²`` and its two-pass one), Haiku, and none (the control: the same network
without batch norm). In float32, and in bfloat16 (activations and convolutions in bfloat16;
parameters, statistics and running state in float32, each layer's output cast back to
bfloat16). *What batch norm adds* is a variant's figure minus the control's; the last column
divides jbn's by Flax's.

* **CPU**: the step's time on this machine (a smaller input, so that it runs in minutes),
  every variant timed round-robin in one process; its compile time; XLA:CPU's peak
  temporary memory.
* **H100 plan** (``benchmarks.plans``: XLA's GPU compiler, without a GPU): CUDA graphs
  (command buffers), conditionals, kernel launches, memory traffic (bytes the top-level
  operations read and write), peak temporary memory, compile time on this machine.
* **TPU v5e plan** (XLA's TPU compiler, without a TPU): bytes accessed (its cost model),
  peak temporary memory, compile time on this machine.

Batch norm is bound by memory traffic on every accelerator: the traffic and the bytes
accessed are what its time follows there. A plan whose compiler is not installed is
reported as skipped (``python -m benchmarks.plans`` says how to install it).
"""

from __future__ import annotations

from benchmarks import plans  # isort: skip  (sets JAX up for deviceless compiles: first)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from functools import partial  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jbn  # noqa: E402
from benchmarks import harness  # noqa: E402

MODEL = pathlib.Path(__file__).with_name("MODEL.md")
BLOCKS = (3, 4, 6, 3)
WIDTHS = (64, 128, 256, 512)
EXPANSION = 4
CLASSES = 1000
MOMENTUM, EPS, LEARNING_RATE = 0.1, 1e-5, 0.1
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
CONTROL = "none"
ACTIVATIONS = {"relu": jax.nn.relu, "leaky_relu": jax.nn.leaky_relu,  # leaky: slope 0.01
               "identity": lambda z: z}
# (measure, unit, how a figure is read off a part's results, whether the target compares it)
MEASURES = {
    "cpu": [("CPU step", "ms", lambda r: r["cpu step"] * 1e3),
            ("CPU compile", "s", lambda r: r["cpu"].compile_seconds),
            ("CPU peak temporaries", "MiB", lambda r: r["cpu"].temporaries / 2**20)],
    "gpu": [("H100 conditionals", "", lambda r: r["gpu"].conditionals),
            ("H100 command buffers", "", lambda r: r["gpu"].command_buffers),
            ("H100 launches", "", lambda r: r["gpu"].launches),
            ("H100 memory traffic", "GiB", lambda r: r["gpu"].traffic / 2**30),
            ("H100 peak temporaries", "MiB", lambda r: r["gpu"].temporaries / 2**20),
            ("H100 compile", "s", lambda r: r["gpu"].compile_seconds)],
    "tpu": [("TPU v5e bytes accessed", "GiB", lambda r: r["tpu"].traffic / 2**30),
            ("TPU v5e peak temporaries", "MiB", lambda r: r["tpu"].temporaries / 2**20),
            ("TPU v5e compile", "s", lambda r: r["tpu"].compile_seconds)],
}
# What jbn aims for, in what batch norm adds over the control: (measure, bound on jbn ÷ Flax).
TARGETS = (("H100 memory traffic", 1.0), ("TPU v5e bytes accessed", 1.0),
           ("H100 launches", 1.1), ("H100 compile", 1.15), ("CPU compile", 1.15),
           ("H100 peak temporaries", 1.0), ("TPU v5e peak temporaries", 1.0))


@dataclasses.dataclass(frozen=True)
class Norm:
    """A batch norm as the network uses it: ``init(C) -> (params, state)`` and the training
    call ``apply(params, state, x) -> (y, state)``, channels last; where it fuses the
    residual add and the activation after it, ``fused(params, state, x, activation=,
    residual=) -> (y, state)``."""

    init: Callable[[int], tuple[Any, Any]]
    apply: Callable[[Any, Any, jax.Array], tuple[jax.Array, Any]]
    fused: Callable[..., tuple[jax.Array, Any]] | None = None


def jbn_norm() -> Norm:
    """`jbn.batchnorm(params, state, x, True, axis=-1)`."""
    return Norm(jbn.init, partial(jbn.batchnorm, training=True, axis=-1, momentum=MOMENTUM,
                                  eps=EPS))


def jbn_fused_norm() -> Norm:
    """`jbn.batchnorm(..., activation=..., residual=...)`: each batch norm fused with the
    activation after it, the projection shortcut's as `"identity"`, the block's last with the
    shortcut as `residual` (with ReLU, which is not invertible, the plain composition)."""
    return Norm(jbn.init, jbn_norm().apply,
                fused=partial(jbn.batchnorm, training=True, axis=-1, momentum=MOMENTUM,
                              eps=EPS))


def flax_norm(use_fast_variance: bool = True, *, axis: int = -1, axis_name=None) -> Norm:
    """`flax.linen.BatchNorm(use_running_average=False, axis=-1, momentum=0.9)`, applied with
    `mutable=["batch_stats"]`."""
    import flax.linen as nn

    module = nn.BatchNorm(use_running_average=False, axis=axis, momentum=1 - MOMENTUM,
                          epsilon=EPS, use_fast_variance=use_fast_variance, axis_name=axis_name)

    def init(channels):
        variables = module.init(jax.random.key(0), jnp.zeros((1, channels)))
        return variables["params"], variables["batch_stats"]

    def apply(params, state, x):
        y, updates = module.apply({"params": params, "batch_stats": state}, x,
                                  mutable=["batch_stats"])
        return y, updates["batch_stats"]

    return Norm(init, apply)


def haiku_norm() -> Norm:
    """`haiku.BatchNorm(create_scale=True, create_offset=True, decay_rate=0.9)` in
    `hk.transform_with_state`, `is_training=True`."""
    import haiku as hk

    model = hk.transform_with_state(
        lambda x: hk.BatchNorm(True, True, 1 - MOMENTUM, eps=EPS)(x, is_training=True))
    return Norm(lambda channels: model.init(None, jnp.zeros((1, 1, 1, channels))),
                lambda params, state, x: model.apply(params, state, None, x))


def no_norm() -> Norm:
    """The control: no batch norm, each layer's output as it is."""
    return Norm(lambda channels: ({}, {}), lambda params, state, x: (x, state))


# Name shown in the tables -> (module it needs, builder). jbn first, the control last.
VARIANTS = {"jbn": ("jbn", jbn_norm), "jbn fused": ("jbn", jbn_fused_norm),
            "flax": ("flax", flax_norm),
            "flax two-pass": ("flax", partial(flax_norm, use_fast_variance=False)),
            "haiku": ("haiku", haiku_norm), CONTROL: ("jbn", no_norm)}


def layers(blocks: Sequence[int]) -> list[tuple[str, int, int, int, int]]:
    """(name, kernel size, input channels, output channels, stride) of every convolution,
    each followed by a batch norm; bottleneck ``b`` of a stage has ``b.conv1`` to ``b.conv3``
    and, where its shape changes, the projection ``b.shortcut``."""
    found = [("stem", 7, 3, WIDTHS[0], 2)]
    channels = WIDTHS[0]
    for stage, (count, width) in enumerate(zip(blocks, WIDTHS, strict=True)):
        for index in range(count):
            stride = 2 if index == 0 and stage > 0 else 1
            name = f"{stage}.{index}"
            found += [(f"{name}.conv1", 1, channels, width, 1),
                      (f"{name}.conv2", 3, width, width, stride),
                      (f"{name}.conv3", 1, width, width * EXPANSION, 1)]
            if index == 0:
                found.append((f"{name}.shortcut", 1, channels, width * EXPANSION, stride))
            channels = width * EXPANSION
    return found


def init(norm: Norm, blocks: Sequence[int], key: jax.Array) -> tuple[dict, dict]:
    """The network's parameters (He-initialized convolutions, each layer's batch norm, the
    classifier) and its batch norms' running states."""
    params, states = {}, {}
    for (name, size, cin, cout, _), k in zip(layers(blocks),
                                             jax.random.split(key, len(layers(blocks))),
                                             strict=True):
        weight = jax.random.normal(k, (size, size, cin, cout)) * math.sqrt(2 / (size**2 * cin))
        norm_params, states[name] = norm.init(cout)
        params[name] = {"weight": weight, "norm": norm_params}
    params["classifier"] = {"weight": jnp.zeros((WIDTHS[-1] * EXPANSION, CLASSES)),
                            "bias": jnp.zeros(CLASSES)}
    return params, states


def forward(norm: Norm, blocks: Sequence[int], dtype, activation: str, params: dict,
            states: dict, images: jax.Array) -> tuple[jax.Array, dict]:
    """Logits (float32) and the new running states."""
    new_states = {}

    def conv_norm(name, x, activation=None, residual=None):
        """activation(norm(conv(x)) + residual), the norm fused with the rest where it can."""
        _, size, _, _, stride = specs[name]
        x = lax.conv_general_dilated(x, params[name]["weight"].astype(dtype), (stride, stride),
                                     "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        if norm.fused is not None:
            y, new_states[name] = norm.fused(params[name]["norm"], states[name], x,
                                             activation=activation or "identity",
                                             residual=residual)
            return y
        y, new_states[name] = norm.apply(params[name]["norm"], states[name], x)
        y = y.astype(dtype)
        if residual is not None:
            y = y + residual
        return y if activation is None else ACTIVATIONS[activation](y)

    specs = {spec[0]: spec for spec in layers(blocks)}
    x = conv_norm("stem", images.astype(dtype), activation)
    x = lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "SAME")
    for stage, count in enumerate(blocks):
        for index in range(count):
            name = f"{stage}.{index}"
            h = conv_norm(f"{name}.conv1", x, activation)
            h = conv_norm(f"{name}.conv2", h, activation)
            shortcut = conv_norm(f"{name}.shortcut", x) if index == 0 else x
            x = conv_norm(f"{name}.conv3", h, activation, residual=shortcut)
    features = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    logits = features @ params["classifier"]["weight"] + params["classifier"]["bias"]
    return logits, new_states


def train_step(norm: Norm, blocks: Sequence[int], dtype, activation: str, params, states,
               images, labels):
    """One SGD step: the new parameters and running states, and the loss."""
    def loss(params):
        logits, new_states = forward(norm, blocks, dtype, activation, params, states, images)
        log_p = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(log_p, labels[:, None], axis=1)), new_states

    (value, new_states), grads = jax.value_and_grad(loss, has_aux=True)(params)
    params = jax.tree.map(lambda p, g: p - LEARNING_RATE * g, params, grads)
    return params, new_states, value


def step_and_arguments(variant: str, dtype_name: str, blocks, batch: int, size: int,
                       sharding=None, concrete: bool = False, activation: str = "relu"):
    """The jitted-to-be step of ``variant`` and its arguments: abstract (placed by
    ``sharding``), or concrete random ones to run."""
    norm = VARIANTS[variant][1]()
    step = partial(train_step, norm, tuple(blocks), DTYPES[dtype_name], activation)
    key = jax.random.key(0)
    images = (batch, size, size, 3)
    if concrete:
        params, states = init(norm, blocks, key)
        return step, (params, states, jax.random.normal(key, images),
                      jax.random.randint(key, (batch,), 0, CLASSES))
    params, states = jax.eval_shape(partial(init, norm, blocks), key)
    abstract = partial(jax.tree.map, lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                                                    sharding=sharding))
    return step, (abstract(params), abstract(states),
                  jax.ShapeDtypeStruct(images, jnp.float32, sharding=sharding),
                  jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=sharding))


def _abstract_step(key: tuple[str, str], *, blocks, batch: int, size: int, sharding,
                   activation: str):
    return step_and_arguments(*key, blocks, batch, size, sharding, activation=activation)


def measure(variants: Sequence[str], dtypes: Sequence[str], parts: Sequence[str], *,
            blocks=BLOCKS, batch: int = 32, size: int = 128, cpu_batch: int = 8,
            cpu_size: int = 64, budget: float = 60.0, compile_reps: int = 1,
            activation: str = "relu", log: Callable[[str], None] = lambda s: None) -> dict:
    """results[(variant, dtype)][part]: a ``plans.Plan`` for "cpu" (compiled at the CPU's
    size), "gpu" and "tpu" (at ``batch`` × ``size``²), and "cpu step", seconds per step
    (the median, timed round-robin with ``budget`` seconds for each dtype). The CPU and the
    H100 compile every variant ``compile_reps`` times, round-robin, and keep the quickest;
    the TPU, whose compiles take minutes, once."""
    results = {(v, d): {} for v in variants for d in dtypes}

    def compile_all(part, keys, arguments_of, reps):
        for rep in range(reps):
            for key in keys:
                log(f"{part}: {key[0]}, {key[1]} ({rep + 1}/{reps})")
                step, arguments = arguments_of(key)
                # A new function each time: JAX would answer a second compile from its cache.
                found = plans.compile_plan(lambda *a, step=step: step(*a), arguments, part)
                if part not in results[key] or (found.compile_seconds
                                                 < results[key][part].compile_seconds):
                    results[key][part] = found

    for part in parts:
        if part == "cpu":
            continue
        replicated = NamedSharding(jax.sharding.Mesh(plans.devices(part), ("d",)), P())
        compile_all(part, list(results), partial(_abstract_step, blocks=blocks, batch=batch,
                                                 size=size, sharding=replicated,
                                                 activation=activation),
                    compile_reps if part == "gpu" else 1)
    if "cpu" in parts:
        for dtype in dtypes:
            concrete = {(variant, dtype): step_and_arguments(variant, dtype, blocks, cpu_batch,
                                                             cpu_size, concrete=True,
                                                             activation=activation)
                        for variant in variants}
            compile_all("cpu", list(concrete), concrete.__getitem__, compile_reps)
            jobs = {variant: partial(lambda c, a: jax.block_until_ready(c(*a)),
                                     results[variant, dtype]["cpu"].executable,
                                     concrete[variant, dtype][1])
                    for variant in variants}
            log(f"cpu: timing {dtype}")
            for variant, seconds in harness.round_robin(jobs, 3, budget).items():
                results[variant, dtype]["cpu step"] = float(np.median(seconds))
    return results


def rows(results: dict, variants: Sequence[str], dtype: str) -> list[tuple[str, list]]:
    """(measure with its unit, [each variant's figure, what jbn's batch norm adds ÷ what
    Flax's adds]) of every measure the results hold."""
    found = []
    for part, measures in MEASURES.items():
        if not all(part in results[v, dtype] or (part == "cpu" and "cpu step" in
                                                  results[v, dtype]) for v in variants):
            continue
        for name, unit, read in measures:
            figures = [read(results[v, dtype]) for v in variants]
            ratio = None
            if {"jbn", "flax", CONTROL} <= set(variants):
                by = dict(zip(variants, figures, strict=True))
                added = by["flax"] - by[CONTROL]
                ratio = (by["jbn"] - by[CONTROL]) / added if added else None
            found.append((f"{name}" + (f" ({unit})" if unit else ""), [*figures, ratio]))
    return found


def _figure(value: float | None) -> str:
    if value is None:
        return "—"
    if float(value).is_integer() and abs(value) >= 1:
        return f"{int(value)}"
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


def targets(results: dict, variants: Sequence[str], dtypes: Sequence[str]) -> list[list[str]]:
    """[target, measured, met] of each target the results can judge."""
    found = []
    for measure, bound in TARGETS:
        for dtype in dtypes:
            for name, figures in rows(results, variants, dtype):
                if name.split(" (")[0] == measure and figures[-1] is not None:
                    found.append([f"{measure}, {dtype}: what batch norm adds, jbn ÷ Flax "
                                  f"≤ {bound}", f"{figures[-1]:.2f}×",
                                  "yes" if figures[-1] <= bound else "**no**"])
    return found


def markdown(results: dict, variants: Sequence[str], dtypes: Sequence[str],
             skipped: dict[str, str], shapes: str, command: str) -> str:
    lines = harness.heading("The whole model", command, __doc__)
    lines += ["", shapes, "", "## Targets", "",
              *harness.table(["target", "measured", "met"], targets(results, variants, dtypes))]
    for dtype in dtypes:
        lines += ["", f"## {dtype}", "",
                  *harness.table(["", *variants, "what batch norm adds, jbn ÷ Flax"],
                                 [[name, *map(_figure, figures[:-1]),
                                   "—" if figures[-1] is None else f"{figures[-1]:.2f}×"]
                                  for name, figures in rows(results, variants, dtype)])]
    lines += ["", "## The variants", ""]
    lines += [f"- **{name}**: {' '.join(_builder_doc(name).split())}" for name in variants]
    if skipped:
        lines += ["", "## Skipped", "", *(f"- {name}: {why}" for name, why in skipped.items())]
    return "\n".join(lines) + "\n"


def _builder_doc(variant: str) -> str:
    builder = VARIANTS[variant][1]
    return (builder.func if isinstance(builder, partial) else builder).__doc__ + (
        " With `use_fast_variance=False`: variance as E[(x − E[x])²]."
        if isinstance(builder, partial) else "")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=("cpu", "gpu", "tpu"),
                        default=["cpu", "gpu", "tpu"], help="what to measure (default: all)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--blocks", nargs=4, type=int, default=list(BLOCKS), metavar="B",
                        help="bottleneck blocks per stage (default: 3 4 6 3)")
    parser.add_argument("--batch", type=int, default=32, help="the plans' batch (default: 32)")
    parser.add_argument("--size", type=int, default=128,
                        help="the plans' image size (default: 128)")
    parser.add_argument("--cpu-batch", type=int, default=8, help="the CPU's batch (default: 8)")
    parser.add_argument("--cpu-size", type=int, default=64,
                        help="the CPU's image size (default: 64)")
    parser.add_argument("--budget", type=float, default=60.0,
                        help="seconds of timed CPU steps per dtype (default: 60)")
    parser.add_argument("--compile-reps", type=int, default=1,
                        help="compilations per variant on the CPU and the H100 plan, the "
                        "quickest reported (default: 1)")
    harness.add_write_option(parser, MODEL)
    args = parser.parse_args(argv)
    command = " ".join(["python -m benchmarks.model", *(sys.argv[1:] if argv is None
                                                        else argv)])
    skipped = {}
    for name in args.variants:
        try:
            __import__(VARIANTS[name][0])
        except ImportError as error:
            skipped[name] = f"not installed ({error})"
    for part in ("gpu", "tpu"):
        if part in args.parts and plans.missing(part):
            skipped[f"{part.upper()} plan"] = plans.missing(part)
    variants = [v for v in args.variants if v not in skipped]
    parts = [p for p in args.parts if f"{p.upper()} plan" not in skipped]

    def log(line):
        print(line, file=sys.stderr, flush=True)

    start = time.perf_counter()
    results = measure(variants, args.dtypes, parts, blocks=args.blocks, batch=args.batch,
                      size=args.size, cpu_batch=args.cpu_batch, cpu_size=args.cpu_size,
                      budget=args.budget, compile_reps=args.compile_reps, log=log)
    log(f"measured in {time.perf_counter() - start:.0f} s")
    shapes = (f"Blocks {args.blocks}; the plans compile a step on a batch of {args.batch} "
              f"images of {args.size}×{args.size}, the CPU runs one of {args.cpu_batch} of "
              f"{args.cpu_size}×{args.cpu_size}. The CPU step is the median over "
              f"{args.budget:g} s of round-robin steps per dtype; compile times are the "
              f"quickest of {args.compile_reps} round-robin (the TPU's: one).")
    harness.publish(markdown(results, variants, args.dtypes, skipped, shapes, command), MODEL,
                    args.write)
    return results


if __name__ == "__main__":
    main()
