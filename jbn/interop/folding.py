"""Batch norm folded away for inference.

In eval mode with running statistics, batch norm is one affine map per channel:

.. math::

    y = x\\, s + t, \\qquad s = \\frac{w}{\\sqrt{\\mathrm{running\\_var} + \\epsilon}}, \\qquad
    t = b - \\mathrm{running\\_mean}\\cdot s,

so it folds into a multiply-add (``fold``), or into the layer before it (``fold_into``).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import Array

from jbn._batchnorm import Params, State
from jbn._normalize import folded
from jbn._parse import check_eps, check_layer


def fold(params: Params, state: State, *, eps: float = 1e-5) -> tuple[Array, Array]:
    """Eval-mode batch norm as one multiply-add per channel: ``y = x·scale + offset``.

    .. math:: s = \\frac{w}{\\sqrt{\\mathrm{running\\_var} + \\epsilon}}, \\qquad
              t = b - \\mathrm{running\\_mean}\\cdot s \\qquad (w = 1,\\ b = 0 \\text{ without
              affine})

    ``x * scale + offset`` (scale and offset reshaped to the channel axis) is what
    ``batchnorm(params, state, x, training=False)`` computes, up to the rounding of its two
    terms: eval mode subtracts the mean first, so it stays exact where a channel's mean is
    large against its spread and the folded form cancels.

    Args:
      params: ``{"weight", "bias"}`` of shape (C,), or ``{}``.
      state: ``{"running_mean", "running_var", "num_batches_tracked"}``; not ``{}``.
      eps: the ``eps`` of the batch norm, ≥ 0.

    Returns:
      ``scale`` and ``offset``, shape (C,), in the state's dtype or float32 if finer.

    Raises:
      ValueError: when ``state == {}`` (eval mode then normalizes with each batch's own
        statistics, which no fixed scale and offset express), for a bad ``eps``, and for
        params or state that ``batchnorm`` would not accept.

    PyTorch: no function of its own; ``torch.nn.utils.fusion`` folds the same ``s`` and ``t``
    into a layer (``fold_into`` here).
    """
    check_layer(params, state)
    if not state:
        raise ValueError("fold needs running statistics, got state == {}: without them eval "
                         "mode normalizes with the statistics of each batch, which no fixed "
                         "scale and offset express")
    check_eps(eps)
    return folded(params.get("weight"), params.get("bias"),
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
    scale, offset = fold(params, state, eps=eps)
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
        return new_kernel, offset.astype(kernel.dtype)
    bias = jnp.asarray(bias)
    return new_kernel, (bias * scale + offset).astype(bias.dtype)
