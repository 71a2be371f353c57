"""Array-level split arithmetic: pure ``jnp`` functions on one kernel, no trees.

Every method returns a tuple of branch arrays whose left-to-right sum equals the
input **bit for bit**. Values are split when ``|w| > threshold`` (strict), with the
threshold cast to the kernel's dtype first (PPQ parity); NaN is never split and
``±inf`` is never split (it stays on ``branch_0``, ``branch_1`` gets ``0`` there).

Exactness, argued per method:

* ``balance``: ``w2 = w / 2`` and ``w1 = w - w2``. Halving is exact for normal
  numbers; where it is not (subnormal results, or XLA flushing them to zero on CPU),
  ``w - w2`` is still exact by Sterbenz' lemma (``w2`` lies in ``[0, w]`` with
  the same sign, and ``w - 0 == w``), so ``w1 + w2 == w``. On CPU, XLA flushes
  subnormal results to zero, so a value below twice the smallest normal number may
  stay whole on ``branch_0`` (exact all the same).
* ``random``: ``u ~ U[0.5, 1)``, ``big = w * u`` rounded, so ``|big|`` lies in
  ``[|w|/2, |w|]`` and ``w - big`` is exact (Sterbenz). A fair coin decides which
  branch receives ``big``.
* ``clip``, ``grid``, k-way ``balance`` rest on one lemma: if every share ``x`` is a
  multiple of ``ulp(w)`` (the float spacing in ``w``'s binade) with ``w``'s sign and
  ``|x| <= |w|``, every partial sum is such a multiple no larger than ``|w|``, hence
  representable, so the left-to-right sum is exact (``snap_to_ulp``).
* ``snap``: the ``clip`` twin moved onto its own quantization grid; every share is
  snapped to ``ulp(w)``, has ``w``'s sign and is at most ``|w|`` (the lemma above).
* ``residual``: ``w1 = Q(w)`` lies in ``[w/2, 2w]`` or is ``0``, so ``w - w1`` is exact.
* ``compensate``: ``w1`` a dense grid point snapped to ``ulp(w)`` and ``w2 = w - w1``,
  kept only where ``branch_sum`` gives back ``w``; elsewhere ``snap``'s exact shares.

Where a corner case escapes these arguments (subnormals, which XLA flushes to zero on
CPU), ``exact_or_keep`` leaves that one value whole on ``branch_0``, so the contract
``branch_sum(split(...)) == w`` holds for every method, always.
"""

from __future__ import annotations

import functools
import math
import zlib

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.random import threefry2x32_p

from jaxsplit import blocks, quant

__all__ = [
    "METHODS",
    "QUANT_METHODS",
    "BRANCHES",
    "split_mask",
    "balance",
    "random",
    "clip",
    "grid",
    "residual",
    "snap",
    "compensate",
    "COMPENSATE_SLOTS",
    "COMPENSATE_WINDOW",
    "window_start",
    "elementwise",
    "RECOMPUTED",
    "branch_sum",
    "snap_to_ulp",
    "exact_or_keep",
    "split",
    "stochastic_key",
    "element_bits",
]

#: Split methods this module implements (``SplitConfig.method`` accepts these).
METHODS = ("balance", "random", "clip", "grid", "residual", "snap", "compensate")
#: Methods whose shares depend on the quantization grid (they need a ``QuantSpec``).
QUANT_METHODS = ("grid", "residual", "snap", "compensate")
#: ``compensate``: twin values per output column re-chosen against the calibration.
COMPENSATE_SLOTS = 32
#: ``compensate`` tries dense codes within this many steps of ``snap``'s (a full scan of
#: ``2·qmax + 1`` codes up to int6; int8 would be 255 passes over the kernel, int16 65 535).
COMPENSATE_WINDOW = 31
#: Accepted branch counts (``branches > 2`` only for ``balance``).
BRANCHES = (2, 4, 8)


def split_mask(w: jax.Array, threshold) -> jax.Array:
    """Boolean mask of the values that a split divides: finite and ``|w| > threshold``.

    Args:
      w: a floating-point array.
      threshold: a scalar (or an array broadcastable to ``w``); cast to ``w.dtype``
        before the comparison, as PPQ does.

    Returns:
      A bool array of ``w``'s shape.

    Example:
      >>> import jax.numpy as jnp
      >>> split_mask(jnp.array([0.1, -0.5, 0.7, jnp.inf]), 0.5).tolist()
      [False, False, True, False]
    """
    t = jnp.asarray(threshold).astype(w.dtype)
    return (jnp.abs(w) > t) & jnp.isfinite(w)


def balance(w: jax.Array, threshold, branches: int = 2) -> tuple[jax.Array, ...]:
    """PPQ's ``balance`` split: values above the threshold are shared equally between branches.

    With ``branches=2`` each split value is halved exactly (``w2 = w / 2``,
    ``w1 = w - w2``). With ``branches=k`` (4 or 8) the equal share ``w / k`` is rounded
    to a multiple of ``ulp(w)`` (``snap_to_ulp``; a change of at most half an ulp) and
    ``branch_0`` takes ``w - (k-1)·share``, so every partial sum of the left-to-right
    sum is exact (plain ``w / 4`` four times is not: ``3w/4`` can round).

    Args:
      w: a floating-point kernel of any shape.
      threshold: absolute threshold (scalar, or an array broadcastable to ``w``).
      branches: number of branches, one of ``BRANCHES``.

    Returns:
      ``branches`` arrays in ``w``'s dtype whose left-to-right sum is ``w`` bit for bit;
      where ``|w| <= threshold`` (or ``w`` is not finite), ``branch_0 = w`` and the
      others are ``0``.

    Raises:
      ValueError: ``branches`` is not one of ``BRANCHES``.

    Example:
      >>> import jax.numpy as jnp
      >>> w1, w2 = balance(jnp.array([0.25, -3.0, 2.0]), 1.0)
      >>> w1.tolist(), w2.tolist()
      ([0.25, -1.5, 1.0], [0.0, -1.5, 1.0])
      >>> [b.tolist() for b in balance(jnp.array([8.0, 0.5]), 1.0, branches=4)]
      [[2.0, 0.5], [2.0, 0.0], [2.0, 0.0], [2.0, 0.0]]
    """
    _check_branches(branches)
    zero = jnp.zeros_like(w)
    if branches == 2:
        half = w / 2
        mask = split_mask(w, threshold) & (half != 0)  # a flushed half: keep the value whole
        w2 = jnp.where(mask, half, zero)
        w1 = jnp.where(mask, w - w2, w)
        return w1, w2
    mask = split_mask(w, threshold)
    share = jnp.where(mask, snap_to_ulp(w / branches, w), zero)
    first = jnp.where(mask, w - (branches - 1) * share, w)
    return exact_or_keep(w, (first, *([share] * (branches - 1))))


def element_bits(key: jax.Array, shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """Two independent ``uint32`` words per element: Threefry-2x32 of the element's flat index.

    Elementwise by construction (each element hashes its own row-major index with the
    key), so it is reproducible on every backend and needs no communication when the
    leading or the last axis is sharded. Kernels of rank > 2 are hashed as the 2-D view
    ``(prod(shape[:-1]), shape[-1])`` (same indices, same bits): XLA on CPU takes 20-30 s
    to compile Threefry over a rank-4 array (jax 0.10), about 1 s over a rank-2 one.

    Example:
      >>> import jax
      >>> a, b = element_bits(jax.random.key(0), (2, 3))
      >>> a.shape, a.dtype.name, bool((a != b).any())
      ((2, 3), 'uint32', True)
    """
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    key = key.astype(jnp.uint32)
    size = math.prod(shape)
    if size > 2**32:
        raise ValueError(f"element_bits supports up to 2**32 elements, got shape {shape}")
    view = shape if len(shape) <= 2 else (size // max(shape[-1], 1), shape[-1])
    index = jnp.zeros(view, jnp.uint32)
    stride = 1
    for d in reversed(range(len(view))):
        index = index + lax.broadcasted_iota(jnp.uint32, view, d) * jnp.uint32(stride % 2**32)
        stride *= view[d]
    words = threefry2x32_p.bind(key[0], key[1], index, jnp.zeros(view, jnp.uint32))
    return tuple(x.reshape(shape) for x in words)


def random(w: jax.Array, threshold, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Random shares: each split value is divided at a random point, bit-exactly.

    Unlike PPQ (whose ``W1 = W - W2`` is computed from a float draw and can be one
    ulp off), the larger share ``big = w * u`` with ``u ~ U[0.5, 1)`` makes
    ``w - big`` exact, and a fair coin decides which branch receives it, so each
    branch's share is uniform over ``[0, w]`` and ``w1 + w2 == w`` exactly. The
    random words come from ``element_bits`` (Threefry keyed by ``key``).

    Args:
      w: a floating-point kernel (up to ``2**32`` elements).
      threshold: absolute threshold (scalar, or broadcastable to ``w``).
      key: a ``jax.random`` key (typed or raw ``uint32[2]``).

    Returns:
      ``(w1, w2)`` with ``w1 + w2 == w`` bit for bit; shares lie between 0 and ``w``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> w = jnp.array([0.1, 3.0, -5.0])
      >>> w1, w2 = random(w, 1.0, jax.random.key(0))
      >>> bool(jnp.all(w1 + w2 == w)), float(w2[0])
      (True, 0.0)
    """
    mask = split_mask(w, threshold)
    b_share, b_coin = element_bits(key, w.shape)
    # 23 random mantissa bits -> [1, 2) -> [0.5, 1); rounding to w's dtype stays in [0.5, 1]
    one_two = lax.bitcast_convert_type((b_share >> 9) | jnp.uint32(0x3F800000), jnp.float32)
    u = (one_two * 0.5).astype(w.dtype)
    big = w * u
    small = w - big  # exact (Sterbenz) unless it is subnormal and XLA flushes it to zero:
    big = jnp.where(small == 0, w, big)  # then keep the value whole, still exact
    coin = (b_coin & 1) == 1
    zero = jnp.zeros_like(w)
    w1 = jnp.where(mask, jnp.where(coin, big, small), w)
    w2 = jnp.where(mask, jnp.where(coin, small, big), zero)
    return w1, w2


def clip(w: jax.Array, threshold) -> tuple[jax.Array, jax.Array]:
    """The twin takes only the excess: ``w1 = clip(w, -t, t)``, ``w2 = w - w1``.

    The dense ``branch_0``'s range shrinks to ``t`` while a sparse ``branch_1`` (non-zero
    only where ``|w| > t``) holds the outliers' excess. ``w - t`` is not always
    representable, so the excess is rounded to a multiple of ``ulp(w)`` and ``w1 = w -
    w2`` is computed from it: the sum is exact, and ``|w1|`` may differ from ``t`` by at
    most one ulp of ``w``.

    Args:
      w: a floating-point kernel.
      threshold: absolute threshold ``t`` (scalar, or broadcastable to ``w``, e.g. one
        per output channel); cast to ``w``'s dtype first.

    Returns:
      ``(w1, w2)`` with ``w1 + w2 == w`` bit for bit; ``w2 == 0`` where ``|w| <= t``.

    Example:
      >>> import jax.numpy as jnp
      >>> w1, w2 = clip(jnp.array([0.5, -3.0, 2.0]), 1.0)
      >>> w1.tolist(), w2.tolist()
      ([0.5, -1.0, 1.0], [0.0, -2.0, 1.0])
    """
    t = jnp.asarray(threshold).astype(w.dtype)
    mask = split_mask(w, t)
    excess = snap_to_ulp(w - jnp.sign(w) * t, w)
    w2 = jnp.where(mask, excess, jnp.zeros_like(w))
    w1 = jnp.where(mask, w - w2, w)
    return exact_or_keep(w, (w1, w2))


def grid(w: jax.Array, threshold, spec: quant.QuantSpec) -> tuple[jax.Array, jax.Array]:
    """Quantization-aware halves (OCS "grid aware" splitting, Zhao et al., ICML 2019).

    ``balance`` halves round identically, so their errors add up coherently. Here the
    twin's share is ``w / 2`` moved onto ``branch_1``'s own quantization grid (step
    ``max|w/2|`` over the split values ``/ qmax``, per tensor or per channel as ``spec``
    says), so ``branch_1`` quantizes without error and ``Q(w1) + Q(w2)`` is within half
    of ``branch_0``'s step of ``w`` (rounding in opposite directions, in OCS' words).
    ``branch_0`` keeps ``w1 = w - w2``; its range is at most ``max|w|/2 + step/2``.
    The share is rounded to a multiple of ``ulp(w)``, so the sum is exact; in low
    precision kernels (bfloat16) that rounding can move it off the grid slightly.

    Args:
      w: a floating-point kernel.
      threshold: absolute threshold (scalar, or broadcastable to ``w``).
      spec: a symmetric ``QuantSpec`` (``branch_1``'s quantization: the twin's
        ``twin_spec`` under mixed precision, ``kernels.split``).

    Returns:
      ``(w1, w2)`` with ``w1 + w2 == w`` bit for bit; ``w2 == 0`` where ``|w| <= t``.

    Raises:
      ValueError: ``spec`` is asymmetric.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxsplit.quant import QuantSpec
      >>> w1, w2 = grid(jnp.array([0.5, 3.0, 4.0]), 1.0, QuantSpec(bits=2))
      >>> w1.tolist(), w2.tolist()  # branch_1's grid has step 2: 1.5 -> 2, 2 -> 2
      ([0.5, 1.0, 2.0], [0.0, 2.0, 2.0])
    """
    if not isinstance(spec, quant.QuantSpec) or not spec.symmetric:
        raise ValueError(f"method 'grid' needs a symmetric QuantSpec, got spec={spec!r}")
    half = _grid_half(w, threshold)
    return _grid_shares(w, threshold, quant.per_element(quant.scale(half, spec), w.shape, spec))


def _grid_half(w, t):
    """``grid``'s halves of the split values (0 elsewhere), in the compute dtype."""
    ft = jnp.promote_types(w.dtype, jnp.float32)
    return jnp.where(split_mask(w, t), w.astype(ft) / 2, 0)


def _grid_shares(w, t, step):
    """``grid``'s shares given the twin's step (elementwise where ``t`` and ``step`` are
    scalars)."""
    mask = split_mask(w, t)
    half = _grid_half(w, t)
    safe = jnp.where(step > 0, step, jnp.ones_like(step))
    on_grid = (jnp.round(half / safe) * step).astype(w.dtype)
    share = snap_to_ulp(jnp.sign(w) * jnp.minimum(jnp.abs(on_grid), jnp.abs(w)), w)
    w2 = jnp.where(mask, share, jnp.zeros_like(w))
    w1 = jnp.where(mask, w - w2, w)
    return exact_or_keep(w, (w1, w2))


def residual(w: jax.Array, threshold, spec: quant.QuantSpec) -> tuple[jax.Array, jax.Array]:
    """Error-compensating twin: ``w1 = Q(w)``, ``w2 = w - Q(w)`` on the split values.

    ``Q`` is ``quant.quantize`` under ``spec`` over the whole kernel, so ``branch_0``
    lies on (its own) grid where values are split and ``branch_1`` holds the rounding
    residual (at most half a step), which its own, much finer scale quantizes again.
    The cost: ``branch_1`` is non-zero wherever a split value is off the grid, i.e. a
    dense twin at ``threshold=0``. ``Q(w)`` lies in ``[w/2, 2w]`` or is ``0``, so
    ``w - Q(w)`` is exact (Sterbenz).

    Args:
      w: a floating-point kernel.
      threshold: absolute threshold (scalar, or broadcastable to ``w``); only values
        with ``|w| > threshold`` get a residual.
      spec: a ``QuantSpec``.

    Returns:
      ``(w1, w2)`` with ``w1 + w2 == w`` bit for bit; ``w2 == 0`` where ``|w| <= t``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxsplit.quant import QuantSpec
      >>> w1, w2 = residual(jnp.array([0.25, 1.25, -3.0]), 0.0, QuantSpec(bits=3))
      >>> w1.tolist(), w2.tolist()
      ([0.0, 1.0, -3.0], [0.25, 0.25, 0.0])
    """
    if not isinstance(spec, quant.QuantSpec):
        raise ValueError(f"method 'residual' needs a QuantSpec, got spec={spec!r}")
    return _residual(w, threshold, spec)


def _residual(w, t, spec, params=None):
    """``residual``'s shares, ``Q`` under ``params`` (default: ``w``'s own)."""
    mask = split_mask(w, t)
    w1 = jnp.where(mask, quant.quantize(w, spec, params=params), w)
    # the twin is taken from the stored branch, never from Q's formula: XLA may contract
    # ``w - n * s`` into one fused multiply-add, which skips the rounding of ``n * s``
    w2 = jnp.where(mask, w - w1, jnp.zeros_like(w))
    return exact_or_keep(w, (w1, w2))


def snap(w: jax.Array, threshold, spec: quant.QuantSpec) -> tuple[jax.Array, jax.Array]:
    """``clip`` with a twin that quantizes without error: its excess put on its own grid.

    ``clip``'s sparse twin holds the excess ``e = w - sign(w)·t`` and rounds it with its
    own step ``σ = max|e| / qmax``: at int4 that error dominates once ``t`` is small.
    Here the twin takes ``sign(w)·min(ceil(|e| / σ), qmax)·σ`` — a point of its own
    grid no smaller than the excess — so ``Q(w2) == w2`` and ``branch_0`` keeps ``w1 =
    w - w2`` in ``(t - σ, t]``, which its fine dense grid rounds like any other value:
    an outlier's error becomes the dense branch's. Where that share would exceed
    ``|w|`` the plain excess is kept (as ``clip``). Shares are snapped to multiples of
    ``ulp(w)``, so the sum is exact (and the twin may sit within an ulp of its grid).

    Args:
      w: a floating-point kernel.
      threshold: absolute threshold ``t`` (scalar, or broadcastable to ``w``).
      spec: a symmetric ``QuantSpec``: the twin's (per tensor or per channel).

    Returns:
      ``(w1, w2)`` with ``w1 + w2 == w`` bit for bit; ``w2 == 0`` where ``|w| <= t``.

    Raises:
      ValueError: ``spec`` is asymmetric.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxsplit.quant import QuantSpec
      >>> w1, w2 = snap(jnp.array([0.5, 3.0, 8.0]), 1.0, QuantSpec(bits=3))  # twin step 7/3
      >>> [round(x, 4) for x in w1.tolist()], [round(x, 4) for x in w2.tolist()]
      ([0.5, 0.6667, 1.0], [0.0, 2.3333, 7.0])
    """
    if not isinstance(spec, quant.QuantSpec) or not spec.symmetric:
        raise ValueError(f"method 'snap' needs a symmetric QuantSpec, got spec={spec!r}")
    t = jnp.asarray(threshold).astype(w.dtype)
    return _snap_shares(w, t, _snap_step(w, t, spec), spec)


def _excess(w, t):
    """``snap``'s ``(mask, w in the compute dtype, its sign, the excess over t)``."""
    mask = split_mask(w, t)
    ft = jnp.promote_types(w.dtype, jnp.float32)
    wf = w.astype(ft)
    sign = jnp.sign(wf)
    return mask, wf, sign, jnp.where(mask, wf - sign * t.astype(ft), 0)


def _snap_step(w, t, spec):
    """``snap``'s twin step ``σ`` (per element as ``quant.per_element`` gives it)."""
    excess = _excess(w, t)[3]
    return quant.per_element(quant.scale(excess, spec), excess.shape, spec)


def _snap_shares(w, t, step, spec):
    """``snap``'s shares given its step (elementwise where ``t`` and ``step`` are scalars)."""
    mask, wf, sign, excess = _excess(w, t)
    safe = jnp.where(step > 0, step, jnp.ones_like(step))
    k = jnp.minimum(jnp.ceil(jnp.abs(excess) / safe), spec.qmax)
    on = k * step
    share = jnp.where(on <= jnp.abs(wf), sign * on, excess).astype(w.dtype)
    share = snap_to_ulp(jnp.sign(w) * jnp.minimum(jnp.abs(share), jnp.abs(w)), w)
    w2 = jnp.where(mask, share, jnp.zeros_like(w))
    w1 = jnp.where(mask, w - w2, w)
    return exact_or_keep(w, (w1, w2))


@functools.partial(jax.jit, static_argnames=("spec", "twin_spec", "slots"))
def compensate(
    w: jax.Array,
    threshold,
    spec: quant.QuantSpec,
    calibration: jax.Array | None = None,
    *,
    twin_spec: quant.QuantSpec | None = None,
    slots: int = COMPENSATE_SLOTS,
) -> tuple[jax.Array, jax.Array]:
    """``snap``'s twin, its values re-chosen to cancel the dense rounding in output space.

    ``snap`` fixes the twin's support ``S`` (the values above ``t``) and both branches'
    scales. On ``S`` the represented value ``Q(w1) + Q(w2)`` is still free: with
    ``w1 = a·s1`` on the dense grid (``a`` in ``[-qmax, qmax]``) and ``w2 = w - w1``,
    ``Q(w2)`` is the twin's grid point nearest ``w - a·s1``, so each value of ``S`` has
    reachable errors ``a·s1 + k·σ - w`` within half a twin step ``σ``: the codes ``a``
    within ``COMPENSATE_WINDOW`` steps of ``snap``'s are tried (all ``2·qmax + 1`` codes up
    to int6; the window spans ``σ`` whenever ``σ < 63·s1``).
    Every value of ``S`` first takes the reachable error nearest zero. With a matrix
    ``calibration`` ``C = E[x xᵀ]`` (``d_in = prod(shape[:-1])``), in each output column
    the ``slots`` values of ``S`` with the largest ``C_ii`` are then re-chosen GPTQ-style,
    only on ``S``: the continuous optimum ``e_S = -C_SS⁻¹ C_{S,~S} r`` against the other
    values' errors ``r``, rounded one value at a time to its reachable set, each rounding
    error passed on to the values not yet rounded (through the Cholesky factor of the
    damped ``C_SS⁻¹``); a column keeps the result only if it lowers ``eᵀ C e``. Values
    attaining either branch's max stay as ``snap`` put them, so the scales do not move.
    A diagonal or no calibration decouples the values (the nearest-zero step alone).

    Exact: ``w1`` is snapped to a multiple of ``ulp(w)``; a value whose ``branch_sum`` is
    not ``w`` keeps ``snap``'s (exact) shares. The extra non-zeros are ``snap``'s, at most.

    Jitted (``spec``, ``twin_spec`` and ``slots`` static): called eagerly it compiles once
    per shape and configuration, not its loops anew at every call (0.98 s -> 15 ms a call
    on 512² under XLA's defaults); inside a caller's ``jit`` it is inlined.

    Args:
      w: a floating-point kernel (the last axis: output columns).
      threshold: absolute threshold ``t`` (scalar, or broadcastable to ``w``).
      spec: a symmetric ``QuantSpec`` (``branch_0``'s, and the twin's by default).
      calibration: ``None``, ``(d_in,)`` or ``(d_in, d_in)`` (``jaxsplit.measure``).
      twin_spec: the twin's ``QuantSpec`` where it differs (mixed precision).
      slots: values of ``S`` per output column re-chosen against ``C`` (static).

    Returns:
      ``(w1, w2)`` with ``w1 + w2 == w`` bit for bit; ``w2 == 0`` where ``|w| <= t``.

    Raises:
      ValueError: ``spec`` (or ``twin_spec``) is asymmetric.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxsplit.quant import QuantSpec
      >>> w = jnp.array([0.5, 0.3, 3.0, 8.0])
      >>> w1, w2 = compensate(w, 1.0, QuantSpec(bits=3))
      >>> bool(jnp.all(branch_sum((w1, w2)) == w)), int(jnp.count_nonzero(w2))
      (True, 2)
    """
    tspec = twin_spec or spec
    for name, q in (("spec", spec), ("twin_spec", tspec)):
        if not isinstance(q, quant.QuantSpec) or not q.symmetric:
            raise ValueError(f"method 'compensate' needs a symmetric QuantSpec, got {name}={q!r}")
    t = jnp.asarray(threshold).astype(w.dtype)
    ft = jnp.promote_types(w.dtype, jnp.float32)
    win = min(spec.qmax, COMPENSATE_WINDOW)
    c = None if calibration is None else jnp.asarray(calibration).astype(ft)
    decoupled = c is None or c.ndim != 2 or w.ndim < 1 or c.shape[0] <= 1
    if decoupled and jnp.ndim(t) == 0 and spec.granularity == tspec.granularity == "per_tensor":
        # scalar threshold and steps: every pass over ``w`` in cache-sized blocks
        return blocks.in_blocks(_compensate_elementwise(w, t, spec, tspec), (w,))
    step = _snap_step(w, t, tspec)
    w1s, w2s = _snap_shares(w, t, step, tspec)
    r1, rg = quant.scale(w1s.astype(ft), spec), quant.scale(w2s.astype(ft), tspec)
    s1, sg = quant.per_element(r1, w.shape, spec), quant.per_element(rg, w.shape, tspec)
    specs = ((spec, r1), (tspec, rg))
    if decoupled:
        return _decoupled(w, w1s, w2s, s1, sg, specs, win)
    codes, moved, e_base, a_snap, free = _nearest_codes(w, w1s, w2s, s1, sg, specs, win)
    wf = w.astype(ft)
    codes, changed = _compensate_columns(
        wf, e_base, codes, a_snap, free, c, *(jnp.broadcast_to(x, w.shape) for x in (s1, sg)),
        spec.qmax, tspec.qmax, slots, win,
    )  # fmt: skip
    return _compensated(w, w1s, w2s, codes, moved | (changed & free), s1)


def _decoupled(w, w1s, w2s, s1, sg, specs, win):
    """``compensate`` without a matrix calibration: the nearest-zero step alone."""
    codes, moved, _, _, _ = _nearest_codes(w, w1s, w2s, s1, sg, specs, win)
    return _compensated(w, w1s, w2s, codes, moved, s1)


def _nearest_codes(w, w1s, w2s, s1, sg, specs, win):
    """``compensate``'s elementwise step: every value of the twin's support takes the
    reachable error nearest zero. ``(codes, moved, e_base, a_snap, free)``: the dense
    codes, where they differ from ``snap``'s shares, the errors, ``snap``'s codes and
    the values that may move (on the support, not pinned to a branch's max).
    ``specs``: ``((spec, scale), (twin_spec, twin_scale))``, the scales as
    ``quant.scale`` returns them (``s1``, ``sg``: per element)."""
    (spec1, r1), (spec2, r2) = specs
    q1, q2 = spec1.qmax, spec2.qmax
    ft = jnp.promote_types(w.dtype, jnp.float32)
    wf, b1, b2 = w.astype(ft), w1s.astype(ft), w2s.astype(ft)
    top1, top2 = s1 * q1, sg * q2
    pin = (jnp.abs(b1) >= top1 * (1 - 1e-6)) | (jnp.abs(b2) >= top2 * (1 - 1e-6))
    free = (w2s != 0) & ~pin & (s1 > 0) & (sg > 0)
    safe = jnp.where(sg > 0, sg, 1)

    zero = _unknown_zero(wf)

    def reach(a):  # the error of code ``a`` on branch_0, and whether it keeps the scales
        v1 = _rounded(a * s1, zero)
        rest = wf - v1
        k = jnp.clip(jnp.round(rest / safe), -q2, q2)
        return v1 + _rounded(k * sg, zero) - wf, jnp.abs(rest) <= top2

    def nearest_zero(a, best):
        e, ok = reach(a.astype(ft))
        better = ok & (jnp.abs(e) < jnp.abs(best[1]))
        return jnp.where(better, a, best[0]), jnp.where(better, e, best[1])

    e_snap = (
        _rounded(_quantize(b1, spec1, r1), zero) + _rounded(_quantize(b2, spec2, r2), zero) - wf
    )
    a_snap = jnp.round(b1 / jnp.where(s1 > 0, s1, 1))
    lo = window_start(a_snap, q1, win)

    def scan(d, best):  # codes lo … lo + 2·win (all of -q1 … q1 when win == q1)
        return nearest_zero(lo + d, best)

    a0, e0 = lax.fori_loop(0, 2 * win + 1, scan, (a_snap, e_snap))
    moved = free & (jnp.abs(e0) < jnp.abs(e_snap))  # otherwise snap's shares stay
    return jnp.where(moved, a0, a_snap), moved, jnp.where(moved, e0, e_snap), a_snap, free


def _unknown_zero(w):
    """Integer zeros of ``w``'s float width that no compiler can prove zero (``isnan(w)``;
    a ``nan`` position gets ``1``, but ``compensate`` never moves one)."""
    ints = jnp.int64 if w.dtype == jnp.float64 else jnp.int32
    return jnp.isnan(w).astype(ints)


def _rounded(p, zero):
    """The product ``p`` rounded on its own: its bits or-ed with ``zero`` (``_unknown_zero``),
    so that no compiler contracts it with a following sum into a fused multiply-add. XLA's
    CPU backend does that under its default LLVM optimisation, and then a jitted program and
    the same ops run eagerly (or fused differently: in blocks, sharded) disagree in the last
    bit of ``compensate``'s errors, hence in the codes it picks."""
    ints = zero.dtype
    return lax.bitcast_convert_type(lax.bitcast_convert_type(p, ints) | zero, p.dtype)


def _quantize(x, spec, s):
    """``quant.quantize`` under a symmetric ``spec`` with its scale ``s`` given."""
    return quant.quantize(x, spec, params=quant.QParams(s, jnp.zeros_like(s)))


def _compensated(w, w1s, w2s, codes, use, s1):
    """The shares of ``compensate``: ``codes · s1`` snapped to ``ulp(w)`` where ``use``
    and exact, ``snap``'s shares elsewhere."""
    ft = jnp.promote_types(w.dtype, jnp.float32)
    wf = w.astype(ft)
    w1c = snap_to_ulp(codes * s1, wf).astype(w.dtype)
    w2c = w - w1c
    ok = use & (branch_sum((w1c, w2c)) == w) & jnp.isfinite(w)
    w1 = jnp.where(ok, w1c, w1s)
    w2 = jnp.where(ok, w2c, w2s)
    return exact_or_keep(w, (w1, w2))


def _compensate_elementwise(w, t, spec, tspec):
    """``compensate`` without a matrix calibration at a scalar threshold, per tensor, as
    an elementwise function of ``w``: the twin step and both scales come from passes in
    blocks (``blocks.extremes_in_blocks``), then each value is independent."""
    ft = jnp.promote_types(w.dtype, jnp.float32)
    win = min(spec.qmax, COMPENSATE_WINDOW)
    step = _scale_in_blocks(lambda x: _excess(x, t)[3], w, tspec)
    e1, eg = blocks.extremes_in_blocks(lambda x: _snap_shares(x, t, step, tspec), (w,))
    r1, rg = quant.scale(e1.astype(ft), spec), quant.scale(eg.astype(ft), tspec)
    specs = ((spec, r1), (tspec, rg))

    def nearest(w_):  # snap's shares, then the nearest-zero step
        w1s_, w2s_ = _snap_shares(w_, t, step, tspec)
        return _decoupled(w_, w1s_, w2s_, r1, rg, specs, win)

    return nearest


#: Methods whose elementwise split (``elementwise``) costs about as much as reading its
#: branches back, so a measurement recomputes it rather than storing the branches
#: (``measure.measure_split``); ``compensate``'s code scan costs ~15 such passes.
RECOMPUTED = ("balance", "clip", "grid", "residual", "snap")


def elementwise(
    method: str,
    w: jax.Array,
    threshold,
    *,
    branches: int = 2,
    spec: quant.QuantSpec | None = None,
    twin_spec: quant.QuantSpec | None = None,
    calibration: jax.Array | None = None,
):
    """``split`` of ``w`` as an elementwise function of ``w``, or ``None`` where it is not one.

    Every method but ``random`` (whose shares hash each value's position) is elementwise
    once its kernel-wide scalars are known, at a scalar ``threshold`` and per-tensor
    specs (``compensate``: without a matrix calibration). Those scalars (``grid``'s and
    ``snap``'s twin steps, ``residual``'s scale, ``compensate``'s step and scales) are
    computed here, from ``w``, in blocks; the function returned maps any array ``x`` to
    the branches of its values under them, so ``blocks.in_blocks(f, (w,))`` is ``split``'s
    result bit for bit, and ``blocks.sum_in_blocks`` can reduce the branches without ever
    writing them (``measure.measure_split``).

    Args:
      method, w, threshold, branches, spec, twin_spec, calibration: as for ``split``
        (checked the same way).

    Returns:
      A function of one array to the tuple of ``branches`` arrays, or ``None``.

    Example:
      >>> import jax.numpy as jnp
      >>> w = jnp.array([0.5, -3.0, 2.0])
      >>> f = elementwise("clip", w, 1.0)
      >>> [b.tolist() for b in f(w)] == [b.tolist() for b in split("clip", w, 1.0)]
      True
      >>> elementwise("clip", w, jnp.ones(3)) is None  # not a scalar threshold
      True
    """
    _check_split(method, branches, spec)
    tspec = twin_spec or spec
    if method == "random" or jnp.ndim(threshold) != 0:
        return None
    if method in QUANT_METHODS and not spec.granularity == tspec.granularity == "per_tensor":
        return None
    t = jnp.asarray(threshold).astype(w.dtype)
    if method == "balance":
        return lambda x: balance(x, t, branches)
    if method == "clip":
        return lambda x: clip(x, t)
    if method == "grid":
        step = _scale_in_blocks(lambda x: _grid_half(x, t), w, tspec)
        return lambda x: _grid_shares(x, t, step)
    if method == "snap":
        step = _scale_in_blocks(lambda x: _excess(x, t)[3], w, tspec)
        return lambda x: _snap_shares(x, t, step, tspec)
    if method == "compensate":
        if calibration is not None and jnp.ndim(calibration) == 2:
            return None  # a matrix calibration couples the values of each column
        return _compensate_elementwise(w, t, spec, tspec)
    (e,) = blocks.extremes_in_blocks(lambda x: (x,), (w,))
    qp = quant.qparams(e, spec)
    return lambda x: _residual(x, t, spec, qp)


def _scale_in_blocks(f, w, spec):
    """``quant.scale(f(w), spec)`` (per tensor) of an elementwise ``f``, from its extremes
    in blocks: ``f(w)`` is never written."""
    (e,) = blocks.extremes_in_blocks(lambda x: (f(x),), (w,))
    return quant.scale(e, spec)


def window_start(a: jax.Array, qmax: int, win: int) -> jax.Array:
    """The first of the ``2·win + 1`` consecutive codes ``compensate`` tries around code
    ``a``: centred on ``a``, shifted to stay within ``[-qmax, qmax]`` (``-qmax`` when
    ``win == qmax``: every code).

    Example:
      >>> import jax.numpy as jnp
      >>> window_start(jnp.array([0.0, 6.0, -7.0]), 7, 2).tolist()
      [-2.0, 3.0, -7.0]
    """
    return jnp.clip(a - win, -qmax, qmax - 2 * win)


def _compensate_columns(wf, e_base, codes, a_snap, free, c, s1, sg, q1, q2, slots, win):
    """``compensate``'s per-column step on the twin's support (see its docstring):
    ``(codes, changed)``, the dense codes and where they were re-chosen.

    Per column, with ``H = C_SS`` (damped) ``= Uᵀ U`` and ``b = C_{S,~S} r``, the output
    error is ``||U e + g||² + const`` (``g = U⁻ᵀ b``); the values are rounded from the last
    slot to the first (nearest plane, the order GPTQ's updates amount to), the highest
    ``C_ii`` first, each to the reachable error nearest its conditional optimum."""
    shape = wf.shape
    d_out = shape[-1]
    as2 = lambda x: x.reshape(-1, d_out)  # noqa: E731
    w2d, free2 = as2(wf), as2(free)
    s12, sg2 = as2(jnp.broadcast_to(s1, shape)), as2(jnp.broadcast_to(sg, shape))
    d_in = w2d.shape[0]
    m = min(slots, d_in)
    base_codes, e_base = as2(codes), as2(e_base)
    diag = jnp.diagonal(c)
    prio = jnp.where(free2.T, diag[None, :], -jnp.inf)  # (d_out, d_in)
    vals, idx = lax.top_k(prio, m)
    vals, idx = vals[:, ::-1], idx[:, ::-1]  # rounded last to first: best C_ii first
    valid = jnp.isfinite(vals)  # (d_out, m)
    cols = jnp.arange(d_out)[:, None]
    slotted = jnp.zeros((d_out, d_in), bool).at[cols, idx].set(valid).T  # (d_in, d_out)
    r = jnp.where(slotted, 0, e_base)
    b = jnp.where(valid, (c @ r).T[cols, idx], 0)  # (d_out, m): C_{S,~S} r
    vv = valid[:, :, None] & valid[:, None, :]
    damp = 0.01 * jnp.mean(diag) + jnp.finfo(c.dtype).tiny
    eye = jnp.eye(m, dtype=c.dtype)
    h = jnp.where(vv, c[idx[:, :, None], idx[:, None, :]], 0)
    h = h + eye * jnp.where(valid[:, :, None], damp, 1.0)
    low = jnp.linalg.cholesky(h)
    g = jax.scipy.linalg.solve_triangular(low, b[..., None], lower=True)[..., 0]
    u = jnp.swapaxes(low, 1, 2)
    # every reachable error of every slot (codes within ``win`` of snap's, clipped to
    # -q1 … q1), then the slot's current one
    w_s, s1_s, sg_s, e_s = (x.T[cols, idx] for x in (w2d, s12, sg2, e_base))
    a_s = as2(jnp.broadcast_to(a_snap, shape)).T[cols, idx]
    a = window_start(a_s, q1, win)[..., None] + jnp.arange(2 * win + 1, dtype=wf.dtype)
    v1 = a * s1_s[..., None]
    rest = w_s[..., None] - v1
    k = jnp.clip(jnp.round(rest / jnp.where(sg_s > 0, sg_s, 1)[..., None]), -q2, q2)
    cand = v1 + k * sg_s[..., None] - w_s[..., None]
    cand = jnp.where(jnp.abs(rest) <= (sg_s * q2)[..., None], cand, jnp.inf)
    cand = jnp.concatenate([cand, e_s[..., None]], axis=-1)

    def step(n, state):
        e, chosen = state
        i = m - 1 - n
        ui = u[:, i, :]
        want = -(g[:, i] + jnp.sum(ui * e, axis=1)) / ui[:, i]
        ci = cand[:, i, :]
        j = jnp.argmin(jnp.abs(ci - want[:, None]), axis=1)
        ei = jnp.where(valid[:, i], jnp.take_along_axis(ci, j[:, None], axis=1)[:, 0], 0)
        return e.at[:, i].set(ei), chosen.at[:, i].set(j)

    init = (jnp.zeros((d_out, m), wf.dtype), jnp.full((d_out, m), 2 * win + 1))
    e_new_s, chosen = lax.fori_loop(0, m, step, init)
    good = valid & (chosen <= 2 * win)
    e_new = e_base.T.at[cols, idx].set(jnp.where(good, e_new_s, e_s)).T
    out_old = jnp.sum((c @ e_base) * e_base, axis=0)
    out_new = jnp.sum((c @ e_new) * e_new, axis=0)
    keep = out_new < out_old  # per column
    picked = jnp.take_along_axis(a, jnp.minimum(chosen, 2 * win)[..., None], axis=-1)[..., 0]
    new_codes = jnp.where(good, picked, 0).astype(wf.dtype)
    codes2 = base_codes.T.at[cols, idx].set(jnp.where(good, new_codes, base_codes.T[cols, idx])).T
    changed = jnp.zeros((d_out, d_in), bool).at[cols, idx].set(good).T & keep[None, :]
    codes2 = jnp.where(changed, codes2, base_codes)
    return codes2.reshape(shape), changed.reshape(shape)


def snap_to_ulp(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x`` rounded to the nearest multiple of ``ulp(w)`` (float spacing in ``w``'s binade).

    Shares of ``w`` that are such multiples, carry ``w``'s sign and are no larger than
    ``|w|`` sum exactly in any order (see the module docstring).

    Example:
      >>> import jax.numpy as jnp
      >>> float(snap_to_ulp(jnp.float32(1e-9), jnp.float32(1.0)))
      0.0
    """
    if _bit_ulp(x, w):
        return _snap_bits(x, w)
    u = jnp.spacing(jnp.abs(w))
    return jnp.round(x / u) * u


def _bit_ulp(x, w) -> bool:
    """Whether ``snap_to_ulp`` builds ``ulp(w)`` from ``w``'s bits (``_snap_bits``): float32
    and float64 on the CPU, where it gives ``jnp.spacing``'s results (a 4096² ``clip`` split
    18-21 -> 13-15 ms with huge-page outputs; ``benchmarks/RESULTS.md``)."""
    dt = jnp.result_type(w)
    return (
        dt in (jnp.float32, jnp.float64) and jnp.result_type(x) == dt
        and jax.default_backend() == "cpu"
    )  # fmt: skip


def _snap_bits(x, w):
    """``round(x / ulp(w)) * ulp(w)`` with ``ulp(w)`` and ``1 / ulp(w)`` built from the
    exponent bits of ``w`` and no division (the quotient is the same correctly rounded
    value: ``1 / ulp`` is a power of two, normal wherever the spacing is).

    Lanes where ``jnp.spacing`` is not a normal number (``|w|`` whose spacing is
    subnormal, below ``2 ** mant`` times the smallest normal; ``±max``, whose
    spacing is inf; inf; NaN) give NaN, as ``round(x / spacing) * spacing`` does there
    under XLA's denormals-are-zero on the CPU (the NaN's sign may differ; every caller
    keeps such a value whole through ``exact_or_keep``)."""
    dt = jnp.result_type(w)
    fi = jnp.finfo(dt)
    mant, bias = fi.nmant, fi.maxexp - 1
    ut = jnp.uint32 if dt.itemsize == 4 else jnp.uint64
    expmask = (fi.maxexp * 2 - 1) << mant  # all exponent bits: inf and NaN
    bits = lax.bitcast_convert_type(w, ut) & ut(expmask | ((1 << mant) - 1))  # |w|
    e = bits & ut(expmask)
    fast = (e >= ut((mant + 1) << mant)) & (e < ut(expmask)) & (bits != ut(expmask - 1))
    u = lax.bitcast_convert_type(e - ut(mant << mant), dt)
    inv = lax.bitcast_convert_type(ut((2 * bias + mant) << mant) - e, dt)
    nan = jnp.asarray(jnp.nan, dt)
    return jnp.where(fast, jnp.round(x * inv) * u, nan)


def branch_sum(branches) -> jax.Array:
    """Left-to-right sum of the branches, as ``merge_params`` computes it.

    A zero addend leaves the running total's bits alone (so ``-0.0`` and subnormal
    values survive even where XLA flushes subnormal arithmetic to zero).

    Example:
      >>> import jax.numpy as jnp
      >>> branch_sum([jnp.array([1.0, -0.0]), jnp.array([2.0, 0.0])]).tolist()
      [3.0, -0.0]
    """
    total = branches[0]
    for b in branches[1:]:
        total = jnp.where(b == 0, total, total + b)
    return total


def exact_or_keep(w: jax.Array, branches) -> tuple[jax.Array, ...]:
    """The branches, except that values whose ``branch_sum`` is not ``w`` stay whole on 0.

    The last line of every non-trivial method: whatever a corner case does, the result
    sums back to ``w`` exactly (non-finite values stay on ``branch_0``).

    Example:
      >>> import jax.numpy as jnp
      >>> w = jnp.array([1.0, 1.0])
      >>> [b.tolist() for b in exact_or_keep(w, (jnp.array([0.5, 0.5]), jnp.array([0.5, 0.25])))]
      [[0.5, 1.0], [0.5, 0.0]]
    """
    ok = branch_sum(branches) == w
    zero = jnp.zeros_like(w)
    first = jnp.where(ok, branches[0], w)
    return (first, *(jnp.where(ok, b, zero) for b in branches[1:]))


def _check_split(method: str, branches: int, spec) -> None:
    """``split``'s checks of its static arguments (``elementwise`` shares them)."""
    _check_branches(branches)
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    if branches != 2 and method != "balance":
        raise ValueError(
            f"branches={branches} needs method 'balance' (k-way split), got method {method!r}"
        )
    if method in QUANT_METHODS and spec is None:
        raise ValueError(f"method {method!r} needs spec=QuantSpec(...)")


def _check_branches(branches) -> None:
    if isinstance(branches, bool) or branches not in BRANCHES:
        raise ValueError(f"branches must be one of {list(BRANCHES)}, got {branches!r}")


def stochastic_key(seed: int, path: str) -> jax.Array:
    """The per-layer key: ``seed`` folded with a stable hash of the layer ``path``.

    Because the key depends only on ``(seed, path)``, a layer's random split never
    depends on which other layers are selected or on their order.

    Example:
      >>> import jax
      >>> k1, k2 = stochastic_key(0, "Dense_0"), stochastic_key(0, "Dense_0")
      >>> bool((jax.random.key_data(k1) == jax.random.key_data(k2)).all())
      True
    """
    return jax.random.fold_in(jax.random.key(seed), zlib.crc32(path.encode("utf-8")))


def split(
    method: str,
    w: jax.Array,
    threshold,
    key: jax.Array | None = None,
    *,
    branches: int = 2,
    spec: quant.QuantSpec | None = None,
    twin_spec: quant.QuantSpec | None = None,
    calibration: jax.Array | None = None,
) -> tuple[jax.Array, ...]:
    """Dispatches to a method by name; returns the branches (``branch_sum == w`` bit for bit).

    This is the one place ``split`` (via ``programs``) calls, so new methods only touch this module
    (and ``METHODS``).

    Args:
      method: one of ``METHODS``.
      w: a floating-point kernel.
      threshold: absolute threshold (scalar, or broadcastable to ``w``).
      key: a ``jax.random`` key, needed by ``"random"``.
      branches: one of ``BRANCHES``; more than 2 only for ``"balance"``.
      spec: the ``QuantSpec``, needed by the ``QUANT_METHODS``.
      twin_spec: the twin's ``QuantSpec`` where it differs (``grid``, ``snap`` and
        ``compensate`` put the twin on its grid); default ``spec``.
      calibration: the second moment of the layer's inputs (``jaxsplit.measure``), used
        by ``"compensate"`` only.

    Returns:
      The tuple of ``branches`` arrays.

    Raises:
      ValueError: unknown method, a missing key or spec, or ``branches > 2`` for a
        method other than ``"balance"``.

    Example:
      >>> import jax.numpy as jnp
      >>> [b.tolist() for b in split("balance", jnp.array([4.0]), 1.0)]
      [[2.0], [2.0]]
      >>> [b.tolist() for b in split("clip", jnp.array([4.0]), 1.0)]
      [[1.0], [3.0]]
    """
    _check_split(method, branches, spec)
    if method == "balance":
        return balance(w, threshold, branches)
    if method == "random":
        if key is None:
            raise ValueError("method 'random' needs a key")
        return random(w, threshold, key)
    if method == "clip":
        return clip(w, threshold)
    if method == "grid":
        return grid(w, threshold, twin_spec or spec)
    if method == "snap":
        return snap(w, threshold, twin_spec or spec)
    if method == "compensate":
        return compensate(w, threshold, spec, calibration, twin_spec=twin_spec)
    return residual(w, threshold, spec)
