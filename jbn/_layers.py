"""What models of many batch norms share: layer paths, the check that every state was
threaded, and the keywords a framework layer passes on to ``batchnorm``."""

from __future__ import annotations

import inspect
from collections.abc import Hashable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from jbn._batchnorm import batchnorm
from jbn._call import check_layer

# The keywords of batchnorm that a layer fixes when it is built; mask changes with each
# batch, so the layer takes it per call. Read from the signature, so that a new keyword of
# batchnorm passes through the layers with no change to them.
LAYER_KEYWORDS = tuple(name for name, parameter in inspect.signature(batchnorm).parameters.items()
                       if parameter.kind is inspect.Parameter.KEYWORD_ONLY and name != "mask")


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

    ``running_mean`` zeros, ``running_var`` ones, ``num_batches_tracked`` 0, each with its
    dtype; any other leaf is returned as it is. With the weights fixed, K training-mode calls
    with ``momentum=None`` from this state then give the cumulative average of the K batches'
    statistics (PreciseBN; Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm",
    arXiv:2105.07576): ``running_mean = (1/K) Σ mean_b``, ``running_var = (1/K) Σ s²_b``, each
    ``s²_b`` the batch's unbiased variance. For batches of equal counts the mean is that of
    all their values, and the variance the pooled within-batch variance. Each batch weighs
    1/K whatever its count (unequal sizes, masks). A batch with fewer than 2 valid values
    counts but adds no statistics: its share goes to the batches before it (to the fresh
    0 and 1 if it comes first).

    Args:
      states: one layer's state or any pytree of them, such as ``from_torch_model``'s
        path → state dict or a nested dict mirroring the model; ``{}`` stays ``{}``.

    Returns:
      The same structure with fresh running statistics.

    PyTorch: ``module.reset_running_stats()``, as ``torch.optim.swa_utils.update_bn`` uses
    it with ``momentum=None``.
    """
    fresh = {"running_mean": jnp.zeros_like, "running_var": jnp.ones_like,
             "num_batches_tracked": jnp.zeros_like}

    def reset(path, leaf):
        keys = [getattr(key, "key", None) for key in path]
        if "accumulator" in keys:  # the micro-batches of a step under way go too
            return jnp.zeros_like(leaf)
        return fresh[keys[-1]](leaf) if keys and keys[-1] in fresh else leaf

    return jax.tree_util.tree_map_with_path(reset, states)


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


def _progress(states: Any) -> list[tuple[str, tuple[np.ndarray, np.ndarray | None]]]:
    """Each layer's path, ``num_batches_tracked`` and its accumulator's ``micro_batches``
    (None without one), found by their keys."""
    found = jax.tree.leaves_with_path(states, is_leaf=_is_state)
    return [(dotted(keys), (np.asarray(state["num_batches_tracked"]),
                            None if "accumulator" not in state
                            else np.asarray(state["accumulator"]["micro_batches"])))
            for keys, state in found if _is_state(state)]


def dotted(keys) -> str:
    """A pytree key path as a module path: ``("layer1", 0, "bn1")`` → ``"layer1.0.bn1"``."""
    names = (getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))) for key in keys)
    return ".".join(str(name) for name in names)


def layer_keywords(layer: str, keywords: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    """The ``batchnorm`` keywords given to a layer, checked by name, as hashable pairs (a
    layer's static configuration must be hashable under ``jax.jit``); their values are
    checked by ``batchnorm`` itself."""
    unknown = sorted(set(keywords) - set(LAYER_KEYWORDS))
    if unknown:
        raise TypeError(f"{layer} got unexpected keyword arguments {unknown}; it takes the "
                        f"keywords of jbn.batchnorm {list(LAYER_KEYWORDS)}, and mask per call")
    return tuple((name, _hashable(keywords[name])) for name in LAYER_KEYWORDS
                 if name in keywords)


def _hashable(value: Any) -> Any:
    return tuple(_hashable(v) for v in value) if isinstance(value, (list, tuple)) else value


def check_loadable(built: Mapping[str, tuple[Mapping, Mapping]], params: Mapping[str, Any],
                   states: Mapping[str, Any], states_name: str) -> None:
    """Checks that ``params``/``states`` (path → jbn dict) cover exactly the ``built``
    layers (path → their current params and state), each a layer as ``batchnorm`` takes it
    with the same keys, shapes and dtypes as the built one."""
    for name, given in (("params", params), (states_name, states)):
        if set(given) != set(built):
            raise ValueError(f"{name} must have the paths of the model's batch norms; missing "
                             f"{sorted(set(built) - set(given))}, unknown "
                             f"{sorted(set(given) - set(built))}")

    def layout(entries):
        return {key: f"{jnp.result_type(value)}{list(jnp.shape(value))}"
                for key, value in entries.items()}

    for path, current in built.items():
        try:
            check_layer(params[path], states[path], channels=check_layer(*current))
        except (TypeError, ValueError) as error:
            raise type(error)(f"layer {path!r}: {error}") from None
        for name, new, old in zip(("params", states_name), (params[path], states[path]),
                                  current, strict=True):
            if layout(new) != layout(old):
                raise ValueError(f"layer {path!r}: {name} has {layout(new)}, the layer was "
                                 f"built with {layout(old)}")
