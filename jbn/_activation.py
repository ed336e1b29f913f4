"""The activations batch norm is fused with (``batchnorm(..., activation=...)``): each as
its function ``y = act(z)``, and where it is invertible, ``z`` and ``act'(z)`` computed from
``y`` alone, which is what lets the fused backward pass keep the output instead of the input.

=============  ======================  ==========================  ======================
activation     act(z)                  z from y                    act'(z) from y
=============  ======================  ==========================  ======================
identity       z                       y                           1
leaky_relu     z ≥ 0: z; else a·z      y ≥ 0: y; else y/a          y ≥ 0: 1; else a
elu            z > 0: z; else          y > 0: y; else              y > 0: 1; else y + a
               a·(exp(z) − 1)          log1p(y/a)
relu           max(z, 0)               not invertible              —
=============  ======================  ==========================  ======================

``a`` is ``activation_param``: leaky ReLU's negative slope (> 0, PyTorch's default 0.01)
or ELU's alpha (> 0, default 1.0). PyTorch: ``nn.Identity``, ``nn.LeakyReLU``, ``nn.ELU``,
``nn.ReLU``; ``act'(0)`` is ``jax.nn``'s: 1 for leaky ReLU, ``a`` for ELU. ReLU, not
invertible, is applied after plain batch norm, so it needs neither.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jax import Array

DEFAULT_PARAMS = {"identity": None, "relu": None, "leaky_relu": 0.01, "elu": 1.0}


class Activation(NamedTuple):
    """An activation and its parameter (None for ``identity`` and ``relu``): static."""

    name: str
    param: float | None

    @property
    def invertible(self) -> bool:
        return self.name != "relu"

    def __call__(self, z: Array) -> Array:
        if self.name == "identity":
            return z
        if self.name == "relu":
            return jnp.maximum(z, 0)
        if self.name == "leaky_relu":
            return jnp.where(z >= 0, z, self.param * z)
        return jnp.where(z > 0, z, self.param * jnp.expm1(jnp.minimum(z, 0)))

    def inverse(self, y: Array) -> Array:
        """``z`` from ``y``. ELU's saturated outputs (``y = −a``, ``z`` below about −17 in
        float32, −37 in float64) come back as the largest ``z`` that rounds to them."""
        if self.name == "identity":
            return y
        if self.name == "leaky_relu":
            return jnp.where(y >= 0, y, y / self.param)
        tiny = jnp.finfo(y.dtype).eps / 2
        return jnp.where(y > 0, y, jnp.log1p(jnp.maximum(y / self.param, tiny - 1)))

    def derivative(self, y: Array) -> Array:
        """``act'(z)`` from ``y``."""
        if self.name == "identity":
            return jnp.ones_like(y)
        if self.name == "leaky_relu":
            return jnp.where(y >= 0, 1, self.param).astype(y.dtype)
        return jnp.where(y > 0, 1, y + self.param).astype(y.dtype)


def activated(activation: Activation | None, y: Array, residual: Array | None) -> Array:
    """``act(y + residual)``, the residual added and the activation applied where given."""
    if residual is not None:
        y = y + residual
    return y if activation is None else activation(y)
