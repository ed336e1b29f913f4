"""One process of ``test_multiprocess.py``: synchronized batch norm across processes.

Usage: ``python _multiprocess_worker.py COORDINATOR NUM_PROCESSES PROCESS_ID DIR [PATH]``.

Joins the ``jax.distributed`` job at ``COORDINATOR`` with 2 CPU devices, reads the inputs
from ``DIR/inputs.npz``, runs ``jbn.batchnorm`` in training mode under ``jax.shard_map``
over the global mesh of all processes' devices, batch split along ``"batch"``, and writes
the gathered global results to ``DIR/result_<PROCESS_ID>.npz``. ``PATH``, if given, forces
that path of the statistics (``"shifted"``: the accelerators').
"""

import os
import re
import sys
import warnings

# Two devices per process, whatever the parent asked for its own JAX; XLA reads the flag
# once, when JAX starts.
_FLAG = "--xla_force_host_platform_device_count"
os.environ["XLA_FLAGS"] = (
    re.sub(rf"{_FLAG}=\d+", "", os.environ.get("XLA_FLAGS", "")) + f" {_FLAG}=2").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jbn  # noqa: E402
from jbn import _stats  # noqa: E402

AXIS = "batch"
# Groups of 2 devices: each process's own, and one device of each process.
GROUPS = {"group_size=2": {"group_size": 2},
          "across processes": {"axis_index_groups": [[0, 2], [1, 3]]}}


def main(coordinator: str, num_processes: int, process_id: int, directory: str) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes, process_id,
                               initialization_timeout=60)
    inputs = dict(np.load(os.path.join(directory, "inputs.npz")))
    mesh = jax.make_mesh((jax.device_count(),), (AXIS,))

    def global_array(value, spec):
        # Every process holds the whole value; each device takes its slice of it.
        return jax.make_array_from_callback(
            value.shape, NamedSharding(mesh, spec), lambda index: value[index])

    params = {k: global_array(inputs[k], P()) for k in ("weight", "bias")}
    state = {k: global_array(inputs[k], P())
             for k in ("running_mean", "running_var", "num_batches_tracked")}
    x, mask, cotangent = (global_array(inputs[k], P(AXIS)) for k in ("x", "mask", "cotangent"))

    def on_device(params, state, x, mask, cotangent):
        def loss(x, params):
            y, new_state = jbn.batchnorm(params, state, x, True, mask=mask, axis_name=AXIS)
            return jnp.sum(y * cotangent), (y, new_state)

        (_, (y, new_state)), (dx, dparams) = jax.value_and_grad(
            loss, argnums=(0, 1), has_aux=True)(x, params)
        # momentum=1 replaces the running statistics by the batch's: mean and unbiased
        # variance of the valid values of the whole global batch.
        with warnings.catch_warnings():  # that momentum is meant here
            warnings.filterwarnings("ignore", "momentum=1.0", UserWarning)
            _, batch_stats = jbn.batchnorm(params, state, x, True, mask=mask, axis_name=AXIS,
                                           momentum=1.0)
        # Groups: of consecutive devices (within each process here), and across processes.
        groups = {name: jbn.batchnorm(params, state, x, True, mask=mask, axis_name=AXIS,
                                      **keywords)
                  for name, keywords in GROUPS.items()}
        return y, new_state, batch_stats, dx, dparams, groups

    run = jax.jit(jax.shard_map(
        on_device, mesh=mesh,
        in_specs=(P(), P(), P(AXIS), P(AXIS), P(AXIS)),
        out_specs=(P(AXIS), P(), P(), P(AXIS), P(), {name: (P(AXIS), P()) for name in GROUPS})))
    y, new_state, batch_stats, dx, dparams, groups = run(params, state, x, mask, cotangent)

    # Sharded results are gathered into global values; replicated ones are read locally.
    y, dx, grouped_y = multihost_utils.process_allgather(
        (y, dx, {name: value[0] for name, value in groups.items()}), tiled=True)
    local = jax.tree.map(lambda a: np.asarray(a.addressable_data(0)),
                         {"state": new_state, "batch_stats": batch_stats, "grad": dparams,
                          **{f"{name} state": value[1] for name, value in groups.items()}})
    np.savez(os.path.join(directory, f"result_{process_id}.npz"),
             y=y, dx=dx, devices=jax.device_count(), processes=jax.process_count(),
             **{f"{name} y": value for name, value in grouped_y.items()},
             **{f"{group}/{key}": value
                for group, values in local.items() for key, value in values.items()})


if __name__ == "__main__":
    with _stats.scheme(path=sys.argv[5] if len(sys.argv) > 5 else None):
        main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
