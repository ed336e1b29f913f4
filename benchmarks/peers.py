"""The contenders: jbn and its peers, one small function each.

Every peer does the same math on an (N, C, ...) float32 array: statistics over every axis but
axis 1, eps 1e-5, a learnable per-channel weight and bias, and in training the running
statistics updated with PyTorch's momentum 0.1 (a decay of 0.9 in the convention of Flax, Haiku
and Equinox). The JAX peers are written as one pure function

    train(x, (weight, bias), state) -> (y, new_state)

with ``weight`` and ``bias`` of shape (C,); ``jax_jobs`` turns that into the two jitted jobs
the harness times, so that every JAX peer is timed, compiled and differentiated the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jbn
from jbn import _stats

MOMENTUM = 0.1  # PyTorch's convention: the weight of the batch statistic
EPS = 1e-5


@dataclasses.dataclass
class Jobs:
    """One peer's work on one input, ready to time.

    ``train`` and ``grad`` each run one call to completion (the device is synchronized before
    they return). ``grad`` returns ``(y, dx, dweight, dbias)``, for checking that the peers
    agree. ``compile_seconds(mode)`` lowers and compiles a fresh copy of the job's function;
    ``residual_bytes`` is what the backward pass holds on to between forward and backward.
    """

    train: Callable[[], Any]
    grad: Callable[[], tuple]
    compile_seconds: Callable[[str], float] | None
    residual_bytes: int | None


def jax_jobs(train: Callable, wb: tuple, state: Any, x: jax.Array, ct: jax.Array,
             scheme: Callable[[], Any] = contextlib.nullcontext) -> Jobs:
    """The two jobs of a JAX peer, from its pure training function, compiled ahead of time
    (within ``scheme()``, jbn's switch of its statistics, where a job asks for one).

    The backward job takes the cotangent as an argument (a captured constant could be folded
    into the compiled code) and also returns the new state, as a training step would.
    """

    def grad(x, wb, state, ct):
        y, vjp, new_state = jax.vjp(lambda x, wb: train(x, wb, state), x, wb, has_aux=True)
        dx, (dweight, dbias) = vjp(ct)
        return y, dx, dweight, dbias, new_state

    def residuals(x, wb, state):
        return jax.vjp(lambda x, wb: train(x, wb, state), x, wb, has_aux=True)[1]

    functions = {"train": (train, (x, wb, state)), "grad": (grad, (x, wb, state, ct))}

    def compiled(mode: str):
        function, args = functions[mode]
        with scheme():  # a new function: no cache can answer
            return jax.jit(lambda *a: function(*a)).lower(*args).compile()

    def compile_seconds(mode: str) -> float:
        start = time.perf_counter()
        compiled(mode)
        return time.perf_counter() - start

    train_compiled, grad_compiled = compiled("train"), compiled("grad")
    # Shapes only: the residuals of jax.vjp are the leaves of the function it returns.
    held = jax.tree.leaves(jax.eval_shape(residuals, x, wb, state))
    return Jobs(
        train=lambda: jax.block_until_ready(train_compiled(x, wb, state)),
        grad=lambda: jax.block_until_ready(grad_compiled(x, wb, state, ct))[:4],
        compile_seconds=compile_seconds,
        residual_bytes=sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in held),
    )


def _weight_bias(channels: int) -> tuple[jax.Array, jax.Array]:
    return jnp.ones(channels, jnp.float32), jnp.zeros(channels, jnp.float32)


def jbn_jobs(x: jax.Array, ct: jax.Array, path: str | None = None,
             accumulation_steps: int | None = None) -> Jobs:
    """`jbn.batchnorm(params, state, x, True, momentum=0.1, eps=1e-5)`."""
    _, state = jbn.init(x.shape[1], accumulation_steps=accumulation_steps)

    def train(x, wb, state):
        return jbn.batchnorm({"weight": wb[0], "bias": wb[1]}, state, x, True,
                             momentum=MOMENTUM, eps=EPS, accumulation_steps=accumulation_steps)

    return jax_jobs(train, _weight_bias(x.shape[1]), state, x, ct,
                    functools.partial(_stats.scheme, path=path))


def flax_jobs(x: jax.Array, ct: jax.Array, *, use_fast_variance: bool = True) -> Jobs:
    """`flax.linen.BatchNorm(use_running_average=False, axis=1, momentum=0.9, epsilon=1e-5)`,
    applied with `mutable=["batch_stats"]`; variance as E[x²] − E[x]² (Flax's default)."""
    import flax.linen as nn

    module = nn.BatchNorm(use_running_average=False, axis=1, momentum=1 - MOMENTUM, epsilon=EPS,
                          use_fast_variance=use_fast_variance, param_dtype=jnp.float32)
    state = module.init(jax.random.key(0), x)["batch_stats"]

    def train(x, wb, state):
        variables = {"params": {"scale": wb[0], "bias": wb[1]}, "batch_stats": state}
        y, updates = module.apply(variables, x, mutable=["batch_stats"])
        return y, updates["batch_stats"]

    return jax_jobs(train, _weight_bias(x.shape[1]), state, x, ct)


def flax_two_pass_jobs(x: jax.Array, ct: jax.Array) -> Jobs:
    """As flax, with `use_fast_variance=False`: variance as E[(x − E[x])²]."""
    return flax_jobs(x, ct, use_fast_variance=False)


def haiku_jobs(x: jax.Array, ct: jax.Array) -> Jobs:
    """`haiku.BatchNorm(create_scale=True, create_offset=True, decay_rate=0.9, eps=1e-5,
    data_format="channels_first")` in `hk.transform_with_state`, `is_training=True`."""
    import haiku as hk

    def forward(x):
        bn = hk.BatchNorm(create_scale=True, create_offset=True, decay_rate=1 - MOMENTUM, eps=EPS,
                          data_format="channels_first")
        return bn(x, is_training=True)

    model = hk.transform_with_state(forward)
    params, state = model.init(None, x)
    # Haiku keeps its parameters broadcastable against x: (1, C, 1, ...).
    shape = params["batch_norm"]["scale"].shape

    def train(x, wb, state):
        params = {"batch_norm": {"scale": wb[0].reshape(shape), "offset": wb[1].reshape(shape)}}
        return model.apply(params, state, None, x)

    return jax_jobs(train, _weight_bias(x.shape[1]), state, x, ct)


def equinox_jobs(x: jax.Array, ct: jax.Array) -> Jobs:
    """`equinox.nn.BatchNorm(C, axis_name="batch", mode="batch", momentum=0.9, eps=1e-5)` on
    one (C, ...) example, under `jax.vmap(..., axis_name="batch")` over the batch axis."""
    import equinox as eqx

    # Equinox normalizes one example (C, ...) at a time; vmap over the batch names the axis
    # whose examples share the statistics.
    bn = eqx.nn.BatchNorm(x.shape[1], axis_name="batch", eps=EPS, momentum=1 - MOMENTUM,
                          mode="batch", dtype=jnp.float32)
    state = eqx.nn.State(bn)

    def train(x, wb, state):
        model = eqx.tree_at(lambda m: (m.weight, m.bias), bn, wb)
        return jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)

    return jax_jobs(train, _weight_bias(x.shape[1]), state, x, ct)


def torch_jobs(x: jax.Array, ct: jax.Array) -> Jobs:
    """`torch.nn.BatchNorm1d` (2-D and 3-D x) or `BatchNorm2d` (4-D), momentum 0.1, eps 1e-5,
    train mode, default threads; the forward under `torch.no_grad()` (the running statistics
    still update); the backward as `torch.autograd.grad(y, (x, weight, bias), ct)`."""
    import torch

    device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    layer = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
             5: torch.nn.BatchNorm3d}[x.ndim]
    bn = layer(x.shape[1], eps=EPS, momentum=MOMENTUM, device=device).train()
    tx = torch.from_numpy(np.array(x)).to(device).requires_grad_()
    tct = torch.from_numpy(np.array(ct)).to(device)

    def train():
        with torch.no_grad():  # train mode all the same: the running statistics update
            y = bn(tx)
        sync()
        return y

    def grad():
        y = bn(tx)
        dx, dweight, dbias = torch.autograd.grad(y, (tx, bn.weight, bn.bias), tct)
        sync()
        return y.detach(), dx, dweight, dbias

    saved = {}

    def pack(t):  # each saved tensor once, however often autograd saves it
        saved[(t.data_ptr(), t.dtype, tuple(t.shape))] = t.nelement() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        bn(tx)
    return Jobs(train=train, grad=grad, compile_seconds=None, residual_bytes=sum(saved.values()))


# Name shown in the table -> (module it needs, builder). jbn comes first: the others are
# measured against it.
PEERS: dict[str, tuple[str, Callable[[jax.Array, jax.Array], Jobs]]] = {
    "jbn": ("jbn", jbn_jobs),
    "flax": ("flax", flax_jobs),
    "flax two-pass": ("flax", flax_two_pass_jobs),
    "haiku": ("haiku", haiku_jobs),
    "equinox": ("equinox", equinox_jobs),
    "torch": ("torch", torch_jobs),
}
