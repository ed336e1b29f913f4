"""Shape and dtype checks shared by the converters, with messages naming the caller's keys."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from jbn._batchnorm import _PARAM_KEYS, _STATE_KEYS, Params, State, _check_entries


def _check_vectors(named: Mapping[str, Any]) -> None:
    """Checks that the arrays are floating vectors of one length C; the keys name them in
    messages."""
    reference = None  # (name, shape) of the first vector: the others must match it
    for name, value in named.items():
        shape, dtype = jnp.shape(value), jnp.result_type(value)
        if reference is None and len(shape) == 1:
            reference = (name, shape)
        if reference is None or shape != reference[1]:
            expected = ("(C,), one value per channel" if reference is None
                        else f"{reference[1]} as {reference[0]}")
            raise ValueError(f"{name} has shape {shape}, expected {expected}")
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"{name} has dtype {dtype}, expected a floating dtype")


def _check_count(value, name: str) -> None:
    """Checks an integer scalar, from its shape and dtype only (so, also under ``jax.jit``)."""
    shape, dtype = jnp.shape(value), jnp.result_type(value)
    if shape != () or not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"{name} has shape {shape} and dtype {dtype}, expected an integer "
                         "scalar, shape ()")


def _check_layer(params: Params, state: State) -> None:
    """Checks jbn params and state as ``batchnorm`` would, with C taken from them."""
    first = next(((f"{name}[{key!r}]", value) for name, entries in (("params", params),
                                                                   ("state", state))
                  if isinstance(entries, Mapping)
                  for key, value in entries.items() if key != "num_batches_tracked"), None)
    channels = None
    if first is not None:
        name, value = first
        if jnp.ndim(value) != 1:
            raise ValueError(f"{name} must have shape (C,), got {jnp.shape(value)}")
        channels = jnp.shape(value)[0]
    _check_entries("params", params, _PARAM_KEYS, channels)
    _check_entries("state", state, _STATE_KEYS, channels)
