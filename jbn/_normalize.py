"""The normalization with batch statistics and its derivative rule; eval mode's normalization
with given statistics (``normalize_with``) and its folded form (``folded``).

.. math::

    \\hat x = (x - \\mu)\\, r, \\qquad r = (\\sigma^2 + \\epsilon)^{-1/2}, \\qquad
    y = w\\, \\hat x + b,

with :math:`\\mu, \\sigma^2` the mean and biased variance of the valid values of ``x``
(``_stats.measure``). Differentiating through the statistics, with :math:`N` the number of
valid values and :math:`\\langle v\\rangle = \\frac1N \\sum_{\\text{valid}} v` their mean,

.. math::

    \\dot\\mu = \\langle \\dot x\\rangle, \\qquad
    \\dot{\\sigma^2} = \\tfrac{2}{r} \\langle \\hat x \\dot x\\rangle, \\qquad
    \\dot y = w\\, r\\, (\\dot x - \\langle \\dot x\\rangle
              - \\hat x\\, \\langle \\hat x \\dot x\\rangle) + \\dot w\\, \\hat x + \\dot b .

The rule is a JVP (``jax.custom_jvp``), so forward mode and higher orders keep working and
JAX derives the backward pass by transposing it: two per-channel sums (one all-reduce across
devices, the transpose of the one here) and one elementwise pass. The tangent map is
rematerialized (``jax.checkpoint``), so reverse mode keeps ``x`` and per-channel vectors,
not :math:`\\hat x` in float32 nor the intermediates of the textbook formula.

Masked-out positions do not enter :math:`\\mu, \\sigma^2`, so their ``x`` receives only the
direct term :math:`w\\, r\\, \\dot x`.

Batch renormalization (Ioffe 2017, arXiv:1702.03275, Algorithm 1) corrects :math:`\\hat x`
towards the running statistics :math:`\\mu_R, \\sigma_R^2`:

.. math::

    y = (\\hat x\\, \\rho + \\delta)\\, w + b, \\qquad
    \\rho = \\mathrm{clip}\\big(\\sqrt{\\sigma^2 + \\epsilon}\\,/\\sqrt{\\sigma_R^2 + \\epsilon},\\,
          1/r_{\\max},\\, r_{\\max}\\big), \\qquad
    \\delta = \\mathrm{clip}\\big((\\mu - \\mu_R)/\\sqrt{\\sigma_R^2 + \\epsilon},\\,
          -d_{\\max},\\, d_{\\max}\\big),

with :math:`\\rho, \\delta` (the paper's r and d) constants to the derivative. That is batch
norm with the affine parameters :math:`(\\rho w,\\, \\delta w + b)`, so it shares the forward
pass and the tangent map above, with :math:`\\dot w` entering as :math:`\\rho \\dot w` and
:math:`\\delta \\dot w + \\dot b`.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import Array, lax
from jax.custom_derivatives import SymbolicZero

from jbn._activation import Activation, activated
from jbn._reduction import Reduction, compute_dtype
from jbn._stats import Statistics, measure


class Renorm(NamedTuple):
    """What batch renormalization corrects towards: the running statistics (before this
    batch's update) and the limits of r and d, scalars that may be traced."""

    running_mean: Array  # (C,)
    running_var: Array  # (C,)
    rmax: Array  # (), ≥ 1
    dmax: Array  # (), ≥ 0


@partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def normalize(
    reduction: Reduction,
    eps: float,
    x: Array,
    valid: Array | None,
    weight: Array | None,
    bias: Array | None,
    renorm: Renorm | None = None,
) -> tuple[Array, Statistics]:
    """Batch-normalizes ``x`` with the statistics of its own valid values.

    Args:
      reduction: the axes and devices the statistics run over.
      eps: added to the variance.
      x: the input, channel at ``reduction.channel_axis``.
      valid: None or a boolean array broadcastable to ``x`` (size 1 on the channel axis).
      weight, bias: (C,) affine parameters, or both None.
      renorm: None, or batch renormalization's running statistics and limits; they carry
        no derivative.

    Returns:
      ``y`` in ``x.dtype``, and the batch's statistics in at least float32, which carry no
      derivative (their tangents are zeros).
    """
    y, stats, _, _ = _forward(reduction, eps, x, valid, weight, bias, renorm)
    return y, stats


def _forward(reduction, eps, x, valid, weight, bias, renorm, floored=False):
    """y, the statistics, 1/√(σ² + ε) and renormalization's (r, d); ``floored``: the
    weight that scales x̂ (after renormalization) has magnitude at least ``WEIGHT_FLOOR``."""
    stats = measure(x, valid, reduction)
    inv_std = lax.rsqrt(stats.variance + eps)
    factors = _renorm_factors(stats, inv_std, eps, renorm)
    xhat = _standardized(reduction, x, stats, inv_std)
    weight, bias = _renormalized(factors, weight, bias)
    if floored:
        weight = _floored(weight)
    y = _affine(reduction, xhat, weight, bias).astype(x.dtype)
    return y, stats, inv_std, factors


def _renorm_factors(stats: Statistics, inv_std: Array, eps: float,
                    renorm: Renorm | None) -> tuple[Array, Array] | None:
    """Batch renormalization's r = clip(σ_B/σ, 1/rmax, rmax) and
    d = clip((μ_B − μ)/σ, −dmax, dmax), σ = √(running_var + eps), as constants."""
    if renorm is None:
        return None
    dtype = stats.mean_head.dtype
    running_mean, running_var, rmax, dmax = (v.astype(dtype) for v in renorm)
    inv_sigma = lax.rsqrt(running_var + eps)
    r = jnp.clip(inv_sigma / inv_std, 1 / rmax, rmax)
    # μ_B − μ with the mean's pair: (mean_head − μ) first, where the two may be close.
    d = jnp.clip(((stats.mean_head - running_mean) + stats.mean_tail) * inv_sigma, -dmax, dmax)
    return lax.stop_gradient(r), lax.stop_gradient(d)


def _renormalized(factors: tuple[Array, Array] | None, weight: Array | None,
                  bias: Array | None) -> tuple[Array | None, Array | None]:
    """The affine parameters that apply batch renormalization's r and d: (r·w, d·w + b),
    or (r, d) without affine. Linear in (w, b), so it maps their tangents as well."""
    if factors is None:
        return weight, bias
    r, d = factors
    if weight is None:
        return r, d
    return r * weight, d * weight + bias


def _standardized(reduction: Reduction, x: Array, stats: Statistics, inv_std: Array) -> Array:
    # (x − mean_head) is exact for data near the mean; subtracting the small mean_tail
    # afterwards keeps the mean finer than the input precision.
    centered = x.astype(stats.mean_head.dtype) - reduction.per_channel(stats.mean_head)
    return (centered - reduction.per_channel(stats.mean_tail)) * reduction.per_channel(inv_std)


def _affine(reduction: Reduction, xhat: Array, weight: Array | None,
            bias: Array | None) -> Array:
    if weight is None:
        return xhat
    return xhat * reduction.per_channel(weight) + reduction.per_channel(bias)


@normalize.defjvp
def _normalize_jvp(reduction, eps, primals, tangents):
    x, valid, weight, bias, renorm = primals
    dx, _, dweight, dbias, _ = tangents
    y, stats, inv_std, factors = _forward(reduction, eps, x, valid, weight, bias, renorm)
    # Renormalization is batch norm with the affine parameters (r·w, d·w + b), r and d
    # constant; without affine, (r, d), constant too.
    if weight is not None:
        dweight, dbias = _renormalized(factors, dweight, dbias)
    weight, _ = _renormalized(factors, weight, bias)

    # Rematerialized without prevent_cse: its barrier would wrap every input, x and the
    # cotangent too, and keep XLA from fusing the backward's sums and ẏ into the elementwise
    # work around the layer (an activation's derivative, a residual's add). The barrier here
    # holds only per-channel values: the backward computes with the forward's very
    # statistics, as it would from saved residuals.
    @partial(jax.checkpoint, prevent_cse=False)
    def tangent_map(x, stats, inv_std, weight, dx, dweight, dbias):
        stats, inv_std, weight = lax.optimization_barrier((stats, inv_std, weight))
        # The sums are about the mean's head, the shift here: one copy for the sum and one
        # for ẏ, opaque to XLA, so that each x − shift fuses into its own pass over x, where a
        # shared one would be written to memory.
        # Unlike the statistics, these sums take no plain path: under reverse mode they are
        # transposed into ẏ's elementwise pass, and a branch there would write its x-sized
        # output to memory, where the shift costs only a share of one reduction
        # (Σ ct·(x − shift) against Σ ct·x).
        shift_sum, shift_dy = lax.optimization_barrier((stats.mean_head, stats.mean_head))
        dtype = stats.mean_head.dtype
        dx = dx.astype(dtype)
        centered = x.astype(dtype) - reduction.per_channel(shift_sum)
        # ⟨ẋ⟩ and ⟨(x − shift)·ẋ⟩ over the whole batch: one all-reduce.
        sums = reduction.psum(reduction.sum(dx, valid), reduction.sum(centered * dx, valid))
        mean_dx, mean_centered_dx = (total / jnp.maximum(stats.count, 1) for total in sums)
        mean_xhat_dx = (mean_centered_dx - stats.mean_tail * mean_dx) * inv_std
        scale, slope, intercept = _coefficients(inv_std, weight, mean_dx, mean_xhat_dx,
                                                dweight, dbias)
        # x̂ expanded as (x − shift)·r − mean_tail·r, so that x enters once and reverse mode
        # needs only the sums of ct and (x − shift)·ct.
        centered = x.astype(dtype) - reduction.per_channel(shift_dy)
        dy = (dx * reduction.per_channel(scale)
              + centered * reduction.per_channel(inv_std * slope)
              + reduction.per_channel(intercept - stats.mean_tail * inv_std * slope))
        return dy.astype(x.dtype)

    dy = tangent_map(x, stats, inv_std, weight, dx, dweight, dbias)
    # The statistics feed only the running state, which carries no derivative.
    return (y, stats), (dy, jax.tree.map(jnp.zeros_like, stats))


# The smallest magnitude of the weight that scales x̂ in the fused form, where x̂ is
# recovered from the output as (act⁻¹(y) − residual − b)/w (docs/numerics.md).
WEIGHT_FLOOR = 1e-3


def _floored(weight: Array | None) -> Array | None:
    """``weight`` with magnitude at least ``WEIGHT_FLOOR``, its sign kept (0 as +)."""
    if weight is None:
        return None
    return jnp.where(jnp.abs(weight) < WEIGHT_FLOOR,
                     jnp.where(weight < 0, -WEIGHT_FLOOR, WEIGHT_FLOOR).astype(weight.dtype),
                     weight)


@partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2))
def normalize_activated(
    reduction: Reduction,
    eps: float,
    activation: Activation,
    x: Array,
    valid: Array | None,
    weight: Array | None,
    bias: Array | None,
    residual: Array | None,
    renorm: Renorm | None = None,
) -> tuple[Array, Statistics]:
    """``act(BN(x) + residual)`` for an invertible ``activation``, whose derivative keeps
    the output ``y`` (and ``residual``), not ``x``.

    .. math::

        z = \\mathrm{act}^{-1}(y), \\qquad \\hat x = (z - \\mathrm{residual} - b)/w, \\qquad
        \\dot y = \\mathrm{act}'(z)\\,\\big(w\\, r\\, (\\dot x - \\langle \\dot x\\rangle
                  - \\hat x\\, \\langle \\hat x \\dot x\\rangle) + \\dot w\\, \\hat x + \\dot b
                  + \\dot{\\mathrm{residual}}\\big),

    the tangent map of ``normalize`` with x̂ recovered from ``y`` (Rota Bulò et al., In-Place
    Activated BatchNorm, CVPR 2018), rematerialized from ``y``, ``residual`` and per-channel
    vectors. ``w`` is the weight after renormalization, its magnitude floored at
    ``WEIGHT_FLOOR`` in the forward pass as well (so the output is the one the derivative
    inverts; ``ẇ`` passes the floor unchanged): x̂ cannot be recovered where ``w = 0``.
    Rounding: ``y`` carries about one unit in the last place of ``|b + residual|``, so the
    error of the recovered x̂, and of the derivative, is about that divided by ``|w|``
    (measured against the bias ÷ weight ratio in docs/numerics.md, "The fused form").
    Arguments and returns as ``normalize``'s, with ``residual`` None or of ``x``'s shape
    and dtype.
    """
    y, stats, _, _ = _forward(reduction, eps, x, valid, weight, bias, renorm, floored=True)
    return activated(activation, y, residual), stats


def _normalize_activated_jvp(reduction, eps, activation, primals, tangents):
    x, valid, weight, bias, residual, renorm = primals
    # Zero tangents arrive symbolic: a residual that carries no derivative (an input, a
    # constant) then enters neither the tangent map nor what reverse mode keeps.
    dx, _, dweight, dbias, dresidual, _ = (
        None if isinstance(tangent, SymbolicZero) else tangent for tangent in tangents)
    dx = jnp.zeros_like(x) if dx is None else dx
    if weight is not None:
        dweight = jnp.zeros_like(weight) if dweight is None else dweight
        dbias = jnp.zeros_like(bias) if dbias is None else dbias
    y, stats, inv_std, factors = _forward(reduction, eps, x, valid, weight, bias, renorm,
                                          floored=True)
    out = activated(activation, y, residual)
    if weight is not None:
        dweight, dbias = _renormalized(factors, dweight, dbias)
    weight, bias = _renormalized(factors, weight, bias)
    weight = _floored(weight)

    @partial(jax.checkpoint, prevent_cse=False)
    def tangent_map(out, residual, stats, inv_std, weight, bias, dx, dweight, dbias,
                    dresidual):
        stats, inv_std, weight, bias = lax.optimization_barrier((stats, inv_std, weight, bias))
        dtype = stats.mean_head.dtype
        z = activation.inverse(out.astype(dtype))
        if residual is not None:
            z = z - residual.astype(dtype)
        if bias is not None:
            z = z - reduction.per_channel(bias)
        xhat = z if weight is None else z / reduction.per_channel(weight)
        dx = dx.astype(dtype)
        sums = reduction.psum(reduction.sum(dx, valid), reduction.sum(xhat * dx, valid))
        mean_dx, mean_xhat_dx = (total / jnp.maximum(stats.count, 1) for total in sums)
        scale, slope, intercept = _coefficients(inv_std, weight, mean_dx, mean_xhat_dx,
                                                dweight, dbias)
        dz = (dx * reduction.per_channel(scale) + xhat * reduction.per_channel(slope)
              + reduction.per_channel(intercept))
        if dresidual is not None:
            dz = dz + dresidual.astype(dtype)
        return (activation.derivative(out.astype(dtype)) * dz).astype(x.dtype)

    dout = tangent_map(out, residual, stats, inv_std, weight, bias, dx, dweight, dbias,
                       dresidual)
    return (out, stats), (dout, jax.tree.map(jnp.zeros_like, stats))


normalize_activated.defjvp(_normalize_activated_jvp, symbolic_zeros=True)


def _coefficients(inv_std: Array, weight: Array | None, mean_dx: Array, mean_xhat_dx: Array,
                  dweight: Array | None, dbias: Array | None) -> tuple[Array, Array, Array]:
    """The per-channel coefficients of the tangent map ẏ = scale·ẋ + slope·x̂ + intercept:
    scale = w·r, slope = −scale·⟨x̂ẋ⟩ + ẇ, intercept = −scale·⟨ẋ⟩ + ḃ."""
    scale = inv_std if weight is None else inv_std * weight
    slope = -scale * mean_xhat_dx
    intercept = -scale * mean_dx
    if dweight is not None:
        slope, intercept = slope + dweight, intercept + dbias
    return scale, slope, intercept


def normalize_with(reduction: Reduction, eps: float, x: Array, mean: Array, var: Array,
                   weight: Array | None, bias: Array | None) -> Array:
    """Normalizes ``x`` with given statistics (eval mode): ``y = (x − mean)·s + b``,
    ``s = w/√(var + eps)``.

    Centering comes first: ``x − mean`` is exact for data near the mean (Sterbenz), so a
    channel whose mean is large against its spread loses nothing, where the folded
    ``x·s + (b − mean·s)`` cancels (error ≈ 2⁻²⁴·|mean|/σ in float32). It is the same single
    elementwise pass. Computed in the finer of x's and the statistics' precisions, at least
    float32; ``y`` in ``x.dtype``.
    """
    dtype = compute_dtype(jnp.promote_types(x.dtype, mean.dtype))
    scale = _scale(weight, var.astype(dtype), eps)
    y = (x.astype(dtype) - reduction.per_channel(mean.astype(dtype))) * reduction.per_channel(
        scale)
    if bias is not None:
        y = y + reduction.per_channel(bias)
    return y.astype(x.dtype)


def folded(weight: Array | None, bias: Array | None, mean: Array, var: Array,
           eps: float) -> tuple[Array, Array]:
    """Eval-mode batch norm as one multiply-add: ``y = x·scale + offset`` with
    ``scale = w/√(var + eps)`` and ``offset = b − mean·scale`` (w = 1, b = 0 without affine).

    The form a layer folds into (``jbn.fold_into``); it cancels where ``normalize_with`` does
    not, for channels whose mean is large against their spread."""
    scale = _scale(weight, var.astype(compute_dtype(mean.dtype)), eps)
    offset = -mean * scale if bias is None else bias - mean * scale
    return scale, offset


def _scale(weight: Array | None, var: Array, eps: float) -> Array:
    """``w/√(var + eps)``, or ``1/√(var + eps)`` without affine."""
    scale = lax.rsqrt(var + eps)
    return scale if weight is None else scale * weight
