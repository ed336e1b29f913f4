"""What the framework layers (``jbn.linen``, ``jbn.nnx``, ``jbn.equinox``) share, so that
each keeps only its framework's idioms (its signature, its state container, its docstring):
the guarded import of the framework, the options a layer keeps and forwards to
``batchnorm``, and for whole models, loading their layers and recording a forward pass to
find what folds."""

from __future__ import annotations

import functools
import importlib
from collections import Counter
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jbn._activation import activated
from jbn._batchnorm import Params, State, batchnorm
from jbn._parse import (
    check_activation,
    check_eps,
    check_layer,
    check_mode,
    check_pooling,
    number,
)

# The options a layer keeps under ``batchnorm``'s names and passes to each call: every
# keyword of ``batchnorm`` but ``eps`` (each framework names it its own way) and the
# per-call ``mask``, ``statistics`` and ``residual``.
OPTIONS = ("mode", "momentum", "axis", "axis_name", "axis_index_groups", "group_size",
           "renorm", "virtual_batch_size", "accumulation_steps", "accumulation_pooling",
           "activation", "activation_param")
# What a layer's call takes besides ``x`` and its framework's phase; ``momentum`` and
# ``renorm`` override the layer's.
PER_CALL = ("mask", "momentum", "renorm", "statistics", "residual")


class _LayerValue:
    """The default of a framework layer's per-call keyword: the value it was built with."""

    def __repr__(self) -> str:
        return "<the layer's>"


# Typed Any so that it may stand as the default of a keyword of any type.
LAYER: Any = _LayerValue()


def framework(name: str, layer_module: str, title: str, extra: str) -> ModuleType:
    """Imports the framework ``name`` (``"flax.nnx"``) that ``layer_module`` is jbn's layer
    for, or raises ``ModuleNotFoundError`` naming the extra that installs it."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] != name.split(".")[0]:  # one of its own
            raise
        raise ModuleNotFoundError(f"{layer_module} is jbn's layer for {title}, which is not "
                                  f"installed: pip install 'jbn[{extra}]'",
                                  name=error.name) from error


def other_names(names: Mapping[str, str], *, like: str) -> Callable:
    """Wraps a layer's ``__init__`` so that another framework's name for one of its keywords
    (``eps`` where the layer takes ``epsilon``) raises a ``TypeError`` that names the
    layer's own, as ``like`` (the framework's layer) calls it."""
    def wrap(init: Callable) -> Callable:
        @functools.wraps(init)
        def checked(self, *args: Any, **kwargs: Any) -> None:
            for other, own in names.items():
                if other in kwargs:
                    raise TypeError(f"{type(self).__name__}() got an unexpected keyword "
                                    f"argument {other!r}: this layer takes {own!r}, as "
                                    f"{like} does")
            init(self, *args, **kwargs)
        return checked
    return wrap


def options(*, mode: Any, momentum: Any, eps: Any, axis: Any, axis_name: Any,
            axis_index_groups: Any, group_size: Any, renorm: Any, virtual_batch_size: Any,
            accumulation_steps: Any, accumulation_pooling: Any, activation: Any,
            activation_param: Any, mode_hint: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A layer's ``OPTIONS``, checked when it is built as ``batchnorm`` checks them (all but
    what depends on the input), and hashable (lists as tuples) for ``jax.jit``;
    ``mode_hint``: what the framework's own modes mean, for the message."""
    check_mode(mode, hint=mode_hint)
    number("momentum", momentum, integral=False, at_least=0, at_most=1, optional=True)
    check_eps(eps)
    number("axis", axis, integral=True)
    for name, value in (("group_size", group_size), ("virtual_batch_size", virtual_batch_size),
                        ("accumulation_steps", accumulation_steps)):
        number(name, value, integral=True, at_least=1, optional=True)
    check_pooling(accumulation_pooling)
    check_activation(activation, activation_param)
    return {"mode": mode, "momentum": momentum, "axis": axis, "axis_name": hashable(axis_name),
            "axis_index_groups": hashable(axis_index_groups), "group_size": group_size,
            "renorm": renorm, "virtual_batch_size": virtual_batch_size,
            "accumulation_steps": accumulation_steps,
            "accumulation_pooling": accumulation_pooling, "activation": activation,
            "activation_param": activation_param}


def check_scale_and_bias(use_scale: bool, use_bias: bool) -> None:
    """Flax's ``use_scale`` and ``use_bias``: any pair but a bias without a weight."""
    if use_bias and not use_scale:
        raise ValueError("use_bias=True with use_scale=False is a bias without a weight, "
                         "which jbn does not have: use use_scale=True (a weight of ones "
                         "computes the same) or use_bias=False")


def forward(layer: Any, params: Params, state: State, x: Any, training: bool, *, eps: float,
            **per_call: Any) -> tuple[Any, State]:
    """``batchnorm`` with ``layer``'s ``OPTIONS``, and the call's ``PER_CALL`` keywords
    overriding them where given (not ``LAYER``)."""
    keywords = {name: getattr(layer, name) for name in OPTIONS}
    keywords.update({name: value for name, value in per_call.items() if value is not LAYER})
    return batchnorm(params, state, x, training, eps=eps, **keywords)


def why_unfoldable(tracked: bool, mode: str, axis: int, ndim: int, *,
                   channel_axis: int) -> str | None:
    """Why a batch norm over ``axis``, given input of rank ``ndim``, does not fold into the
    layer before it, which puts its output channels at ``channel_axis`` (-1: last, 0: first);
    None: it folds. ``tracked``: whether it has running statistics."""
    if not tracked or mode == "untracked":
        return ("normalizes with the batch's statistics in eval (no running statistics, or "
                "mode 'untracked')")
    if axis % ndim != channel_axis % ndim:
        return (f"normalizes axis {axis}, where the layer before it puts its output "
                f"channels {'last' if channel_axis == -1 else 'first'}")
    return None


def after_folding(layer: Any, x: Any, residual: Any) -> Any:
    """What a batch norm folded into the layer before it leaves to do, on that layer's
    output ``x``: ``layer``'s activation of ``x + residual``."""
    return activated(check_activation(layer.activation, layer.activation_param), x, residual)


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

    def run(self, path: str, layer: Callable, is_batchnorm: bool, x: Any, args: tuple,
            kwargs: dict) -> Any:
        """Runs ``layer(x, *args, **kwargs)``, recording it as the layer at ``path``."""
        if is_batchnorm:
            self.batchnorm(path, x)
            return layer(x, *args, **kwargs)
        output = layer(x, *args, **kwargs)
        self.layer(path, x, output)
        return output

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
