"""jbn's batch norm as an Equinox layer, and whole Equinox models' batch norms in and out.

``from jbn.equinox import BatchNorm`` imports Equinox; ``import jbn`` does not.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import Array
from jax.typing import DTypeLike

from jbn._batchnorm import Params, State, batchnorm, init
from jbn._layers import check_loadable, dotted, layer_keywords

try:
    import equinox as eqx
except ModuleNotFoundError as error:
    if error.name != "equinox":
        raise
    raise ModuleNotFoundError(f"{__name__} is jbn's layer for Equinox, which is not "
                              "installed: pip install 'jbn[equinox]'", name=error.name) from error

__all__ = ["BatchNorm", "get_layers", "set_layers"]


class BatchNorm(eqx.nn.StatefulLayer):
    """``jbn.batchnorm`` as an Equinox layer: PyTorch's batch norm, state in ``eqx.nn.State``.

    .. math:: y = \\frac{x - \\mathrm{E}[x]}{\\sqrt{\\mathrm{Var}[x] + \\epsilon}}\\, w + b

    In training (``inference=False``) the batch's statistics normalize and
    ``running ← (1 − momentum)·running + momentum·batch`` with the unbiased batch variance,
    ``num_batches_tracked += 1``; in inference (``eqx.nn.inference_mode(model)``) the
    running statistics normalize, or the batch's own without running statistics.
    Everything is ``jbn.batchnorm``'s, which this calls.

    The batch is either an axis of ``x`` (call the layer on ``(N, C, ...)``, ``axis=1``,
    the default) or, as with ``eqx.nn.BatchNorm``, a ``jax.vmap`` axis: call it on one
    example ``(C, ...)`` inside ``jax.vmap(..., axis_name="batch", in_axes=(0, None),
    out_axes=(0, None))`` with ``axis=0, axis_name="batch"``.

    Fields ``weight``, ``bias`` (None without affine) and the state
    ``{"running_mean", "running_var", "num_batches_tracked"}`` have PyTorch's names; build
    with ``eqx.nn.make_with_state(BatchNorm)(C, ...)`` for the initial ``eqx.nn.State``.

    Args:
      num_features: C, the number of channels.
      affine: whether there are a learnable ``weight`` and ``bias``.
      track_running_stats: whether there are running statistics for inference.
      dtype: floating dtype of the parameters and running statistics.
      inference: the mode, switched by ``eqx.nn.inference_mode``.
      **keywords: ``jbn.batchnorm``'s keywords, passed on to each call: ``momentum``
        (0.1, PyTorch's convention), ``eps`` (1e-5), ``axis`` (1), ``axis_name``,
        ``axis_index_groups``, ``renorm``, ``virtual_batch_size``.

    Raises:
      TypeError: for a keyword ``jbn.batchnorm`` does not have; bad values raise when the
        layer is called, as ``jbn.batchnorm`` does.

    PyTorch: ``torch.nn.BatchNorm{1,2,3}d(num_features, affine=..., track_running_stats=...,
    momentum=..., eps=...)``. Equinox: ``eqx.nn.BatchNorm`` with ``momentum = 1 − jbn
    momentum``, but a biased running variance and its own ``mode`` rules.
    """

    weight: Array | None
    bias: Array | None
    state_index: eqx.nn.StateIndex | None
    inference: bool
    keywords: tuple[tuple[str, Any], ...] = eqx.field(static=True)

    def __init__(
        self,
        num_features: int,
        *,
        affine: bool = True,
        track_running_stats: bool = True,
        dtype: DTypeLike = jnp.float32,
        inference: bool = False,
        **keywords: Any,
    ):
        self.keywords = layer_keywords("jbn.equinox.BatchNorm", keywords)
        params, state = init(num_features, affine=affine,
                             track_running_stats=track_running_stats, dtype=dtype)
        self.weight, self.bias = params.get("weight"), params.get("bias")
        self.state_index = eqx.nn.StateIndex(state) if state else None
        self.inference = inference

    def __call__(
        self,
        x: Array,
        state: eqx.nn.State,
        *,
        mask: Array | None = None,
        key: Any = None,
        inference: bool | None = None,
    ) -> tuple[Array, eqx.nn.State]:
        """Normalizes ``x``, and in training returns the state with new running statistics.

        Args:
          x: floating array, channel at the layer's ``axis``.
          state: the model's ``eqx.nn.State``.
          mask: boolean, as ``jbn.batchnorm``'s: False positions enter no statistic.
          key: ignored, as by Equinox's layers without randomness.
          inference: overrides the layer's mode for this call.

        Returns:
          ``(y, state)``.
        """
        del key
        if inference is None:
            inference = self.inference
        y, new = batchnorm(self.params, self.layer_state(state), x, not inference, mask=mask,
                           **dict(self.keywords))
        # Only training changes the state; setting it would also invalidate the caller's.
        if self.state_index is not None and not inference:
            state = state.set(self.state_index, new)
        return y, state

    @property
    def params(self) -> Params:
        """``{"weight", "bias"}``, or ``{}``: the layer's jbn params."""
        return {} if self.weight is None else {"weight": self.weight, "bias": self.bias}

    def layer_state(self, state: eqx.nn.State) -> State:
        """The layer's jbn state, from the model's ``eqx.nn.State``: ``{}`` without running
        statistics."""
        return {} if self.state_index is None else state.get(self.state_index)


def get_layers(model: Any, state: eqx.nn.State) -> tuple[dict[str, Params], dict[str, State]]:
    """Every ``jbn.equinox.BatchNorm`` of ``model`` as jbn ``(params, state)``, by path.

    Paths join field names and sequence indices with dots (``"layers.0.bn"``; ``""`` for
    ``model`` itself): a model that mirrors a PyTorch module's names has PyTorch's paths, so
    ``jbn.to_torch_model(*get_layers(model, state))`` gives its batch norms' state_dict
    entries.

    Args:
      model: an Equinox module (any pytree).
      state: its ``eqx.nn.State``.

    Returns:
      ``(params, layer_states)``: path → ``{"weight", "bias"}`` or ``{}``, path → the
      running state or ``{}``, as ``jbn.from_torch_model`` returns them.
    """
    layers = _layers(model)
    return ({path: layer.params for path, layer in layers.items()},
            {path: layer.layer_state(state) for path, layer in layers.items()})


def set_layers(
    model: Any,
    state: eqx.nn.State,
    params: dict[str, Params],
    layer_states: dict[str, State],
) -> tuple[Any, eqx.nn.State]:
    """``model`` and ``state`` with jbn ``(params, state)`` loaded into its batch norms.

    The inverse of ``get_layers``; with ``jbn.from_torch_model`` it loads a PyTorch model's
    batch norms.

    Args:
      model: an Equinox module (any pytree).
      state: its ``eqx.nn.State``; do not use it afterwards (Equinox invalidates it).
      params, layer_states: path → the layer's ``{"weight", "bias"}`` / running state, for
        every batch norm of the model and no other path.

    Returns:
      ``(model, state)``, updated.

    Raises:
      ValueError: for paths missing from or unknown to the model, and for a layer's arrays
        whose keys, shapes or dtypes differ from those it was built with (build it with
        ``dtype`` matching, e.g. float64 for a float64 PyTorch model).
    """
    layers = _layers(model)
    check_loadable({path: (layer.params, layer.layer_state(state))
                    for path, layer in layers.items()}, params, layer_states, "layer_states")
    for path, layer in layers.items():
        if layer.state_index is not None:
            state = state.set(layer.state_index, layer_states[path])

    def load(keys, leaf):
        if not isinstance(leaf, BatchNorm) or leaf.weight is None:
            return leaf
        new = params[dotted(keys)]
        return eqx.tree_at(lambda layer: (layer.weight, layer.bias), leaf,
                           (new["weight"], new["bias"]))

    return jax.tree_util.tree_map_with_path(load, model, is_leaf=_is_layer), state


def _is_layer(node: Any) -> bool:
    return isinstance(node, BatchNorm)


def _layers(model: Any) -> dict[str, BatchNorm]:
    return {dotted(keys): leaf
            for keys, leaf in jax.tree_util.tree_leaves_with_path(model, is_leaf=_is_layer)
            if _is_layer(leaf)}
