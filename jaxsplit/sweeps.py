"""Compiled sweeps: thresholds × methods × ``QuantSpec`` grids over selected layers.

``sweep(params, cfg, thresholds=..., methods=..., specs=...)`` answers "which
threshold and method, how much error does a split buy at how many bits?" per layer. The
whole grid of one kernel runs as **one compiled program per kernel shape and dtype**:
thresholds are resolved for all candidates at once, and each ``(method, spec)`` pair
evaluates every candidate with ``lax.map`` (sequential, so memory stays at one
candidate's branches; ``vmap`` would materialise all of them). Layers of the same shape
and dtype share the compiled program; new threshold *values* (same count and kinds) do
not recompile.

Each row is one layer × grid point: the threshold as given and resolved, the method,
the spec, how much was split, the measured MSE of ``sum_i Q(W_i)`` against ``W`` (each
branch quantized with its own scale), Widrow's prediction (naive and with correlated
rounding), the reduction against not splitting and the SQNR: ``jaxsplit.measure``'s
figures. Renderings (markdown, CSV) are in ``jaxsplit.render``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxsplit import kernels
from jaxsplit.config import Auto, SplitConfig, ThresholdSpec
from jaxsplit.errors import ConfigError, ConfigTypeError, NonFiniteError
from jaxsplit.evaluate import quant_error
from jaxsplit.measure import Measurement, measure, measure_candidate, reduction, sqnr_db
from jaxsplit.quant import QuantSpec
from jaxsplit.split import check_layer, resolve_selection, split_with_report
from jaxsplit.thresholds import as_threshold, channel_axis, resolve_rule
from jaxsplit.tree import x64

__all__ = ["SweepRow", "SweepResult", "sweep", "auto_sweep", "auto_rows", "spec_label"]

logger = logging.getLogger("jaxsplit")


class SweepRow(NamedTuple):
    """One layer at one grid point (all plain Python values).

    Attributes:
      layer: layer path.
      shape: kernel shape.
      threshold: the threshold's label (``"0.5"``, ``"rel:0.5"``, ``"sigma:3"``, ``"pct:99"``).
      threshold_abs: the absolute threshold it resolved to for this kernel (the mean of
        the per-channel thresholds for a ``per_channel`` spec).
      method: split method.
      bits, granularity: the ``QuantSpec``'s (``spec`` holds its full label).
      spec: ``spec_label(spec)``.
      n_split: values with ``|w| > threshold_abs`` (``residual`` leaves those already on
        the grid whole, so ``quant_error`` may count fewer); ``frac_split = n_split / size``.
      extra_nonzero: non-zero values the split adds (non-zeros summed over the branches
        minus those of ``W``, ``jaxsplit.measure``): the parameter cost of the split;
        ``extra_fraction``: the same as a fraction of the kernel's size.
      mse_before: measured MSE of ``Q(W)`` (no split).
      mse: measured MSE of ``sum_i Q(W_i)`` against ``W``.
      predicted_mse: Widrow's naive prediction (independent rounding per branch).
      predicted_mse_correlated: Widrow with identical branches rounding alike.
      reduction: ``measure.reduction(mse_before, mse)``: ``1 - mse / mse_before``.
      sqnr_before_db, sqnr_db: ``10 log10(mean(W²) / mse)`` before and after.
    """

    layer: str
    shape: tuple[int, ...]
    threshold: str
    threshold_abs: float
    method: str
    bits: int
    granularity: str
    spec: str
    n_split: int
    frac_split: float
    extra_nonzero: int
    extra_fraction: float
    mse_before: float
    mse: float
    predicted_mse: float
    predicted_mse_correlated: float
    reduction: float
    sqnr_before_db: float
    sqnr_db: float

    def to_dict(self) -> dict[str, Any]:
        """The row as a plain dict (``shape`` as a list)."""
        d = self._asdict()
        d["shape"] = list(self.shape)
        return d


@dataclasses.dataclass(frozen=True)
class SweepResult:
    """The tidy result of ``sweep``: one ``SweepRow`` per layer × grid point.

    Example:
      >>> import numpy as np
      >>> w = np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8) ** 3
      >>> res = sweep({"d": {"kernel": w}}, SplitConfig(layers=["d"]), thresholds=[0.25, 0.5])
      >>> [r["threshold"] for r in res.to_rows()]
      ['0.25', '0.5']
    """

    rows: tuple[SweepRow, ...]

    def to_rows(self) -> list[dict[str, Any]]:
        """Rows as plain dicts (JSON-ready)."""
        return [r.to_dict() for r in self.rows]

    def to_dict(self) -> dict[str, Any]:
        """``{"rows": to_rows()}``."""
        return {"rows": self.to_rows()}


def spec_label(spec: QuantSpec) -> str:
    """A short text form of a ``QuantSpec``: ``int8`` (per tensor, symmetric), ``int4/ch``.

    Example:
      >>> spec_label(QuantSpec(bits=4, granularity="per_channel"))
      'int4/ch'
    """
    s = f"int{spec.bits}"
    if spec.granularity == "per_channel":
        s += "/ch"
    if not spec.symmetric:
        s += "/asym"
    if not spec.narrow_range:
        s += "/full"
    return s


def _resolve_all(w, values, rules: tuple[tuple[str, int | None], ...]):
    """Absolute thresholds of every candidate, one statistic pass per distinct rule.

    Shape ``(N,)``, or ``(N, ...)`` broadcasting against ``w`` when a rule is per channel
    (one threshold per index of its axis; scalar rules are broadcast).
    """
    axes = {axis for _, axis in rules if axis is not None}
    bshape = ()
    if axes:
        (axis,) = axes  # one channel axis per sweep (SplitConfig.channel_axis)
        bshape = tuple(w.shape[i] if i == axis else 1 for i in range(w.ndim))
    out = jnp.zeros((len(rules), *bshape), jnp.float32)
    for rule in dict.fromkeys(rules):
        kind, axis = rule
        idx = [i for i, r in enumerate(rules) if r == rule]
        vals = values[jnp.array(idx)]
        if axis is not None:
            thr = jnp.stack([resolve_rule(kind, v, w, axis) for v in vals])
        else:
            thr = resolve_rule(kind, vals, w).reshape(len(idx), *(1,) * len(bshape))
        out = out.at[jnp.array(idx)].set(jnp.broadcast_to(thr, (len(idx), *bshape)))
    return out


def _figures(m: Measurement):
    """``(mse, predicted, predicted_correlated, extra_nonzero)`` of one measurement."""
    return m.mse, m.mse_widrow, m.mse_widrow_correlated, m.extra_nonzero


@functools.partial(jax.jit, static_argnames=("rules", "methods", "specs"))
def _sweep_kernel(w, values, key, *, rules, methods, specs):
    """The whole grid of one kernel in one compiled program (cached per shape/dtype)."""
    thr = _resolve_all(w, values, rules)
    n_split = jax.lax.map(lambda t: jnp.sum(kernels.split_mask(w, t), dtype=jnp.int32), thr)
    thr_mean = jnp.mean(thr.reshape(thr.shape[0], -1), axis=1)
    base = [measure(w, (w,), spec).mse for spec in specs]
    grid = []  # [method] -> per spec (mse, predicted, predicted_correlated, extra) over thr
    for method in methods:

        def one(t, method=method):
            if method in kernels.QUANT_METHODS or len(specs) == 1:
                # shares on the spec's grid, or one spec: each its own candidate (a cheap
                # split is then measured in blocks without being written)
                return [_figures(measure_candidate(method, w, t, key, spec=s)[0]) for s in specs]
            branches = kernels.split(method, w, t, key)  # one split measured under each spec
            return [_figures(measure(w, branches, spec)) for spec in specs]

        grid.append(jax.lax.map(one, thr))
    signal = jnp.mean(jnp.square(w.astype(jnp.float32)))
    return thr_mean, n_split, base, grid, signal


def _check_grid(cfg, thresholds, methods, specs) -> None:
    """Validates the grid through ``SplitConfig``/``QuantSpec`` (errors name the entry)."""
    for name, seq in (("thresholds", thresholds), ("methods", methods), ("specs", specs)):
        if isinstance(seq, str) or not isinstance(seq, Sequence) or len(seq) == 0:
            raise ConfigError(
                "sweep", name, f"sweep {name} must be a non-empty sequence, got {seq!r}"
            )
    for s in specs:
        if not isinstance(s, QuantSpec):
            raise ConfigTypeError(
                "sweep", "specs", f"sweep specs must hold jaxsplit.QuantSpec, got {s!r}"
            )
    for t in thresholds:
        if isinstance(t, Auto):
            raise ConfigTypeError(
                "sweep",
                "thresholds",
                f"sweep thresholds must be resolvable (float, Relative, Sigma, Percentile), "
                f"got {t!r}; Auto searches thresholds itself (jaxsplit.search)",
            )
        for m in methods:
            if m == "auto":
                raise ConfigError(
                    "sweep",
                    "methods",
                    "sweep methods must be kernel methods (balance, random, clip, grid, "
                    "residual), got 'auto'; split_with_report with an Auto threshold searches",
                )
            for s in specs if m in kernels.QUANT_METHODS else (None,):
                SplitConfig(layers=cfg.layers, threshold=t, method=m, spec=s, seed=cfg.seed)
    if len(set(methods)) != len(methods) or len(set(specs)) != len(specs):
        raise ConfigError(
            "sweep", "methods", f"sweep methods/specs must not repeat, got {methods!r} / {specs!r}"
        )


def sweep(
    params: Mapping,
    cfg: SplitConfig,
    *,
    thresholds: Sequence[ThresholdSpec] | None = None,
    methods: Sequence[str] | None = None,
    specs: Sequence[QuantSpec] | None = None,
    on_layer: Callable[[str], Any] | None = None,
) -> SweepResult:
    """Evaluates a grid of thresholds × methods × quantization specs on the selected layers.

    Args:
      params: any tree ``split_params`` accepts (unsplit layers only).
      cfg: a ``SplitConfig``: its ``layers``, ``seed`` and ``strict`` apply; its
        ``threshold``, ``method`` and ``spec`` are the grid's defaults.
      thresholds: threshold specs (absolute floats, ``Relative``, ``Sigma``,
        ``Percentile``, also ``per_channel=True``, along ``cfg.channel_axis``), mixed
        freely. Default: ``(cfg.threshold,)``.
      methods: split methods (``kernels.METHODS``); quantization-aware ones (``grid``,
        ``residual``) split once per spec, on that spec's grid. Default ``(cfg.method,)``.
      specs: ``QuantSpec``s; each branch is quantized with its own scale. Default
        ``(cfg.spec,)``, or int8 per tensor when ``cfg.spec`` is ``None``.
      on_layer: called with each layer's path once its grid is done (progress bars).

    Returns:
      A ``SweepResult``: rows ordered by layer (tree order), then method, spec, threshold.

    Raises:
      ConfigError: an empty grid, repeated methods/specs, an invalid threshold or method
        (the message names it).
      UnmatchedPatternError: a pattern matched no layer (``cfg.strict``).
      NonFiniteError, AlreadySplitError: a kernel holding NaN/inf, or already split.
      ConfigTypeError: a spec is not a ``QuantSpec``; UnsplittableError: a selected
        kernel is not floating.

    Example:
      >>> import numpy as np
      >>> from jaxsplit import Relative
      >>> w = np.array([[0.1, -0.2], [0.3, 4.0]], np.float32)
      >>> res = sweep({"d": {"kernel": w}}, SplitConfig(layers="d"), thresholds=[Relative(0.5)],
      ...             specs=[QuantSpec(bits=4)])
      >>> r = res.rows[0]
      >>> r.threshold, r.threshold_abs, r.n_split, r.extra_nonzero, r.extra_fraction
      ('rel:0.5', 2.0, 1, 1, 0.25)
    """
    if not isinstance(cfg, SplitConfig):
        raise ConfigTypeError(
            "sweep", "cfg", f"cfg must be a jaxsplit.SplitConfig, got {type(cfg).__name__}"
        )
    if isinstance(cfg.threshold, Auto) and thresholds is None:
        raise ConfigError(
            "sweep",
            "thresholds",
            "sweep needs thresholds=[...] when cfg.threshold is Auto (Auto is a search)",
        )
    thresholds = (cfg.threshold,) if thresholds is None else thresholds
    methods = (cfg.method,) if methods is None else methods
    specs = ((cfg.spec or QuantSpec(bits=8)),) if specs is None else specs
    _check_grid(cfg, thresholds, methods, specs)
    thresholds, methods, specs = tuple(thresholds), tuple(methods), tuple(specs)
    objs = [as_threshold(t) for t in thresholds]
    selected, _, _ = resolve_selection(params, cfg)
    values = jnp.asarray([t.value for t in objs], jnp.float32)
    labels = [t.label for t in objs]
    rows: list[SweepRow] = []
    for layer in selected:
        reason = check_layer(layer)
        if reason is not None:
            logger.warning("sweep: %s skipped (%s)", layer.path, reason)
            continue
        w = layer.array
        if not bool(jnp.all(jnp.isfinite(w))):
            raise NonFiniteError(
                layer.path,
                f"layer {layer.path!r}: kernel holds NaN/inf; sweep needs finite weights",
            )
        axis = channel_axis(w.ndim, cfg.channel_axis) if w.ndim else None
        rules = tuple((t.kind, axis if t.per_channel else None) for t in objs)
        key = kernels.stochastic_key(cfg.seed, layer.path)
        with x64(w.dtype):
            out = _sweep_kernel(w, values, key, rules=rules, methods=methods, specs=specs)
        rows.extend(_rows(layer.path, w, labels, methods, specs, out))
        if on_layer is not None:
            on_layer(layer.path)
    return SweepResult(tuple(rows))


def _rows(path, w, labels, methods, specs, out) -> list[SweepRow]:
    """Host-side: turns one kernel's device results into rows (one transfer)."""
    thr, n_split, base, grid, signal = jax.device_get(out)
    size, signal = int(w.size), float(signal)
    rows = []
    for mi, method in enumerate(methods):
        for si, spec in enumerate(specs):
            mse, pred, pred_c, extra = grid[mi][si]
            before = float(base[si])
            for i, label in enumerate(labels):
                m = float(mse[i])
                rows.append(
                    SweepRow(
                        layer=path,
                        shape=tuple(int(d) for d in w.shape),
                        threshold=label,
                        threshold_abs=float(thr[i]),
                        method=method,
                        bits=spec.bits,
                        granularity=spec.granularity,
                        spec=spec_label(spec),
                        n_split=int(n_split[i]),
                        frac_split=int(n_split[i]) / size,
                        extra_nonzero=int(extra[i]),
                        extra_fraction=int(extra[i]) / size,
                        mse_before=before,
                        mse=m,
                        predicted_mse=float(pred[i]),
                        predicted_mse_correlated=float(pred_c[i]),
                        reduction=reduction(before, m),
                        sqnr_before_db=sqnr_db(signal, before),
                        sqnr_db=sqnr_db(signal, m),
                    )
                )
    return rows


def auto_sweep(
    params: Mapping,
    cfg: SplitConfig,
    *,
    autos: Sequence[Auto],
    methods: Sequence[str] = ("auto",),
    calibration: Mapping | None = None,
) -> SweepResult:
    """Rows of ``Auto`` searches: one per selected layer, ``Auto`` and method.

    Each ``(auto, method)`` is one ``split_with_report`` (so ``scope="tree"`` shares its
    budget over the selected layers) measured by ``quant_error`` under ``auto.spec``
    (and ``auto.twin_spec``). ``threshold`` reads ``"auto"`` (``"auto:tree"`` for a
    tree budget); ``method`` is the one chosen (``"none"`` when a layer stays whole);
    ``threshold_abs`` is the chosen threshold (its mean per channel, ``nan`` if whole).

    Example:
      >>> import numpy as np
      >>> w = np.array([[0.1, -0.2], [0.3, 4.0]], np.float32)
      >>> res = auto_sweep({"d": {"kernel": w}}, SplitConfig(layers="d"),
      ...                  autos=[Auto(QuantSpec(bits=4), candidates=8)])
      >>> r = res.rows[0]
      >>> r.threshold, r.method, r.reduction > 0.5
      ('auto', 'residual', True)
    """
    rows: list[SweepRow] = []
    for a in autos:
        for m in methods:
            c = dataclasses.replace(cfg, threshold=a, method=m, spec=None)
            p2, rep = split_with_report(params, c, calibration=calibration)
            err = quant_error(params, p2, a.spec, twin_spec=a.twin_spec)
            rows += auto_rows(rep.layers, err.layers, a)
    return SweepResult(tuple(rows))


def auto_rows(plans: Sequence, errors: Sequence, auto: Auto) -> list[SweepRow]:
    """``auto_sweep``'s rows from a split's ``LayerPlan``s and ``quant_error``'s rows
    (matched by path; the streamed sweep builds them one layer at a time).

    Example:
      >>> import numpy as np
      >>> from jaxsplit.split import split_with_report
      >>> p = {"d": {"kernel": np.array([[0.1, -0.2], [0.3, 4.0]], np.float32)}}
      >>> a = Auto(QuantSpec(bits=4), candidates=8)
      >>> p2, rep = split_with_report(p, SplitConfig(layers="d", threshold=a))
      >>> [r.layer for r in auto_rows(rep.layers, quant_error(p, p2, a.spec).layers, a)]
      ['d']
    """
    err = {r.path: r for r in errors}
    label = "auto" if auto.scope == "layer" else "auto:tree"
    rows = []
    for plan in plans:
        e, ch = err[plan.path], plan.auto
        if ch is None:
            continue
        t = ch.threshold
        t_abs = float("nan") if t is None else float(sum(t) / len(t) if isinstance(t, tuple) else t)
        rows.append(
            SweepRow(
                layer=plan.path,
                shape=plan.shape,
                threshold=label,
                threshold_abs=t_abs,
                method=ch.method or "none",
                bits=auto.spec.bits,
                granularity=auto.spec.granularity,
                spec=spec_label(auto.spec),
                n_split=int(plan.n_split or 0),
                frac_split=int(plan.n_split or 0) / max(plan.n_total, 1),
                extra_nonzero=e.extra_nonzero,
                extra_fraction=e.extra_fraction,
                mse_before=e.mse_before,
                mse=e.mse_after,
                predicted_mse=e.pred_after,
                predicted_mse_correlated=e.pred_after_corr,
                reduction=e.reduction,
                sqnr_before_db=e.sqnr_before,
                sqnr_db=e.sqnr_after,
            )
        )
    return rows
