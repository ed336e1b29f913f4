"""Data-parallel training with synchronized batch norm, checked against one device.

Each global batch of ``train.py`` is split evenly across the devices of a 1-D mesh with
axis ``"data"``. ``jbn.batchnorm(..., axis_name="data")`` then normalizes with the
statistics of the *whole* batch (all-reduces of O(C) values per layer: on a CPU one, and a
second only when a channel's mean is beyond 3σ of its spread; on GPUs and TPUs two), so the
training is that of one device on the global batch, up to float32 rounding. This script
runs both side by side and checks it every epoch: it exits with status 1 when the losses,
parameters or batch-norm state differ by more than rounding can explain.

The batches hold 61 or 62 examples padded to 64 and masked (``train.epoch_batches``), so
the last device's slice is partly padding. jbn weights each device by its count of valid
values: an equal weighting of devices would not give the statistics of the global batch.

Usage::

    python examples/data_parallel.py                 # jax.shard_map, 8 CPU devices
    python examples/data_parallel.py --pmap          # jax.pmap
    python examples/data_parallel.py --processes 2   # 2 jax.distributed processes × 4
    python examples/data_parallel.py --group-size 2  # statistics per pair of devices

On CPU, the devices are virtual (``--xla_force_host_platform_device_count``, set below
before JAX is imported); with accelerators, every device takes part. ``--processes``
rehearses a multi-host job on this machine's CPU: the script starts that many copies of
itself, which meet over loopback and communicate through gloo, as hosts would over the
network. On a cluster, run it once per host with ``--coordinator HOST:PORT --processes N
--process-id I``, which is what the copies are given.
"""

# ruff: noqa: E402  (JAX may be imported only once XLA_FLAGS is set, below)

from __future__ import annotations

import os
import re
import sys

# XLA reads the flag once, when JAX starts. A worker of --processes gets its share of the
# devices from its launcher, through the environment.
_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
_TOTAL_CPU_DEVICES = 8
if _DEVICE_COUNT_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        f"{os.environ.get('XLA_FLAGS', '')} {_DEVICE_COUNT_FLAG}={_TOTAL_CPU_DEVICES}".strip())

import argparse
import socket
import subprocess
import time

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from train import (
    BATCH_SIZE,
    EPOCHS,
    SEED,
    evaluate,
    init_model,
    load_data,
    loss_fn,
    make_optimizer,
    make_train_step,
    run_epoch,
)

AXIS = "data"

# How far apart the two runs may be. Splitting the batch changes the order of the float32
# sums (per-device partial sums, then an all-reduce), so each step differs by a few ulps
# (1 ulp of 1.0 is 1.2e-7), and training carries the differences on. Measured over the
# 15 epochs, with shard_map, pmap and 2 processes: parameters and state within 2e-6,
# losses within 1.5e-6 relative. A real error (per-device statistics, gradients not
# summed across devices) moves the losses by 1e-1 from the first epoch.
RTOL = 1e-5
ATOL = 1e-5


def make_shard_map_step(optimizer: optax.GradientTransformation, mesh: jax.sharding.Mesh,
                        **options):
    """The step of ``train.make_train_step``, data-parallel with ``jax.shard_map``.

    Parameters, state and optimizer state are replicated (``P()``), the batch split along
    ``"data"``. Inside, each device differentiates its share of the loss; because the
    parameters enter replicated, the transpose of that replication sums the gradients
    across devices, so they come out as the gradient of the whole batch's loss. ``options``
    go to ``jbn.batchnorm``.
    """

    def gradients(params, state, x, labels, mask):
        (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, state, x, labels, mask, axis_name=AXIS, **options)
        return grads, state, jax.lax.psum(loss, AXIS)

    sharded_gradients = jax.shard_map(
        gradients, mesh=mesh,
        in_specs=(P(), P(), P(AXIS), P(AXIS), P(AXIS)), out_specs=P())

    @jax.jit
    def step(params, state, opt_state, x, labels, mask):
        grads, state, loss = sharded_gradients(params, state, x, labels, mask)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), state, opt_state, loss

    return step


def make_pmap_step(optimizer: optax.GradientTransformation, **options):
    """The same step with ``jax.pmap``, whose values carry a leading axis of devices.

    pmap does not know that the parameters are the same on every device: each device's
    gradient is that of its own share of the loss, so the gradients are summed explicitly.
    """

    def step(params, state, opt_state, x, labels, mask):
        (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, state, x, labels, mask, axis_name=AXIS, **options)
        grads = jax.lax.psum(grads, AXIS)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), state, opt_state,
                jax.lax.psum(loss, AXIS))

    return jax.pmap(step, axis_name=AXIS)


class DataParallel:
    """A data-parallel step, with how to hand it host values and read its results.

    Every process holds the whole data set and the same initial values, and passes the same
    global batch: each device takes its slice of it. Results are replicated, so any device
    holds all of them.
    """

    def __init__(self, optimizer: optax.GradientTransformation, use_pmap: bool, **options):
        self.use_pmap = use_pmap
        if use_pmap:
            self._step = make_pmap_step(optimizer, **options)
        else:
            self.mesh = jax.make_mesh((jax.device_count(),), (AXIS,))
            self._step = make_shard_map_step(optimizer, self.mesh, **options)

    def replicate(self, tree):
        """Host values → the same value on every device."""
        if self.use_pmap:
            local = jax.local_device_count()
            return jax.tree.map(lambda a: np.broadcast_to(a, (local, *np.shape(a))), tree)
        return _global_arrays(tree, NamedSharding(self.mesh, P()))

    def split(self, batch: np.ndarray):
        """A global batch → each device's slice of it."""
        if self.use_pmap:
            # pmap takes, in each process, the slices of its own devices, stacked.
            local, per_device = jax.local_device_count(), len(batch) // jax.device_count()
            start = jax.process_index() * local * per_device
            rows = batch[start:start + local * per_device]
            return rows.reshape(local, per_device, *batch.shape[1:])
        return _global_arrays(batch, NamedSharding(self.mesh, P(AXIS)))

    def fetch(self, tree):
        """Replicated results → host values, from this process's first device."""
        if self.use_pmap:
            # Each device's slice keeps the (size 1) leading axis of devices.
            return jax.tree.map(lambda a: np.asarray(a.addressable_data(0))[0], tree)
        return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), tree)

    def step(self, params, state, opt_state, x, labels, mask):
        """``train.make_train_step``'s step, on host batches."""
        params, state, opt_state, loss = self._step(
            params, state, opt_state, self.split(x), self.split(labels), self.split(mask))
        return params, state, opt_state, self.fetch(loss).reshape(-1)[0]


def _global_arrays(tree, sharding: NamedSharding):
    # make_array_from_callback asks each process only for its own devices' slices, so the
    # same code builds the global arrays with one process or several.
    return jax.tree.map(
        lambda a: jax.make_array_from_callback(np.shape(a), sharding, lambda i: np.asarray(a)[i]),
        tree)


def train_and_compare(epochs: int, batch_size: int, use_pmap: bool,
                      group_size: int | None = None) -> bool:
    """Trains on one device and data-parallel, in lockstep; True if they agree.

    Compared every epoch: the training and test losses, and the parameters and batch-norm
    state (running statistics included). The test accuracy is printed, not compared: it is
    a function of the compared parameters and state. With ``group_size=k``, each group of k
    devices has its own statistics; the one device then normalizes ghost batches of the
    group's examples (``virtual_batch_size = k ×`` the examples per device).
    """
    if batch_size % jax.device_count():
        raise SystemExit(f"--batch-size {batch_size} must be a multiple of the "
                         f"{jax.device_count()} devices")
    log = print if jax.process_index() == 0 else (lambda *args: None)
    data = load_data()
    optimizer = make_optimizer()
    per_device = batch_size // jax.device_count()
    parallel = DataParallel(optimizer, use_pmap, group_size=group_size)
    single_step = make_train_step(
        optimizer, virtual_batch_size=None if group_size is None else group_size * per_device)
    params, state = init_model(jax.random.key(SEED))
    single = (params, state, optimizer.init(params))
    multi = tuple(parallel.replicate(tree) for tree in single)

    log(f"{'jax.pmap' if use_pmap else 'jax.shard_map'} over {jax.device_count()} "
        f"{jax.devices()[0].platform} devices in {jax.process_count()} process(es), "
        f"{per_device} examples each"
        + ("" if group_size is None else f", statistics per group of {group_size} devices")
        + f"; reference: 1 device on the global batch of {batch_size}"
        + ("" if group_size is None else f" in ghost batches of {group_size * per_device}"))
    log(f"{'':6}{'train loss':>22}{'test loss':>22}{'test accuracy':>20}"
        "     max |difference|")
    log(f"{'epoch':6}" + f"{'1 device':>11}{'parallel':>11}" * 2
        + f"{'1 device':>11}{'parallel':>9}     losses   params, state")
    agree = True
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        *single, single_train = run_epoch(single_step, *single, data, epoch, batch_size)
        *multi, multi_train = run_epoch(parallel.step, *multi, data, epoch, batch_size)
        multi_params, multi_state = parallel.fetch(multi[0]), parallel.fetch(multi[1])
        single_test, single_accuracy = _evaluate(single[0], single[1], data)
        multi_test, multi_accuracy = _evaluate(multi_params, multi_state, data)
        loss_diff, losses_close = _compare((single_train, single_test),
                                           (multi_train, multi_test))
        value_diff, values_close = _compare(single[:2], (multi_params, multi_state))
        close = losses_close and values_close
        agree &= close
        log(f"{epoch:<6}{single_train:11.6f}{multi_train:11.6f}{single_test:11.6f}"
            f"{multi_test:11.6f}{single_accuracy:11.2%}{multi_accuracy:9.2%}"
            f"     {loss_diff:.1e}   {value_diff:.1e}" + ("" if close else "   MISMATCH"))
    log(f"{'match' if agree else 'MISMATCH'}: the data-parallel training "
        f"{'equals' if agree else 'differs from'} the single-device training within "
        f"rtol {RTOL:g}, atol {ATOL:g}; final test accuracy {multi_accuracy:.2%} "
        f"({time.perf_counter() - start:.1f} s)")
    return agree


def _evaluate(params, state, data) -> tuple[float, float]:
    return tuple(float(v) for v in evaluate(params, state, data.x_test, data.y_test))


def _compare(reference, values) -> tuple[float, bool]:
    """The largest absolute difference between two pytrees, and whether they are close."""
    pairs = [(np.asarray(r, np.float64), np.asarray(v, np.float64))
             for r, v in zip(jax.tree.leaves(reference), jax.tree.leaves(values), strict=True)]
    difference = max(float(np.max(np.abs(r - v))) for r, v in pairs)
    return difference, all(np.allclose(v, r, rtol=RTOL, atol=ATOL) for r, v in pairs)


def launch(num_processes: int, argv: list[str], timeout: float) -> int:
    """Runs this script in ``num_processes`` jax.distributed workers on loopback, each with
    its share of the CPU devices; returns 0 if all succeed, else a failing status."""
    if _TOTAL_CPU_DEVICES % num_processes:
        raise SystemExit(f"--processes must divide {_TOTAL_CPU_DEVICES}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    flags = re.sub(rf"{_DEVICE_COUNT_FLAG}=\d+", "", os.environ.get("XLA_FLAGS", ""))
    # CPU only: processes on one host would otherwise all claim the same accelerators.
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
        f"{flags} {_DEVICE_COUNT_FLAG}={_TOTAL_CPU_DEVICES // num_processes}".strip()))
    workers = [
        subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv,
                          "--coordinator", f"127.0.0.1:{port}",
                          "--processes", str(num_processes), "--process-id", str(i)], env=env)
        for i in range(num_processes)
    ]
    deadline = time.monotonic() + timeout
    try:
        # A worker that fails leaves the others waiting in a collective: stop them all.
        while True:
            statuses = [worker.poll() for worker in workers]
            failed = [status for status in statuses if status]
            if failed or None not in statuses:
                return failed[0] if failed else 0
            if time.monotonic() > deadline:
                print(f"the workers still run after {timeout:g} s", file=sys.stderr)
                return 1
            time.sleep(0.1)
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--pmap", action="store_true", help="use jax.pmap, not jax.shard_map")
    parser.add_argument("--group-size", type=int, default=None,
                        help="statistics per group of that many devices (default: all)")
    parser.add_argument("--processes", type=int, default=1,
                        help="without --coordinator: run that many local processes on the "
                        "CPU; with it: the number of processes in the job")
    parser.add_argument("--timeout", type=float, default=600,
                        help="seconds the local processes may take")
    parser.add_argument("--coordinator", metavar="HOST:PORT",
                        help="join a jax.distributed job: the address of process 0")
    parser.add_argument("--process-id", type=int, default=0,
                        help="with --coordinator: this process's rank")
    args = parser.parse_args(argv)

    if args.coordinator is None and args.processes > 1:
        worker_argv = ["--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
                       *(["--group-size", str(args.group_size)] if args.group_size else [])]
        return launch(args.processes, worker_argv + ["--pmap"] * args.pmap, args.timeout)
    if args.coordinator is not None:
        # gloo gives the CPU devices collectives across processes; accelerators have their
        # own (NCCL, ICI), and the setting leaves them alone.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(args.coordinator, args.processes, args.process_id)
    return 0 if train_and_compare(args.epochs, args.batch_size, args.pmap,
                                  args.group_size) else 1


if __name__ == "__main__":
    sys.exit(main())
