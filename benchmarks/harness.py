"""Timing, the memory floor, the targets, and the table.

For each shape, every (peer, mode) job, the floor (jitted ``x + 1``) and jbn's eval mode are
timed round-robin, in a shuffled order each round, so that a change of load on the machine
hits all of them alike and their ratios come from one window of time.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import importlib
import importlib.metadata
import math
import os
import pathlib
import platform
import random
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import jbn
from benchmarks.peers import PEERS
from jbn import _stats

MODES = {"train": "Training forward (with state update)",
         "grad": "Forward+backward (y and gradients for x, weight and bias)"}
SHAPES = ((256, 128), (4096, 1024), (64, 256, 256), (64, 64, 32, 32))
LARGE = 2**20  # elements: from here on, times are dominated by memory traffic, not dispatch
MAX_REPS = 2000
COMPILE_REPS = 7
TOLERANCE = 1e-3  # peers agree with jbn to this (float32, relative and absolute)
FLOOR, EVAL, EXACT = "x + 1", "jbn eval", "jbn, channel 0 at 10σ"
ACCUMULATING = "jbn, accumulating 4 micro-batches"
ACCUMULATION_TARGET = 1.05
JAX_PEERS = ("flax", "flax two-pass", "haiku", "equinox")


@dataclasses.dataclass
class Row:
    """One peer in one mode on one shape."""

    shape: tuple[int, ...]
    mode: str
    peer: str
    seconds: list[float]
    compile_seconds: float | None = None
    residual_bytes: int | None = None
    agrees: bool | None = None

    @property
    def median(self) -> float:
        return float(np.median(self.seconds))


@dataclasses.dataclass
class Report:
    rows: list[Row]
    floors: dict[tuple[int, ...], Row]  # jitted x + 1 on each shape
    evals: dict[tuple[int, ...], Row]  # jbn in eval mode on each shape
    skipped: dict[str, str]  # peer -> why
    machine: dict[str, str]
    compile_reps: int = COMPILE_REPS

    def row(self, shape, mode, peer) -> Row | None:
        return next((r for r in self.rows if (r.shape, r.mode, r.peer) == (shape, mode, peer)),
                    None)


def run(shapes: Sequence[tuple[int, ...]] = SHAPES, *, reps: int = 10, budget: float = 10.0,
        compile_reps: int = COMPILE_REPS, log: Callable[[str], None] = lambda s: None) -> Report:
    """Times every installed peer on every shape, in both modes.

    Besides the peers, jbn runs three times more: on the same data with channel 0 moved to a
    mean of 10σ (``EXACT``), which on a CPU takes the exact path (the cost of a layer whose
    channel means stay far from 0); with the statistics of the other platforms forced
    (``other_path()``: on a CPU the accelerators' shifted sums, elsewhere the CPU's guarded
    ones), what the choice by platform saves; and accumulating the statistics of micro-batches
    (``ACCUMULATING``, ``accumulation_steps=4``: a call as each micro-batch makes it).

    Args:
      shapes: (N, C, ...) shapes of x, channel on axis 1.
      reps: the least number of timed calls per job; more, up to ``budget``.
      budget: seconds of timed calls per shape, all jobs together.
      compile_reps: compilations timed per job; their median is reported.
      log: called with a line of progress now and then.
    """
    builders, skipped = {}, {}
    for name, (module, build) in PEERS.items():
        try:
            importlib.import_module(module)
            builders[name] = build
        except ImportError as error:
            skipped[name] = f"not installed ({error})"
    busy_before = hasattr(os, "getloadavg") and os.getloadavg()[0] > (os.cpu_count() or 1) / 2
    report = Report([], {}, {}, skipped, machine(), compile_reps)
    for shape in shapes:
        shape = tuple(shape)
        log(f"{shape}: building and compiling")
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal(shape, np.float32) * 2 + 0.5)  # mean 0.25σ
        ct = jnp.asarray(rng.standard_normal(shape, np.float32))
        jobs = {name: build(x, ct) for name, build in builders.items()}
        jobs[EXACT] = PEERS["jbn"][1](x.at[:, 0].add(10 * 2), ct)
        jobs[other_path()] = PEERS["jbn"][1](x, ct, path=_other_statistics())
        jobs[ACCUMULATING] = PEERS["jbn"][1](x, ct, accumulation_steps=4)
        timed = {(name, mode): getattr(job, mode) for name, job in jobs.items() for mode in MODES}
        timed[FLOOR], timed[EVAL] = _floor_and_eval(x)
        log(f"{shape}: timing")
        seconds = round_robin(timed, reps, budget)
        log(f"{shape}: compile times, checks")
        reference = _numpy(jobs["jbn"].grad())
        for name, job in jobs.items():
            for mode in MODES:
                row = Row(shape, mode, name, seconds[name, mode])
                if job.compile_seconds is not None:
                    row.compile_seconds = float(np.median(
                        [job.compile_seconds(mode) for _ in range(compile_reps)]))
                if mode == "grad":
                    row.residual_bytes = job.residual_bytes
                    if name != EXACT:  # other data
                        row.agrees = all(
                            np.allclose(a, b, rtol=TOLERANCE, atol=TOLERANCE)
                            for a, b in zip(_numpy(job.grad()), reference, strict=True))
                report.rows.append(row)
        report.floors[shape] = Row(shape, "floor", FLOOR, seconds[FLOOR])
        report.evals[shape] = Row(shape, "eval", EVAL, seconds[EVAL])
    report.machine["load average after"] = _load()
    # Judged from the load before the run: the run itself keeps the cores busy.
    if busy_before:
        report.machine["note"] = ("the machine was busy before the run (load average above "
                                  "half its cores): times are noisy and their ratios less "
                                  "reliable")
    return report


def _other_statistics() -> str:
    """The path of the statistics this platform does not run."""
    return _stats.SHIFTED if jax.default_backend() == "cpu" else _stats.GUARDED


def other_path() -> str:
    """The name of the row of jbn with the other platforms' statistics."""
    return f"jbn, {_other_statistics()} path"


def _floor_and_eval(x: jax.Array) -> tuple[Callable, Callable]:
    params, state = jbn.init(x.shape[1])
    plus_one = jax.jit(lambda x: x + 1)
    evaluate = jax.jit(lambda x, params, state: jbn.batchnorm(params, state, x, False)[0])
    return (lambda: plus_one(x).block_until_ready(),
            lambda: evaluate(x, params, state).block_until_ready())


def round_robin(jobs: dict, reps: int, budget: float) -> dict:
    """Seconds of each call of each job: at least ``reps`` calls each, round-robin."""
    for job in jobs.values():
        for _ in range(3):  # compiles, touches every buffer once
            job()
    one_round = 0.0
    for job in jobs.values():
        start = time.perf_counter()
        job()
        one_round += time.perf_counter() - start
    reps = max(reps, min(MAX_REPS, int(budget / one_round)))
    seconds = {key: [] for key in jobs}
    order = list(jobs)
    shuffle = random.Random(0).shuffle
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection would land in one job's time
    try:
        for _ in range(reps):
            shuffle(order)
            for key in order:
                start = time.perf_counter()
                jobs[key]()
                seconds[key].append(time.perf_counter() - start)
    finally:
        if gc_was_enabled:
            gc.enable()
    return seconds


def _numpy(arrays) -> list[np.ndarray]:
    return [np.asarray(a.detach().cpu() if hasattr(a, "detach") else a) for a in arrays]


def machine() -> dict[str, str]:
    """What the numbers were measured on."""
    info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info["CPU"] = model
    info["cores"] = f"{os.cpu_count()} ({len(os.sched_getaffinity(0))} usable)" if hasattr(
        os, "sched_getaffinity") else str(os.cpu_count())
    info["load average before"] = _load()
    device = jax.devices()[0]
    info["JAX device"] = f"{jax.default_backend()}: {device.device_kind}"
    info["python"] = platform.python_version()
    versions = []
    for package in ("jax", "jaxlib", "numpy", "torch", "flax", "dm-haiku", "equinox"):
        try:
            versions.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{package} (not installed)")
    info["versions"] = ", ".join(versions)
    try:
        import torch

        info["torch device"] = (torch.cuda.get_device_name() if jax.default_backend() == "gpu"
                                and torch.cuda.is_available()
                                else f"cpu, {torch.get_num_threads()} threads")
    except ImportError:
        pass
    if os.environ.get("XLA_FLAGS"):
        info["XLA_FLAGS"] = os.environ["XLA_FLAGS"]
    return info


def add_write_option(parser: argparse.ArgumentParser, record: pathlib.Path) -> None:
    """``--write``: each command's option to record what it prints in ``record``."""
    parser.add_argument("--write", action="store_true",
                        help=f"also record the output in benchmarks/{record.name} (by default "
                        "the run prints it and changes no file)")


def heading(title: str, command: str, doc: str) -> list[str]:
    """A record's first lines: its title, the command that wrote it, the machine (but its
    load: the numbers below are not timings), and what it shows (``doc`` after its first
    paragraph, a module docstring)."""
    return ["# " + title, "", f"`{command}`", "",
            *(f"- **{key}**: {value}" for key, value in machine().items()
              if not key.startswith("load average")),
            "", doc.split("\n\n", 1)[1].strip().replace("``", "`")]


def publish(text: str, record: pathlib.Path, write: bool) -> None:
    """Prints ``text``; with ``write``, also records it in ``record``."""
    print(text)
    if write:
        record.write_text(text)
        print(f"wrote {record}", file=sys.stderr)


def _load() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


# ---- The table --------------------------------------------------------------------------------


def markdown(report: Report, command: str = "python -m benchmarks") -> str:
    """The whole report: machine, targets, one table per mode, the floor, skipped peers."""
    shapes = list(report.floors)
    reps = sorted({len(r.seconds) for r in report.rows})
    lines = ["# jbn benchmarks", "", f"`{command}`", ""]
    lines += [f"- **{k}**: {v}" for k, v in report.machine.items()]
    lines += [
        "",
        f"Times are the median of {_span(reps)} calls per job (more for small shapes), with "
        "min–max; every job of a shape is timed round-robin in the same window. "
        "**× jbn**: the peer's median ÷ jbn's (above 1: jbn is faster). "
        "**copies of x**: the median ÷ that of a jitted `x + 1` on the same array, i.e. in "
        "units of one read plus one write of x, the memory floor of an elementwise pass. "
        f"**compile**: `jax.jit(f).lower(...).compile()` of a fresh function, median of "
        f"{report.compile_reps}. **residuals**: bytes the backward pass keeps from the forward "
        "(the leaves of the function `jax.vjp` returns; for torch, the tensors autograd "
        "saves), in multiples of x's bytes. **agrees**: y and the three gradients equal "
        f"jbn's to {TOLERANCE:g}.",
        "",
        "## Targets",
        "",
        "What jbn aims for, each judged from this run alone. *Fastest JAX peer*: on each "
        "shape, the fastest of " + ", ".join(JAX_PEERS) + " (PyTorch runs its own kernels, "
        "not XLA's, and is reported apart). *Speed-up*: that peer's median ÷ jbn's, so above "
        "1 jbn is faster; the training forward asks for parity (≥ 0.95, within the noise of "
        "a shared machine) on every shape, the forward+backward for a lead, ≥ 1.25 in "
        "geometric mean over the shapes and ≥ 1.0 on each. *Copies of x* bounds the time "
        "against the memory floor on the shapes of ≥ 2²⁰ elements, where memory traffic "
        "dominates. *Compile time*: jbn's median over shapes ÷ Flax's. The rows without a "
        "verdict are reported for reading, not targets: PyTorch's speed-ups, what a channel "
        f"far from 0 costs (`{EXACT}`, ÷ jbn on x itself: on a CPU, the exact path), and "
        f"what the other platforms' statistics would cost here (`{other_path()}`, ÷ jbn). "
        f"*Accumulation*: a micro-batch's call with `accumulation_steps` ÷ a plain call, "
        f"≤ {ACCUMULATION_TARGET} on every shape.",
        "",
        *_targets(report, shapes),
    ]
    for mode, title in MODES.items():
        lines += ["", f"## {title}", "", *_mode_table(report, shapes, mode)]
    lines += ["", "## Against the memory floor", "", *_floor_table(report, shapes)]
    lines += ["", "## The peers", "",
              "Each does the same math: statistics over every axis but 1, eps 1e-5, weight "
              "and bias, the running statistics updated with PyTorch's momentum 0.1 (decay "
              "0.9). What each keeps as running state differs (biased or unbiased variance, "
              "debiasing counters), which costs O(C).", ""]
    lines += [f"- **{name}**: {' '.join(build.__doc__.split())}"
              for name, (_, build) in PEERS.items() if name not in report.skipped]
    lines += [f"- **{EXACT}**: jbn again, on the same x with channel 0 moved to a mean of 10σ, "
              "so that on a CPU its statistics take the exact path (a second pass, about the "
              "mean).",
              f"- **{other_path()}**: jbn again, with the statistics of the other platforms "
              "forced (the shifted sums of GPUs and TPUs on a CPU, the CPU's guarded sums "
              "elsewhere).",
              f"- **{ACCUMULATING}**: jbn again, `accumulation_steps=4`, its state with an "
              "accumulator: each call merges its statistics and, every fourth, updates the "
              "running statistics."]
    if report.skipped:
        lines += ["", "## Skipped peers", ""]
        lines += [f"- {name}: {why}" for name, why in report.skipped.items()]
    return "\n".join(lines) + "\n"


def _mode_table(report: Report, shapes, mode: str) -> list[str]:
    header = ["shape", "peer", "median", "min–max", "× jbn", "copies of x", "compile"]
    if mode == "grad":
        header += ["residuals", "agrees"]
    rows = []
    for shape in shapes:
        reference = report.row(shape, mode, "jbn").median
        floor = report.floors[shape].median
        for row in (r for r in report.rows if (r.shape, r.mode) == (shape, mode)):
            cells = [_shape(shape), row.peer, _duration(row.median),
                     f"{_duration(min(row.seconds))}–{_duration(max(row.seconds))}",
                     f"{row.median / reference:.2f}", f"{row.median / floor:.2f}",
                     "n/a" if row.compile_seconds is None else f"{row.compile_seconds:.2f} s"]
            if mode == "grad":
                held = row.residual_bytes
                cells += ["n/a" if held is None else f"{held / (math.prod(shape) * 4):.2f}",
                          {True: "yes", False: "**NO**", None: "n/a"}[row.agrees]]
            rows.append(cells)
    return table(header, rows)


def _floor_table(report: Report, shapes) -> list[str]:
    rows = []
    for shape in shapes:
        floor = report.floors[shape].median
        copies = [report.evals[shape].median / floor,
                  report.row(shape, "train", "jbn").median / floor,
                  report.row(shape, "grad", "jbn").median / floor]
        rows.append([_shape(shape), _duration(floor), *(f"{c:.2f} copies" for c in copies)])
    return table(["shape", "x + 1 (median)", "jbn eval", "jbn training forward",
                  "jbn forward+backward"], rows)


def targets(report: Report, shapes) -> list[tuple[str, str, bool | None]]:
    """(target, what was measured, whether it is met; None for a figure reported only)."""
    results = []

    def speedups(mode, peers):
        """shape -> (the fastest of ``peers``, its median ÷ jbn's)."""
        found = {}
        for shape in shapes:
            rows = [r for r in report.rows if (r.shape, r.mode) == (shape, mode)
                    and r.peer in peers]
            if rows:
                fastest = min(rows, key=lambda r: r.median)
                found[shape] = (fastest.peer, fastest.median / report.row(
                    shape, mode, "jbn").median)
        return found

    def detail(found):
        return ", ".join(f"{_shape(k)} {p} {s:.2f}×" for k, (p, s) in found.items())

    for mode, worst_bound, mean_bound in (("train", 0.95, None), ("grad", 1.0, 1.25)):
        name = MODES[mode].split(" (")[0].lower()
        found = speedups(mode, JAX_PEERS)
        if not found:
            results.append((f"{name}: jbn vs the fastest JAX peer", "no JAX peer installed",
                            None))
            continue
        if mean_bound is not None:
            geomean = math.exp(np.mean([math.log(s) for _, s in found.values()]))
            results.append((f"{name}: ≥ {mean_bound}× the fastest JAX peer (geometric mean)",
                            f"{geomean:.2f}× ({detail(found)})", geomean >= mean_bound))
        worst_shape, (worst_peer, worst) = min(found.items(), key=lambda kv: kv[1][1])
        results.append((f"{name}: ≥ {worst_bound}× the fastest JAX peer on every shape",
                        f"worst {worst:.2f}× ({_shape(worst_shape)} vs {worst_peer})",
                        worst >= worst_bound))
    large = [s for s in shapes if math.prod(s) >= LARGE]
    if large:
        copies = {s: report.row(s, "grad", "jbn").median / report.floors[s].median
                  for s in large}
        results.append(("forward+backward ≤ 4 copies of x (large shapes)",
                        f"worst {max(copies.values()):.2f} ("
                        + ", ".join(f"{_shape(s)} {c:.2f}" for s, c in copies.items()) + ")",
                        max(copies.values()) <= 4))
    for mode in MODES:
        compiled = [(report.row(s, mode, "jbn"), report.row(s, mode, "flax")) for s in shapes]
        compiled = [(j.compile_seconds, f.compile_seconds) for j, f in compiled if f is not None]
        if compiled:
            mine, theirs = (float(np.median(v)) for v in zip(*compiled, strict=True))
            results.append((f"compile time, {MODES[mode].split(' (')[0].lower()}: ≤ 1.3× "
                            "Flax's (median over shapes)",
                            f"jbn {mine:.2f} s, flax {theirs:.2f} s ({mine / theirs:.2f}×)",
                            mine <= 1.3 * theirs))
    for mode in MODES:
        ratios = {s: report.row(s, mode, ACCUMULATING).median / report.row(s, mode, "jbn").median
                  for s in shapes if report.row(s, mode, ACCUMULATING) is not None}
        if ratios:
            worst = max(ratios.values())
            results.append((f"{MODES[mode].split(' (')[0].lower()}: accumulating ÷ a plain "
                            f"call ≤ {ACCUMULATION_TARGET} on every shape",
                            ", ".join(f"{_shape(s)} {r:.2f}×" for s, r in ratios.items()),
                            worst <= ACCUMULATION_TARGET))
    for mode in MODES:
        name = MODES[mode].split(" (")[0].lower()
        found = speedups(mode, ("torch",))
        if found:
            results.append((f"{name}: PyTorch's speed-up (reported)", detail(found), None))
        for row, what in ((EXACT, "channel 0 at 10σ"), (other_path(), other_path()[5:])):
            ratios = {s: report.row(s, mode, row).median / report.row(s, mode, "jbn").median
                      for s in shapes if report.row(s, mode, row) is not None}
            results.append((f"{name}: {what} ÷ jbn (reported)",
                            ", ".join(f"{_shape(s)} {r:.2f}×" for s, r in ratios.items()),
                            None))
    return results


def _targets(report: Report, shapes) -> list[str]:
    return table(["target", "measured", "met"],
                 [[target, measured, {True: "yes", False: "**no**", None: "—"}[met]]
                  for target, measured, met in targets(report, shapes)])


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table's lines: the one table writer of the benchmarks."""
    return [table_line(cells) for cells in (header, ["---"] * len(header), *rows)]


def table_line(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def parse_shape(text: str) -> tuple[int, ...]:
    """A shape from the command line: sizes joined by x, like 64x256x256."""
    try:
        shape = tuple(int(n) for n in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is sizes joined by x, like 64x256x256; "
                                         f"got {text!r}") from None
    if len(shape) < 2 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"a shape needs a batch and a channel axis, got {text!r}")
    return shape


def _shape(shape: tuple[int, ...]) -> str:
    return "×".join(map(str, shape))


def _duration(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    return f"{seconds * 1e3:.2f} ms"


def _span(values: list[int]) -> str:
    return str(values[0]) if len(values) == 1 else f"{values[0]}–{values[-1]}"
