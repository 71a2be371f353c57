"""Compiled per-kernel programs behind ``split``: statistics, split, and both fused.

Each program is one ``jax.jit`` cached per (shape, dtype, threshold rule, method), so a
tree with 20 distinct kernel shapes compiles 20 programs however many layers it has. They
are written for memory traffic, the whole cost of a split:

* ``stats`` reads the kernel once: the absolute threshold, the number of values it
  splits and the number of non-finite values, counted as one integer code per value
  (``1`` split, ``2**16`` non-finite) summed in short chunks along the last axis, which
  XLA on CPU fuses into one reduction (a plain ``sum`` of a mask materializes the mask
  as int32 first: measured 10× slower) and which needs no data movement between
  devices when the kernel is sharded.
* ``apply`` writes the branches. For ``balance`` both branches are computed from ``w``
  alone (``w1 = where(m, w - w / 2, w)`` rather than ``w - w2``), so XLA emits two loop
  fusions that each read ``w`` once instead of materializing the mask and re-reading
  ``w2``; the values are bit-identical to ``kernels.balance`` (tested). Other methods
  call ``kernels.split`` unchanged. ``apply_donated`` is the same program with ``w``
  donated, so ``branch_0`` may reuse the kernel's buffer.
* ``fused`` is ``stats`` and ``apply`` in one program (one dispatch, one compile).

No host callbacks, no numpy: the same programs run on CPU, GPU and TPU, under a user's
``jit`` and on sharded arrays (elementwise work keeps the input's sharding; only the
counts and a ``Relative``/``Sigma``/``Percentile`` threshold reduce across devices).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxsplit import kernels, search
from jaxsplit.thresholds import resolve_rule

__all__ = [
    "count_codes",
    "balance_fused",
    "stats",
    "threshold",
    "apply",
    "apply_donated",
    "fused",
    "fused_group",
    "auto_fused",
    "auto_fused_donated",
    "counts",
    "curve",
]

_NONFINITE = 1 << 16  # count code of a non-finite value; a chunk sums at most 32 codes
_CHUNK = 32


def _chunk(n: int) -> int:
    """The largest divisor of ``n`` that is at most ``_CHUNK`` (1 for a prime ``n``)."""
    return next(c for c in range(min(n, _CHUNK), 0, -1) if n % c == 0)


def count_codes(w: jax.Array, threshold, branches=None) -> jax.Array:
    """``int32[2]``: values the split divides, and non-finite values, in one pass.

    A value counts as split when a branch other than ``branch_0`` is non-zero there,
    i.e. what the kernels do, not merely what ``split_mask`` selects: a value whose half
    XLA flushes to zero (``|w|`` below twice the smallest normal number, on CPU) stays
    whole on ``branch_0`` and is not counted, nor is a ``clip`` excess that rounds to 0.

    Args:
      w: a floating-point kernel (any shape, sharded or not).
      threshold: a scalar, or an array broadcastable to ``w`` (cast to ``w.dtype``).
      branches: the kernel's branches, to count from (fused into the same pass, nothing
        is re-read); ``None`` counts what 2-way ``balance`` splits.

    Returns:
      ``[n_split, n_nonfinite]`` as an int32 array.

    Example:
      >>> import jax.numpy as jnp
      >>> count_codes(jnp.array([[0.1, 3.0, jnp.nan, -2.0]]), 1.0).tolist()
      [2, 1]
    """
    if branches is None:
        branches = balance_fused(w, threshold)
    m = functools.reduce(jnp.logical_or, [b != 0 for b in branches[1:]])
    code = jnp.where(m, 1, jnp.where(jnp.isfinite(w), 0, _NONFINITE)).astype(jnp.int32)
    if code.ndim == 0:
        code = code.reshape(1)
    c = _chunk(code.shape[-1]) if code.shape[-1] else 1
    part = code.reshape(*code.shape[:-1], code.shape[-1] // c, c).sum(axis=-1)
    return jnp.stack([jnp.sum(part & (_NONFINITE - 1)), jnp.sum(part >> 16)])


def balance_fused(w: jax.Array, threshold) -> tuple[jax.Array, jax.Array]:
    """``kernels.balance`` written so each branch is one read of ``w`` (bit-identical).

    Example:
      >>> import jax.numpy as jnp
      >>> [b.tolist() for b in balance_fused(jnp.array([0.25, -3.0]), 1.0)]
      [[0.25, -1.5], [0.0, -1.5]]
    """
    t = jnp.asarray(threshold).astype(w.dtype)
    half = w / 2
    # a half that XLA flushes to zero (CPU) leaves the value whole: XLA may rewrite
    # ``w - w / 2`` as ``w * 0.5``, which would flush branch_0 too and lose the value
    m = (jnp.abs(w) > t) & jnp.isfinite(w) & (half != 0)
    return jnp.where(m, w - half, w), jnp.where(m, half, jnp.zeros_like(w))


def _branches(
    w, thr, key, method: str, branches: int = 2, spec=None, twin_spec=None, calibration=None
):
    if method == "balance" and branches == 2:
        return balance_fused(w, thr)
    return kernels.split(
        method, w, thr, key, branches=branches, spec=spec, twin_spec=twin_spec,
        calibration=calibration,
    )  # fmt: skip


@functools.partial(jax.jit, static_argnames=("kind", "axis", "method", "branches", "spec"))
def stats(
    w,
    value,
    key=None,
    *,
    kind: str,
    axis: int | None = None,
    method: str = "balance",
    branches: int = 2,
    spec=None,
):
    """``(int32[2] counts, threshold)`` of one kernel: one compiled read pass.

    ``kind`` and ``axis`` (``None``: one threshold; else per index of that axis) are the
    threshold's static rule (``thresholds.resolve_rule``), ``value`` its data. The counts
    are those ``fused`` returns for the same method (the branches are computed inside
    the reduction, never written).

    Example:
      >>> import jax.numpy as jnp
      >>> n, thr = stats(jnp.array([0.5, -4.0]), 1.0, kind="absolute")
      >>> n.tolist(), float(thr)
      ([1, 0], 1.0)
    """
    thr = resolve_rule(kind, value, w, axis)
    return count_codes(w, thr, _branches(w, thr, key, method, branches, spec)), thr


@functools.partial(jax.jit, static_argnames=("kind", "axis"))
def threshold(w, value, *, kind: str, axis: int | None = None):
    """``thresholds.resolve_rule`` compiled alone: the float32 threshold that ``fused``
    computes inside its program, from one read of ``w`` (for ``relative``, ``value`` times
    the largest finite ``|w|``: a max and one multiply, so the same bits in any program).

    Example:
      >>> import jax.numpy as jnp
      >>> float(threshold(jnp.array([0.5, -4.0]), 0.5, kind="relative"))
      2.0
    """
    return resolve_rule(kind, value, w, axis)


def _apply(
    w, thr, key, *, method: str, branches: int = 2, spec=None, twin_spec=None, calibration=None
):
    return _branches(w, thr, key, method, branches, spec, twin_spec, calibration)


_STATIC = ("method", "branches", "spec", "twin_spec")
#: ``apply(w, thr, key, method=..., branches=2, spec=None, twin_spec=None,
#: calibration=None)``: the branches of one kernel for a resolved threshold
#: (``calibration``, data: the layer's input moments, for ``compensate``).
apply = jax.jit(_apply, static_argnames=_STATIC)
#: ``apply`` with ``w`` donated: ``branch_0`` may take over the kernel's buffer.
apply_donated = jax.jit(_apply, static_argnames=_STATIC, donate_argnums=(0,))


@functools.partial(jax.jit, static_argnames=("kind", "axis", *_STATIC))
def fused(
    w,
    value,
    key,
    *,
    kind: str,
    axis: int | None = None,
    method: str,
    branches: int = 2,
    spec=None,
    twin_spec=None,
):
    """``(branches, counts, threshold)`` in one program (``stats`` then ``apply``).

    Example:
      >>> import jax.numpy as jnp
      >>> (w1, w2), n, thr = fused(jnp.array([4.0]), 1.0, None, kind="absolute", method="balance")
      >>> w1.tolist(), w2.tolist(), n.tolist()
      ([2.0], [2.0], [1, 0])
    """
    thr = resolve_rule(kind, value, w, axis)
    ws = _branches(w, thr, key, method, branches, spec, twin_spec)
    return ws, count_codes(w, thr, ws), thr


def _fused_group(
    ws, value, keys, *, kind, axis=None, method, branches=2, spec=None, twin_spec=None
):
    out, counts, thrs = [], [], []
    for w, key in zip(ws, keys, strict=True):
        thr = resolve_rule(kind, value, w, axis)
        b = _branches(w, thr, key, method, branches, spec, twin_spec)
        out.append(b)
        counts.append(count_codes(w, thr, b))
        thrs.append(thr)
    return tuple(out), jnp.stack(counts), jnp.stack(thrs)


#: ``fused_group(ws, value, keys, kind=..., axis=None, method=..., ...)``: ``fused`` over a
#: tuple of same-shape kernels in one program (one dispatch for many small layers, whose
#: cost is the dispatch): ``(branches per kernel, int32[G, 2] counts, stacked thresholds)``.
fused_group = jax.jit(_fused_group, static_argnames=("kind", "axis", *_STATIC))


def _auto(w, key, budget, calibration=None, *, auto_cfg, method: str, branches: int = 2):
    ws, info = search.search(
        w, key, auto=auto_cfg, method=method, branches=branches, budget=budget,
        calibration=calibration,
    )  # fmt: skip
    counts = count_codes(w, info["threshold"], ws)
    counts = counts.at[0].set(jnp.where(info["split"], counts[0], 0))
    return ws, counts, info["threshold"], info


_AUTO_STATIC = ("auto_cfg", "method", "branches")
#: ``auto_fused(w, key, budget, calibration=None, auto_cfg=..., method=..., branches=2)``:
#: ``(branches,
#: counts, threshold, info)`` for an ``Auto`` threshold: ``search.search`` then the
#: counts, in one program; ``counts[0]`` is 0 when the layer stays untouched. ``budget``
#: (data) overrides ``auto_cfg.max_extra``, so budgets share a program.
auto_fused = jax.jit(_auto, static_argnames=_AUTO_STATIC)
#: ``auto_fused`` with ``w`` donated (after every check has passed, see ``split``).
auto_fused_donated = jax.jit(_auto, static_argnames=_AUTO_STATIC, donate_argnums=(0,))
#: ``count_codes`` compiled (``split``'s counts of a threshold chosen on the host).
counts = jax.jit(count_codes)
#: ``search.curve``: every candidate of one kernel measured (``Auto(scope="tree")``).
curve = search.curve
