"""jbn's batch norm as a Flax NNX layer, and whole NNX models' batch norms in and out.

``from jbn.nnx import BatchNorm`` imports Flax; ``import jbn`` does not.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, Literal

import jax.numpy as jnp
from jax import Array
from jax.typing import ArrayLike, DTypeLike

from jbn import _layer, _parse, _running_stats
from jbn._batchnorm import Params, State, init
from jbn.interop.folding import fold_into

nnx = _layer.framework("flax.nnx", __name__, "Flax NNX", "flax")

__all__ = ["BatchNorm", "Folded", "fold_model", "get_layers", "set_layers"]


class BatchNorm(nnx.Module):
    """``jbn.batchnorm`` as an NNX module: PyTorch's batch norm with ``nnx.BatchNorm``'s
    arguments and conventions, state kept by NNX.

    .. math:: y = \\frac{x - \\mathrm{E}[x]}{\\sqrt{\\mathrm{Var}[x] + \\epsilon}}\\, w + b

    In training (``use_running_average=False``, ``model.train()``) the batch's statistics
    normalize and ``running ← (1 − momentum)·running + momentum·batch`` with the unbiased
    batch variance, ``num_batches_tracked += 1``; in eval (``use_running_average=True``,
    ``model.eval()``, ``nnx.view(model, use_running_average=True)``) the running
    statistics normalize, or the batch's own without running statistics. ``mode`` changes
    that as ``jbn.batchnorm``'s does: ``"untracked"`` normalizes with the batch in both and
    leaves the state, ``"frozen"`` with the running statistics in both, its weight and bias
    then ``nnx.BatchStat`` constants that an optimizer over ``nnx.Param`` leaves alone.
    Everything is ``jbn.batchnorm``'s, which this calls.

    Attributes ``weight``, ``bias`` (``nnx.Param``) and ``running_mean``, ``running_var``,
    ``num_batches_tracked`` (``nnx.BatchStat``) have PyTorch's names; those the layer was
    built without are None. The arguments are attributes too: change ``momentum`` or
    ``renorm`` between steps, or pass them per call.

    Args:
      num_features: C, the number of channels.
      use_running_average: the phase, switched by ``train()``/``eval()``/``nnx.view``.
      axis: the channel axis, -1 as ``nnx.BatchNorm`` (NHWC after ``nnx.Conv``).
      momentum: the weight of the *new batch* (PyTorch's convention, default 0.1), or None
        for the cumulative average: ``nnx.BatchNorm``'s 0.99 is 0.01 here.
      epsilon: added to the variance.
      dtype: the dtype ``x`` is cast to and ``y`` has; None keeps ``x``'s (Flax promotes
        ``x`` with the float32 statistics instead, so that a bfloat16 ``x`` gives a float32
        ``y`` there).
      param_dtype: the dtype of ``weight`` and ``bias``. The running statistics are float32,
        or float64 for float64 params.
      use_bias, use_scale: whether there is a ``bias``, a ``weight``; a bias without a
        weight is not supported.
      axis_name, axis_index_groups: the mapped axes whose devices or examples share the
        statistics, as ``jbn.batchnorm``'s.
      track_running_stats: whether there are running statistics (PyTorch's argument).
      mode: ``"tracked"``, ``"untracked"`` or ``"frozen"``, as ``jbn.batchnorm``'s.
      renorm: None or ``(rmax, dmax)``: batch renormalization, numbers or arrays.
      virtual_batch_size: None or k: ghost batch norm.
      group_size: None or k: statistics per group of k devices along ``axis_name``.
      accumulation_steps, accumulation_pooling: None or k: the running statistics learn
        once every k training calls, from the statistics of all k micro-batches (pooled as
        ``accumulation_pooling`` says); the layer then also holds ``accumulator``
        (``nnx.BatchStat``). As ``jbn.batchnorm``'s.
      activation, activation_param: None, or ``"identity"``, ``"relu"``, ``"leaky_relu"``
        (its negative slope, 0.01 by default) or ``"elu"`` (its alpha, 1.0): the layer
        returns ``act(y + residual)``, fused as ``jbn.batchnorm``'s.
      rngs: ignored (nothing is random here), so that ``nnx.BatchNorm``'s call site works.

    Raises:
      TypeError, ValueError: as ``jbn.batchnorm`` for its options, when the layer is built;
        for ``use_bias=True`` with ``use_scale=False``; for ``eps`` (the layer takes
        ``epsilon``).

    Flax: ``nnx.BatchNorm`` with ``momentum = 1 − jbn momentum``, but an unbiased running
    variance (n/(n − 1) times Flax's) and the cumulative average for ``momentum=None``.
    PyTorch: ``torch.nn.BatchNorm{1,2,3}d(num_features, eps=epsilon, momentum=...,
    affine=use_scale, track_running_stats=..., bias=use_bias)`` with ``axis=1``;
    ``mode="frozen"``: torchvision's ``FrozenBatchNorm2d``.
    """

    @_layer.other_names({"eps": "epsilon"}, like="nnx.BatchNorm")
    def __init__(
        self,
        num_features: int,
        *,
        use_running_average: bool = False,
        axis: int = -1,
        momentum: float | None = 0.1,
        epsilon: float = 1e-5,
        dtype: DTypeLike | None = None,
        param_dtype: DTypeLike = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        axis_name: Hashable | tuple[Hashable, ...] | None = None,
        axis_index_groups: Sequence[Sequence[int]] | None = None,
        track_running_stats: bool = True,
        mode: Literal["tracked", "untracked", "frozen"] = "tracked",
        renorm: tuple[ArrayLike, ArrayLike] | None = None,
        virtual_batch_size: int | None = None,
        group_size: int | None = None,
        accumulation_steps: int | None = None,
        accumulation_pooling: Literal["union", "micro-batches"] = "union",
        activation: Literal["identity", "relu", "leaky_relu", "elu"] | None = None,
        activation_param: float | None = None,
        rngs: nnx.Rngs | None = None,
    ):
        del rngs
        layer_options = _layer.options(
            mode=mode, momentum=momentum, eps=epsilon, axis=axis, axis_name=axis_name,
            axis_index_groups=axis_index_groups, group_size=group_size, renorm=renorm,
            virtual_batch_size=virtual_batch_size, accumulation_steps=accumulation_steps,
            accumulation_pooling=accumulation_pooling, activation=activation,
            activation_param=activation_param)
        _layer.check_scale_and_bias(use_scale, use_bias)
        params, state = init(num_features, affine=use_scale, bias=use_bias,
                             track_running_stats=track_running_stats, dtype=param_dtype,
                             accumulation_steps=accumulation_steps)
        # A frozen layer's weight and bias are constants, as FrozenBatchNorm2d's buffers, and
        # it counts no batches.
        trainable = nnx.BatchStat if mode == "frozen" else nnx.Param
        if mode == "frozen":
            state.pop("num_batches_tracked", None)
        for name in _parse.PARAM_KEYS:
            setattr(self, name, trainable(params[name]) if name in params else nnx.data(None))
        for name in _parse.LAYER_STATE_KEYS:
            setattr(self, name, nnx.BatchStat(state[name]) if name in state else nnx.data(None))
        self.use_running_average = use_running_average
        self.epsilon = epsilon
        self.dtype = dtype
        # renorm's arrays may be traced: a schedule does not recompile.
        layer_options["renorm"] = nnx.data(renorm)
        for name, value in layer_options.items():
            setattr(self, name, value)

    def __call__(
        self,
        x: Array,
        use_running_average: bool | None = None,
        *,
        mask: Array | None = None,
        momentum: float | None = _layer.LAYER,
        renorm: tuple[ArrayLike, ArrayLike] | None = _layer.LAYER,
        statistics: Mapping[str, Array] | None = None,
        residual: Array | None = None,
    ) -> Array:
        """Normalizes ``x``; where the running statistics learn, updates them in place.

        Args:
          x: floating array, channel at the layer's ``axis``.
          use_running_average: overrides the layer's phase for this call.
          mask: boolean, as ``jbn.batchnorm``'s: False positions enter no statistic.
          momentum, renorm: override the layer's for this call (a ``renorm`` schedule of
            traced values under ``nnx.jit`` compiles once).
          statistics: None, or ``{"mean", "var"}`` (``jbn.batch_statistics``'s) that
            normalize in place of the batch's own, as ``jbn.batchnorm``'s.
          residual: None, or an array of ``x``'s shape added to the normalized ``x``
            before the layer's activation, as ``jbn.batchnorm``'s.

        Returns:
          ``y``, of the shape of ``x`` and the layer's ``dtype`` (``x``'s by default).
        """
        if use_running_average is None:
            use_running_average = self.use_running_average
        if self.dtype is not None:
            x = jnp.asarray(x, self.dtype)
            residual = None if residual is None else jnp.asarray(residual, self.dtype)
        state = self.state
        y, new_state = _layer.forward(self, self.params, state, x, not use_running_average,
                                      eps=self.epsilon, mask=mask, momentum=momentum,
                                      renorm=renorm, statistics=statistics,
                                      residual=residual)
        if new_state is not state:  # only an update: writing would add outputs to a trace
            for name, value in new_state.items():
                getattr(self, name).set_value(value)
        return y

    @property
    def params(self) -> Params:
        """``{"weight", "bias"}`` as arrays, ``{"weight"}``, or ``{}``: the layer's jbn
        params (constants in a frozen layer)."""
        return {name: getattr(self, name)[...] for name in _parse.PARAM_KEYS
                if getattr(self, name) is not None}

    @property
    def state(self) -> State:
        """``{"running_mean", "running_var", "num_batches_tracked"}`` as arrays (without the
        count in a frozen layer; with ``"accumulator"`` where it accumulates), or ``{}``."""
        return {name: getattr(self, name).get_value() for name in _parse.LAYER_STATE_KEYS
                if getattr(self, name) is not None}

    def set_view(self, use_running_average: bool | None = None):
        """Sets the phase for ``nnx.view(model, use_running_average=...)``."""
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
    _layer.check_loadable({path: (layer.params, layer.state) for path, layer in layers.items()},
                          params, state, "state")
    for path, layer in layers.items():
        for name, value in {**params[path], **state[path]}.items():
            getattr(layer, name).set_value(value)


class Folded(nnx.Module):
    """Where ``fold_model`` folded a batch norm into the layer before it: returns ``x``, or
    the batch norm's activation of ``x + residual`` where it had one, whatever else the call
    passes (``use_running_average``, ``mask``...)."""

    def __init__(self, activation: str | None = None, activation_param: float | None = None):
        self.activation, self.activation_param = activation, activation_param

    def __call__(self, x: Array, *args: Any, residual: Array | None = None,
                 **kwargs: Any) -> Array:
        """Returns ``activation(x + residual)``: ``x`` without either."""
        del args, kwargs
        return _layer.after_folding(self, x, residual)


def fold_model(
    model: nnx.Module,
    x: Any,
    *,
    forward: Callable[[nnx.Module, Any], Any] | None = None,
) -> tuple[nnx.Module, _layer.FoldReport]:
    """A copy of ``model`` for inference, each ``jbn.nnx.BatchNorm`` that directly follows an
    ``nnx.Conv`` or ``nnx.Linear`` folded into it (``jbn.fold_into``) and replaced by
    ``Folded``. Which batch norm follows which layer is seen by tracing ``forward`` once; the
    guide *Folding* says what folds and what stays.

    Args:
      model: an NNX module; it is left as it is.
      x: an input to run the model on, in eval mode.
      forward: ``forward(model, x)`` returns the model's output (any pytree of arrays);
        ``model(x)`` by default. Traced once (``nnx.eval_shape``) and run twice: pass it
        jitted (``nnx.jit``) to run compiled.

    Returns:
      ``(folded, report)``: the folded copy, in eval mode, and its ``FoldReport``.

    PyTorch: ``torch.ao.quantization.fuse_modules``, which folds the same pairs.
    """
    forward = forward or (lambda model, x: model(x))
    reference = nnx.clone(model)
    reference.eval()
    recording = _layer.Recording()
    recorded = nnx.clone(reference)
    for keys, module in _foldable(recorded):
        _replace(recorded, keys, _Recorded(module, _running_stats.dotted(keys), recording))
    nnx.eval_shape(forward, recorded, x)  # tracing is all the recording needs
    pairs, left = recording.plan({
        path: functools.partial(_layer.why_unfoldable, bool(layer.state), layer.mode, layer.axis,
                                channel_axis=-1)
        for path, layer in _layers(reference).items()})
    folded = nnx.clone(reference)
    modules = {_running_stats.dotted(keys): (keys, module) for keys, module in _foldable(folded)}
    for layer_path, batchnorm_path in pairs:
        layer = modules[layer_path][1]
        keys, batchnorm = modules[batchnorm_path]
        kernel, bias = fold_into(layer.kernel[...],
                                 None if layer.bias is None else layer.bias[...],
                                 batchnorm.params, batchnorm.state,
                                 layout="s" * (layer.kernel.ndim - 2) + "io",
                                 eps=batchnorm.epsilon)
        layer.kernel[...] = kernel
        if layer.bias is None:
            layer.bias, layer.use_bias = nnx.Param(bias), True
        else:
            layer.bias[...] = bias
        _replace(folded, keys, Folded(batchnorm.activation, batchnorm.activation_param))
    difference = _layer.max_difference(forward(reference, x), forward(folded, x))
    return folded, _layer.FoldReport(pairs, left, difference)


class _Recorded(nnx.Module):
    """A layer of the model, run as it is, whose call ``fold_model`` records."""

    def __init__(self, layer: nnx.Module, path: str, recording: _layer.Recording):
        self.layer, self.path, self.recording = layer, path, recording

    def __call__(self, x, *args, **kwargs):
        return self.recording.run(self.path, self.layer, isinstance(self.layer, BatchNorm), x,
                                  args, kwargs)


def _foldable(model: nnx.Module) -> list[tuple[tuple, nnx.Module]]:
    """The Conv, Linear and jbn batch norm modules of ``model``, with their key paths."""
    return [(keys, module) for keys, module in nnx.iter_modules(model)
            if isinstance(module, (nnx.Conv, nnx.Linear, BatchNorm))]


def _replace(model: nnx.Module, keys: tuple, new: nnx.Module) -> None:
    """Puts ``new`` where ``keys`` lead in ``model``: through attributes, list indices or
    dict keys."""
    def attribute(node, key):
        return isinstance(key, str) and hasattr(node, key)

    parent = model
    for key in keys[:-1]:
        parent = getattr(parent, key) if attribute(parent, key) else parent[key]
    if attribute(parent, keys[-1]):
        setattr(parent, keys[-1], new)
    else:
        parent[keys[-1]] = new


def _layers(model: nnx.Module) -> dict[str, BatchNorm]:
    return {_running_stats.dotted(path): module for path, module in nnx.iter_modules(model)
            if isinstance(module, BatchNorm)}
