"""Simulated (fake) quantization of one array: ``QuantSpec``, scales, Widrow's prediction.

Array level only (no trees); pure ``jnp``, fine under ``jit``, for every float dtype.
Statistics and the quantization grid are computed in float32 (float64 stays float64).

Exact reference (what every element equals, bit for bit, at every granularity). With
``ft`` the compute dtype (float32; float64 for float64 input), ``x`` cast to ``ft`` and
every operation correctly rounded in ``ft``:

- symmetric: ``qmax = 2**(bits-1) - 1``, ``qmin = -qmax`` (``narrow_range``) or
  ``-qmax - 1``; ``s = ft(max|x|) / ft(qmax)``; ``q = clip(rint(x / s), qmin, qmax) * s``
  (no zero point is added, so a small negative value gives ``-0.0``).
- asymmetric: integer levels ``[qmin, qmax] = [narrow_range, 2**bits - 1]``;
  ``lo = min(min(x), 0)``, ``hi = max(max(x), 0)``, ``s = (hi - lo) / ft(qmax - qmin)``;
  ``zp = clip(rint(qmin - lo / s), qmin, qmax)`` (an integer zero point, so ``0`` stays
  exact); ``q = (clip(rint(x / s) + zp, qmin, qmax) - zp) * s``.

``rint`` rounds half to even; the result is cast back to ``x``'s dtype (round to nearest
even: bfloat16/float16 input is computed in float32 and rounded once at the end). A zero
tensor, channel or group has scale ``0`` and quantizes to zero (never NaN). The maths is
exact wherever the scale is a normal float (XLA on CPU flushes subnormals).

XLA rewrites ``x / s`` into ``x * (1 / s)`` when the divisor is a broadcast (per-tensor
or per-channel scale) or a constant (``max|x| / qmax``); that product is not correctly
rounded and moves values at rounding boundaries one step. Every division here goes
through ``_div``, whose divisor is an elementwise function of the numerator (no broadcast
left to rewrite), so the compiled HLO keeps a true ``divide``; tests check the HLO.

Granularity: ``per_tensor`` (one scale), ``per_channel`` (one per index of ``axis``, the
output channel), ``per_group`` (one per output channel and group of ``group_size``
consecutive inputs, as GPTQ/AWQ int4 quantizers use). Per group, the input of a kernel is
every axis but ``axis`` flattened in C order (a Conv kernel ``(kh, kw, cin, cout)`` has
``d_in = kh*kw*cin``), and group ``g`` holds inputs ``[g*G, min((g+1)*G, d_in))``: when
``G`` does not divide ``d_in`` the last group is *ragged* (``d_in % G`` inputs, its own
scale from those inputs only), and ``G >= d_in`` is per channel.
``qparams``/``scale`` return ``(n_groups, d_out)`` per group (``QParams``); ``per_element``
expands such a statistic to the array's shape.

``fake_quant``'s forward value is ``quantize``'s, bit for bit (a ``custom_jvp`` straight
-through estimator, not ``x + stop_gradient(q - x)``, which rounds and loses ``-0.0``).

Widrow's model: rounding error uniform on ``[-scale/2, scale/2]``, so each quantized value
contributes ``scale² / 12``; exact zeros contribute nothing (zero is on the grid).
Branches that hold *identical* values with *identical* scales round identically: their
errors add coherently (``(n·s)² / 12`` for ``n`` equal branches, not ``n·s² / 12``), which
is why a ``balance`` split at ``threshold <= max/2`` keeps the full original error on the
split values. ``branches_mse`` reports that corrected prediction beside the naive one.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxsplit.errors import ConfigError, ConfigTypeError

__all__ = [
    "QuantSpec",
    "QParams",
    "BranchesMSE",
    "GRANULARITIES",
    "qparams",
    "scale",
    "per_element",
    "quantize",
    "fake_quant",
    "mse",
    "widrow_mse",
    "branches_mse",
    "check_branches",
]

#: Accepted values of ``QuantSpec.granularity``.
GRANULARITIES = ("per_tensor", "per_channel", "per_group")


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantSpec:
    """How to simulate integer quantization of a weight (or activation) array.

    Attributes:
      bits: integer bit width, 2 to 16.
      symmetric: symmetric grid around 0 (``scale = max|x| / qmax``); ``False`` for an
        affine grid with an integer zero point covering ``[min(x, 0), max(x, 0)]``.
      granularity: ``"per_tensor"`` (one scale), ``"per_channel"`` (one scale per index
        of ``axis``, statistics over all other axes) or ``"per_group"`` (one scale per
        output channel and group of ``group_size`` consecutive inputs).
      axis: the output-channel axis for ``"per_channel"`` and ``"per_group"`` (default
        ``-1``, a Dense/Conv kernel's last axis); ignored per tensor.
      narrow_range: symmetric: use ``[-qmax, qmax]`` (``True``) or ``[-qmax-1, qmax]``;
        asymmetric: levels ``[1, 2**bits-1]`` (``True``) or ``[0, 2**bits-1]``.
      group_size: inputs per group (an int >= 1), required with ``"per_group"`` and only
        valid there. A ragged last group (``d_in % group_size`` inputs) gets its own scale.

    Example:
      >>> spec = QuantSpec(bits=4)
      >>> spec.qmin, spec.qmax, hash(spec) == hash(QuantSpec(bits=4))
      (-7, 7, True)
      >>> QuantSpec(bits=4, granularity="per_group", group_size=128).to_dict()["group_size"]
      128
      >>> QuantSpec(bits=1)
      Traceback (most recent call last):
      ...
      jaxsplit.errors.ConfigError: QuantSpec.bits must be an int in [2, 16], got 1
    """

    bits: int = 8
    symmetric: bool = True
    granularity: str = "per_tensor"
    axis: int = -1
    narrow_range: bool = True
    group_size: int | None = None

    def __post_init__(self):
        b = self.bits
        if isinstance(b, bool) or not isinstance(b, int):
            raise ConfigTypeError(
                "QuantSpec",
                "bits",
                f"QuantSpec.bits must be an int in [2, 16], got {b!r} ({type(b).__name__})",
            )
        if not 2 <= b <= 16:
            raise ConfigError(
                "QuantSpec", "bits", f"QuantSpec.bits must be an int in [2, 16], got {b!r}"
            )
        for name in ("symmetric", "narrow_range"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigTypeError(
                    "QuantSpec",
                    name,
                    f"QuantSpec.{name} must be a bool, got {getattr(self, name)!r}",
                )
        if not isinstance(self.granularity, str) or self.granularity not in GRANULARITIES:
            raise ConfigError(
                "QuantSpec",
                "granularity",
                f"QuantSpec.granularity must be one of {list(GRANULARITIES)}, "
                f"got {self.granularity!r}",
            )
        if isinstance(self.axis, bool) or not isinstance(self.axis, int):
            raise ConfigTypeError(
                "QuantSpec", "axis", f"QuantSpec.axis must be an int (e.g. -1), got {self.axis!r}"
            )
        g = self.group_size
        if self.granularity != "per_group":
            if g is not None:
                raise ConfigError(
                    "QuantSpec",
                    "group_size",
                    f"QuantSpec.group_size is only valid with granularity='per_group', got "
                    f"group_size={g!r} with granularity={self.granularity!r} (leave it None)",
                )
            return
        if g is None:
            raise ConfigError(
                "QuantSpec",
                "group_size",
                "QuantSpec.group_size is required with granularity='per_group' "
                "(an int >= 1, e.g. 128), got None",
            )
        if isinstance(g, bool) or not isinstance(g, int):
            raise ConfigTypeError(
                "QuantSpec",
                "group_size",
                f"QuantSpec.group_size must be an int >= 1 (e.g. 128), got {g!r} "
                f"({type(g).__name__})",
            )
        if g < 1:
            raise ConfigError(
                "QuantSpec",
                "group_size",
                f"QuantSpec.group_size must be an int >= 1 (e.g. 128), got {g!r}",
            )

    @property
    def qmax(self) -> int:
        """Largest integer level."""
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def qmin(self) -> int:
        """Smallest integer level."""
        if self.symmetric:
            return -self.qmax if self.narrow_range else -self.qmax - 1
        return 1 if self.narrow_range else 0

    def to_dict(self) -> dict:
        """The spec's fields as plain Python values (``group_size``: ``None`` unless per group)."""
        return dataclasses.asdict(self)


class QParams(NamedTuple):
    """Quantization parameters of one array: ``scale`` (and ``zero_point``, 0 if symmetric).

    Both are float32 (float64 for float64 input). Shapes: a scalar per tensor; per channel
    the array's rank with size 1 on every axis but ``axis`` (it broadcasts against the
    array); per group ``(n_groups, d_out)`` with ``d_out = x.shape[axis]``,
    ``n_groups = ceil(d_in / group_size)`` and row ``g`` for inputs
    ``[g*group_size, (g+1)*group_size)`` of the C-order flattened other axes.
    """

    scale: jax.Array
    zero_point: jax.Array


class BranchesMSE(NamedTuple):
    """Measured and predicted MSE per element of ``sum_i Q(W_i)`` against ``W``.

    Attributes:
      measured: ``mean((sum_i Q(W_i) - W)²)``.
      predicted: naive Widrow sum over branches, ``sum_i widrow_mse(W_i)`` (independent noise).
      predicted_correlated: Widrow with identical branches (same value, same scale at an
        element) rounding identically: ``n`` such branches add ``(n·s)² / 12``.
    """

    measured: jax.Array
    predicted: jax.Array
    predicted_correlated: jax.Array


def _ftype(x) -> jnp.dtype:
    """The compute dtype: at least float32."""
    dt = jnp.result_type(x)
    if not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(f"x must be a floating-point array, got dtype {dt}")
    return jnp.promote_types(dt, jnp.float32)


def _div(a: jax.Array, b) -> jax.Array:
    """Correctly rounded ``a / b`` (``b`` broadcasts against ``a``), never ``a * (1/b)``.

    XLA's simplifier turns a division by a broadcast or a constant into a multiplication
    by the reciprocal. Here the divisor is ``where(a == a, b, nan)``: an elementwise
    function of ``a`` (not a broadcast, not a constant, and not foldable since ``a`` may be
    NaN), equal to ``b`` wherever the quotient is not NaN anyway.
    """
    b = jnp.asarray(b, a.dtype)
    return a / jnp.where(a == a, b, jnp.asarray(jnp.nan, a.dtype))


def _channel_axis(ndim: int, spec: QuantSpec) -> int:
    """``spec.axis`` as a non-negative index (per channel / per group)."""
    if not -ndim <= spec.axis < ndim:
        raise ValueError(
            f"QuantSpec.axis={spec.axis} is out of range for an array of rank {ndim} "
            f"(valid: {-ndim} to {ndim - 1}); {spec.granularity} needs ndim >= 1"
        )
    return spec.axis % ndim


def _to_layout(x: jax.Array, spec: QuantSpec) -> jax.Array:
    """The array in the layout its statistics reduce over.

    Per tensor / per channel: ``x`` itself. Per group: ``(n_groups, group_size, d_out)``,
    the other axes flattened in C order to ``d_in`` and zero-padded up to
    ``n_groups * group_size`` (zeros change neither max-abs nor ``[min(x,0), max(x,0)]``).
    """
    if spec.granularity != "per_group":
        return x
    ax = _channel_axis(x.ndim, spec)
    d_out = x.shape[ax]
    d_in = math.prod(x.shape) // d_out if d_out else math.prod(x.shape[:ax] + x.shape[ax + 1 :])
    g = spec.group_size
    n_groups = max(1, -(-d_in // g))
    x2 = jnp.moveaxis(x, ax, -1).reshape(d_in, d_out)
    pad = n_groups * g - d_in
    if pad:
        x2 = jnp.pad(x2, ((0, pad), (0, 0)))
    return x2.reshape(n_groups, g, d_out)


def _from_layout(xl: jax.Array, shape: tuple[int, ...], spec: QuantSpec) -> jax.Array:
    """Inverse of ``_to_layout`` for an array of ``shape``."""
    if spec.granularity != "per_group":
        return xl
    ax = _channel_axis(len(shape), spec)
    moved = shape[:ax] + shape[ax + 1 :] + (shape[ax],)
    d_in = math.prod(moved[:-1])
    x2 = xl.reshape(xl.shape[0] * xl.shape[1], shape[ax])[:d_in]
    return jnp.moveaxis(x2.reshape(moved), -1, ax)


def _reduce_axes(xl: jax.Array, spec: QuantSpec) -> tuple[int, ...]:
    """Axes of the layout reduced for the statistics."""
    if spec.granularity == "per_tensor":
        return tuple(range(xl.ndim))
    if spec.granularity == "per_group":
        return (1,)
    ax = _channel_axis(xl.ndim, spec)
    return tuple(i for i in range(xl.ndim) if i != ax)


def _qparams_layout(xl: jax.Array, spec: QuantSpec) -> QParams:
    """Scale and zero point with ``keepdims`` shapes (broadcast against the layout)."""
    axes = _reduce_axes(xl, spec)
    if spec.symmetric:
        amax = jnp.max(jnp.abs(xl), axis=axes, keepdims=True, initial=0.0)
        s = _div(amax, spec.qmax)
        return QParams(s, jnp.zeros_like(s))
    lo = jnp.min(xl, axis=axes, keepdims=True, initial=0.0)
    hi = jnp.max(xl, axis=axes, keepdims=True, initial=0.0)
    s = _div(hi - lo, spec.qmax - spec.qmin)
    safe = jnp.where(s > 0, s, jnp.ones_like(s))
    zp = jnp.clip(jnp.round(spec.qmin - _div(lo, safe)), spec.qmin, spec.qmax)
    zp = jnp.where(s > 0, zp, jnp.full_like(zp, spec.qmin))
    return QParams(s, zp)


def _public(a: jax.Array, spec: QuantSpec) -> jax.Array:
    """A layout statistic in its documented shape (see ``QParams``)."""
    if spec.granularity == "per_tensor":
        return a.reshape(())
    if spec.granularity == "per_group":
        return a[:, 0, :]
    return a


def _params_layout(params: QParams, xl: jax.Array, spec: QuantSpec) -> QParams:
    """User ``QParams`` (documented shapes) in the layout's broadcast shape."""
    ft = xl.dtype
    out = []
    for name, a in zip(QParams._fields, params, strict=True):
        a = jnp.asarray(a).astype(ft)
        if spec.granularity == "per_group":
            want = (xl.shape[0], xl.shape[2])
            try:
                a = jnp.broadcast_to(a, want)
            except ValueError:
                raise ValueError(
                    f"params.{name} must broadcast to (n_groups, d_out) = {want} for "
                    f"QuantSpec.granularity='per_group', got shape {tuple(a.shape)}"
                ) from None
            a = a[:, None, :]
        out.append(a)
    return QParams(*out)


@functools.partial(jax.jit, static_argnames="spec")
def qparams(x: jax.Array, spec: QuantSpec) -> QParams:
    """Scale and zero point calibrated by the range of ``x`` (max-abs, or min/max if asymmetric).

    Args:
      x: a floating-point array.
      spec: a ``QuantSpec``.

    Returns:
      ``QParams(scale, zero_point)`` shaped as ``QParams`` documents (scalar per tensor,
      broadcastable per channel, ``(n_groups, d_out)`` per group); a zero
      tensor/channel/group gets ``scale == 0``.

    Raises:
      TypeError: ``x`` is not floating point.
      ValueError: ``spec.axis`` is out of range for ``x`` (per channel / per group).

    Example:
      >>> import jax.numpy as jnp
      >>> qp = qparams(jnp.array([-1.0, 3.0]), QuantSpec(bits=8, symmetric=False))
      >>> round(float(qp.scale) * 254, 6), float(qp.zero_point)
      (4.0, 64.0)
      >>> w = jnp.array([[1.0, 2.0], [-4.0, 0.5], [0.25, -8.0]])  # d_in 3, groups [0, 2), [2]
      >>> (qparams(w, QuantSpec(bits=2, granularity="per_group", group_size=2)).scale).tolist()
      [[4.0, 2.0], [0.25, 8.0]]
    """
    ft = _ftype(x)
    xl = _to_layout(jnp.asarray(x).astype(ft), spec)
    qp = _qparams_layout(xl, spec)
    return QParams(_public(qp.scale, spec), _public(qp.zero_point, spec))


@functools.partial(jax.jit, static_argnames="spec")
def scale(x: jax.Array, spec: QuantSpec) -> jax.Array:
    """The quantization step of ``x`` under ``spec`` (``qparams(x, spec).scale``).

    Per tensor a scalar; per channel shaped to broadcast against ``x`` (size 1 on every
    axis but ``spec.axis``); per group ``(n_groups, d_out)``. A zero tensor/channel/group
    gets 0.

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.array([[1.0, -0.5], [-2.0, 0.0]])
      >>> float(scale(x, QuantSpec(bits=2)))
      2.0
      >>> scale(x, QuantSpec(bits=2, granularity="per_channel")).tolist()
      [[2.0, 0.5]]
      >>> scale(x, QuantSpec(bits=2, granularity="per_group", group_size=1)).tolist()
      [[1.0, 0.5], [2.0, 0.0]]
    """
    return qparams(x, spec).scale


def per_element(a: jax.Array, shape: tuple[int, ...], spec: QuantSpec) -> jax.Array:
    """A statistic from ``qparams``/``scale`` in a form that broadcasts against ``x``.

    Per tensor and per channel ``a`` already broadcasts and comes back unchanged; per group
    the ``(n_groups, d_out)`` array is expanded to ``shape`` (each element gets its group's
    value). Use it to combine a per-group scale with the array elementwise.

    Args:
      a: ``qparams(x, spec).scale`` or ``.zero_point`` (or any array of that shape).
      shape: ``x.shape``.
      spec: the ``QuantSpec`` that produced ``a``.

    Returns:
      ``a``, broadcastable against an array of ``shape``.

    Raises:
      ValueError: ``spec.axis`` is out of range for ``shape`` (per group).

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.array([[1.0], [-4.0], [0.5]])
      >>> spec = QuantSpec(bits=2, granularity="per_group", group_size=2)
      >>> per_element(scale(x, spec), x.shape, spec).ravel().tolist()
      [4.0, 4.0, 0.5]
    """
    a = jnp.asarray(a)
    if spec.granularity != "per_group":
        return a
    shape = tuple(shape)
    ax = _channel_axis(len(shape), spec)
    g = spec.group_size
    full = jnp.broadcast_to(a[:, None, :], (a.shape[0], g, shape[ax]))
    return _from_layout(full, shape, spec)


def _quantize_f(xf: jax.Array, qp: QParams, spec: QuantSpec) -> tuple[jax.Array, jax.Array]:
    """``(q, inside)`` in the compute dtype and layout: fake-quantized values, in-range mask."""
    s = qp.scale.astype(xf.dtype)
    zp = qp.zero_point.astype(xf.dtype)
    nonzero = s > 0
    safe = jnp.where(nonzero, s, jnp.ones_like(s))
    v = jnp.round(_div(xf, safe))
    if spec.symmetric:  # no ``+ 0``: it would turn ``rint(-0.3) == -0.0`` into ``+0.0``
        inside = (v >= spec.qmin) & (v <= spec.qmax)
        q = jnp.clip(v, spec.qmin, spec.qmax) * s
    else:
        v = v + zp
        inside = (v >= spec.qmin) & (v <= spec.qmax)
        q = (jnp.clip(v, spec.qmin, spec.qmax) - zp) * s
    return jnp.where(nonzero, q, jnp.zeros_like(q)), inside | ~nonzero


def _quantize_full(
    x: jax.Array, spec: QuantSpec, params: QParams | None
) -> tuple[jax.Array, jax.Array]:
    """``(q, inside)`` of ``x`` in the compute dtype and ``x``'s shape."""
    xl = _to_layout(x.astype(_ftype(x)), spec)
    qp = _qparams_layout(xl, spec) if params is None else _params_layout(params, xl, spec)
    qp = QParams(*(jax.lax.stop_gradient(a) for a in qp))
    q, inside = _quantize_f(xl, qp, spec)
    return _from_layout(q, x.shape, spec), _from_layout(inside, x.shape, spec)


@functools.partial(jax.jit, static_argnames="spec")
def quantize(x: jax.Array, spec: QuantSpec, *, params: QParams | None = None) -> jax.Array:
    """Fake-quantized ``x``: round onto the integer grid and back, in ``x``'s dtype.

    Bit-identical to the module's exact reference (correctly rounded ``x / scale``, round
    half to even, clip, times ``scale``) on every element. No gradient trick (the
    gradient of rounding is zero almost everywhere); use ``fake_quant`` for training.

    Args:
      x: a floating-point array.
      spec: a ``QuantSpec``.
      params: precomputed ``QParams`` (e.g. calibrated over a dataset) in the shapes
        ``QParams`` documents; default: from ``x``.

    Returns:
      An array of ``x``'s shape and dtype on the grid ``(k - zero_point) * scale``.

    Raises:
      TypeError: ``x`` is not floating point.
      ValueError: ``spec.axis`` is out of range for ``x``, or ``params`` do not fit.

    Example:
      >>> import jax.numpy as jnp
      >>> quantize(jnp.array([0.3, -1.0, 0.5, 0.7]), QuantSpec(bits=2)).tolist()  # half to even
      [0.0, -1.0, 0.0, 1.0]
      >>> w = jnp.array([[0.3], [1.0], [0.1], [0.05], [0.2]])  # groups [0, 2), [2, 4), [4]
      >>> quantize(w, QuantSpec(bits=2, granularity="per_group", group_size=2)).ravel().tolist()
      [0.0, 1.0, 0.10000000149011612, 0.0, 0.20000000298023224]
    """
    x = jnp.asarray(x)
    return _quantize_full(x, spec, params)[0].astype(x.dtype)


@functools.partial(jax.jit, static_argnames="spec")
def fake_quant(x: jax.Array, spec: QuantSpec, *, params: QParams | None = None) -> jax.Array:
    """``quantize`` with a straight-through gradient: identity inside the clip range, 0 outside.

    The forward values equal ``quantize(x, spec, params=params)`` exactly; the scale is
    treated as a constant (no gradient flows into it). With the default max-abs calibration
    every value is inside the range, so the gradient is the identity.

    Args:
      x: a floating-point array.
      spec: a ``QuantSpec``.
      params: precomputed ``QParams``; default: from ``x``.

    Returns:
      The fake-quantized array, ``x``'s shape and dtype.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> spec = QuantSpec(bits=2)
      >>> fake_quant(jnp.array([0.3, -1.0]), spec).tolist()
      [0.0, -1.0]
      >>> jax.grad(lambda x: fake_quant(x, spec).sum())(jnp.array([0.3, -1.0])).tolist()
      [1.0, 1.0]
    """
    x = jnp.asarray(x)
    q, inside = _quantize_full(jax.lax.stop_gradient(x), spec, params)
    return _straight_through(x, q.astype(x.dtype), inside)


@jax.custom_jvp
def _straight_through(x: jax.Array, q: jax.Array, inside: jax.Array) -> jax.Array:
    """``q`` itself (bit for bit: ``x + (q - x)`` would round, and lose ``-0.0``), with
    the derivative of ``x`` inside the clip range and 0 outside."""
    del x, inside
    return q


@_straight_through.defjvp
def _straight_through_jvp(primals, tangents):
    x, q, inside = primals
    dx = tangents[0]
    return q, jnp.where(inside, dx, jnp.zeros_like(dx))


@functools.partial(jax.jit, static_argnames="spec")
def mse(x: jax.Array, spec: QuantSpec) -> jax.Array:
    """Measured mean-squared error per element of ``Q(x)`` against ``x`` (float32 or wider).

    Example:
      >>> import jax.numpy as jnp
      >>> float(mse(jnp.array([0.25, -1.0, 0.5, 0.0]), QuantSpec(bits=2)))  # (1/16 + 1/4) / 4
      0.078125
      >>> g = QuantSpec(bits=2, granularity="per_group", group_size=2)
      >>> float(mse(jnp.array([[0.25], [-1.0], [0.5], [0.0]]), g))  # (1/16 + 0 + 0 + 0) / 4
      0.015625
    """
    return branches_mse((x,), x, spec).measured


@functools.partial(jax.jit, static_argnames="spec")
def widrow_mse(x: jax.Array, spec: QuantSpec) -> jax.Array:
    """Widrow-predicted MSE per element: (non-zero fraction) × ``scale² / 12``.

    Each element gets its own scale (tensor, channel or group), so per channel the result
    is the mean over channels of (channel's non-zero fraction × ``scale_c² / 12``), and per
    group the mean over groups of the same, weighted by group size (a ragged last group
    counts for its ``d_in % group_size`` inputs).

    Args:
      x: a floating-point array.
      spec: a ``QuantSpec``.

    Returns:
      A scalar (float32, or float64 for float64 input).

    Example:
      >>> import jax.numpy as jnp
      >>> round(float(widrow_mse(jnp.array([0.0, 12.0, 6.0]), QuantSpec(bits=2))), 5)  # 2/3*144/12
      8.0
      >>> g = QuantSpec(bits=2, granularity="per_group", group_size=2)  # scales 12 and 6
      >>> round(float(widrow_mse(jnp.array([[0.0], [12.0], [6.0]]), g)), 5)  # (144 + 36)/12/3
      5.0
    """
    return _widrow_terms((jnp.asarray(x),), spec)[0]


def _widrow_terms(branches, spec: QuantSpec) -> tuple[jax.Array, jax.Array]:
    """``(naive, correlated)`` Widrow predictions for ``sum_i Q(branch_i)``."""
    ft = _ftype(branches[0])
    size = math.prod(jnp.shape(branches[0]))
    xs = [_to_layout(jnp.asarray(b).astype(ft), spec) for b in branches]
    ss = [_qparams_layout(x, spec).scale for x in xs]
    s2 = [jnp.square(s) for s in ss]
    naive = jnp.zeros((), ft)
    corr = jnp.zeros((), ft)
    for i, x in enumerate(xs):
        nz = (x != 0).astype(ft)  # padding of a ragged group is 0: it never counts
        # n_i: branches holding the same value with the same scale at this element.
        n = sum(((xs[j] == x) & (ss[j] == ss[i])).astype(ft) for j in range(len(xs)))
        naive = naive + jnp.sum(nz * s2[i]) / size / 12
        corr = corr + jnp.sum(nz * n * s2[i]) / size / 12
    return naive, corr


def check_branches(branches, w) -> None:
    """Raises unless ``branches`` is a non-empty sequence of arrays of ``w``'s shape.

    Raises:
      ValueError: no branches, or a branch's shape differs from ``w``'s.

    Example:
      >>> import jax.numpy as jnp
      >>> check_branches((jnp.ones(2),), jnp.ones(3))  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      ValueError: branches must all have w's shape (3,), got shapes [(2,)]
    """
    branches = tuple(branches)
    if not branches:
        raise ValueError("branches must hold at least one array, got none")
    bad = [tuple(jnp.shape(b)) for b in branches if tuple(jnp.shape(b)) != tuple(jnp.shape(w))]
    if bad:
        raise ValueError(
            f"branches must all have w's shape {tuple(jnp.shape(w))}, got shapes "
            f"{[tuple(jnp.shape(b)) for b in branches]}"
        )


@functools.partial(jax.jit, static_argnames="spec")
def branches_mse(branches, w: jax.Array, spec: QuantSpec) -> BranchesMSE:
    """MSE of ``sum_i Q(W_i)`` against ``W``, each branch quantized separately with its own scale.

    Args:
      branches: a sequence of arrays of ``w``'s shape (e.g. ``kernels.balance(w, t)``); a
        single ``(w,)`` measures plain ``Q(w)``.
      w: the original array (normally ``sum(branches)``).
      spec: a ``QuantSpec``.

    Returns:
      ``BranchesMSE(measured, predicted, predicted_correlated)``, scalars per element.

    Raises:
      ValueError: no branches, or a branch's shape differs from ``w``'s.

    Example:
      >>> import jax.numpy as jnp
      >>> w = jnp.array([0.25, 1.0, -0.75])
      >>> r = branches_mse((w / 2, w / 2), w, QuantSpec(bits=3))
      >>> float(r.measured) == float(mse(w, QuantSpec(bits=3)))   # halves round alike
      True
      >>> float(r.predicted_correlated / r.predicted)
      2.0
    """
    branches = tuple(branches)
    w = jnp.asarray(w)
    check_branches(branches, w)
    ft = _ftype(w)
    total = jnp.zeros(w.shape, ft)
    for b in branches:
        b = jnp.asarray(b).astype(ft)
        total = total + _quantize_full(b, spec, None)[0]
    measured = jnp.mean(jnp.square(total - w.astype(ft)))
    naive, corr = _widrow_terms(branches, spec)
    return BranchesMSE(measured, naive, corr)
