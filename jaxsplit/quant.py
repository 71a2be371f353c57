"""Simulated (fake) quantization of one array: ``QuantSpec``, scales, Widrow's prediction.

Array level only (no trees); pure ``jnp``, fine under ``jit``, for every float dtype.
Statistics and the quantization grid are computed in float32 (float64 stays float64).

Symmetric (the default, DESIGN.md): ``qmax = 2**(bits-1) - 1``, ``scale = max|x| / qmax``,
``q = clip(round_half_even(x / scale), qmin, qmax) * scale`` with ``qmin = -qmax``
(``narrow_range``) or ``-qmax - 1``. Asymmetric: integer levels ``[qmin, qmax] =
[narrow_range, 2**bits - 1]``, the range ``[min(x, 0), max(x, 0)]`` mapped onto them with an
integer zero point, so ``0`` stays exact. A zero tensor (or channel) has scale ``0`` and
quantizes to zero (never NaN).

XLA may rewrite ``x / scale`` as ``x * (1 / scale)``, so results agree with an
exact-division reference within 2 float32 ulps of ``max|x|`` (a wrong rounding or clip
would be off by a whole step).

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
from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
    "QuantSpec",
    "QParams",
    "BranchesMSE",
    "GRANULARITIES",
    "qparams",
    "scale",
    "quantize",
    "fake_quant",
    "mse",
    "widrow_mse",
    "branches_mse",
]

#: Accepted values of ``QuantSpec.granularity``.
GRANULARITIES = ("per_tensor", "per_channel")


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantSpec:
    """How to simulate integer quantization of a weight (or activation) array.

    Attributes:
      bits: integer bit width, 2 to 16.
      symmetric: symmetric grid around 0 (``scale = max|x| / qmax``); ``False`` for an
        affine grid with an integer zero point covering ``[min(x, 0), max(x, 0)]``.
      granularity: ``"per_tensor"`` (one scale) or ``"per_channel"`` (one scale per index
        of ``axis``, statistics over all other axes).
      axis: the output-feature axis for ``"per_channel"`` (default ``-1``, a Dense/Conv
        kernel's last axis); ignored per tensor.
      narrow_range: symmetric: use ``[-qmax, qmax]`` (``True``) or ``[-qmax-1, qmax]``;
        asymmetric: levels ``[1, 2**bits-1]`` (``True``) or ``[0, 2**bits-1]``.

    Example:
      >>> spec = QuantSpec(bits=4)
      >>> spec.qmin, spec.qmax, hash(spec) == hash(QuantSpec(bits=4))
      (-7, 7, True)
      >>> QuantSpec(bits=1)
      Traceback (most recent call last):
      ...
      ValueError: QuantSpec.bits must be an int in [2, 16], got 1
    """

    bits: int = 8
    symmetric: bool = True
    granularity: str = "per_tensor"
    axis: int = -1
    narrow_range: bool = True

    def __post_init__(self):
        b = self.bits
        if isinstance(b, bool) or not isinstance(b, int):
            raise TypeError(
                f"QuantSpec.bits must be an int in [2, 16], got {b!r} ({type(b).__name__})"
            )
        if not 2 <= b <= 16:
            raise ValueError(f"QuantSpec.bits must be an int in [2, 16], got {b!r}")
        for name in ("symmetric", "narrow_range"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"QuantSpec.{name} must be a bool, got {getattr(self, name)!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"QuantSpec.granularity must be one of {list(GRANULARITIES)}, "
                f"got {self.granularity!r}"
            )
        if isinstance(self.axis, bool) or not isinstance(self.axis, int):
            raise TypeError(f"QuantSpec.axis must be an int (e.g. -1), got {self.axis!r}")

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
        """The spec's fields as plain Python values."""
        return dataclasses.asdict(self)


class QParams(NamedTuple):
    """Quantization parameters of one array: ``scale`` (and ``zero_point``, 0 if symmetric).

    Both are float32 (float64 for float64 input), scalar per tensor or shaped to broadcast
    against the array per channel.
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


def _reduce_axes(x: jax.Array, spec: QuantSpec) -> tuple[int, ...]:
    """Axes reduced for the statistics: all (per tensor) or all but ``spec.axis``."""
    if spec.granularity == "per_tensor":
        return tuple(range(x.ndim))
    if not -x.ndim <= spec.axis < x.ndim:
        raise ValueError(
            f"QuantSpec.axis={spec.axis} is out of range for an array of shape "
            f"{tuple(x.shape)} (valid: {-x.ndim} to {x.ndim - 1}); per_channel needs ndim >= 1"
        )
    ax = spec.axis % x.ndim
    return tuple(i for i in range(x.ndim) if i != ax)


@functools.partial(jax.jit, static_argnames="spec")
def qparams(x: jax.Array, spec: QuantSpec) -> QParams:
    """Scale and zero point calibrated by the range of ``x`` (max-abs, or min/max if asymmetric).

    Args:
      x: a floating-point array.
      spec: a ``QuantSpec``.

    Returns:
      ``QParams(scale, zero_point)``; a zero tensor/channel gets ``scale == 0``.

    Raises:
      TypeError: ``x`` is not floating point.
      ValueError: ``spec.axis`` is out of range for ``x`` (per channel).

    Example:
      >>> import jax.numpy as jnp
      >>> qp = qparams(jnp.array([-1.0, 3.0]), QuantSpec(bits=8, symmetric=False))
      >>> round(float(qp.scale) * 254, 6), float(qp.zero_point)
      (4.0, 64.0)
    """
    ft = _ftype(x)
    xf = jnp.asarray(x).astype(ft)
    axes = _reduce_axes(xf, spec)
    if spec.symmetric:
        amax = jnp.max(jnp.abs(xf), axis=axes, keepdims=True, initial=0.0)
        s = amax / spec.qmax
        return QParams(_squeeze(s, spec), jnp.zeros_like(_squeeze(s, spec)))
    lo = jnp.min(xf, axis=axes, keepdims=True, initial=0.0)
    hi = jnp.max(xf, axis=axes, keepdims=True, initial=0.0)
    s = (hi - lo) / (spec.qmax - spec.qmin)
    safe = jnp.where(s > 0, s, jnp.ones_like(s))
    zp = jnp.clip(jnp.round(spec.qmin - lo / safe), spec.qmin, spec.qmax)
    zp = jnp.where(s > 0, zp, jnp.full_like(zp, spec.qmin))
    return QParams(_squeeze(s, spec), _squeeze(zp, spec))


def _squeeze(a: jax.Array, spec: QuantSpec) -> jax.Array:
    """A per-tensor statistic as a scalar; per channel it keeps the broadcast shape."""
    return a.reshape(()) if spec.granularity == "per_tensor" else a


@functools.partial(jax.jit, static_argnames="spec")
def scale(x: jax.Array, spec: QuantSpec) -> jax.Array:
    """The quantization step of ``x`` under ``spec`` (``qparams(x, spec).scale``).

    Per tensor a scalar; per channel shaped to broadcast against ``x`` (size 1 on every
    axis but ``spec.axis``). A zero tensor/channel gets 0.

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.array([[1.0, -0.5], [-2.0, 0.0]])
      >>> float(scale(x, QuantSpec(bits=2)))
      2.0
      >>> scale(x, QuantSpec(bits=2, granularity="per_channel")).tolist()
      [[2.0, 0.5]]
    """
    return qparams(x, spec).scale


def _quantize_f(xf: jax.Array, qp: QParams, spec: QuantSpec) -> tuple[jax.Array, jax.Array]:
    """``(q, inside)`` in the compute dtype: fake-quantized values and the in-range mask."""
    s = qp.scale.astype(xf.dtype)
    zp = qp.zero_point.astype(xf.dtype)
    nonzero = s > 0
    safe = jnp.where(nonzero, s, jnp.ones_like(s))
    v = jnp.round(xf / safe) + zp
    inside = (v >= spec.qmin) & (v <= spec.qmax)
    q = (jnp.clip(v, spec.qmin, spec.qmax) - zp) * s
    return jnp.where(nonzero, q, jnp.zeros_like(q)), inside | ~nonzero


@functools.partial(jax.jit, static_argnames="spec")
def quantize(x: jax.Array, spec: QuantSpec, *, params: QParams | None = None) -> jax.Array:
    """Fake-quantized ``x``: round onto the integer grid and back, in ``x``'s dtype.

    No gradient trick (the gradient of rounding is zero almost everywhere); use
    ``fake_quant`` for training. Agrees with an exact-division numpy reference within 2
    float32 ulps of ``max|x|`` (XLA may compute ``x * (1/scale)``).

    Args:
      x: a floating-point array.
      spec: a ``QuantSpec``.
      params: precomputed ``QParams`` (e.g. calibrated over a dataset); default: from ``x``.

    Returns:
      An array of ``x``'s shape and dtype on the grid ``(k - zero_point) * scale``.

    Raises:
      TypeError: ``x`` is not floating point.
      ValueError: ``spec.axis`` is out of range for ``x`` (per channel).

    Example:
      >>> import jax.numpy as jnp
      >>> quantize(jnp.array([0.3, -1.0, 0.5, 0.7]), QuantSpec(bits=2)).tolist()  # half to even
      [0.0, -1.0, 0.0, 1.0]
    """
    ft = _ftype(x)
    x = jnp.asarray(x)
    qp = qparams(x, spec) if params is None else params
    q, _ = _quantize_f(x.astype(ft), qp, spec)
    return q.astype(x.dtype)


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
    ft = _ftype(x)
    x = jnp.asarray(x)
    qp = qparams(x, spec) if params is None else params
    qp = QParams(*(jax.lax.stop_gradient(a) for a in qp))
    q, inside = _quantize_f(x.astype(ft), qp, spec)
    q = q.astype(x.dtype)
    ste = x + jax.lax.stop_gradient(q - x)
    return jnp.where(inside, ste, jax.lax.stop_gradient(q))


@functools.partial(jax.jit, static_argnames="spec")
def mse(x: jax.Array, spec: QuantSpec) -> jax.Array:
    """Measured mean-squared error per element of ``Q(x)`` against ``x`` (float32 or wider).

    Example:
      >>> import jax.numpy as jnp
      >>> float(mse(jnp.array([0.25, -1.0, 0.5, 0.0]), QuantSpec(bits=2)))  # (1/16 + 1/4) / 4
      0.078125
    """
    return branches_mse((x,), x, spec).measured


@functools.partial(jax.jit, static_argnames="spec")
def widrow_mse(x: jax.Array, spec: QuantSpec) -> jax.Array:
    """Widrow-predicted MSE per element: (non-zero fraction) × ``scale² / 12``.

    Per channel, each element gets its channel's scale, so the result is the mean over
    channels of (channel's non-zero fraction × ``scale_c² / 12``).

    Args:
      x: a floating-point array.
      spec: a ``QuantSpec``.

    Returns:
      A scalar (float32, or float64 for float64 input).

    Example:
      >>> import jax.numpy as jnp
      >>> round(float(widrow_mse(jnp.array([0.0, 12.0, 6.0]), QuantSpec(bits=2))), 5)  # 2/3*144/12
      8.0
    """
    return _widrow_terms((jnp.asarray(x),), spec)[0]


def _widrow_terms(branches, spec: QuantSpec) -> tuple[jax.Array, jax.Array]:
    """``(naive, correlated)`` Widrow predictions for ``sum_i Q(branch_i)``."""
    ft = _ftype(branches[0])
    xs = [jnp.asarray(b).astype(ft) for b in branches]
    ss = [scale(x, spec) for x in xs]
    s2 = [jnp.square(s) for s in ss]
    naive = jnp.zeros((), ft)
    corr = jnp.zeros((), ft)
    for i, x in enumerate(xs):
        nz = (x != 0).astype(ft)
        # n_i: branches holding the same value with the same scale at this element.
        n = sum(((xs[j] == x) & (ss[j] == ss[i])).astype(ft) for j in range(len(xs)))
        naive = naive + jnp.mean(nz * s2[i]) / 12
        corr = corr + jnp.mean(nz * n * s2[i]) / 12
    return naive, corr


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
    if not branches:
        raise ValueError("branches must hold at least one array, got none")
    bad = [tuple(jnp.shape(b)) for b in branches if tuple(jnp.shape(b)) != tuple(w.shape)]
    if bad:
        raise ValueError(
            f"branches must all have w's shape {tuple(w.shape)}, got shapes "
            f"{[tuple(jnp.shape(b)) for b in branches]}"
        )
    ft = _ftype(w)
    total = jnp.zeros(w.shape, ft)
    for b in branches:
        b = jnp.asarray(b).astype(ft)
        total = total + _quantize_f(b, qparams(b, spec), spec)[0]
    measured = jnp.mean(jnp.square(total - w.astype(ft)))
    naive, corr = _widrow_terms(branches, spec)
    return BranchesMSE(measured, naive, corr)
