"""Gradient accumulation with batch norm: running statistics of the whole effective batch.

The digits MLP of ``train.py``, trained with ``optax.MultiSteps``: each batch of 64 examples
is split into k micro-batches; the gradients of the k accumulate and the optimizer steps
once. Each micro-batch is normalized with its own statistics, as its forward pass must be.
The running statistics are kept two ways, side by side, from the same forward passes:

* ``accumulation_steps=k``: one update per optimizer step, from the statistics of all the
  step's values, as one call on the whole batch gives them;
* per call, as every other library does: k updates per optimizer step, each from one
  micro-batch (k momentum steps, so the running average forgets k times as fast, from
  statistics of k times fewer values).

It prints, for the first layer after the first optimizer step, the difference between each
and one call of ``jbn.batchnorm`` on the step's whole batch; then the test accuracy in eval
mode with each. Run ``python examples/accumulation.py [--micro-batches K]``.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
import optax
from train import (
    BATCH_SIZE,
    SEED,
    epoch_batches,
    evaluate,
    init_model,
    load_data,
    loss_fn,
    make_optimizer,
)

import jbn


def with_accumulator(state, k: int):
    """Each layer's state, with the accumulator of ``accumulation_steps=k``."""
    return [{**layer, **{"accumulator": jbn.init(layer["running_mean"].shape[0],
                                                   accumulation_steps=k)[1]["accumulator"]}}
            for layer in state]


def make_step(optimizer, k: int):
    """One micro-batch: its gradients (accumulated by MultiSteps), the state kept both ways."""

    @jax.jit
    def step(params, accumulated, per_call, opt_state, x, labels, mask):
        (_, accumulated), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, accumulated, x, labels, mask, accumulation_steps=k)
        _, per_call = loss_fn(params, per_call, x, labels, mask)  # the same y, other state
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), accumulated, per_call, opt_state

    return step


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--micro-batches", type=int, default=4, help="k per optimizer step")
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args(argv)
    k = args.micro_batches
    if BATCH_SIZE % k:
        parser.error(f"--micro-batches must divide the batch of {BATCH_SIZE}")

    data = load_data()
    params, state = init_model(jax.random.key(SEED))
    accumulated, per_call = with_accumulator(state, k), state
    optimizer = optax.MultiSteps(make_optimizer(), every_k_schedule=k)
    opt_state = optimizer.init(params)
    step = make_step(optimizer, k)
    size = BATCH_SIZE // k
    print(f"digits MLP, batches of {BATCH_SIZE} as {k} micro-batches of {size}; "
          f"{args.epochs} epochs")
    for epoch in range(1, args.epochs + 1):
        for indices, mask in epoch_batches(len(data.y_train), BATCH_SIZE, epoch):
            if epoch == 1 and int(accumulated[0]["num_batches_tracked"]) == 0:
                # What one call on this whole batch gives the first layer, weights as now.
                whole = jbn.batchnorm(params["hidden"][0]["bn"], state[0],
                                      data.x_train[indices] @ params["hidden"][0]["w"], True,
                                      mask=mask)[1]
            for i in range(k):
                rows = slice(i * size, (i + 1) * size)
                params, accumulated, per_call, opt_state = step(
                    params, accumulated, per_call, opt_state, data.x_train[indices][rows],
                    data.y_train[indices][rows], mask[rows])
            if epoch == 1 and int(accumulated[0]["num_batches_tracked"]) == 1:
                for name, layers in (("accumulation_steps", accumulated),
                                     ("per call", per_call)):
                    difference = max(float(np.max(np.abs(layers[0][key] - whole[key])))
                                     for key in ("running_mean", "running_var"))
                    print(f"first layer after one optimizer step, {name}: "
                          f"max |running − one call on the whole batch| = {difference:.1e}, "
                          f"num_batches_tracked {int(layers[0]['num_batches_tracked'])}")
    accuracies = {}
    for name, layers in (("accumulation_steps", accumulated), ("per call", per_call)):
        layers = [{key: layer[key] for key in ("running_mean", "running_var",
                                               "num_batches_tracked")} for layer in layers]
        accuracies[name] = float(evaluate(params, layers, data.x_test, data.y_test)[1])
        print(f"test accuracy in eval mode, running statistics kept {name}: "
              f"{accuracies[name]:.2%}")
    return accuracies


if __name__ == "__main__":
    main()
