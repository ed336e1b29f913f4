"""What models of many batch norms share: layer paths, the check that every state was
threaded, and what the framework layers share."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from jbn._call import check_layer


class _LayerValue:
    """The default of a framework layer's per-call keyword: the value it was built with."""

    def __repr__(self) -> str:
        return "<the layer's>"


# Typed Any so that it may stand as the default of a keyword of any type.
LAYER: Any = _LayerValue()


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


def hashable(value: Any) -> Any:
    """``value`` with its lists as tuples: a layer's static configuration must be hashable
    under ``jax.jit`` (``axis_index_groups=[[0, 1], [2, 3]]``)."""
    return tuple(hashable(v) for v in value) if isinstance(value, (list, tuple)) else value


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

    def layout(entries):  # an accumulator's entries too
        return {key: jax.tree.map(lambda array: f"{jnp.result_type(array)}"
                                                f"{list(jnp.shape(array))}", value)
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


class FoldReport(NamedTuple):
    """What folding a model for inference did.

    ``pairs``: ``(layer, batch norm)`` paths, each batch norm folded into the Conv or Linear
    before it; ``left``: batch norm path → why it was left in place; ``max_difference``: the
    largest absolute difference between the outputs of the folded and the unfolded model in
    eval mode, on the input given."""

    pairs: tuple[tuple[str, str], ...]
    left: dict[str, str]
    max_difference: float


class Recording:
    """One forward pass as the layers saw it: how often each ran, and which layer's output
    each batch norm received (the very array object, so that anything computed in between,
    an activation or a residual sum, breaks the pair)."""

    def __init__(self):
        self.calls: Counter[str] = Counter()
        self.outputs: list[tuple[str, Any]] = []
        self.inputs: dict[str, tuple[str | None, int]] = {}  # batch norm → (source, x.ndim)
        self.shared: set[str] = set()  # layers whose output another layer takes too

    def layer(self, path: str, x: Any, output: Any) -> None:
        self.calls[path] += 1
        source = self._source(x)
        if source is not None:
            self.shared.add(source)
        self.outputs.append((path, output))

    def batchnorm(self, path: str, x: Any) -> None:
        self.calls[path] += 1
        self.inputs[path] = (self._source(x), x.ndim)

    def _source(self, x: Any) -> str | None:
        return next((layer for layer, output in self.outputs if output is x), None)

    def plan(self, unfoldable: Mapping[str, Callable[[int], str | None]]
             ) -> tuple[tuple[tuple[str, str], ...], dict[str, str]]:
        """The pairs to fold and the batch norms to leave, with why; ``unfoldable`` maps
        each batch norm's path to what says, from the rank of its input, why it cannot be
        folded into the layer before it (None: it can)."""
        sources = Counter(source for source, _ in self.inputs.values())
        pairs, left = [], {}
        for path, why_not in unfoldable.items():
            source, ndim = self.inputs.get(path, (None, 0))
            if self.calls[path] != 1:
                why = ("did not run on the given input" if not self.calls[path] else
                       "runs more than once")
            elif source is None:
                why = "does not directly follow a Conv or Linear"
            elif self.calls[source] > 1 or sources[source] > 1 or source in self.shared:
                why = f"follows {source!r}, whose output is not its alone"
            else:
                why = why_not(ndim)
            if why is None:
                pairs.append((source, path))
            else:
                left[path] = why
        self.outputs.clear()  # arrays of a trace, which must not outlive it
        return tuple(pairs), left


def max_difference(a: Any, b: Any) -> float:
    """The largest absolute difference between the leaves of two pytrees of arrays."""
    return max((float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
                for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
                if np.size(x)), default=0.0)
