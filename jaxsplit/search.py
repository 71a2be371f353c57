"""Automatic per-layer thresholds (and methods): a compiled search under a ``QuantSpec``.

For one kernel ``W``, ``search`` builds ``Auto.candidates`` thresholds (half of them
fractions ``j / (n/2)`` of ``max|W|``, ``j = 0 … n/2 - 1``, so ``Relative(0.5)`` is
always among them; half chosen so that ``1 … R/2`` of the ``R`` values are split, on a
geometric scale), then measures every candidate with ``jax.lax.map`` inside one
``jit``: the weight MSE of ``sum_i Q(W_i)`` against ``W`` and the extra non-zero
parameters (non-zeros summed over the branches minus those of ``W``, as a fraction of
``W.size``). ``lax.map`` keeps one candidate's arrays alive at a time, where ``vmap``
would materialise all of them (and was measured 3-4x slower on CPU).

On large per-tensor kernels (``jaxsplit.screen``) every candidate is first *predicted*
on a sample of the kernel (its largest values exactly, a strided rest), and only the
``top`` best predictions within the budget are measured on the whole kernel; the others
count as unmeasured. ``Auto(scope="tree")`` curves (``screened_curve``) also measure the
best prediction at a few multiples of the layer's budget, where a shared budget may move
it; calibrated searches are screened too (prediction weighted by the calibration's
diagonal, the exact output error measured). Tree-scope curves of 16-bit per-tensor
kernels without calibration measure every candidate exactly on the kernel's distinct
values instead (``table_curve``, ``jaxsplit.table``). ``exhaustive=True`` measures them all
(per-channel and per-group specs, small kernels and ``random`` always are).

The choice is the lowest measured MSE within the ``max_extra`` budget, and only if it is
below the MSE of not splitting (``Q(W)`` alone); otherwise the layer stays untouched. So
the choice is never worse than not splitting nor than any measured candidate (all of them
when exhaustive). With a per-channel spec, thresholds are per channel (along ``spec.axis``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxsplit import kernels, quant, screen
from jaxsplit.config import AUTO_METHODS, Auto
from jaxsplit.measure import (
    Measurement,
    measure,
    measure_candidate,
    measure_counted,
    reduction,
)
from jaxsplit.thresholds import channel_axis

__all__ = [
    "AutoChoice",
    "candidate_thresholds",
    "evaluate",
    "search_methods",
    "search",
    "choice",
    "curve",
    "screened_curve",
    "screens",
    "table_curve",
    "table_thresholds",
    "finite_thresholds",
    "allocate",
    "measure_all",
    "layer_choice",
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
      output_error, output_error_unsplit: expected output error ``trace(Eᵀ C E)``
        of the choice and of not splitting under the layer's calibration (``None``
        without one, ``jaxsplit.measure``).
      effective_bits: storage bits per weight of the choice, twins' indices included.
      budget_share: under ``Auto(scope="tree")``, this layer's spending (what
        ``Auto.cost`` counts) as a fraction of the tree's budget (``None`` under
        ``scope="layer"``).
    """

    method: str | None
    threshold: float | tuple[float, ...] | None
    mse: float
    mse_unsplit: float
    extra_nonzero: int
    extra_fraction: float
    candidates: int
    output_error: float | None = None
    output_error_unsplit: float | None = None
    effective_bits: float = float("nan")
    budget_share: float | None = None

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


def _tail_ranks(rows: int, n: int) -> np.ndarray:
    """``candidate_thresholds``' ranks ``k`` (``desc(|W|)[k]`` candidates): ``n`` of them,
    geometric in ``[1, rows / 2]``, repeated if the grid has fewer distinct sizes."""
    ks = np.unique(np.round(np.geomspace(1, max(rows // 2, 1), n)).astype(int))
    return np.resize(ks, n)


def candidate_thresholds(
    w: jax.Array, spec: quant.QuantSpec, n: int, *, sampled: screen.Sample | None = None
) -> jax.Array:
    """``n`` candidate thresholds for ``w``: shape ``(n,)`` per tensor, else ``(n, *b)``.

    ``b`` broadcasts against ``w`` (size 1 except on the channel axis). The first
    ``n // 2`` are ``j / (n // 2) × max|W|``; the rest are the ``k``-th largest ``|W|``
    (per channel), so that ``k`` values are split, for ``k`` geometric in ``[1, R/2]``.
    Per tensor on kernels of ``screen.MIN_SIZE`` values or more, the ``k``-th largest is
    exact for ``k < screen.TAIL`` and read from ``screen.sample`` beyond (so that about
    ``k`` values are split) instead of sorting the whole kernel; ``sampled``: that sample
    of ``w`` where the caller has taken it already (``screen.sample(w)``).

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
    ks = _tail_ranks(rows, n - n_rel)
    if ax is None and rows >= screen.MIN_SIZE:  # no full sort: exact tail, sampled rest
        top = screen.order_stats(screen.sample(w) if sampled is None else sampled, ks)[:, None]
    else:
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

    m = measure_all(w, thresholds, method, spec, branches=branches, key=key)
    return m.mse, m.extra_nonzero


def measure_all(
    w: jax.Array,
    thresholds: jax.Array,
    method: str,
    spec: quant.QuantSpec,
    *,
    branches: int = 2,
    key: jax.Array | None = None,
    calibration: jax.Array | None = None,
    twin_spec: quant.QuantSpec | None = None,
) -> Measurement:
    """``measure`` of ``method`` at every threshold (fields stacked, shape ``(n,)``).

    Example:
      >>> import jax.numpy as jnp
      >>> w = jnp.array([[0.1, -0.2], [0.3, 4.0]])
      >>> m = measure_all(w, jnp.array([0.5]), "clip", quant.QuantSpec(bits=4),
      ...                 calibration=jnp.ones(2))
      >>> m.extra_nonzero.tolist(), bool(m.output_error[0] > 0)
      ([1], True)
    """

    def one(thr):
        return measure_candidate(
            method, w, thr, key, branches=branches, spec=spec, twin_spec=twin_spec,
            calibration=calibration,
        )[0]  # fmt: skip

    return jax.lax.map(one, thresholds)


def search_methods(method: str, spec: quant.QuantSpec) -> tuple[str, ...]:
    """The methods ``search`` tries for ``SplitConfig.method``.

    Example:
      >>> search_methods("auto", quant.QuantSpec(bits=8, symmetric=False))
      ('balance', 'clip', 'residual')
    """
    if method != "auto":
        return (method,)
    grid_only = ("grid", "snap", "compensate")  # symmetric specs only
    return tuple(m for m in AUTO_METHODS if m not in grid_only or spec.symmetric)


def search(
    w: jax.Array,
    key: jax.Array | None,
    *,
    auto: Auto,
    method: str,
    branches: int = 2,
    budget=None,
    calibration: jax.Array | None = None,
    exhaustive: bool = False,
    top: int = 4,
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
      calibration: the second moment of the layer's inputs (``jaxsplit.measure``):
        candidates are then scored by the expected output error, not the weight MSE.
      exhaustive: measure every candidate on the whole kernel (static). By default
        candidates are scored on a sample and only the ``top`` best are measured
        (``jaxsplit.screen``) where the screen applies (per-tensor specs, kernels of
        ``screen.MIN_SIZE`` values or more, no ``random``, no twin spec; with a
        calibration the prediction is weighted by its diagonal and the measured
        figure is the exact output error); elsewhere the search is exhaustive anyway.
      top: candidates the screen measures exactly (static).

    Returns:
      ``(ws, info)``: the branches (``ws[0] = w``, others zero, when no candidate beats
      not splitting) and a dict of arrays: ``split`` (bool), ``method`` (index into
      ``search_methods``), ``threshold``, ``mse``, ``mse_unsplit``, ``extra_nonzero``,
      ``output_error``, ``output_error_unsplit``, ``effective_bits``, ``size``.

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
        calibration,
        spec=auto.spec,
        candidates=auto.candidates,
        method=method,
        branches=branches,
        twin_spec=auto.twin_spec,
        cost=auto.cost,
        top=0 if exhaustive else top,
    )


def _curve(w, key, calibration, *, spec, candidates, method, branches, twin_spec):
    methods = search_methods(method, spec)
    wf = jnp.where(jnp.isfinite(w), w, jnp.zeros_like(w))
    thr = candidate_thresholds(wf, spec, candidates)
    ms = [
        measure_all(
            wf, thr, m, spec, branches=branches, key=key, calibration=calibration,
            twin_spec=twin_spec,
        )
        for m in methods
    ]  # fmt: skip
    stacked = Measurement(*(jnp.stack(f) for f in zip(*ms, strict=True)))
    base = measure(wf, (wf,), spec, calibration=calibration)
    return _curve_dict(thr, stacked, base, calibration, w.size)


def _curve_dict(thr, m: Measurement, base: Measurement, calibration, size: int) -> dict:
    """A curve's dict, its scores computed one way for the exhaustive and the screened
    curve: the total squared error (comparable across layers) or, with a calibration,
    the output error per unit of mean input power (so the tree allocation stays in
    weight units); a non-finite score is ``inf``."""
    score, score0 = _score(m, calibration, size), _score(base, calibration, size)
    return {"thresholds": thr, "m": m, "base": base, "score": score, "score0": score0}


def _score(m: Measurement, calibration, size: int) -> jax.Array:
    """``_curve_dict``'s score of measured candidates (``inf`` where not finite)."""
    score = m.mse * size if calibration is None else m.output_error / _input_power(calibration)
    return jnp.where(jnp.isfinite(score), score, jnp.inf)


def _input_power(calibration) -> jax.Array:
    """The mean of ``diag(C)`` (``C``: ``(d_in,)`` or ``(d_in, d_in)``), at least tiny."""
    c = jnp.asarray(calibration, jnp.float32)
    d = c if c.ndim == 1 else jnp.diagonal(c)
    return jnp.maximum(jnp.mean(d), jnp.finfo(jnp.float32).tiny)


@functools.partial(
    jax.jit, static_argnames=("spec", "candidates", "method", "branches", "twin_spec")
)
def curve(
    w, key, calibration=None, *, spec, candidates: int, method: str, branches: int = 2,
    twin_spec=None,
):  # fmt: skip
    """Every candidate of one kernel, measured in one compiled call (no choice).

    The first half of ``Auto(scope="tree")``: ``allocate`` chooses on the host from
    these curves, then ``programs.apply`` writes each chosen split.

    Returns:
      A dict: ``thresholds`` ``(candidates, ...)``; ``m``, a ``Measurement`` of arrays
      ``(methods, candidates)`` (methods: ``search_methods``); ``base``, the
      ``Measurement`` of not splitting; ``score`` ``(methods, candidates)`` and
      ``score0``: the figure minimised, total squared weight error (``mse × size``)
      or, with ``calibration``, the expected output error.

    Example:
      >>> import jax.numpy as jnp
      >>> c = curve(jnp.array([0.01, -0.02, 0.03, 4.0]), None, spec=quant.QuantSpec(bits=4),
      ...           candidates=4, method="clip")
      >>> c["score"].shape, bool(c["score"].min() < c["score0"])
      ((1, 4), True)
    """
    return _curve(
        w, key, calibration, spec=spec, candidates=candidates, method=method,
        branches=branches, twin_spec=twin_spec,
    )  # fmt: skip


def _screened_curve(
    w, key, calibration, budget, *, spec, candidates, method, branches, top, levels, rank=None
):  # fmt: skip
    """``_curve``'s dict from the screen (``jaxsplit.screen``): every candidate predicted
    on a sample, only ``screen.tree_picks`` measured (the others score ``inf``). With
    ``rank`` (``screen.measure_picks``) it also holds ``"kept"``: the flat index and the
    branches of the best-ranked measured pick (split from ``w`` with non-finite values
    zeroed)."""
    methods = search_methods(method, spec)
    wf = jnp.where(jnp.isfinite(w), w, jnp.zeros_like(w))
    s = screen.sample(wf)  # taken once, for the thresholds and the predictions
    thr = candidate_thresholds(wf, spec, candidates, sampled=s)
    p_score, p_extra = screen.predictions(
        wf, thr, methods, spec, branches=branches, key=key, calibration=calibration, sampled=s
    )
    chosen = screen.tree_picks(p_score, p_extra, budget, w.size, top=top, levels=levels)
    m = screen.measure_picks(
        wf, thr, chosen, methods, spec, branches=branches, key=key, calibration=calibration,
        rank=rank,
    )  # fmt: skip
    m, kept = (m, None) if rank is None else m
    base = screen.lean(measure(wf, (wf,), spec, calibration=calibration))
    return {**_curve_dict(thr, m, base, calibration, w.size), "kept": kept}


def screens(shape: tuple[int, ...], auto: Auto, method: str) -> bool:
    """Whether ``Auto`` curves of a kernel of ``shape`` come from the screen (static):
    per-tensor specs on kernels of ``screen.MIN_SIZE`` values or more, no ``random``,
    no ``twin_spec``; elsewhere every candidate is measured.

    Example:
      >>> screens((1024, 1024), Auto(quant.QuantSpec(bits=4)), "clip"), screens((8, 8),
      ...     Auto(quant.QuantSpec(bits=4)), "clip")
      (True, False)
    """
    methods = search_methods(method, auto.spec)
    return auto.twin_spec is None and screen.applies(tuple(shape), auto.spec, methods)


@functools.partial(
    jax.jit, static_argnames=("spec", "candidates", "method", "branches", "top", "levels")
)
def screened_curve(
    w, key, calibration=None, budget=0.0, *, spec, candidates: int, method: str,
    branches: int = 2, top: int = 4, levels: tuple[float, ...] = screen.TREE_LEVELS,
):  # fmt: skip
    """``curve`` from the screen: every candidate predicted on a sample of ``w``, only a
    few measured on the whole kernel (the rest score ``inf``, so no choice takes them).

    Measured: the ``top`` best predictions within ``budget × w.size`` extra non-zeros
    (what ``search`` measures for ``scope="layer"``, so a tree-wide allocation over these
    curves is never worse than the per-layer choice), and the best prediction within
    ``level × budget × w.size`` for each of ``levels`` (``screen.tree_picks``). Use it
    where ``screens`` holds; with ``calibration`` the prediction weights each value by
    the calibration's diagonal and the measured figure is the exact output error.

    Returns:
      As ``curve``.

    Example:
      >>> import numpy as np, jax.numpy as jnp
      >>> w = jnp.asarray(np.random.default_rng(0).standard_t(3, 2**18), jnp.float32)
      >>> c = screened_curve(w, None, None, 0.01, spec=quant.QuantSpec(bits=4),
      ...                    candidates=16, method="clip", top=2, levels=(4.0,))
      >>> int(np.isfinite(np.asarray(c["score"])).sum()) <= 3, bool(c["score"].min() < c["score0"])
      (True, True)
    """
    return _screened_curve(
        w, key, calibration, jnp.float32(budget), spec=spec, candidates=candidates,
        method=method, branches=branches, top=top, levels=levels,
    )  # fmt: skip


@functools.partial(jax.jit, static_argnames=("spec", "candidates"))
def finite_thresholds(w, *, spec, candidates: int):
    """``candidate_thresholds`` of ``w`` with its non-finite values zeroed: ``curve``'s
    candidates (``table_curve`` takes them as data).

    Example:
      >>> import jax.numpy as jnp
      >>> finite_thresholds(jnp.array([0.0, jnp.inf, 2.0, 4.0]), spec=quant.QuantSpec(bits=4),
      ...                   candidates=4).tolist()
      [0.0, 2.0, 2.0, 0.0]
    """
    wf = jnp.where(jnp.isfinite(w), w, jnp.zeros_like(w))
    return candidate_thresholds(wf, spec, candidates)


def table_thresholds(tab, rest: np.ndarray, *, spec, candidates: int) -> jax.Array:
    """``finite_thresholds`` of a per-tensor kernel of ``screen.MIN_SIZE`` values or more,
    from its value table ``tab`` (``table.ValueTable``) and its strided sample ``rest``
    (the kernel's values at ``screen.sample_stride(size)`` steps): the same float32 values,
    without the kernel (the streamed split reads both in blocks).

    The maximum and the exact tail (``screen.TAIL`` largest ``|w|``, repeats included) come
    from the table's counts; the rest of the order statistics from ``rest``, as
    ``screen.order_stats`` reads them.

    Example:
      >>> import numpy as np
      >>> from jaxsplit import screen, table
      >>> w = (np.random.default_rng(0).standard_t(3, 2**18) * 0.02).astype(np.float16)
      >>> q = quant.QuantSpec(bits=4)
      >>> rest = w[:: screen.sample_stride(w.size)]
      >>> got = table_thresholds(table.value_table(w), rest, spec=q, candidates=8)
      >>> bool((got == finite_thresholds(jnp.asarray(w), spec=q, candidates=8)).all())
      True
    """
    size = int(tab.size)
    if size < screen.MIN_SIZE or (spec is not None and spec.granularity != "per_tensor"):
        raise ValueError(
            f"table_thresholds needs a per-tensor kernel of at least {screen.MIN_SIZE} values, "
            f"got size {size} and spec {spec}"
        )
    a = np.abs(np.asarray(tab.values).astype(np.float32))
    a[~np.isfinite(a)] = 0.0  # non-finite values count as zeros (``finite_thresholds``)
    counts = np.asarray(tab.counts, np.int64)
    order = np.argsort(-a, kind="stable")
    a_desc, c_desc = a[order], counts[order]
    n_rel = candidates // 2
    frac = jnp.arange(n_rel, dtype=jnp.float32) / n_rel
    top_value = jnp.float32(a_desc[c_desc > 0][0]) if (c_desc > 0).any() else jnp.float32(0)
    rel = frac * top_value
    tail = min(screen.TAIL, size)
    ends = np.cumsum(c_desc)  # a_desc[j] fills the positions [ends[j-1], ends[j])
    tail_abs = a_desc[np.searchsorted(ends, np.arange(tail), side="right")]
    r = np.abs(np.asarray(rest).astype(np.float32))
    r[~np.isfinite(r)] = 0.0
    top = screen.ranked(tail_abs, -np.sort(-r), size, _tail_ranks(size, candidates - n_rel))
    return jnp.concatenate([rel, jnp.asarray(top, jnp.float32)])


@functools.partial(jax.jit, static_argnames=("spec", "method", "branches", "twin_spec"))
def table_curve(
    values, counts, size, thresholds, key=None, *, spec, method: str, branches: int = 2,
    twin_spec=None,
):  # fmt: skip
    """``curve`` of a 16-bit kernel from its value table (``jaxsplit.table``): every
    candidate measured exactly, on the kernel's distinct values weighted by their counts
    (``measure.measure_counted``), so the cost is the table's size, not the kernel's,
    and one program serves every kernel shape with a table of that size.

    Args:
      values, counts: ``table.value_table(w)``'s (non-finite values count as zeros, as
        in ``curve``).
      size: the kernel's size (data).
      thresholds: ``(candidates,)`` ``candidate_thresholds`` of the kernel (with its
        non-finite values zeroed), so the candidates are ``curve``'s.
      key: unused (``table.applies`` excludes ``random``).
      spec, method, branches, twin_spec: as for ``curve``.

    Returns:
      As ``curve`` (Widrow's predictions are ``nan``).

    Example:
      >>> import numpy as np, jax.numpy as jnp
      >>> from jaxsplit import table
      >>> rng = np.random.default_rng(0)
      >>> w = jnp.asarray(rng.standard_t(3, (512, 512)) * 0.02, jnp.bfloat16)
      >>> t, spec = table.value_table(w), quant.QuantSpec(bits=4)
      >>> thr = candidate_thresholds(w, spec, 8)
      >>> c = table_curve(t.values, t.counts, t.size, thr, spec=spec, method="clip")
      >>> e = curve(w, None, spec=spec, candidates=8, method="clip")
      >>> bool(np.allclose(c["score"], e["score"], rtol=1e-5))
      True
      >>> bool((c["m"].extra_nonzero == e["m"].extra_nonzero).all())
      True
    """
    methods = search_methods(method, spec)
    v = jnp.where(jnp.isfinite(values), values, jnp.zeros_like(values))

    def one(m):
        def f(t):
            bs = kernels.split(m, v, t, key, branches=branches, spec=spec, twin_spec=twin_spec)
            return measure_counted(v, counts, size, bs, spec, twin_spec=twin_spec)

        return jax.lax.map(f, thresholds)

    ms = [one(m) for m in methods]
    stacked = Measurement(*(jnp.stack(f) for f in zip(*ms, strict=True)))
    base = measure_counted(v, counts, size, (v,), spec)
    return _curve_dict(thresholds, stacked, base, None, size)


@functools.partial(
    jax.jit,
    static_argnames=("spec", "candidates", "method", "branches", "twin_spec", "cost", "top"),
)
def _search(
    w, key, budget, calibration, *, spec, candidates, method, branches, twin_spec, cost="extra",
    top=0,
):  # fmt: skip
    """``search`` with the budget as data, so budgets share one compilation."""
    methods = search_methods(method, spec)
    screened = top > 0 and twin_spec is None and screen.applies(w.shape, spec, methods)

    def within_budget(m, score):  # ``inf`` where a candidate spends more than the budget
        spent = m.twin_nonzero if cost == "twin" else m.extra_nonzero
        return jnp.where(spent <= budget * w.size, score, jnp.inf)

    def rank(m):  # the choice's score below, of one measured pick
        return within_budget(m, _score(m, calibration, w.size))

    if screened:
        c = _screened_curve(
            w, key, calibration, budget, spec=spec, candidates=candidates, method=method,
            branches=branches, top=top, levels=(), rank=rank,
        )  # fmt: skip
    else:
        c = _curve(
            w, key, calibration, spec=spec, candidates=candidates, method=method,
            branches=branches, twin_spec=twin_spec,
        )  # fmt: skip
    m, base, thr, score0 = c["m"], c["base"], c["thresholds"], c["score0"]
    score = within_budget(m, c["score"])
    best = jnp.argmin(score.reshape(-1))
    mi, ti = best // candidates, best % candidates
    do_split = score.reshape(-1)[best] < score0
    t = thr[ti]

    def apply(name):
        return lambda: kernels.split(
            name, w, t, key, branches=branches, spec=spec, twin_spec=twin_spec,
            calibration=calibration,
        )  # fmt: skip

    def split():
        return (
            jax.lax.switch(mi, [apply(n) for n in methods]) if len(methods) > 1 else apply(method)()
        )

    def unsplit():
        return (w, *(jnp.zeros_like(w) for _ in range(branches - 1)))

    if c.get("kept") is None:
        ws = jax.lax.cond(do_split, lambda: tuple(split()), unsplit)
    else:  # the screen kept the best pick's branches: reuse them where they are the choice's
        flat, kept = c["kept"]
        same = (flat == best) & jnp.all(jnp.isfinite(w))
        which = jnp.where(do_split, jnp.where(same, 2, 1), 0)
        ws = jax.lax.switch(which, [unsplit, lambda: tuple(split()), lambda: tuple(kept)])
    info = {
        "split": do_split,
        "method": mi,
        "threshold": t,
        "mse": jnp.where(do_split, m.mse[mi, ti], base.mse),
        "mse_unsplit": base.mse,
        "extra_nonzero": jnp.where(do_split, m.extra_nonzero[mi, ti], 0),
        "output_error": jnp.where(do_split, m.output_error[mi, ti], base.output_error),
        "output_error_unsplit": base.output_error,
        "effective_bits": jnp.where(do_split, m.effective_bits[mi, ti], base.effective_bits),
        "size": jnp.int32(w.size),
    }
    return ws, info


def allocate(
    extras: list[np.ndarray],
    scores: list[np.ndarray],
    base: list[float],
    budget: float,
    layer_budgets: list[float] | None = None,
) -> list[int]:
    """Chooses one candidate per layer (or none) under a budget shared by the layers.

    Minimises ``sum_l score_l`` subject to ``sum_l extra_l <= budget``: the greedy over
    the lower convex hull of each layer's ``(extra, score)`` curve (the Lagrangian
    solution: steps taken by decreasing error removed per extra non-zero), then one
    pass that spends what is left on the best single upgrade per layer, while any
    helps. With ``layer_budgets`` (``scope="layer"``'s per-layer budgets, summing to at
    most ``budget``) the per-layer choice is computed too and the better total is
    returned, so the tree-wide choice is never worse than ``scope="layer"`` at the same
    total budget. The sum of the chosen extras never exceeds ``budget``.

    Args:
      extras: per layer, the extra non-zeros of each candidate (flat).
      scores: per layer, each candidate's score (lower is better; ``inf`` = invalid).
      base: per layer, the score of not splitting.
      budget: total extra non-zeros allowed.
      layer_budgets: per layer, its own budget under ``scope="layer"`` (optional).

    Returns:
      Per layer, the chosen candidate's flat index, or ``-1`` (not split).

    Example:
      >>> import numpy as np
      >>> allocate([np.array([1, 2]), np.array([1, 2])],
      ...          [np.array([5.0, 1.0]), np.array([9.0, 8.0])], [10.0, 10.0], 3)
      [1, 0]
    """
    n = len(extras)
    ex = [np.asarray(e, np.float64).reshape(-1) for e in extras]
    sc = [np.asarray(s, np.float64).reshape(-1) for s in scores]
    base = [float(b) for b in base]
    choice_ = [-1] * n
    used = 0.0
    steps = []  # (slope, layer, order, target index, extra from, extra to)
    for lay in range(n):
        ok = np.isfinite(sc[lay]) & (sc[lay] < base[lay])
        idx = np.flatnonzero(ok)
        if not idx.size:
            continue
        pts = sorted(((ex[lay][i], sc[lay][i], int(i)) for i in idx), key=lambda p: (p[0], p[1]))
        hull = [(0.0, base[lay], -1)]
        for p in pts:
            if p[1] >= hull[-1][1]:
                continue  # not lower than a cheaper point
            while len(hull) >= 2:
                (x1, y1, _), (x2, y2, _) = hull[-2], hull[-1]
                # drop the middle point when it lies on or above the chord
                if (y2 - y1) * (p[0] - x1) >= (p[1] - y1) * (x2 - x1):
                    hull.pop()
                else:
                    break
            hull.append(p)
        for k in range(1, len(hull)):
            (x0, y0, _), (x1, y1, i1) = hull[k - 1], hull[k]
            dx = max(x1 - x0, 1e-12)
            steps.append(((y1 - y0) / dx, lay, k, i1, x1 - x0))
    steps.sort(key=lambda s: (s[0], s[1], s[2]))
    pos = [0] * n
    blocked = [False] * n
    extra_of = [0.0] * n
    for _slope, lay, k, i1, dx in steps:
        if blocked[lay] or pos[lay] != k - 1:
            blocked[lay] = True
            continue
        if used + dx > budget:
            blocked[lay] = True
            continue
        used += dx
        pos[lay] = k
        choice_[lay] = i1
        extra_of[lay] = ex[lay][i1]
    # spend what is left: the best single replacement per layer, best gain first
    improved = True
    while improved:
        improved = False
        best = None
        for lay in range(n):
            cur = base[lay] if choice_[lay] < 0 else sc[lay][choice_[lay]]
            room = budget - used + extra_of[lay]
            ok = np.isfinite(sc[lay]) & (ex[lay] <= room) & (sc[lay] < cur)
            if ok.any():
                i = int(np.flatnonzero(ok)[np.argmin(sc[lay][ok])])
                gain = cur - sc[lay][i]
                if best is None or gain > best[0]:
                    best = (gain, lay, i)
        if best is not None:
            _, lay, i = best
            used += ex[lay][i] - extra_of[lay]
            extra_of[lay] = ex[lay][i]
            choice_[lay] = i
            improved = True
    if layer_budgets is not None:
        alt = [
            layer_choice(e, s_, b, lb)
            for e, s_, b, lb in zip(ex, sc, base, layer_budgets, strict=True)
        ]

        def total(ch):
            return sum(b if i < 0 else s_[i] for i, s_, b in zip(ch, sc, base, strict=True))

        alt_used = sum(e[i] for i, e in zip(alt, ex, strict=True) if i >= 0)
        if alt_used <= budget and total(alt) < total(choice_):
            return alt
    return choice_


def layer_choice(extra: np.ndarray, score: np.ndarray, base: float, budget: float) -> int:
    """The best candidate of one layer within ``budget`` extra non-zeros, or ``-1``.

    Example:
      >>> import numpy as np
      >>> layer_choice(np.array([1, 5]), np.array([3.0, 1.0]), 4.0, 2)
      0
    """
    s = np.where(np.asarray(extra, np.float64).reshape(-1) <= budget,
                 np.asarray(score, np.float64).reshape(-1), np.inf)  # fmt: skip
    i = int(np.argmin(s))
    return i if s[i] < base else -1


def choice(
    info: dict,
    methods: tuple[str, ...],
    candidates: int,
    *,
    size: int | None = None,
    budget_share: float | None = None,
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
    if size is None:
        size = int(info["size"])
    nan = float("nan")
    thr = np.asarray(info["threshold"], np.float64)
    thr_v = float(thr) if thr.size == 1 else tuple(float(x) for x in thr.reshape(-1))
    return AutoChoice(
        method=methods[int(info["method"])] if split else None,
        threshold=thr_v if split else None,
        mse=float(info["mse"]),
        mse_unsplit=float(info["mse_unsplit"]),
        extra_nonzero=int(info["extra_nonzero"]),
        extra_fraction=int(info["extra_nonzero"]) / max(int(size), 1),
        candidates=len(methods) * candidates,
        output_error=_finite_or_none(info.get("output_error", nan)),
        output_error_unsplit=_finite_or_none(info.get("output_error_unsplit", nan)),
        effective_bits=float(info.get("effective_bits", nan)),
        budget_share=budget_share,
    )


def _finite_or_none(x) -> float | None:
    """``float(x)``, or ``None`` for NaN (no calibration: reports compare equal)."""
    v = float(x)
    return None if v != v else v
