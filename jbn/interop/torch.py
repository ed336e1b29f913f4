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

from jbn._batchnorm import Params, State
from jbn._parse import PARAM_KEYS, STATE_KEYS, check_layer


def from_torch(state_dict: Mapping[str, Any], prefix: str = "") -> tuple[Params, State]:
    """A PyTorch batch norm's ``state_dict`` as jbn ``(params, state)``.

    The entries are ``prefix + name`` for ``name`` in ``weight``, ``bias``, ``running_mean``,
    ``running_var``, ``num_batches_tracked``; other keys are ignored, so a whole model's
    state_dict works with the layer's prefix (``"encoder.bn1."``).

    Values are torch tensors (on any device, requiring grad or not) or anything NumPy reads.
    jbn does not import torch: a tensor is recognized by its ``detach`` method. Floating
    dtypes carry over (float64 needs ``jax_enable_x64``, as everywhere in JAX; without it
    JAX warns and narrows); ``num_batches_tracked`` becomes int32, as in ``jbn.init``.

    Two partial layers are taken as they are, and written back so by ``to_torch``:

    * ``weight`` without ``bias`` (``BatchNorm(..., bias=False)``, which adds none) gives
      ``params == {"weight"}``;
    * running statistics without ``num_batches_tracked`` (torchvision's and detectron2's
      ``FrozenBatchNorm2d``, which keep none, and checkpoints older than the count) give a
      state without it: it normalizes in every mode, and training refuses it
      (``jbn.batchnorm``). To train such a layer, give it a count of 0, as PyTorch's
      ``load_state_dict`` does.

    Args:
      state_dict: a mapping from names to tensors or arrays, e.g. ``model.state_dict()``.
      prefix: what precedes the names, with its trailing dot.

    Returns:
      ``params``: ``{"weight", "bias"}``, ``{"weight"}`` (``bias=False``), or ``{}`` when
      there is no ``weight`` (``affine=False``). ``state``: ``{"running_mean",
      "running_var", "num_batches_tracked"}``, the first two alone, or ``{}`` when there are
      no running statistics (``track_running_stats=False``).

    Raises:
      ValueError: naming the key, for an entry of the wrong shape or dtype, a ``bias``
        without ``weight``, one running statistic without the other, and when nothing lies
        under ``prefix`` (most often a misspelt prefix; the error lists the layers found).

    PyTorch: the inverse of ``to_torch``; ``module.load_state_dict`` for a jbn layer.
    """
    found = {name: state_dict[prefix + name] for name in (*PARAM_KEYS, *STATE_KEYS)
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
    params = {name: arrays[name] for name in PARAM_KEYS if name in arrays}
    state = {name: arrays[name] for name in STATE_KEYS if name in arrays}
    check_layer(params, state, names={name: repr(prefix + name) for name in found})
    if "num_batches_tracked" in state:
        count = state["num_batches_tracked"]
        if not 0 <= count <= np.iinfo(np.int32).max:
            raise ValueError(f"{prefix + 'num_batches_tracked'!r} is {count}, outside jbn's "
                             "int32 range [0, 2**31 - 1]")
    # The explicit dtype makes JAX warn, rather than narrow float64 silently, when x64 is off.
    return ({name: jnp.asarray(value, dtype=value.dtype) for name, value in params.items()},
            {name: jnp.asarray(value, dtype=jnp.int32 if name == "num_batches_tracked"
                               else value.dtype) for name, value in state.items()})


def to_torch(params: Params, state: State) -> dict[str, np.ndarray]:
    """jbn ``(params, state)`` as a PyTorch batch norm's state_dict, in NumPy arrays.

    Keys, order and dtypes are PyTorch's: ``weight``, ``bias``, ``running_mean``,
    ``running_var`` in the dtype of the jbn arrays, ``num_batches_tracked`` int64; a layer
    without bias or count writes none. The arrays are writable copies. ``load_state_dict``
    takes tensors, so convert on the way in::

        bn.load_state_dict({k: torch.from_numpy(v) for k, v in jbn.to_torch(p, s).items()})

    (``torch.from_numpy`` has no bfloat16: cast such arrays to float32 first.) Prefix the keys
    to place them in a whole model's state_dict.

    Args:
      params: ``{"weight", "bias"}`` of shape (C,), ``{"weight"}``, or ``{}``.
      state: ``{"running_mean", "running_var"}`` of shape (C,) and ``"num_batches_tracked"``,
        the first two alone, or ``{}``.

    Returns:
      A dict that ``torch.nn.BatchNorm{1,2,3}d(C, affine=bool(params),
      track_running_stats=bool(state), bias="bias" in params)`` loads with ``strict=True``
      (``FrozenBatchNorm2d(C)`` too, for a state without count).

    Raises:
      TypeError, ValueError: for params or state that ``batchnorm`` would not accept.

    PyTorch: ``module.state_dict()``; the inverse of ``from_torch``.
    """
    check_layer(params, state)
    state_dict = {name: np.array(params[name]) for name in PARAM_KEYS if name in params}
    state_dict.update((name, np.array(state[name], np.int64 if name == "num_batches_tracked"
                                      else None)) for name in STATE_KEYS if name in state)
    return state_dict


def from_torch_model(
    state_dict: Mapping[str, Any],
    layers: Mapping[str, Mapping[str, Any]] | None = None,
) -> tuple[dict[str, Params], dict[str, State], dict[str, Any]]:
    """Every batch norm of a whole model's ``state_dict`` as jbn ``(params, state)``.

    A batch norm is found by its running statistics: each ``P.running_mean`` /
    ``P.running_var`` / ``P.num_batches_tracked`` key makes ``P`` a layer, converted by
    ``from_torch(state_dict, "P.")`` (so with or without ``weight``, ``bias`` and
    ``num_batches_tracked``). That covers ``BatchNorm{1,2,3}d``, ``SyncBatchNorm`` and
    ``FrozenBatchNorm2d`` (whose state has no count, and whose ``eps`` and mode
    ``options_from_torch`` reads); an ``InstanceNorm`` built with
    ``track_running_stats=True`` writes the same keys and is found too. A batch norm
    *without* running statistics writes only ``weight`` and ``bias``, as ``LayerNorm`` and
    ``GroupNorm`` do, so only the module tells it apart: pass ``layers``
    (``options_from_torch(model)[0]``), which also checks each layer against how it was
    built.

    The results are flat, keyed by module path (``"layer1.0.bn1"``, ``""`` for a model that
    is itself a batch norm), the names of ``model.named_modules()``: ``params[path]`` and
    ``state[path]`` are what ``jbn.batchnorm`` takes, and both dicts have every layer, ``{}``
    for one without affine or running statistics. Being pytrees of arrays, they go to
    ``jax.grad``, optax and ``jax.tree`` functions as they are.

    Args:
      state_dict: a model's ``state_dict()``: torch tensors or NumPy arrays.
      layers: the batch norms, path → ``{"num_features", "affine", "track_running_stats"}``
        and optionally ``"bias"`` (other keys are ignored); None to find them by their
        running statistics.

    Returns:
      ``params``: path → ``{"weight", "bias"}``, ``{"weight"}`` or ``{}``; ``state``: path →
      ``{"running_mean", "running_var", "num_batches_tracked"}``, the first two alone or
      ``{}``; ``rest``: every other entry, untouched (the same objects, in their order).

    Raises:
      TypeError: when ``layers`` is not a mapping.
      ValueError: as ``from_torch`` for a layer's entries, naming the key; with ``layers``,
        for a layer whose entries do not match its ``num_features``, ``affine``, ``bias`` or
        ``track_running_stats``.

    PyTorch: ``model.state_dict()`` read layer by layer; the inverse of ``to_torch_model``.
    """
    if layers is not None and not isinstance(layers, Mapping):
        raise TypeError(f"layers must map each batch norm's path to how it was built, as "
                        f"options_from_torch(model)[0] does; got {type(layers).__name__}")
    if layers is None:
        layers = {}
        for key in state_dict:
            for name in STATE_KEYS:
                if key == name or key.endswith("." + name):
                    layers.setdefault(key[: -len(name) - 1] if key != name else "", None)
    params, state, taken = {}, {}, set()
    for path, options in layers.items():
        prefix = f"{path}." if path else ""
        names = [name for name in (*PARAM_KEYS, *STATE_KEYS) if prefix + name in state_dict]
        taken.update(prefix + name for name in names)
        params[path], state[path] = from_torch(state_dict, prefix) if names else ({}, {})
        if options is not None:
            _check_built_as(path, options, params[path], state[path], names)
    rest = {key: value for key, value in state_dict.items() if key not in taken}
    return params, state, rest


def to_torch_model(
    params: Mapping[str, Params], state: Mapping[str, State]
) -> dict[str, np.ndarray]:
    """jbn layers keyed by module path as the entries of a whole model's ``state_dict``.

    Each layer's ``to_torch`` entries, under the prefix ``path + "."``, in the order of
    ``params``. Together with the model's other entries they load with ``strict=True``::

        entries = {**rest, **jbn.to_torch_model(params, state)}
        model.load_state_dict({k: torch.as_tensor(v) for k, v in entries.items()},
                              strict=True)

    Args:
      params: path → ``{"weight", "bias"}`` or ``{}``, as ``from_torch_model`` returns.
      state: path → the layer's state or ``{}``, for the same paths.

    Returns:
      Writable NumPy arrays keyed ``"layer1.0.bn1.weight"``..., in PyTorch's dtypes
      (``num_batches_tracked`` int64).

    Raises:
      ValueError: when ``params`` and ``state`` name different layers (a layer left out
        when threading the state), and as ``to_torch`` for a layer, naming its path.

    PyTorch: ``model.state_dict()``; the inverse of ``from_torch_model``.
    """
    if set(params) != set(state):
        raise ValueError(f"params and state must name the same layers; only in params: "
                         f"{sorted(set(params) - set(state))}, only in state: "
                         f"{sorted(set(state) - set(params))}")
    state_dict = {}
    for path in params:
        prefix = f"{path}." if path else ""
        try:
            entries = to_torch(params[path], state[path])
        except (TypeError, ValueError) as error:
            raise type(error)(f"layer {path!r}: {error}") from None
        state_dict.update((prefix + name, value) for name, value in entries.items())
    return state_dict


def options_from_torch(
    model: Any,
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """How each batch norm of a live ``torch.nn.Module`` was built and is called.

    A state_dict holds arrays only: ``momentum`` and ``eps`` are attributes of the modules,
    and a layer's ``momentum=None`` or ``eps=1e-3`` left out of its ``jbn.batchnorm`` call
    changes nothing but that layer's running statistics (or its outputs, for ``eps``). This
    reads them, with ``affine``, ``bias`` and ``track_running_stats``, from every
    ``BatchNorm{1,2,3}d`` and ``SyncBatchNorm`` (subclasses of
    ``torch.nn.modules.batchnorm._BatchNorm``), by module path. A ``FrozenBatchNorm2d``
    (torchvision's or detectron2's, recognized by its class name) gives its ``eps`` (often
    0) and ``mode="frozen"``: it normalizes with its running statistics whatever the
    ``training`` of the call, with constant weight and bias, as in PyTorch. Imports torch.

    Args:
      model: a ``torch.nn.Module``; lazy batch norms must have run once (to know C).

    Returns:
      ``(layers, options)``, both keyed by path: ``layers[path]`` is
      ``{"num_features", "affine", "bias", "track_running_stats"}``, the arguments of
      ``jbn.init`` and what ``from_torch_model(..., layers=)`` checks; ``options[path]`` is
      ``{"momentum", "eps"}`` (``{"eps", "mode"}`` for a ``FrozenBatchNorm2d``), the
      keywords of ``jbn.batchnorm``::

          y, new = jbn.batchnorm(params[path], state[path], x, training, **options[path])

    Raises:
      TypeError: when ``model`` is not a ``torch.nn.Module``.
      ValueError: for a lazy batch norm that has not run yet.

    PyTorch: ``model.named_modules()`` and each batch norm's attributes.
    """
    try:  # only here: jbn's other functions take tensors without importing torch
        import torch
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError("jbn.options_from_torch reads live torch modules and needs "
                                  "PyTorch: pip install 'jbn[torch]'", name=error.name) from error

    if not isinstance(model, torch.nn.Module):
        hint = " (the module itself, not its state_dict)" if isinstance(model, Mapping) else ""
        raise TypeError(f"model must be a torch.nn.Module{hint}, got {type(model).__name__}")
    layers, options = {}, {}
    # _BatchNorm is the base of BatchNorm{1,2,3}d, SyncBatchNorm and the lazy ones, and
    # not of InstanceNorm, whose statistics are per example.
    for path, module in model.named_modules():
        if type(module).__name__ == "FrozenBatchNorm2d":  # torchvision's and detectron2's
            layers[path] = {"num_features": module.weight.shape[0], "affine": True,
                            "bias": True, "track_running_stats": True}
            options[path] = {"eps": module.eps, "mode": "frozen"}
            continue
        if not isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            continue
        if isinstance(module, torch.nn.modules.lazy.LazyModuleMixin) and (
                module.has_uninitialized_params()):
            raise ValueError(f"the lazy batch norm {path!r} does not know its number of "
                             "features yet: run the model once before reading its options")
        layers[path] = {"num_features": module.num_features, "affine": module.affine,
                        "bias": module.bias is not None,
                        "track_running_stats": module.track_running_stats}
        options[path] = {"momentum": module.momentum, "eps": module.eps}
    return layers, options


def _host_array(value) -> np.ndarray:
    """A NumPy copy of ``value``, in its dtype (a torch tensor's too, bfloat16 included)."""
    if hasattr(value, "detach"):  # a torch.Tensor or Parameter: off autograd, onto the host
        value = value.detach().cpu()
        # NumPy's own types lack bfloat16 (torch's .numpy() refuses it); DLPack carries it.
        bfloat16 = str(value.dtype) == "torch.bfloat16"
        value = jax.dlpack.from_dlpack(value.contiguous()) if bfloat16 else value.numpy()
    return np.array(value)


def _check_built_as(path: str, options: Mapping[str, Any], params: Params, state: State,
                    names: list[str]) -> None:
    """Checks a layer's converted entries against the module's ``num_features``, ``affine``,
    ``bias`` (where given) and ``track_running_stats``."""
    built = [(bool(params), "affine"), (bool(state), "track_running_stats")]
    if params and "bias" in options:
        built.append(("bias" in params, "bias"))
    for has, option in built:
        if has != bool(options[option]):
            raise ValueError(f"layer {path!r} was built with {option}={options[option]}, but "
                             f"the state_dict has entries {names} under it")
    try:
        check_layer(params, state, channels=options["num_features"])
    except ValueError as error:
        raise ValueError(f"layer {path!r} was built with num_features="
                         f"{options['num_features']}, but {error}") from None
