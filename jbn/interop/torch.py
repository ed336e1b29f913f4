"""PyTorch state_dicts in and out.

jbn's ``params``/``state`` use PyTorch's state_dict names, so these functions only select,
check and convert arrays. They copy, since a torch tensor keeps changing in place while its
module trains. jbn does not import torch for them: a tensor is recognized by its ``detach``
method.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jbn._batchnorm import _PARAM_KEYS, _STATE_KEYS, Params, State
from jbn.interop._checks import _check_count, _check_layer, _check_vectors

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


def _host_array(value) -> np.ndarray:
    """A NumPy copy of ``value``, in its dtype (a torch tensor's too, bfloat16 included)."""
    if hasattr(value, "detach"):  # a torch.Tensor or Parameter: off autograd, onto the host
        value = value.detach().cpu()
        # NumPy's own types lack bfloat16 (torch's .numpy() refuses it); DLPack carries it.
        bfloat16 = str(value.dtype) == "torch.bfloat16"
        value = jax.dlpack.from_dlpack(value.contiguous()) if bfloat16 else value.numpy()
    return np.array(value)
