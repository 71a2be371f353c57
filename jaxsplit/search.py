"""Automatic per-layer thresholds (and methods): a compiled search under a ``QuantSpec``.

For one kernel ``W``, ``search`` builds ``Auto.candidates`` thresholds (half of them
fractions ``j / (n/2)`` of ``max|W|``, ``j = 0 … n/2 - 1``, so ``Relative(0.5)`` is
always among them; half chosen so that ``1 … R/2`` of the ``R`` values are split, on a
geometric scale), then measures every candidate with ``jax.lax.map`` inside one
``jit``: the weight MSE of ``sum_i Q(W_i)`` against ``W`` and the extra non-zero
parameters (non-zeros summed over the branches minus those of ``W``, as a fraction of
``W.size``). ``lax.map`` keeps one candidate's arrays alive at a time, where ``vmap``
would materialise all of them (and was measured 3-4x slower on CPU).

The choice is the lowest MSE within the ``max_extra`` budget, and only if it is below
the MSE of not splitting (``Q(W)`` alone); otherwise the layer stays untouched. Since
every candidate is measured, the choice is never worse than any of them, in particular
than ``balance`` at any candidate threshold when ``method="auto"``. With a per-channel
spec, thresholds are per channel (along ``spec.axis``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxsplit import kernels, quant
from jaxsplit.config import AUTO_METHODS, Auto
from jaxsplit.measure import measure, reduction
from jaxsplit.thresholds import channel_axis

__all__ = [
    "AutoChoice",
    "candidate_thresholds",
    "evaluate",
    "search_methods",
    "search",
    "choice",
]


@dataclasses.dataclass(frozen=True)
class AutoChoice:
    """What ``Auto`` chose for one layer, and what it costs.

    Attributes:
      method: the chosen method (``None`` when the layer is left untouched).
      threshold: the chosen absolute threshold: a float, or one per channel as a tuple
        (``None`` when untouched).
      mse: weight MSE of the split (equal to ``mse_unsplit`` when untouched).
      mse_unsplit: weight MSE of quantizing the layer as it is.
      extra_nonzero: extra non-zero parameters (count, ``jaxsplit.measure``).
      extra_fraction: the same as a fraction of the layer's size.
      candidates: number of (method, threshold) pairs measured.
    """

    method: str | None
    threshold: float | tuple[float, ...] | None
    mse: float
    mse_unsplit: float
    extra_nonzero: int
    extra_fraction: float
    candidates: int

    @property
    def split(self) -> bool:
        """Whether the layer is split."""
        return self.method is not None

    @property
    def reduction(self) -> float:
        """Fraction of the unsplit MSE removed (``measure.reduction``; ``0`` when untouched)."""
        return reduction(self.mse_unsplit, self.mse)

    def to_dict(self) -> dict[str, Any]:
        """Fields plus ``split`` and ``reduction``, as plain Python values."""
        return {**dataclasses.asdict(self), "split": self.split, "reduction": self.reduction}


def _axis(w: jax.Array, spec: quant.QuantSpec) -> int | None:
    """The channel axis of ``w`` under ``spec`` (``None`` per tensor)."""
    if spec.granularity == "per_tensor" or w.ndim == 0:
        return None
    return channel_axis(w.ndim, spec.axis)


def candidate_thresholds(w: jax.Array, spec: quant.QuantSpec, n: int) -> jax.Array:
    """``n`` candidate thresholds for ``w``: shape ``(n,)`` per tensor, else ``(n, *b)``.

    ``b`` broadcasts against ``w`` (size 1 except on the channel axis). The first
    ``n // 2`` are ``j / (n // 2) × max|W|``; the rest are the ``k``-th largest ``|W|``
    (per channel), so that ``k`` values are split, for ``k`` geometric in ``[1, R/2]``.

    Example:
      >>> import jax.numpy as jnp
      >>> w = jnp.arange(8.0)
      >>> candidate_thresholds(w, quant.QuantSpec(bits=8), 4).tolist()
      [0.0, 3.5, 6.0, 3.0]
    """
    ax = _axis(w, spec)
    a = jnp.where(jnp.isfinite(w), jnp.abs(w), 0).astype(jnp.float32)
    cols = a.reshape(-1, 1) if ax is None else jnp.moveaxis(a, ax, -1).reshape(-1, a.shape[ax])
    rows = cols.shape[0]
    n_rel = n // 2
    frac = jnp.arange(n_rel, dtype=jnp.float32) / n_rel
    rel = frac[:, None] * jnp.max(cols, axis=0)[None, :]
    ks = np.unique(np.round(np.geomspace(1, max(rows // 2, 1), n - n_rel)).astype(int))
    ks = np.resize(ks, n - n_rel)  # repeat if the geometric grid has fewer distinct sizes
    desc = jnp.sort(cols, axis=0)[::-1]
    top = desc[np.clip(ks, 0, rows - 1)]
    thr = jnp.concatenate([rel, top], axis=0)
    if ax is None:
        return thr[:, 0]
    shape = [1] * w.ndim
    shape[ax] = w.shape[ax]
    return thr.reshape(n, *shape)


def evaluate(
    w: jax.Array,
    thresholds: jax.Array,
    method: str,
    spec: quant.QuantSpec,
    *,
    branches: int = 2,
    key: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """MSE and extra non-zeros of ``method`` at every threshold, one candidate at a time.

    Args:
      w: a floating-point kernel (finite).
      thresholds: ``(n, ...)`` thresholds, each broadcastable to ``w``.
      method: one of ``kernels.METHODS``.
      spec: the branches' ``QuantSpec``.
      branches: branch count (``balance`` only for more than 2).
      key: a key for ``"random"``.

    Returns:
      ``(mse, extra_nonzero)``: float32 and int32 arrays of shape ``(n,)``
      (``jaxsplit.measure``).

    Example:
      >>> import jax.numpy as jnp
      >>> w = jnp.array([0.1, -0.2, 0.3, 4.0])
      >>> mse, extra = evaluate(w, jnp.array([0.2, 0.5]), "clip", quant.QuantSpec(bits=4))
      >>> extra.tolist(), bool(mse[1] < mse[0])
      ([2, 1], True)
    """

    def one(thr):
        bs = kernels.split(method, w, thr, key, branches=branches, spec=spec)
        m = measure(w, bs, spec)
        return m.mse, m.extra_nonzero

    return jax.lax.map(one, thresholds)


def search_methods(method: str, spec: quant.QuantSpec) -> tuple[str, ...]:
    """The methods ``search`` tries for ``SplitConfig.method``.

    Example:
      >>> search_methods("auto", quant.QuantSpec(bits=8, symmetric=False))
      ('balance', 'clip', 'residual')
    """
    if method != "auto":
        return (method,)
    return tuple(m for m in AUTO_METHODS if m != "grid" or spec.symmetric)


def search(
    w: jax.Array,
    key: jax.Array | None,
    *,
    auto: Auto,
    method: str,
    branches: int = 2,
    budget=None,
):
    """Chooses and applies the best split of one kernel, in one compiled call.

    Args:
      w: a floating-point kernel; non-finite values are ignored by the search and stay
        on ``branch_0``.
      key: a ``jax.random`` key (used by ``"random"``), or ``None``.
      auto: the ``Auto`` settings (static).
      method: a kernel method or ``"auto"`` (static).
      branches: branch count (static).
      budget: overrides ``auto.max_extra`` (a scalar, may be traced), so that callers
        compiling ``search`` inside their own ``jit`` can share one program across
        budgets; ``None``: ``auto.max_extra``.

    Returns:
      ``(ws, info)``: the branches (``ws[0] = w``, others zero, when no candidate beats
      not splitting) and a dict of arrays: ``split`` (bool), ``method`` (index into
      ``search_methods``), ``threshold``, ``mse``, ``mse_unsplit``, ``extra_nonzero``.

    Example:
      >>> import jax.numpy as jnp
      >>> w = jnp.array([0.01, -0.02, 0.03, 0.02, 4.0])
      >>> ws, info = search(w, None, auto=Auto(quant.QuantSpec(bits=4)), method="clip")
      >>> bool(info["split"]), float(ws[1][-1]) > 0, bool(info["mse"] < info["mse_unsplit"])
      (True, True, True)
    """
    if budget is None:
        budget = jnp.inf if auto.max_extra is None else auto.max_extra
    return _search(
        w,
        key,
        jnp.float32(budget),
        spec=auto.spec,
        candidates=auto.candidates,
        method=method,
        branches=branches,
    )


@functools.partial(jax.jit, static_argnames=("spec", "candidates", "method", "branches"))
def _search(w, key, budget, *, spec, candidates: int, method: str, branches: int):
    """``search`` with the budget as data, so budgets share one compilation."""
    methods = search_methods(method, spec)
    wf = jnp.where(jnp.isfinite(w), w, jnp.zeros_like(w))
    thr = candidate_thresholds(wf, spec, candidates)
    results = [evaluate(wf, thr, m, spec, branches=branches, key=key) for m in methods]
    mse = jnp.stack([r[0] for r in results])
    extra = jnp.stack([r[1] for r in results])
    score = jnp.where(jnp.isfinite(mse) & (extra <= budget * w.size), mse, jnp.inf)
    best = jnp.argmin(score.reshape(-1))
    mi, ti = best // candidates, best % candidates
    mse0 = measure(wf, (wf,), spec).mse
    do_split = score.reshape(-1)[best] < mse0
    t = thr[ti]

    def apply(m):
        return lambda: kernels.split(m, w, t, key, branches=branches, spec=spec)

    ws = jax.lax.switch(mi, [apply(m) for m in methods]) if len(methods) > 1 else apply(method)()
    zero = jnp.zeros_like(w)
    ws = (jnp.where(do_split, ws[0], w), *(jnp.where(do_split, b, zero) for b in ws[1:]))
    info = {
        "split": do_split,
        "method": mi,
        "threshold": t,
        "mse": jnp.where(do_split, mse[mi, ti], mse0),
        "mse_unsplit": mse0,
        "extra_nonzero": jnp.where(do_split, extra[mi, ti], 0),
        "size": w.size,
    }
    return ws, info


def choice(
    info: dict, methods: tuple[str, ...], candidates: int, *, size: int | None = None
) -> AutoChoice:
    """An ``AutoChoice`` from ``search``'s concrete ``info`` (a host sync).

    Example:
      >>> info = {"split": True, "method": 1, "threshold": 0.5, "mse": 1e-4,
      ...         "mse_unsplit": 4e-4, "extra_nonzero": 3}
      >>> c = choice(info, ("balance", "clip"), 64, size=300)
      >>> c.reduction, c.extra_fraction
      (0.75, 0.01)
    """
    split = bool(info["split"])
    thr = np.asarray(info["threshold"], np.float64)
    thr_v = float(thr) if thr.size == 1 else tuple(float(x) for x in thr.reshape(-1))
    return AutoChoice(
        method=methods[int(info["method"])] if split else None,
        threshold=thr_v if split else None,
        mse=float(info["mse"]),
        mse_unsplit=float(info["mse_unsplit"]),
        extra_nonzero=int(info["extra_nonzero"]),
        extra_fraction=int(info["extra_nonzero"]) / max(int(info.get("size", size)), 1),
        candidates=len(methods) * candidates,
    )
