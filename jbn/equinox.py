"""jbn's batch norm as an Equinox layer, and whole Equinox models' batch norms in and out.

``from jbn.equinox import BatchNorm`` imports Equinox; ``import jbn`` does not.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax import Array
from jax.typing import ArrayLike, DTypeLike

from jbn import _layer, _parse, _running_stats
from jbn._batchnorm import Params, State, init
from jbn.interop.folding import fold_into

eqx = _layer.framework("equinox", __name__, "Equinox", "equinox")

__all__ = ["BatchNorm", "Folded", "fold_model", "get_layers", "set_layers"]


class BatchNorm(eqx.nn.StatefulLayer):
    """``jbn.batchnorm`` as an Equinox layer: PyTorch's batch norm with
    ``eqx.nn.BatchNorm``'s arguments and conventions, state in ``eqx.nn.State``.

    .. math:: y = \\frac{x - \\mathrm{E}[x]}{\\sqrt{\\mathrm{Var}[x] + \\epsilon}}\\, w + b

    As ``eqx.nn.BatchNorm``, the layer sees one example ``(C, ...)``, channel axis 0, the
    batch being a ``jax.vmap`` (or ``pmap``) axis named ``axis_name``. In training
    (``inference=False``) the batch's statistics normalize and
    ``running ← (1 − momentum)·running + momentum·batch`` with the unbiased batch variance,
    ``num_batches_tracked += 1``; in inference (``eqx.nn.inference_mode(model)``) the
    running statistics normalize, which needs no bound axis: a model runs on one example,
    or under ``jax.vmap`` without ``axis_name``. ``mode`` changes that as
    ``jbn.batchnorm``'s does: ``"untracked"`` normalizes with the batch in both and leaves
    the state, ``"frozen"`` with the running statistics in both, its weight and bias then
    kept in the ``eqx.nn.State`` (the fields are None), out of reach of
    ``eqx.filter(model, eqx.is_inexact_array)``. Everything is ``jbn.batchnorm``'s, which
    this calls. Called on a whole batch ``(N, C, ...)`` instead, it takes ``axis=1`` and
    ``axis_name=None``.

    Fields ``weight``, ``bias`` (None without them, or when frozen) and the state
    ``{"running_mean", "running_var", "num_batches_tracked"}`` have PyTorch's names; build
    with ``eqx.nn.make_with_state(BatchNorm)(C, "batch", ...)`` for the initial
    ``eqx.nn.State``.

    Args:
      input_size: C, the number of channels.
      axis_name: the name of the mapped batch axis, as ``eqx.nn.BatchNorm``'s (a tuple for
        several); None only for a whole batch (``axis`` ≠ 0) or a frozen layer.
      eps: added to the variance.
      channelwise_affine: whether there are a learnable ``weight`` and ``bias``.
      momentum: the weight of the *new batch* (PyTorch's convention, default 0.1), or None
        for the cumulative average: ``eqx.nn.BatchNorm``'s 0.99 is 0.01 here.
      inference: the phase, switched by ``eqx.nn.inference_mode``.
      dtype: the dtype of ``weight`` and ``bias`` (Equinox's meaning; float64 with
        ``jax_enable_x64``, float32 otherwise). The running statistics are float32, or
        float64 for float64 params; ``y`` has ``x``'s dtype.
      axis: the channel axis: 0 for one example, 1 for a whole batch ``(N, C, ...)``.
      use_bias: with ``channelwise_affine``, whether there is a ``bias`` (PyTorch's
        ``bias``).
      track_running_stats: whether there are running statistics (PyTorch's argument).
      mode: ``"tracked"``, ``"untracked"`` or ``"frozen"``, as ``jbn.batchnorm``'s.
      axis_index_groups, renorm, virtual_batch_size: as ``jbn.batchnorm``'s; ``renorm``
        may hold arrays, which are traced under ``eqx.filter_jit``.
      group_size: None or k: statistics per group of k examples (or devices) along
        ``axis_name``.
      accumulation_steps, accumulation_pooling: None or k: the running statistics learn
        once every k training calls, from the statistics of all k micro-batches (pooled as
        ``accumulation_pooling`` says); the state then also holds ``"accumulator"``. As
        ``jbn.batchnorm``'s.
      activation, activation_param: as ``jbn.batchnorm``'s: ``act(y + residual)``, fused.

    Raises:
      TypeError, ValueError: as ``jbn.batchnorm`` for its options, when the layer is built;
        for ``axis=0`` without ``axis_name`` (one example alone has no batch to take
        statistics over); for ``epsilon`` (the layer takes ``eps``).

    Equinox: ``eqx.nn.BatchNorm(mode="batch")`` with ``momentum = 1 − jbn momentum``, but an
    unbiased running variance (n/(n − 1) times Equinox's) and no debiasing at inference
    (PyTorch's running statistics, from 0 and 1). PyTorch: ``torch.nn.BatchNorm{1,2,3}d``;
    ``mode="frozen"``: torchvision's ``FrozenBatchNorm2d``.
    """

    weight: Array | None
    bias: Array | None
    state_index: eqx.nn.StateIndex | None
    inference: bool
    renorm: tuple[ArrayLike, ArrayLike] | None  # arrays here are traced: no recompiling
    input_size: int = eqx.field(static=True)
    axis_name: Hashable | tuple[Hashable, ...] | None = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    momentum: float | None = eqx.field(static=True)
    axis: int = eqx.field(static=True)
    mode: str = eqx.field(static=True)
    axis_index_groups: tuple[tuple[int, ...], ...] | None = eqx.field(static=True)
    virtual_batch_size: int | None = eqx.field(static=True)
    group_size: int | None = eqx.field(static=True)
    accumulation_steps: int | None = eqx.field(static=True)
    accumulation_pooling: str = eqx.field(static=True)
    activation: str | None = eqx.field(static=True)
    activation_param: float | None = eqx.field(static=True)

    @_layer.other_names({"epsilon": "eps"}, like="eqx.nn.BatchNorm")
    def __init__(
        self,
        input_size: int,
        axis_name: Hashable | Sequence[Hashable] | None = None,
        eps: float = 1e-5,
        channelwise_affine: bool = True,
        momentum: float | None = 0.1,
        inference: bool = False,
        dtype: DTypeLike | None = None,
        *,
        axis: int = 0,
        use_bias: bool = True,
        track_running_stats: bool = True,
        mode: Literal["tracked", "untracked", "frozen"] = "tracked",
        activation: Literal["identity", "relu", "leaky_relu", "elu"] | None = None,
        activation_param: float | None = None,
        axis_index_groups: Sequence[Sequence[int]] | None = None,
        renorm: tuple[ArrayLike, ArrayLike] | None = None,
        virtual_batch_size: int | None = None,
        group_size: int | None = None,
        accumulation_steps: int | None = None,
        accumulation_pooling: Literal["union", "micro-batches"] = "union",
    ):
        layer_options = _layer.options(
            mode=mode, momentum=momentum, eps=eps, axis=axis, axis_name=axis_name,
            axis_index_groups=axis_index_groups, group_size=group_size, renorm=renorm,
            virtual_batch_size=virtual_batch_size, accumulation_steps=accumulation_steps,
            accumulation_pooling=accumulation_pooling, activation=activation,
            activation_param=activation_param, mode_hint=dict.fromkeys(
                ("ema", "batch"), "eqx.nn.BatchNorm's mode chooses how it averages, where jbn "
                "averages as PyTorch does; leave mode out"))
        if axis_name is None and axis == 0 and mode != "frozen":
            raise ValueError(
                "axis=0 is the channel axis of one example, whose batch is a jax.vmap axis: "
                "name it (axis_name='batch', as eqx.nn.BatchNorm takes it), or pass axis=1 to "
                "call the layer on a whole batch (N, C, ...)")
        params, state = init(input_size, affine=channelwise_affine, bias=use_bias,
                             track_running_stats=track_running_stats,
                             dtype=jnp.result_type(float) if dtype is None else dtype,
                             accumulation_steps=accumulation_steps)
        if mode == "frozen":
            # Weight and bias are constants, as FrozenBatchNorm2d's buffers: in the state,
            # where no filter for trainable arrays finds them; and no batch count.
            state = {**params, **state}
            state.pop("num_batches_tracked", None)
            params = {}
        self.weight, self.bias = params.get("weight"), params.get("bias")
        self.state_index = eqx.nn.StateIndex(state) if state else None
        self.inference = inference
        self.input_size = input_size
        self.eps = eps
        for name, value in layer_options.items():
            setattr(self, name, value)

    def __call__(
        self,
        x: Array,
        state: eqx.nn.State,
        *,
        key: Any = None,
        inference: bool | None = None,
        mask: Array | None = None,
        residual: Array | None = None,
        momentum: float | None = _layer.LAYER,
        renorm: tuple[ArrayLike, ArrayLike] | None = _layer.LAYER,
        statistics: Mapping[str, Array] | None = None,
    ) -> tuple[Array, eqx.nn.State]:
        """Normalizes ``x``, and where the running statistics learn returns the state with
        new ones.

        Args:
          x: floating array, channel at the layer's ``axis``: ``(C, ...)`` by default.
          state: the model's ``eqx.nn.State``.
          key: ignored, as by Equinox's layers without randomness.
          inference: overrides the layer's phase for this call.
          mask: boolean, as ``jbn.batchnorm``'s: False positions enter no statistic (under
            ``vmap``, each example's mask is a scalar or its non-channel shape).
          momentum, renorm: override the layer's for this call (a ``renorm`` schedule of
            traced values under ``eqx.filter_jit`` compiles once).
          statistics, residual: as ``jbn.batchnorm``'s: None, or ``{"mean", "var"}`` to
            normalize with in place of the batch's own; None, or an array of ``x``'s shape
            added to the normalized ``x`` before the layer's activation.

        Returns:
          ``(y, state)``.
        """
        del key
        if inference is None:
            inference = self.inference
        layer_state = self.layer_state(state)
        y, new = _layer.forward(self, self.layer_params(state), layer_state, x, not inference,
                                eps=self.eps, mask=mask, momentum=momentum, renorm=renorm,
                                statistics=statistics, residual=residual)
        # Only an update changes the state; setting it would also invalidate the caller's.
        if new is not layer_state:
            state = state.set(self.state_index, new)
        return y, state

    def layer_params(self, state: eqx.nn.State) -> Params:
        """``{"weight", "bias"}``, ``{"weight"}`` or ``{}``: the layer's jbn params, from its
        fields, or from the model's ``eqx.nn.State`` for a frozen layer."""
        if self.mode == "frozen" and self.state_index is not None:
            return {name: value for name, value in state.get(self.state_index).items()
                    if name in _parse.PARAM_KEYS}
        return {name: getattr(self, name) for name in _parse.PARAM_KEYS
                if getattr(self, name) is not None}

    def layer_state(self, state: eqx.nn.State) -> State:
        """The layer's jbn state, from the model's ``eqx.nn.State``: ``{}`` without running
        statistics, and without ``num_batches_tracked`` for a frozen layer."""
        if self.state_index is None:
            return {}
        return {name: value for name, value in state.get(self.state_index).items()
                if name in _parse.LAYER_STATE_KEYS}


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
    return ({path: layer.layer_params(state) for path, layer in layers.items()},
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
    _layer.check_loadable({path: (layer.layer_params(state), layer.layer_state(state))
                           for path, layer in layers.items()}, params, layer_states,
                          "layer_states")
    for path, layer in layers.items():
        if layer.state_index is not None:
            frozen = params[path] if layer.mode == "frozen" else {}
            state = state.set(layer.state_index, {**frozen, **layer_states[path]})

    def load(keys, leaf):
        if not isinstance(leaf, BatchNorm) or leaf.weight is None:
            return leaf
        new = params[_running_stats.dotted(keys)]
        names = [name for name in _parse.PARAM_KEYS if getattr(leaf, name) is not None]
        return eqx.tree_at(lambda layer: [getattr(layer, name) for name in names], leaf,
                           [new[name] for name in names])

    return jax.tree_util.tree_map_with_path(load, model, is_leaf=_is_layer), state


class Folded(eqx.nn.StatefulLayer):
    """Where ``fold_model`` folded a batch norm into the layer before it: returns ``x``, or
    the batch norm's activation of ``x + residual`` where it had one, and the state
    unchanged, whatever else the call passes (``inference``, ``mask``...)."""

    activation: str | None = eqx.field(static=True, default=None)
    activation_param: float | None = eqx.field(static=True, default=None)

    def __call__(self, x: Array, state: eqx.nn.State | None = None, *args: Any,
                 residual: Array | None = None,
                 **kwargs: Any) -> tuple[Array, eqx.nn.State | None]:
        """Returns ``(activation(x + residual), state)``: ``(x, state)`` without either."""
        del args, kwargs
        return _layer.after_folding(self, x, residual), state


def fold_model(
    model: Any,
    state: eqx.nn.State,
    x: Any,
    *,
    forward: Callable[[Any, eqx.nn.State, Any], Any] | None = None,
) -> tuple[Any, _layer.FoldReport]:
    """``model`` for inference, each ``jbn.equinox.BatchNorm`` that directly follows an
    ``eqx.nn.Conv`` (1-D, 2-D, 3-D) or ``eqx.nn.Linear`` folded into it (``jbn.fold_into``)
    and replaced by ``Folded``. Which batch norm follows which layer is seen by tracing
    ``forward`` once; the guide *Folding* says what folds and what stays.

    Args:
      model: an Equinox module (any pytree).
      state: its ``eqx.nn.State``; the folded model takes the same (its folded batch norms'
        entries are no longer read).
      x: an input to run the model on, in inference mode.
      forward: ``forward(model, state, x)`` returns the model's output (any pytree of
        arrays); by default ``model(x, state)[0]``. A model of one example is run under
        ``jax.vmap`` here, with or without ``axis_name`` (inference binds none). Traced once
        (``eqx.filter_eval_shape``) and run twice: pass it jitted (``eqx.filter_jit``) to
        run compiled.

    Returns:
      ``(folded, report)``: the folded model, in inference mode, and its ``FoldReport``.

    PyTorch: ``torch.ao.quantization.fuse_modules``, which folds the same pairs.
    """
    forward = forward or (lambda model, state, x: model(x, state)[0])
    reference = eqx.nn.inference_mode(model)
    recording = _layer.Recording()
    recorded = _map_foldable(reference, lambda path, layer: _Recorded(layer, path, recording))
    eqx.filter_eval_shape(forward, recorded, state, x)  # tracing is all the recording needs
    pairs, left = recording.plan({
        path: functools.partial(_layer.why_unfoldable, bool(layer.layer_state(state)), layer.mode,
                                layer.axis, channel_axis=0)
        for path, layer in _layers(reference).items()})
    batchnorms = _layers(reference)
    following = dict(pairs)  # layer path → the batch norm folded into it

    def fold(path, node):
        if path in following.values():
            batchnorm = batchnorms[path]
            return Folded(batchnorm.activation, batchnorm.activation_param)
        if path not in following:
            return node
        batchnorm = batchnorms[following[path]]
        bias = None if node.bias is None else node.bias.reshape(-1)
        kernel, bias = fold_into(node.weight, bias, batchnorm.layer_params(state),
                                 batchnorm.layer_state(state),
                                 layout="oi" + "s" * (node.weight.ndim - 2), eps=batchnorm.eps)
        folded = copy.copy(node)
        # use_bias is a static field, which eqx.tree_at cannot change; the copy is ours.
        object.__setattr__(folded, "use_bias", True)
        object.__setattr__(folded, "weight", kernel)
        object.__setattr__(folded, "bias", bias.reshape(bias.shape + (1,) * (kernel.ndim - 2)))
        return folded

    folded = _map_foldable(reference, fold)
    difference = _layer.max_difference(forward(reference, state, x), forward(folded, state, x))
    return folded, _layer.FoldReport(pairs, left, difference)


class _Recorded(eqx.nn.StatefulLayer):
    """A layer of the model, run as it is, whose call ``fold_model`` records."""

    layer: Any
    path: str = eqx.field(static=True)
    recording: _layer.Recording = eqx.field(static=True)

    def is_stateful(self) -> bool:
        return isinstance(self.layer, BatchNorm)

    def __call__(self, x, *args, **kwargs):
        return self.recording.run(self.path, self.layer, isinstance(self.layer, BatchNorm), x,
                                  args, kwargs)


def _is_foldable(node: Any) -> bool:
    return isinstance(node, (eqx.nn.Conv, eqx.nn.Linear, BatchNorm))


def _map_foldable(model: Any, replace: Callable[[str, Any], Any]) -> Any:
    """``model`` with each Conv, Linear and jbn batch norm replaced by ``replace(path, it)``."""
    return jax.tree_util.tree_map_with_path(
        lambda keys, node: (replace(_running_stats.dotted(keys), node) if _is_foldable(node)
                            else node), model, is_leaf=_is_foldable)


def _is_layer(node: Any) -> bool:
    return isinstance(node, BatchNorm)


def _layers(model: Any) -> dict[str, BatchNorm]:
    return {_running_stats.dotted(keys): leaf
            for keys, leaf in jax.tree_util.tree_leaves_with_path(model, is_leaf=_is_layer)
            if _is_layer(leaf)}
