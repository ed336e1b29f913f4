"""What XLA compiles from one call: no more operations than recorded, against Flax linen's
BatchNorm compiled for the same call.

On a CPU each top-level operation of the optimized program is a loop or a library call of its
own; the GPU's launches are checked where XLA's GPU compiler is installed
(``tests/test_accelerators.py``). A change that brings back an operation fails here."""

import functools

import jax
import jax.numpy as jnp
import pytest

from benchmarks import gpu_plan, plans

# What a CPU call runs beyond Flax's: the guard's mean (an operand of its conditional, so that
# the branch's sums and the statistics use that very rounded value), its decision (a
# per-channel comparison, and a reduction XLA:CPU splits in two), its conditional, and the
# step counter; with the backward, which runs fewer operations than Flax's, the balance is
# smaller.
EXTRA_CPU_OPERATIONS = {"train": 6, "grad": 3}


@functools.cache
def operations(layer: str, mode: str, shape: tuple[int, ...]) -> int:
    train, init = gpu_plan._layer(layer, shape[1])
    params, state = jax.eval_shape(init)
    arguments = (*jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype),
                               (params, state)),
                 jax.ShapeDtypeStruct(shape, jnp.float32))
    return plans.compile_plan(gpu_plan._step(mode, train), arguments, "cpu").top_level


@pytest.mark.parametrize("shape", [(256, 128), (64, 16, 8, 8)], ids=["2-D", "4-D"])
@pytest.mark.parametrize("mode", ["train", "grad"])
def test_a_cpu_call_runs_no_more_operations_than_flax_and_the_guard(mode, shape):
    assert operations("jbn", mode, shape) <= (operations("flax", mode, shape)
                                              + EXTRA_CPU_OPERATIONS[mode])


def test_the_counter_counts_the_operations_that_do_work_and_nothing_else():
    x = jax.ShapeDtypeStruct((64, 8), jnp.float32)

    def count(f):
        return plans.top_level_operations(jax.jit(f).lower(x).compile().as_text())

    # Parameters, tuples and bitcasts do no work: one elementwise pass is one operation.
    assert count(lambda x: (x * 2).reshape(8, 64)) == 1
    assert count(lambda x: (x * 2, jnp.exp(x))) <= 2
    assert count(lambda x: (x * 2, jnp.sum(x, axis=0))) >= 2
