"""PyTorch and Flax conversion, and batch norm folded away for inference.

In eval mode with running statistics, batch norm is one affine map per channel:

.. math::

    y = x\\, s + t, \\qquad s = \\frac{w}{\\sqrt{\\mathrm{running\\_var} + \\epsilon}}, \\qquad
    t = b - \\mathrm{running\\_mean}\\cdot s,

so it folds into a multiply-add (``fold``), or into the layer before it (``fold_into``).

jbn's ``params``/``state`` use PyTorch's state_dict names, so ``from_torch``/``to_torch``
only select, check and convert arrays; ``from_flax``/``to_flax`` rename, and document what
Flax's ``BatchNorm`` keeps differently. The PyTorch conversions copy, since a torch tensor
keeps changing in place while its module trains.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from jbn._batchnorm import _PARAM_KEYS, _STATE_KEYS, Params, State, _check_entries, _check_eps
from jbn._normalize import fold as _fold

_VECTOR_KEYS = ("weight", "bias", "running_mean", "running_var")


def from_torch(state_dict: Mapping[str, Any], prefix: str = "") -> tuple[Params, State]:
    """A PyTorch batch norm's ``state_dict`` as jbn ``(params, state)``.

    The entries are ``prefix + name`` for ``name`` in ``weight``, ``bias``, ``running_mean``,
    ``running_var``, ``num_batches_tracked``; other keys are ignored, so a whole model's
    state_dict works with the layer's prefix (``"encoder.bn1."``).

    Values are torch tensors (on any device, requiring grad or not) or anything NumPy reads.
    jbn does not import torch: a tensor is recognized by its ``detach`` method. Floating
    dtypes carry over (float64 needs ``jax_enable_x64``, as everywhere in JAX; without it
    JAX warns and narrows); ``num_batches_tracked`` becomes int32, as in ``jbn.init``.

    Two incomplete entries are PyTorch's own, and are completed:

    * ``weight`` without ``bias`` (``BatchNorm(..., bias=False)``, which adds none) gets a
      zero bias;
    * running statistics without ``num_batches_tracked`` (older checkpoints, which
      ``load_state_dict`` accepts too) get a count of 0, which matters only to
      ``momentum=None``.

    Args:
      state_dict: a mapping from names to tensors or arrays, e.g. ``model.state_dict()``.
      prefix: what precedes the names, with its trailing dot.

    Returns:
      ``params``: ``{"weight", "bias"}``, or ``{}`` when there is no ``weight``
      (``affine=False``). ``state``: ``{"running_mean", "running_var", "num_batches_tracked"}``,
      or ``{}`` when there are no running statistics (``track_running_stats=False``).

    Raises:
      ValueError: naming the key, for an entry of the wrong shape or dtype, a ``bias``
        without ``weight``, one running statistic without the other, and when nothing lies
        under ``prefix`` (most often a misspelt prefix; the error lists the layers found).

    PyTorch: the inverse of ``to_torch``; ``module.load_state_dict`` for a jbn layer.
    """
    found = {name: state_dict[prefix + name] for name in (*_PARAM_KEYS, *_STATE_KEYS)
             if prefix + name in state_dict}
    if not found:
        layers = sorted(key[: -len("running_var")] for key in state_dict
                        if key.endswith("running_var"))
        raise ValueError(f"no batch norm entries under prefix {prefix!r} (such as "
                         f"{prefix + 'weight'!r} or {prefix + 'running_mean'!r}); layers with "
                         f"running statistics in this state_dict have prefixes {layers}")
    for present, needs in (("bias", "weight"), ("running_mean", "running_var"),
                           ("running_var", "running_mean"),
                           ("num_batches_tracked", "running_mean")):
        if present in found and needs not in found:
            raise ValueError(f"{prefix + needs!r} is missing while {prefix + present!r} is present")

    arrays = {name: _host_array(value) for name, value in found.items()}
    _check_vectors({repr(prefix + name): arrays[name] for name in _VECTOR_KEYS if name in arrays})
    # The explicit dtype makes JAX warn, rather than narrow float64 silently, when x64 is off.
    vectors = {name: jnp.asarray(arrays[name], dtype=arrays[name].dtype)
               for name in _VECTOR_KEYS if name in arrays}
    params, state = {}, {}
    if "weight" in vectors:
        weight = vectors["weight"]
        params = {"weight": weight, "bias": vectors.get("bias", jnp.zeros_like(weight))}
    if "running_mean" in vectors:
        count = arrays.get("num_batches_tracked", np.zeros((), np.int64))
        name = repr(prefix + "num_batches_tracked")
        _check_count(count, name)
        if not 0 <= count <= np.iinfo(np.int32).max:
            raise ValueError(f"{name} is {count}, outside jbn's int32 range [0, 2**31 - 1]")
        state = {"running_mean": vectors["running_mean"], "running_var": vectors["running_var"],
                 "num_batches_tracked": jnp.asarray(count, jnp.int32)}
    return params, state


def to_torch(params: Params, state: State) -> dict[str, np.ndarray]:
    """jbn ``(params, state)`` as a PyTorch batch norm's state_dict, in NumPy arrays.

    Keys, order and dtypes are PyTorch's: ``weight``, ``bias``, ``running_mean``,
    ``running_var`` in the dtype of the jbn arrays, ``num_batches_tracked`` int64. The arrays
    are writable copies. ``load_state_dict`` takes tensors, so convert on the way in::

        bn.load_state_dict({k: torch.from_numpy(v) for k, v in jbn.to_torch(p, s).items()})

    (``torch.from_numpy`` has no bfloat16: cast such arrays to float32 first.) Prefix the keys
    to place them in a whole model's state_dict.

    Args:
      params: ``{"weight", "bias"}`` of shape (C,), or ``{}``.
      state: ``{"running_mean", "running_var"}`` of shape (C,) and ``"num_batches_tracked"``,
        or ``{}``.

    Returns:
      A dict that ``torch.nn.BatchNorm{1,2,3}d(C, affine=bool(params),
      track_running_stats=bool(state))`` loads with ``strict=True``.

    Raises:
      TypeError, ValueError: for params or state that ``batchnorm`` would not accept.

    PyTorch: ``module.state_dict()``; the inverse of ``from_torch``.
    """
    _check_layer(params, state)
    state_dict = {name: np.array(params[name]) for name in _PARAM_KEYS if params}
    if state:
        state_dict["running_mean"] = np.array(state["running_mean"])
        state_dict["running_var"] = np.array(state["running_var"])
        state_dict["num_batches_tracked"] = np.array(state["num_batches_tracked"], np.int64)
    return state_dict


def from_flax(variables: Mapping[str, Any]) -> tuple[Params, State]:
    """The variables of a ``flax.linen.BatchNorm`` as jbn ``(params, state)``.

    ``{"params": {"scale", "bias"}, "batch_stats": {"mean", "var"}}`` become ``weight``,
    ``bias``, ``running_mean``, ``running_var``: eval outputs carry over exactly (up to
    rounding: Flax computes ``(x − mean)·s + b``, jbn ``x·s + (b − mean·s)``). With the
    arguments to match: jbn ``axis=-1`` (Flax normalizes the last axis by default),
    ``eps=epsilon`` and ``momentum = 1 − Flax momentum`` (Flax weighs the old running value,
    PyTorch and jbn the new batch: Flax's 0.99 is jbn's 0.01, PyTorch's 0.1 is Flax's 0.9).

    What does not carry over:

    * Flax averages the *biased* batch variance (÷ n), PyTorch and jbn the unbiased one
      (÷ (n − 1)). The running variance is taken as it is, so eval agrees; training on in jbn
      averages batch variances larger by n/(n − 1).
    * Flax counts no batches: ``num_batches_tracked`` is 0, which matters only to
      ``momentum=None`` (the cumulative average would restart).

    A module with only one of ``use_scale``/``use_bias`` gets the missing one as ones (scale)
    or zeros (bias), which computes the same. Select one module's variables from a model's:
    ``{"params": v["params"]["BatchNorm_0"], "batch_stats": v["batch_stats"]["BatchNorm_0"]}``.

    Args:
      variables: a mapping with ``"params"`` and/or ``"batch_stats"`` collections of one
        BatchNorm over a single feature axis.

    Returns:
      ``(params, state)``; ``params == {}`` without scale and bias, ``state == {}`` without
      ``batch_stats``.

    Raises:
      ValueError: for unexpected keys (e.g. a whole model's variables), one of ``mean``/``var``
        without the other, and entries of the wrong shape or dtype.
    """
    collections = {"params": ("scale", "bias"), "batch_stats": ("mean", "var")}
    unexpected = sorted(set(variables) - set(collections))
    if unexpected:
        raise ValueError(f"variables has unexpected collections {unexpected}; expected "
                         "'params' and 'batch_stats'")
    for collection, names in collections.items():
        unexpected = sorted(set(variables.get(collection, {})) - set(names))
        if unexpected:
            raise ValueError(f"variables[{collection!r}] has unexpected keys {unexpected}; "
                             f"expected a subset of {list(names)}: pass the variables of one "
                             "BatchNorm module, e.g. v['params']['BatchNorm_0']")
    flax_params = variables.get("params", {})
    stats = variables.get("batch_stats", {})
    if ("mean" in stats) != ("var" in stats):
        missing = "var" if "mean" in stats else "mean"
        raise ValueError(f"variables['batch_stats'][{missing!r}] is missing")
    _check_vectors({f"variables[{collection!r}][{name!r}]": variables[collection][name]
                    for collection, names in collections.items() for name in names
                    if name in variables.get(collection, {})})
    # The explicit dtype makes JAX warn, rather than narrow float64 silently, when x64 is off.
    scale, bias, mean, var = (None if value is None else
                              jnp.asarray(value, dtype=jnp.result_type(value)) for value in (
        flax_params.get("scale"), flax_params.get("bias"), stats.get("mean"), stats.get("var")))
    params, state = {}, {}
    if scale is not None or bias is not None:
        params = {"weight": jnp.ones_like(bias) if scale is None else scale,
                  "bias": jnp.zeros_like(scale) if bias is None else bias}
    if mean is not None:
        state = {"running_mean": mean, "running_var": var,
                 "num_batches_tracked": jnp.zeros((), jnp.int32)}
    return params, state


def to_flax(params: Params, state: State) -> dict[str, dict[str, Array]]:
    """jbn ``(params, state)`` as the variables of a ``flax.linen.BatchNorm``.

    ``weight``, ``bias``, ``running_mean``, ``running_var`` become ``params: scale, bias`` and
    ``batch_stats: mean, var``, in their dtypes; ``num_batches_tracked`` has no Flax
    counterpart and is dropped. Use the module with ``axis`` set to jbn's channel axis,
    ``epsilon=eps`` and ``momentum = 1 − jbn momentum``; see ``from_flax`` for what differs
    when training continues (Flax averages the biased batch variance).

    Args:
      params: ``{"weight", "bias"}`` of shape (C,), or ``{}``.
      state: ``{"running_mean", "running_var", "num_batches_tracked"}``, or ``{}``.

    Returns:
      ``{"params": {"scale", "bias"}, "batch_stats": {"mean", "var"}}``, without ``"params"``
      when ``params == {}`` (``use_scale=False, use_bias=False``) and without
      ``"batch_stats"`` when ``state == {}`` (Flax then needs
      ``use_running_average=False``, and ``mutable=["batch_stats"]`` to create them).

    Raises:
      TypeError, ValueError: for params or state that ``batchnorm`` would not accept.
    """
    _check_layer(params, state)
    variables = {}
    if params:
        variables["params"] = {"scale": params["weight"], "bias": params["bias"]}
    if state:
        variables["batch_stats"] = {"mean": state["running_mean"], "var": state["running_var"]}
    return variables


def fold(params: Params, state: State, *, eps: float = 1e-5) -> tuple[Array, Array]:
    """Eval-mode batch norm as one multiply-add per channel: ``y = x·scale + shift``.

    .. math:: s = \\frac{w}{\\sqrt{\\mathrm{running\\_var} + \\epsilon}}, \\qquad
              t = b - \\mathrm{running\\_mean}\\cdot s \\qquad (w = 1,\\ b = 0 \\text{ without
              affine})

    This is the computation ``batchnorm(params, state, x, training=False)`` does, so for
    ``x`` of the state's dtype ``x * scale + shift`` (scale and shift reshaped to the channel
    axis) is bitwise its output.

    Args:
      params: ``{"weight", "bias"}`` of shape (C,), or ``{}``.
      state: ``{"running_mean", "running_var", "num_batches_tracked"}``; not ``{}``.
      eps: the ``eps`` of the batch norm, ≥ 0.

    Returns:
      ``scale`` and ``shift``, shape (C,), in the state's dtype or float32 if finer.

    Raises:
      ValueError: when ``state == {}`` (eval mode then normalizes with each batch's own
        statistics, which no fixed scale and shift express), for a bad ``eps``, and for
        params or state that ``batchnorm`` would not accept.

    PyTorch: no function of its own; ``torch.nn.utils.fusion`` folds the same ``s`` and ``t``
    into a layer (``fold_into`` here).
    """
    _check_layer(params, state)
    if not state:
        raise ValueError("fold needs running statistics, got state == {}: without them eval "
                         "mode normalizes with the statistics of each batch, which no fixed "
                         "scale and shift express")
    _check_eps(eps)
    return _fold(params.get("weight"), params.get("bias"),
                 state["running_mean"], state["running_var"], eps)


def fold_into(
    kernel: Array,
    bias: Array | None,
    params: Params,
    state: State,
    *,
    layout: str,
    eps: float = 1e-5,
) -> tuple[Array, Array]:
    """The preceding layer's kernel and bias with an eval-mode batch norm folded in.

    A linear layer or convolution ``z = x ⋆ K + b`` followed, with nothing in between, by
    batch norm over its output channels ``o`` computes ``y = z·s + t`` (``fold``), so

    .. math:: K'_{\\ldots o \\ldots} = K_{\\ldots o \\ldots}\\, s_o, \\qquad b' = b\\, s + t

    give ``y = x ⋆ K' + b'``: the same layer without the batch norm.

    Args:
      kernel: the layer's weight, any rank.
      bias: its bias (C,), or None for a layer without bias (the result then has one).
      params, state: the batch norm's, with running statistics.
      layout: one letter per kernel axis, ``"o"`` marking the output channels (only its
        position matters): ``"io"`` a Dense kernel (Flax ``nn.Dense``, ``x @ K``), ``"oi"`` a
        PyTorch ``Linear`` weight, ``"hwio"`` a JAX/Flax conv kernel, ``"oihw"`` a PyTorch
        ``Conv2d`` weight; ``"oil"``, ``"dhwio"``... the same way. Grouped and depthwise
        convolutions fold alike: their output channels are still one axis.
      eps: the batch norm's ``eps``.

    Returns:
      ``(kernel, bias)``: the kernel in its dtype and layout, the bias (C,) in the dtype of
      ``bias`` (of ``kernel`` when None).

    Raises:
      ValueError: for a layout that does not name the kernel's axes, output channels or bias
        not of the batch norm's size, and as ``fold`` does.

    PyTorch: ``torch.nn.utils.fusion.fuse_linear_bn_weights`` (layout ``"oi"``) and
    ``fuse_conv_bn_weights`` (``"oihw"``).
    """
    scale, shift = fold(params, state, eps=eps)
    kernel = jnp.asarray(kernel)
    if not isinstance(layout, str) or len(layout) != kernel.ndim or layout.count("o") != 1:
        raise ValueError(f"layout must name the {kernel.ndim} axes of the kernel (shape "
                         f"{kernel.shape}), one letter each with one 'o' for the output "
                         f"channels, such as 'io', 'oi', 'hwio', 'oihw'; got {layout!r}")
    out_axis = layout.index("o")
    channels = scale.shape[0]
    if kernel.shape[out_axis] != channels:
        raise ValueError(f"the kernel of shape {kernel.shape} has {kernel.shape[out_axis]} "
                         f"output channels (axis {out_axis} in layout {layout!r}), the batch "
                         f"norm {channels}")
    if bias is not None and jnp.shape(bias) != (channels,):
        raise ValueError(f"bias must have shape ({channels},), got {jnp.shape(bias)}")
    per_output = [1] * kernel.ndim
    per_output[out_axis] = channels
    new_kernel = (kernel * scale.reshape(per_output)).astype(kernel.dtype)
    if bias is None:
        return new_kernel, shift.astype(kernel.dtype)
    bias = jnp.asarray(bias)
    return new_kernel, (bias * scale + shift).astype(bias.dtype)


def _host_array(value) -> np.ndarray:
    """A NumPy copy of ``value``, in its dtype (a torch tensor's too, bfloat16 included)."""
    if hasattr(value, "detach"):  # a torch.Tensor or Parameter: off autograd, onto the host
        value = value.detach().cpu()
        # NumPy's own types lack bfloat16 (torch's .numpy() refuses it); DLPack carries it.
        bfloat16 = str(value.dtype) == "torch.bfloat16"
        value = jax.dlpack.from_dlpack(value.contiguous()) if bfloat16 else value.numpy()
    return np.array(value)


def _check_vectors(named: Mapping[str, Any]) -> None:
    """Checks that the arrays are floating vectors of one length C; the keys name them in
    messages."""
    reference = None  # (name, shape) of the first vector: the others must match it
    for name, value in named.items():
        shape, dtype = jnp.shape(value), jnp.result_type(value)
        if reference is None and len(shape) == 1:
            reference = (name, shape)
        if reference is None or shape != reference[1]:
            expected = ("(C,), one value per channel" if reference is None
                        else f"{reference[1]} as {reference[0]}")
            raise ValueError(f"{name} has shape {shape}, expected {expected}")
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"{name} has dtype {dtype}, expected a floating dtype")


def _check_count(value, name: str) -> None:
    """Checks an integer scalar, from its shape and dtype only (so, also under ``jax.jit``)."""
    shape, dtype = jnp.shape(value), jnp.result_type(value)
    if shape != () or not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"{name} has shape {shape} and dtype {dtype}, expected an integer "
                         "scalar, shape ()")


def _check_layer(params: Params, state: State) -> None:
    """Checks jbn params and state as ``batchnorm`` would, with C taken from them."""
    first = next(((f"{name}[{key!r}]", value) for name, entries in (("params", params),
                                                                   ("state", state))
                  if isinstance(entries, Mapping)
                  for key, value in entries.items() if key != "num_batches_tracked"), None)
    channels = None
    if first is not None:
        name, value = first
        if jnp.ndim(value) != 1:
            raise ValueError(f"{name} must have shape (C,), got {jnp.shape(value)}")
        channels = jnp.shape(value)[0]
    _check_entries("params", params, _PARAM_KEYS, channels)
    _check_entries("state", state, _STATE_KEYS, channels)
