"""Flax ``linen.BatchNorm`` variables in and out: renamed, and what Flax keeps differently."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
from jax import Array

from jbn._batchnorm import Params, State
from jbn._parse import check_layer


def from_flax(variables: Mapping[str, Any]) -> tuple[Params, State]:
    """The variables of a ``flax.linen.BatchNorm`` as jbn ``(params, state)``.

    ``{"params": {"scale", "bias"}, "batch_stats": {"mean", "var"}}`` become ``weight``,
    ``bias``, ``running_mean``, ``running_var``: eval outputs carry over exactly (up to
    rounding: both compute ``(x − mean)·s + b``). With the
    arguments to match: jbn ``axis=-1`` (Flax normalizes the last axis by default),
    ``eps=epsilon`` and ``momentum = 1 − Flax momentum`` (Flax weighs the old running value,
    PyTorch and jbn the new batch: Flax's 0.99 is jbn's 0.01, PyTorch's 0.1 is Flax's 0.9).

    What does not carry over:

    * Flax averages the *biased* batch variance (÷ n), PyTorch and jbn the unbiased one
      (÷ (n − 1)). The running variance is taken as it is, so eval agrees; training on in jbn
      averages batch variances larger by n/(n − 1).
    * Flax counts no batches: ``num_batches_tracked`` is 0, which matters only to
      ``momentum=None`` (the cumulative average would restart).

    A module without bias (``use_bias=False``) gives ``weight`` alone; one without scale but
    with bias gets a scale of ones, which computes the same. Select one module's variables
    from a model's:
    ``{"params": v["params"]["BatchNorm_0"], "batch_stats": v["batch_stats"]["BatchNorm_0"]}``.

    Args:
      variables: a mapping with ``"params"`` and/or ``"batch_stats"`` collections of one
        BatchNorm over a single feature axis.

    Returns:
      ``(params, state)``; ``params == {"weight"}`` without bias, ``{}`` without scale and
      bias; ``state == {}`` without ``batch_stats``.

    Raises:
      ValueError: for unexpected keys (e.g. a whole model's variables), one of ``mean``/``var``
        without the other, and entries of the wrong shape or dtype.
    """
    collections = {"params": ("scale", "bias"), "batch_stats": ("mean", "var")}
    unexpected = sorted(set(variables) - set(collections))
    if unexpected:
        raise ValueError(f"variables has unexpected collections {unexpected}; expected "
                         "'params' and 'batch_stats'")
    for collection, names in collections.items():
        unexpected = sorted(set(variables.get(collection, {})) - set(names))
        if unexpected:
            raise ValueError(f"variables[{collection!r}] has unexpected keys {unexpected}; "
                             f"expected a subset of {list(names)}: pass the variables of one "
                             "BatchNorm module, e.g. v['params']['BatchNorm_0']")
    flax_params = variables.get("params", {})
    stats = variables.get("batch_stats", {})
    if ("mean" in stats) != ("var" in stats):
        missing = "var" if "mean" in stats else "mean"
        raise ValueError(f"variables['batch_stats'][{missing!r}] is missing")
    # The explicit dtype makes JAX warn, rather than narrow float64 silently, when x64 is off.
    scale, bias, mean, var = (None if value is None else
                              jnp.asarray(value, dtype=jnp.result_type(value)) for value in (
        flax_params.get("scale"), flax_params.get("bias"), stats.get("mean"), stats.get("var")))
    params, state = {}, {}
    if scale is not None or bias is not None:
        params = {"weight": jnp.ones_like(bias) if scale is None else scale}
        if bias is not None:
            params["bias"] = bias
    if mean is not None:
        state = {"running_mean": mean, "running_var": var,
                 "num_batches_tracked": jnp.zeros((), jnp.int32)}
    check_layer(params, state, names={
        jbn_name: f"variables[{collection!r}][{name!r}]"
        for jbn_name, collection, name in (("weight", "params", "scale"),
                                           ("bias", "params", "bias"),
                                           ("running_mean", "batch_stats", "mean"),
                                           ("running_var", "batch_stats", "var"))
        if name in variables.get(collection, {})})
    return params, state


def to_flax(params: Params, state: State) -> dict[str, dict[str, Array]]:
    """jbn ``(params, state)`` as the variables of a ``flax.linen.BatchNorm``.

    ``weight``, ``bias``, ``running_mean``, ``running_var`` become ``params: scale, bias`` and
    ``batch_stats: mean, var``, in their dtypes; ``num_batches_tracked`` has no Flax
    counterpart and is dropped. Use the module with ``axis`` set to jbn's channel axis,
    ``epsilon=eps`` and ``momentum = 1 − jbn momentum``; see ``from_flax`` for what differs
    when training continues (Flax averages the biased batch variance).

    Args:
      params: ``{"weight", "bias"}`` of shape (C,), ``{"weight"}``, or ``{}``.
      state: ``{"running_mean", "running_var", "num_batches_tracked"}``, the first two
        alone, or ``{}``.

    Returns:
      ``{"params": {"scale", "bias"}, "batch_stats": {"mean", "var"}}``, without ``"bias"``
      for ``weight`` alone (``use_bias=False``), without ``"params"`` when ``params == {}``
      (``use_scale=False, use_bias=False``) and without
      ``"batch_stats"`` when ``state == {}`` (Flax then needs
      ``use_running_average=False``, and ``mutable=["batch_stats"]`` to create them).

    Raises:
      TypeError, ValueError: for params or state that ``batchnorm`` would not accept.
    """
    check_layer(params, state)
    variables = {}
    if params:
        variables["params"] = {flax_name: params[name] for name, flax_name in (
            ("weight", "scale"), ("bias", "bias")) if name in params}
    if state:
        variables["batch_stats"] = {"mean": state["running_mean"], "var": state["running_var"]}
    return variables
