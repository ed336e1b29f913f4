"""What models of many batch norms share: layer paths, the check that every state was
threaded, and what the framework layers share."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

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
    place: a layer whose new state was not threaded back (it still holds, or was left out
    of, the new state) shows here. Runs on concrete arrays, outside ``jax.jit``.

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
    advanced = dict(_counts(after))
    return [path for path, count in _counts(before)
            if path not in advanced or not np.all(np.asarray(advanced[path]) > count)]


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
        path → state dict or a nested dict mirroring the model; ``{}`` stays ``{}``, and so
        does a frozen layer's state (without ``num_batches_tracked``), which training does
        not update and recalibration could not restore.

    Returns:
      The same structure with fresh running statistics.

    PyTorch: ``module.reset_running_stats()``, as ``torch.optim.swa_utils.update_bn`` uses
    it with ``momentum=None``.
    """
    fresh = {"running_mean": jnp.zeros_like, "running_var": jnp.ones_like,
             "num_batches_tracked": jnp.zeros_like}

    def is_layer(node):
        return isinstance(node, Mapping) and "num_batches_tracked" in node

    def reset(node):
        if not is_layer(node):
            return node
        return {key: fresh[key](value) if key in fresh else value
                for key, value in node.items()}

    return jax.tree.map(reset, states, is_leaf=is_layer)


def _counts(states: Any) -> list[tuple[str, np.ndarray]]:
    """Each layer's path and ``num_batches_tracked``, found by that key."""
    return [(dotted(keys[:-1]), np.asarray(leaf))
            for keys, leaf in jax.tree_util.tree_leaves_with_path(states)
            if getattr(keys[-1], "key", None) == "num_batches_tracked"]


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
