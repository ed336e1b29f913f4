"""Train a small leaky-ReLU ResNet on the digits twice: batch norm fused with its residual and
activation, and unfused. The two train the same; the fused one keeps less for its backward.

The network, on the 8×8 digit images: a 3×3 convolution to 16 channels, batch norm and leaky
ReLU; two residual blocks, each conv → BN → leaky ReLU → conv → BN, + the block's input,
leaky ReLU; global average pooling and a linear classifier. The fused form writes each batch
norm and what follows it as one call:

    h = jbn.batchnorm(p, s, conv(x), True, activation="leaky_relu")             # BN → act
    y = jbn.batchnorm(p, s, conv(h), True, activation="leaky_relu", residual=x)  # BN + x → act

whose derivative recomputes the normalized input from the output (leaky ReLU is invertible),
so the backward pass keeps each output (which the next convolution keeps anyway) instead of
each batch norm's input and each activation's. The unfused form is ``jbn.batchnorm``, ``+``,
``jax.nn.leaky_relu``: the same function, so from the same initialization on the same
batches both follow the same loss curve up to float32 rounding. Each epoch prints both
losses and test accuracies; the end prints the largest difference between the curves, the
bytes each keeps for its backward pass (the arrays ``jax.vjp`` saves, on any platform), and
the peak temporary memory of each compiled step (XLA's memory analysis, for this machine).
On a CPU that peak also holds the backward's passing temporaries, which XLA:CPU writes to
memory where a GPU compiler fuses them, so in a network this small it can be the fused
step's that is larger; ``python -m benchmarks.memory`` compiles a ResNet-50-style step for
an H100. The program exits with status 1 where the curves differ by more than the rounding
allows.

Run ``python examples/fused.py`` (``--epochs``, ``--batch-size``): a few seconds per epoch
on two CPU cores.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from train import epoch_batches, load_data

import jbn

CHANNELS = 16
BLOCKS = 2
BATCH_SIZE = 64
EPOCHS = 6
LEARNING_RATE = 0.05
# Float32 rounding, grown over a run: the loss curves may differ by this much, relatively.
CURVE_TOLERANCE = 1e-3


def init_model(key: jax.Array):
    """Convolution kernels (HWIO, He-initialized), batch norms, the classifier."""
    names = ["stem", *(f"block{b}.conv{i}" for b in range(BLOCKS) for i in (1, 2))]
    keys = jax.random.split(key, len(names) + 1)
    params, state = {}, {}
    for name, k in zip(names, keys, strict=False):
        fan_in = 9 * (1 if name == "stem" else CHANNELS)
        kernel = jax.random.normal(k, (3, 3, fan_in // 9, CHANNELS)) * np.sqrt(2 / fan_in)
        norm_params, state[name] = jbn.init(CHANNELS)
        params[name] = {"kernel": kernel, "norm": norm_params}
    params["classifier"] = {"weight": jax.random.normal(keys[-1], (CHANNELS, 10)) * 0.1,
                            "bias": jnp.zeros(10)}
    return params, state


def apply_model(params, state, images, mask, fused: bool):
    """Logits and the new batch-norm state, in training (NHWC); padding (``mask`` False)
    enters no statistic."""
    new_state = {}

    def conv_norm(name, x, residual=None):
        h = jax.lax.conv_general_dilated(x, params[name]["kernel"], (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        if fused:
            y, new_state[name] = jbn.batchnorm(params[name]["norm"], state[name], h, True,
                                               axis=-1, mask=mask, activation="leaky_relu",
                                               residual=residual)
            return y
        y, new_state[name] = jbn.batchnorm(params[name]["norm"], state[name], h, True, axis=-1,
                                           mask=mask)
        return jax.nn.leaky_relu(y if residual is None else y + residual)

    x = conv_norm("stem", images)
    for b in range(BLOCKS):
        h = conv_norm(f"block{b}.conv1", x)
        x = conv_norm(f"block{b}.conv2", h, residual=x)
    logits = x.mean(axis=(1, 2)) @ params["classifier"]["weight"] + params["classifier"]["bias"]
    return logits, new_state


def make_step(optimizer, fused: bool):
    def loss_fn(params, state, images, labels, mask):
        logits, new_state = apply_model(params, state, images, mask, fused)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return jnp.sum(losses * mask) / jnp.sum(mask), new_state

    def step(params, state, opt_state, images, labels, mask):
        (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state, images,
                                                                          labels, mask)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), state, opt_state, loss

    return jax.jit(step)


@functools.partial(jax.jit, static_argnames="fused")
def accuracy(params, state, images, labels, fused):
    """Test accuracy; each test batch normalized with its own statistics, as in training
    (the running statistics are another example's story, ``train.py``)."""
    logits, _ = apply_model(params, state, images, jnp.ones(len(images), bool), fused)
    return jnp.mean(jnp.argmax(logits, axis=1) == labels)


def images_of(x):
    return x.reshape(-1, 8, 8, 1)


def saved_bytes(params, state, images, labels, mask, fused: bool) -> float:
    """MiB of the arrays ``jax.vjp`` keeps for the backward pass of the loss."""
    def loss(params):
        logits, _ = apply_model(params, state, images, mask, fused)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    _, backward = jax.vjp(loss, params)
    return sum(leaf.nbytes for leaf in jax.tree.leaves(backward)) / 2**20


def peak_temporaries(step, *arguments) -> float:
    """MiB of temporaries the compiled step holds at its peak (XLA's memory analysis)."""
    return step.lower(*arguments).compile().memory_analysis().temp_size_in_bytes / 2**20


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    args = parser.parse_args(argv)
    data = load_data()
    optimizer = optax.sgd(LEARNING_RATE, momentum=0.9)
    params, state = init_model(jax.random.key(0))
    runs = {fused: [params, state, optimizer.init(params), make_step(optimizer, fused)]
            for fused in (True, False)}
    curves = {True: [], False: []}
    print(f"{'epoch':>5}  {'loss fused':>10}  {'loss unfused':>12}  {'test fused':>10}  "
          f"{'test unfused':>12}  {'epoch (s)':>9}")
    for epoch in range(args.epochs):
        start = time.perf_counter()
        losses = {True: [], False: []}
        for batch, mask in epoch_batches(len(data.x_train), args.batch_size, epoch):
            images, labels = images_of(data.x_train[batch]), data.y_train[batch]
            for fused, run in runs.items():
                *run[:3], loss = run[3](*run[:3], images, labels, mask)
                losses[fused].append(float(loss))
        tested = {fused: float(accuracy(run[0], run[1], images_of(data.x_test), data.y_test,
                                        fused)) for fused, run in runs.items()}
        for fused in runs:
            curves[fused] += losses[fused]
        print(f"{epoch + 1:>5}  {np.mean(losses[True]):>10.4f}  {np.mean(losses[False]):>12.4f}"
              f"  {tested[True]:>9.2%}  {tested[False]:>11.2%}  "
              f"{time.perf_counter() - start:>9.1f}")
    difference = np.max(np.abs(np.subtract(curves[True], curves[False]))
                        / np.maximum(np.abs(curves[False]), 1e-12))
    print(f"largest relative difference between the loss curves: {difference:.1e} "
          f"(over {len(curves[True])} steps)")
    for what, measure in (("kept for the backward pass", lambda fused, run: saved_bytes(
                              *run[:2], images, labels, mask, fused)),
                          ("peak temporary memory of the step on this machine",
                           lambda fused, run: peak_temporaries(run[3], *run[:3], images,
                                                               labels, mask))):
        memory = {fused: measure(fused, run) for fused, run in runs.items()}
        print(f"{what}: fused {memory[True]:.2f} MiB, unfused {memory[False]:.2f} MiB "
              f"({memory[True] / memory[False]:.2f}×)")
    if difference > CURVE_TOLERANCE:
        print(f"the loss curves differ by more than {CURVE_TOLERANCE}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
