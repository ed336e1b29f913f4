"""jbn's batch norm as a Flax NNX layer, and whole NNX models' batch norms in and out.

``from jbn.nnx import BatchNorm`` imports Flax; ``import jbn`` does not.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from jax import Array
from jax.typing import DTypeLike

from jbn._batchnorm import Params, State, batchnorm, init
from jbn._layers import check_loadable, dotted, layer_keywords

try:
    from flax import nnx
except ModuleNotFoundError as error:
    if error.name != "flax":
        raise
    raise ModuleNotFoundError(f"{__name__} is jbn's layer for Flax NNX, which is not "
                              "installed: pip install 'jbn[flax]'", name=error.name) from error

__all__ = ["BatchNorm", "get_layers", "set_layers"]


class BatchNorm(nnx.Module):
    """``jbn.batchnorm`` as an NNX module: PyTorch's batch norm, state kept by NNX.

    .. math:: y = \\frac{x - \\mathrm{E}[x]}{\\sqrt{\\mathrm{Var}[x] + \\epsilon}}\\, w + b

    In training (``use_running_average=False``, ``model.train()``) the batch's statistics
    normalize and ``running ← (1 − momentum)·running + momentum·batch`` with the unbiased
    batch variance, ``num_batches_tracked += 1``; in eval (``use_running_average=True``,
    ``model.eval()``, ``nnx.view(model, use_running_average=True)``) the running
    statistics normalize, or the batch's own without running statistics. Everything is
    ``jbn.batchnorm``'s, which this calls.

    Attributes ``weight``, ``bias`` (``nnx.Param``) and ``running_mean``, ``running_var``,
    ``num_batches_tracked`` (``nnx.BatchStat``) have PyTorch's names; those the layer was
    built without are None.

    Args:
      num_features: C, the number of channels.
      affine: whether there are a learnable ``weight`` and ``bias``.
      track_running_stats: whether there are running statistics for eval mode.
      dtype: floating dtype of the parameters and running statistics.
      use_running_average: the mode, switched by ``train()``/``eval()``/``nnx.view``.
      **keywords: ``jbn.batchnorm``'s keywords, passed on to each call: ``momentum``
        (0.1, PyTorch's convention), ``eps`` (1e-5), ``axis`` (1: channels first, unlike
        ``nnx.BatchNorm``'s -1), ``axis_name``, ``axis_index_groups``, ``renorm``,
        ``virtual_batch_size``.

    Raises:
      TypeError: for a keyword ``jbn.batchnorm`` does not have; bad values raise when the
        layer is called, as ``jbn.batchnorm`` does.

    PyTorch: ``torch.nn.BatchNorm{1,2,3}d(num_features, affine=..., track_running_stats=...,
    momentum=..., eps=...)``. Flax: ``nnx.BatchNorm`` with ``momentum = 1 − jbn momentum``,
    but a biased running variance and no cumulative average.
    """

    def __init__(
        self,
        num_features: int,
        *,
        affine: bool = True,
        track_running_stats: bool = True,
        dtype: DTypeLike = jnp.float32,
        use_running_average: bool = False,
        **keywords: Any,
    ):
        self.keywords = layer_keywords("jbn.nnx.BatchNorm", keywords)
        params, state = init(num_features, affine=affine,
                             track_running_stats=track_running_stats, dtype=dtype)
        for name in ("weight", "bias"):
            setattr(self, name, nnx.Param(params[name]) if params else nnx.data(None))
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            setattr(self, name, nnx.BatchStat(state[name]) if state else nnx.data(None))
        self.use_running_average = use_running_average

    def __call__(
        self, x: Array, use_running_average: bool | None = None, *, mask: Array | None = None
    ) -> Array:
        """Normalizes ``x``; in training, updates the running statistics in place.

        Args:
          x: floating array, channel at the layer's ``axis``.
          use_running_average: overrides the layer's mode for this call.
          mask: boolean, as ``jbn.batchnorm``'s: False positions enter no statistic.

        Returns:
          ``y``, of the shape and dtype of ``x``.
        """
        if use_running_average is None:
            use_running_average = self.use_running_average
        y, state = batchnorm(self.params, self.state, x, not use_running_average, mask=mask,
                             **dict(self.keywords))
        if not use_running_average:  # only training changes the state
            for name, value in state.items():
                getattr(self, name)[...] = value
        return y

    @property
    def params(self) -> Params:
        """``{"weight", "bias"}`` as arrays, or ``{}``: the layer's jbn params."""
        return {} if self.weight is None else {"weight": self.weight[...],
                                               "bias": self.bias[...]}

    @property
    def state(self) -> State:
        """``{"running_mean", "running_var", "num_batches_tracked"}`` as arrays, or ``{}``."""
        if self.running_mean is None:
            return {}
        return {name: getattr(self, name)[...]
                for name in ("running_mean", "running_var", "num_batches_tracked")}

    def set_view(self, use_running_average: bool | None = None):
        """Sets the mode for ``nnx.view(model, use_running_average=...)``."""
        if use_running_average is not None:
            self.use_running_average = use_running_average


def get_layers(model: nnx.Module) -> tuple[dict[str, Params], dict[str, State]]:
    """Every ``jbn.nnx.BatchNorm`` of ``model`` as jbn ``(params, state)``, by path.

    Paths join the attribute names and list indices with dots (``"layers.0.bn"``; ``""`` for
    ``model`` itself): a model that mirrors a PyTorch module's names has PyTorch's paths, so
    ``jbn.to_torch_model(*get_layers(model))`` gives its batch norms' state_dict entries.

    Args:
      model: an NNX module.

    Returns:
      ``(params, state)``: path → ``{"weight", "bias"}`` or ``{}``, path → the running
      state or ``{}``, as ``jbn.from_torch_model`` returns them.
    """
    layers = _layers(model)
    return ({path: layer.params for path, layer in layers.items()},
            {path: layer.state for path, layer in layers.items()})


def set_layers(model: nnx.Module, params: dict[str, Params], state: dict[str, State]) -> None:
    """Loads jbn ``(params, state)`` by path into every ``jbn.nnx.BatchNorm`` of ``model``.

    The inverse of ``get_layers``, in place like ``nnx.update``; with
    ``jbn.from_torch_model`` it loads a PyTorch model's batch norms.

    Args:
      model: an NNX module.
      params, state: path → the layer's ``{"weight", "bias"}`` / running state, for every
        batch norm of the model and no other path.

    Raises:
      ValueError: for paths missing from or unknown to the model, and for a layer's arrays
        whose keys, shapes or dtypes differ from those it was built with (build it with
        ``dtype`` matching, e.g. float64 for a float64 PyTorch model).
    """
    layers = _layers(model)
    check_loadable({path: (layer.params, layer.state) for path, layer in layers.items()},
                   params, state, "state")
    for path, layer in layers.items():
        for name, value in {**params[path], **state[path]}.items():
            getattr(layer, name)[...] = value


def _layers(model: nnx.Module) -> dict[str, BatchNorm]:
    return {dotted(path): module for path, module in nnx.iter_modules(model)
            if isinstance(module, BatchNorm)}
