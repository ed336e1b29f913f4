"""The running-statistics utilities for models of many batch norms: the check that every
state was threaded (``stale_layers``), recalibration (``reset_running_stats``) and pooling
across devices (``sync_running_stats``); and layer paths, as they name a model's layers."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike


def stale_layers(before: Any, after: Any) -> list[str]:
    """The batch norms whose running state a training step did not advance.

    Every ``num_batches_tracked`` in ``before`` must have grown in ``after``, at the same
    place, or, for a layer that accumulates micro-batches, its accumulator taken one more:
    a layer whose new state was not threaded back (it still holds, or was left out of, the
    new state) shows here. Runs on concrete arrays, outside ``jax.jit``.

    Args:
      before: the states before the step: any pytree of jbn states, such as
        ``from_torch_model``'s path → state dict or a nested dict mirroring the model.
      after: the states the step returned.

    Returns:
      The paths of the stale layers, their keys joined by dots (``"layer1.0.bn1"``;
      ``""`` when ``before`` is one layer's state), in pytree order (dict keys sorted).
      Empty when every layer advanced. Every training call counts a batch, as PyTorch's
      modules do, even one whose mask leaves its running statistics as they were.

    PyTorch: no equivalent; each module there updates its own buffers in place.
    """
    advanced = dict(_progress(after))
    return [path for path, (count, micro_batches) in _progress(before)
            if path not in advanced or not (np.all(advanced[path][0] > count)
                                            or np.any(advanced[path][1] != micro_batches))]


def reset_running_stats(states: Any) -> Any:
    """Every batch norm's running state as ``jbn.init`` makes it, for recalibration.

    ``running_mean`` zeros, ``running_var`` ones, ``num_batches_tracked`` 0 and an accumulator
    empty, each with its dtype; any other leaf is returned as it is. With the weights fixed,
    K training-mode calls with ``momentum=None`` from this state then give the cumulative
    average of the K batches' statistics (PreciseBN; Wu & Johnson 2021, "Rethinking 'Batch'
    in BatchNorm", arXiv:2105.07576): ``running_mean = (1/K) Σ mean_b``,
    ``running_var = (1/K) Σ s²_b``, each ``s²_b`` the batch's unbiased variance. For batches
    of equal counts the mean is that of all their values, and the variance the pooled
    within-batch variance. Each batch weighs 1/K whatever its count (unequal sizes, masks).
    A batch with fewer than 2 valid values counts but adds no statistics: its share goes to
    the batches before it (to the fresh 0 and 1 if it comes first).

    Args:
      states: one layer's state or any pytree of them, such as ``from_torch_model``'s
        path → state dict or a nested dict mirroring the model; ``{}`` stays ``{}``, and so
        does a frozen layer's state (without ``num_batches_tracked``), which training does
        not update and recalibration could not restore.

    Returns:
      The same structure with fresh running statistics.

    PyTorch: ``module.reset_running_stats()``, as ``torch.optim.swa_utils.update_bn`` uses
    it with ``momentum=None``.
    """
    fresh = {"running_mean": jnp.zeros_like, "running_var": jnp.ones_like,
             "num_batches_tracked": jnp.zeros_like,
             # the micro-batches of a step under way go too
             "accumulator": lambda accumulator: jax.tree.map(jnp.zeros_like, accumulator)}

    def reset(node):
        if not _is_tracked(node):
            return node
        return {key: fresh[key](value) if key in fresh else value
                for key, value in node.items()}

    return jax.tree.map(reset, states, is_leaf=_is_tracked)


def sync_running_stats(states: Any, axis_name: Hashable | tuple[Hashable, ...], *,
                       weight: ArrayLike | None = None) -> Any:
    """Every batch norm's running statistics pooled over the devices along ``axis_name``:
    the same on every device afterwards.

    .. math:: \\mu = \\frac{\\sum_d w_d\\, \\mu_d}{\\sum_d w_d}, \\qquad
              \\sigma^2 = \\frac{\\sum_d w_d\\, \\big(\\sigma_d^2 + (\\mu_d - \\mu)^2\\big)}
              {\\sum_d w_d}

    with :math:`\\mu_d, \\sigma_d^2` device d's ``running_mean`` and ``running_var``: the
    variance of the devices' data together, their own variances plus the spread of their
    means (the law of total variance), where averaging the variances alone would leave the
    spread out. For running statistics that drifted apart: per device (unsynchronized batch
    norm, ``axis_name=None`` in training) or per group of devices on a mesh whose inner axis
    alone is named. Two all-reduces per layer, of C + 1 and C values.

    Args:
      states: one layer's state or any pytree of them; call inside ``jax.shard_map``,
        ``jax.pmap`` or ``jax.vmap`` over ``axis_name``.
      axis_name: the mapped axis (or axes) of the devices to pool.
      weight: this device's weight, such as the number of values its running statistics
        have seen; None weighs every device alike.

    Returns:
      The same structure, ``running_mean`` and ``running_var`` pooled in their dtypes; every
      other leaf (``num_batches_tracked``, an accumulator) as it is.

    PyTorch: timm's ``distribute_bn(..., reduce=True)`` averages the running means and the
    running variances with equal weights, the spread of the means left out.
    """
    weight = jnp.asarray(1.0 if weight is None else weight)

    def pooled(state):
        mean, var = (state[key].astype(jnp.promote_types(state[key].dtype, jnp.float32))
                     for key in ("running_mean", "running_var"))
        total, weighted = lax.psum((weight, weight * mean), axis_name)
        pooled_mean = weighted / total
        pooled_var = lax.psum(weight * (var + (mean - pooled_mean) ** 2), axis_name) / total
        return {**state, "running_mean": pooled_mean.astype(state["running_mean"].dtype),
                "running_var": pooled_var.astype(state["running_var"].dtype)}

    return jax.tree.map(lambda node: pooled(node) if _is_state(node) else node, states,
                        is_leaf=_is_state)


def _is_state(node: Any) -> bool:
    return isinstance(node, Mapping) and "running_mean" in node


def _is_tracked(node: Any) -> bool:
    """A state that training updates: a frozen layer's has no ``num_batches_tracked``."""
    return isinstance(node, Mapping) and "num_batches_tracked" in node


def _progress(states: Any) -> list[tuple[str, tuple[np.ndarray, np.ndarray | None]]]:
    """Each layer's path, ``num_batches_tracked`` and its accumulator's ``micro_batches``
    (None without one), found by their keys."""
    found = jax.tree.leaves_with_path(states, is_leaf=_is_tracked)
    return [(dotted(keys), (np.asarray(state["num_batches_tracked"]),
                            None if "accumulator" not in state
                            else np.asarray(state["accumulator"]["micro_batches"])))
            for keys, state in found if _is_tracked(state)]


def dotted(keys) -> str:
    """A pytree key path as a module path: ``("layer1", 0, "bn1")`` → ``"layer1.0.bn1"``."""
    names = (getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))) for key in keys)
    return ".".join(str(name) for name in names)
