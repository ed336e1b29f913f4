"""jbn's batch norm as a Flax linen layer, and whole linen models' batch norms in and out.

``from jbn.linen import BatchNorm`` imports Flax; ``import jbn`` does not.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
from jax import Array
from jax.typing import ArrayLike, DTypeLike

from jbn import _layer, _parse
from jbn._batchnorm import Params, State, batchnorm, init
from jbn.interop.flax import from_flax, to_flax

nn = _layer.framework("flax.linen", __name__, "Flax linen", "flax")

__all__ = ["BatchNorm", "from_linen", "get_layers", "set_layers", "to_linen"]


class BatchNorm(nn.Module):
    """``jbn.batchnorm`` as a linen module: a drop-in for ``flax.linen.BatchNorm`` with
    PyTorch's batch norm inside.

    .. math:: y = \\frac{x - \\mathrm{E}[x]}{\\sqrt{\\mathrm{Var}[x] + \\epsilon}}\\, w + b

    In training (``use_running_average=False``) the batch's statistics normalize and
    ``running ← (1 − momentum)·running + momentum·batch`` with the unbiased batch variance,
    ``num_batches_tracked += 1``, which needs ``mutable=["batch_stats"]`` as linen's does; in
    eval the running statistics normalize. ``mode`` changes that as ``jbn.batchnorm``'s
    does (``"frozen"``: ``weight`` and ``bias`` then sit in ``batch_stats``, out of an
    optimizer's reach). ``init`` creates the variables, learns nothing and runs no
    collective (``y`` is then normalized with the initial statistics, 0 and 1), so a model
    is initialized outside ``pmap``/``shard_map``/``vmap`` as with linen.

    Variables, with PyTorch's names: ``params``: ``weight``, ``bias``; ``batch_stats``:
    ``running_mean``, ``running_var``, ``num_batches_tracked`` (and ``accumulator``), in
    float32 for params of any narrower dtype. ``from_linen`` converts the variables of a
    model trained with ``flax.linen.BatchNorm``.

    Attributes:
      use_running_average: the phase, or None to pass it per call (as linen's).
      axis: the channel axis, -1 as linen's.
      momentum: the weight of the *new batch* (PyTorch's convention, default 0.1), or None
        for the cumulative average: linen's 0.99 is 0.01 here (and warns).
      epsilon: added to the variance.
      dtype: the dtype ``x`` is cast to and ``y`` has; None keeps ``x``'s.
      param_dtype: the dtype of ``weight`` and ``bias``.
      use_bias, use_scale: whether there is a ``bias``, a ``weight``; a bias without a
        weight is not supported.
      bias_init, scale_init: their initializers, as linen's.
      axis_name, axis_index_groups: the mapped axes whose devices or examples share the
        statistics, as ``jbn.batchnorm``'s (under ``jax.jit`` too).
      track_running_stats: whether there are running statistics (PyTorch's argument).
      mode, renorm, virtual_batch_size, group_size, accumulation_steps, accumulation_pooling:
        as ``jbn.batchnorm``'s.
      activation, activation_param: None, or ``"identity"``, ``"relu"``, ``"leaky_relu"``
        (its negative slope, 0.01 by default) or ``"elu"`` (its alpha, 1.0): the layer
        returns ``act(y + residual)``, fused as ``jbn.batchnorm``'s.

    Raises:
      TypeError, ValueError: as ``jbn.batchnorm`` for its options, when the layer is built;
        for ``use_bias=True`` with ``use_scale=False``.

    Flax: ``flax.linen.BatchNorm`` with ``momentum = 1 − jbn momentum``, but an unbiased
    running variance (n/(n − 1) times linen's), the cumulative average for
    ``momentum=None``, and exact statistics (no ``use_fast_variance``). PyTorch:
    ``torch.nn.BatchNorm{1,2,3}d`` with ``axis=1``; ``mode="frozen"``: ``FrozenBatchNorm2d``.
    """

    use_running_average: bool | None = None
    axis: int = -1
    momentum: float | None = 0.1
    epsilon: float = 1e-5
    dtype: DTypeLike | None = None
    param_dtype: DTypeLike = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Callable[..., Array] = nn.initializers.zeros
    scale_init: Callable[..., Array] = nn.initializers.ones
    axis_name: Hashable | tuple[Hashable, ...] | None = None
    axis_index_groups: Sequence[Sequence[int]] | None = None
    track_running_stats: bool = True
    mode: str = "tracked"
    renorm: tuple[ArrayLike, ArrayLike] | None = None
    virtual_batch_size: int | None = None
    group_size: int | None = None
    accumulation_steps: int | None = None
    accumulation_pooling: str = "union"
    activation: str | None = None
    activation_param: float | None = None

    def __post_init__(self) -> None:
        _layer.options(**{name: getattr(self, name) for name in _layer.OPTIONS},
                       eps=self.epsilon)
        _layer.check_scale_and_bias(self.use_scale, self.use_bias)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: Array, use_running_average: bool | None = None, *,
                 mask: Array | None = None, momentum: float | None = _layer.LAYER,
                 renorm: tuple[ArrayLike, ArrayLike] | None = _layer.LAYER,
                 statistics: Mapping[str, Array] | None = None,
                 residual: Array | None = None) -> Array:
        """Normalizes ``x``; where the running statistics learn, updates ``batch_stats``.

        Args:
          x: floating array, channel at the layer's ``axis``.
          use_running_average: the phase for this call, where the layer's is None (as
            linen's ``merge_param``).
          mask: boolean, as ``jbn.batchnorm``'s: False positions enter no statistic.
          momentum, renorm: override the layer's for this call (a traced ``renorm``
            schedule compiles once).
          statistics: None, or ``{"mean", "var"}`` (``jbn.batch_statistics``'s) that
            normalize in place of the batch's own.
          residual: None, or an array of ``x``'s shape added to the normalized ``x``
            before the layer's activation, as ``jbn.batchnorm``'s.

        Returns:
          ``y``, of the shape of ``x`` and the layer's ``dtype`` (``x``'s by default).
        """
        use_running_average = nn.merge_param("use_running_average", self.use_running_average,
                                             use_running_average)
        if self.dtype is not None:
            x = jnp.asarray(x, self.dtype)
            residual = None if residual is None else jnp.asarray(residual, self.dtype)
        channels = x.shape[_parse.channel_axis_of(x, self.axis, self.axis_name)]
        params, state = self._variables(channels)
        if self.is_initializing():
            # Linen initializes outside the mapped axes: no statistic of the batch, whose
            # devices need not be bound, and nothing learned; y is normalized with the
            # statistics jbn.init starts from.
            initial = state or {"running_mean": jnp.zeros(channels),
                                "running_var": jnp.ones(channels)}
            y, _ = batchnorm(params, initial, x, False, eps=self.epsilon, axis=self.axis,
                             axis_name=self.axis_name, activation=self.activation,
                             activation_param=self.activation_param, residual=residual)
            return y
        y, new_state = _layer.forward(self, params, state, x, not use_running_average,
                                      eps=self.epsilon, mask=mask, momentum=momentum,
                                      renorm=renorm, statistics=statistics,
                                      residual=residual)
        if new_state is not state:  # only an update: needs mutable=["batch_stats"]
            for name, value in new_state.items():
                self.put_variable("batch_stats", name, value)
        return y

    def _variables(self, channels: int) -> tuple[Params, State]:
        """The layer's jbn params and state, made on first use: ``weight`` and ``bias`` from
        the initializers (in ``batch_stats`` when frozen), the running state as ``jbn.init``
        makes it."""
        _, state = init(channels, affine=self.use_scale, bias=self.use_bias,
                        track_running_stats=self.track_running_stats, dtype=self.param_dtype,
                        accumulation_steps=self.accumulation_steps)
        initializers = {"weight": self.scale_init, "bias": self.bias_init}
        wanted = {"weight": self.use_scale, "bias": self.use_bias}
        if self.mode == "frozen":
            # Constants, as FrozenBatchNorm2d's buffers: out of params, and no batch count.
            state.pop("num_batches_tracked", None)
            params = {name: self.variable("batch_stats", name, lambda init=init_fn: init(
                self.make_rng("params"), (channels,), self.param_dtype)).value
                for name, init_fn in initializers.items() if wanted[name]}
        else:
            params = {name: self.param(name, init_fn, (channels,), self.param_dtype)
                      for name, init_fn in initializers.items() if wanted[name]}
        state = {name: self.variable("batch_stats", name, lambda value=value: value).value
                 for name, value in state.items()}
        return params, state



def get_layers(variables: Mapping[str, Any]) -> tuple[dict[str, Params], dict[str, State]]:
    """Every ``jbn.linen.BatchNorm`` of a model's ``variables`` as jbn ``(params, state)``,
    by path.

    Paths join the module names with dots (``"Block_0.BatchNorm_1"``): a model whose
    modules carry a PyTorch module's names (``name="bn1"``) has PyTorch's paths, so
    ``jbn.to_torch_model(*get_layers(variables))`` gives its batch norms' state_dict entries.

    Args:
      variables: a model's variables, as ``init`` returns them.

    Returns:
      ``(params, state)``: path → ``{"weight", "bias"}`` (or less), path → the running
      state, as ``jbn.from_torch_model`` returns them. A layer with neither (no affine, no
      running statistics) holds no variable and is not found.
    """
    layers = _layers(variables)
    return ({path: params for path, (params, _, _) in layers.items()},
            {path: state for path, (_, state, _) in layers.items()})


def set_layers(variables: Mapping[str, Any], params: Mapping[str, Params],
               state: Mapping[str, State]) -> dict[str, Any]:
    """``variables`` with jbn ``(params, state)`` loaded into its batch norms, by path.

    The inverse of ``get_layers``; with ``jbn.from_torch_model`` it loads a PyTorch model's
    batch norms.

    Args:
      variables: a model's variables, as ``init`` returns them.
      params, state: path → the layer's ``{"weight", "bias"}`` / running state, for every
        batch norm of the model and no other path.

    Returns:
      The variables, a new dict, with the batch norms' entries replaced.

    Raises:
      ValueError: for paths missing from or unknown to the model, and for a layer's arrays
        whose keys, shapes or dtypes differ from those it was built with.
    """
    layers = _layers(variables)
    _layer.check_loadable({path: (layer_params, layer_state)
                           for path, (layer_params, layer_state, _) in layers.items()},
                          params, state, "state")
    new = dict(variables)
    for path, (_, _, frozen) in layers.items():
        keys = path.split(".") if path else []
        stats = {**params[path], **state[path]} if frozen else dict(state[path])
        _put(new, "batch_stats", keys, stats)
        if not frozen and params[path]:
            _put(new, "params", keys, dict(params[path]))
    return new


def from_linen(variables: Mapping[str, Any]) -> dict[str, Any]:
    """The variables of a model built with ``flax.linen.BatchNorm``, for the same model
    built with ``jbn.linen.BatchNorm``: each batch norm's ``scale``, ``bias``, ``mean``,
    ``var`` as ``weight``, ``bias``, ``running_mean``, ``running_var`` and a
    ``num_batches_tracked`` of 0 (``jbn.from_flax`` on each); every other entry as it is.

    A batch norm is found by its ``batch_stats`` entry ``{"mean", "var"}``. Eval outputs
    carry over; training on averages the unbiased batch variance where linen averaged the
    biased one (``jbn.from_flax``).
    """
    new = dict(variables)
    for keys, stats in _nodes(variables.get("batch_stats", {}), {"mean", "var"}):
        flax_params = _get(variables.get("params", {}), keys)
        params, state = from_flax({"params": flax_params or {}, "batch_stats": stats})
        _put(new, "batch_stats", keys, state)
        if flax_params is not None:
            _put(new, "params", keys, params)
    return new


def to_linen(variables: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of ``from_linen``: the variables of a model built with
    ``jbn.linen.BatchNorm``, for the same model built with ``flax.linen.BatchNorm``
    (``num_batches_tracked`` dropped, ``jbn.to_flax`` on each; frozen layers' weight and
    bias go back to ``params``)."""
    new = dict(variables)
    for path, (params, state, _) in _layers(variables).items():
        keys = path.split(".") if path else []
        converted = to_flax(params, {key: state[key] for key in ("running_mean", "running_var")
                                     if key in state})
        _put(new, "batch_stats", keys, converted.get("batch_stats", {}))
        if params:
            _put(new, "params", keys, converted["params"])
    return new


# What a jbn.linen.BatchNorm keeps in each collection.
_STATS_KEYS = {*_parse.LAYER_STATE_KEYS, *_parse.PARAM_KEYS}


def _layers(variables: Mapping[str, Any]) -> dict[str, tuple[Params, State, bool]]:
    """Each layer's path → its jbn params, state, and whether it is frozen (its weight and
    bias in ``batch_stats``), found by its entries: ``running_mean`` in ``batch_stats``, or
    ``weight`` in ``params`` with nothing but jbn's keys."""
    found = {}
    for keys, stats in _nodes(variables.get("batch_stats", {}), _STATS_KEYS, "running_mean"):
        frozen = "weight" in stats
        params = ({key: stats[key] for key in _parse.PARAM_KEYS if key in stats} if frozen
                  else dict(_get(variables.get("params", {}), keys) or {}))
        found[".".join(keys)] = (params, {key: value for key, value in stats.items()
                                          if key not in _parse.PARAM_KEYS}, frozen)
    for keys, params in _nodes(variables.get("params", {}), set(_parse.PARAM_KEYS), "weight"):
        found.setdefault(".".join(keys), (dict(params), {}, False))
    return found


def _nodes(tree: Any, allowed: set[str], required: str | None = None,
           keys: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Mapping[str, Any]]]:
    """The dicts of ``tree`` whose keys lie within ``allowed`` (and include ``required``, or
    all of ``allowed``), with their key paths; nothing below them."""
    if not isinstance(tree, Mapping) or not tree:
        return []
    if set(tree) <= allowed and (required in tree if required else set(tree) == allowed):
        return [(keys, tree)]
    return [found for key, value in tree.items()
            for found in _nodes(value, allowed, required, (*keys, key))]


def _get(tree: Mapping[str, Any], keys: Sequence[str]) -> Any:
    for key in keys:
        if not isinstance(tree, Mapping) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _put(variables: dict[str, Any], collection: str, keys: Sequence[str],
         value: Mapping[str, Any]) -> None:
    """Sets ``variables[collection][keys...]`` to ``value``, copying the dicts on the way."""
    node = variables[collection] = dict(variables.get(collection, {}))
    for key in keys:
        node[key] = dict(node.get(key, {}))
        node = node[key]
    node.clear()
    node.update(value)
