"""Compiled sweeps: thresholds × methods × ``QuantSpec`` grids over selected layers.

``sweep(params, layers=..., thresholds=..., methods=..., specs=...)`` answers "which
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
rounding, see ``jaxsplit.quant``), the reduction against not splitting and the SQNR.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxsplit import kernels, quant
from jaxsplit.config import Auto, SplitConfig, ThresholdSpec, resolve_parts, threshold_parts
from jaxsplit.evaluate import sqnr_db
from jaxsplit.quant import QuantSpec
from jaxsplit.transform import _check_layer, _resolve_selection, _x64

__all__ = ["SweepRow", "SweepResult", "sweep", "threshold_label", "spec_label"]

logger = logging.getLogger("jaxsplit")


class SweepRow(NamedTuple):
    """One layer at one grid point (all plain Python values).

    Attributes:
      layer: layer path.
      shape: kernel shape.
      threshold: the threshold as given (``"0.5"``, ``"rel:0.5"``, ``"sigma:3"``, ``"pct:99"``).
      threshold_abs: the absolute threshold it resolved to for this kernel (the mean of
        the per-channel thresholds for a ``per_channel`` spec).
      method: split method.
      bits, granularity: the ``QuantSpec``'s (``spec`` holds its full label).
      spec: ``spec_label(spec)``.
      n_split: values with ``|w| > threshold_abs`` (``residual`` leaves those already on
        the grid whole, so ``quant_error`` may count fewer); ``frac_split = n_split / size``.
      extra_nonzero: non-zero values the split adds (non-zeros summed over the branches
        minus those of ``W``, as in ``quant_error``), as a fraction of the kernel's size:
        the parameter cost of the split.
      mse_before: measured MSE of ``Q(W)`` (no split).
      mse: measured MSE of ``sum_i Q(W_i)`` against ``W``.
      predicted_mse: Widrow's naive prediction (independent rounding per branch).
      predicted_mse_correlated: Widrow with identical branches rounding alike.
      reduction: ``1 - mse / mse_before`` (``nan`` if ``mse_before`` is 0).
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
    extra_nonzero: float
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


_MD_COLUMNS = (
    ("layer", "layer", "{}"),
    ("threshold", "threshold", "{}"),
    ("method", "method", "{}"),
    ("spec", "spec", "{}"),
    ("frac_split", "split %", "{:.2%}"),
    ("extra_nonzero", "extra nz %", "{:.2%}"),
    ("mse_before", "MSE before", "{:.3e}"),
    ("mse", "MSE", "{:.3e}"),
    ("predicted_mse", "Widrow", "{:.3e}"),
    ("predicted_mse_correlated", "Widrow corr.", "{:.3e}"),
    ("reduction", "reduction", "{:.1%}"),
    ("sqnr_db", "SQNR dB", "{:.2f}"),
)


@dataclasses.dataclass(frozen=True)
class SweepResult:
    """The tidy result of ``sweep``: one ``SweepRow`` per layer × grid point.

    Example:
      >>> import numpy as np
      >>> w = np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8) ** 3
      >>> res = sweep({"d": {"kernel": w}}, layers=["d"], thresholds=[0.25, 0.5])
      >>> [r["threshold"] for r in res.to_rows()]
      ['0.25', '0.5']
      >>> res.to_csv().splitlines()[0].split(",")[:4]
      ['layer', 'shape', 'threshold', 'threshold_abs']
    """

    rows: tuple[SweepRow, ...]

    def to_rows(self) -> list[dict[str, Any]]:
        """Rows as plain dicts (JSON-ready)."""
        return [r.to_dict() for r in self.rows]

    def to_dict(self) -> dict[str, Any]:
        """``{"rows": to_rows()}``."""
        return {"rows": self.to_rows()}

    def to_csv(self, path: str | None = None) -> str:
        """CSV text with a header (``shape`` as ``4x4``); also written to ``path`` if given."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(SweepRow._fields)
        for r in self.rows:
            writer.writerow(
                "x".join(map(str, v)) if k == "shape" else (repr(v) if isinstance(v, float) else v)
                for k, v in zip(SweepRow._fields, r, strict=True)
            )
        text = buf.getvalue()
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        return text

    def to_markdown(self) -> str:
        """A GitHub markdown table of the main columns."""
        head = "| " + " | ".join(title for _, title, _ in _MD_COLUMNS) + " |"
        rule = "|" + "|".join("---" if f == "{}" else "---:" for _, _, f in _MD_COLUMNS) + "|"
        lines = [head, rule]
        for r in self.rows:
            cells = [_fmt(getattr(r, name), f) for name, _, f in _MD_COLUMNS]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def _fmt(value, fmt: str) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "-"
    return fmt.format(value)


def threshold_label(spec: ThresholdSpec) -> str:
    """A short text form of a threshold spec (the CLI's syntax; ``/ch`` when per channel).

    Example:
      >>> from jaxsplit import Relative
      >>> threshold_label(0.5), threshold_label(Relative(0.25, per_channel=True))
      ('0.5', 'rel:0.25/ch')
    """
    kind, value = threshold_parts(spec)
    base, _, per = kind.partition("/")
    prefix = {"absolute": "", "relative": "rel:", "sigma": "sigma:", "percentile": "pct:"}[base]
    return f"{prefix}{value:g}{'/ch' if per else ''}"


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


def _resolve_all(w, values, kinds: tuple[str, ...]):
    """Absolute thresholds of every candidate, one statistic pass per distinct kind.

    Shape ``(N,)``, or ``(N, 1, ..., 1, C)`` when a kind is per channel (``"/channel"``:
    one threshold per index of the kernel's last axis; scalar kinds are broadcast).
    """
    per_channel = any(k.endswith("/channel") for k in kinds) and w.ndim > 0
    bshape = (*(1,) * (w.ndim - 1), w.shape[-1]) if per_channel else ()
    out = jnp.zeros((len(kinds), *bshape), jnp.float32)
    for kind in dict.fromkeys(kinds):
        idx = [i for i, k in enumerate(kinds) if k == kind]
        vals = values[jnp.array(idx)]
        if kind.endswith("/channel"):
            thr = jnp.stack([resolve_parts(kind, v, w) for v in vals])
        else:
            thr = resolve_parts(kind, vals, w).reshape(len(idx), *(1,) * len(bshape))
        out = out.at[jnp.array(idx)].set(jnp.broadcast_to(thr, (len(idx), *bshape)))
    return out


def _measure(branches, w, spec: QuantSpec):
    """``(mse, predicted, predicted_correlated, extra_nonzero)`` of one split."""
    m = quant.branches_mse(branches, w, spec)
    nonzero = sum(jnp.sum(b != 0, dtype=jnp.int32) for b in branches)
    return m.measured, m.predicted, m.predicted_correlated, nonzero - jnp.sum(w != 0)


@functools.partial(jax.jit, static_argnames=("kinds", "methods", "specs"))
def _sweep_kernel(w, values, key, *, kinds, methods, specs):
    """The whole grid of one kernel in one compiled program (cached per shape/dtype)."""
    thr = _resolve_all(w, values, kinds)
    n_split = jax.lax.map(lambda t: jnp.sum(kernels.split_mask(w, t), dtype=jnp.int32), thr)
    thr_mean = jnp.mean(thr.reshape(thr.shape[0], -1), axis=1)
    base = [quant.branches_mse((w,), w, spec).measured for spec in specs]
    grid = []  # [method] -> per spec (mse, predicted, predicted_correlated, extra) over thr
    for method in methods:

        def one(t, method=method):
            if method in kernels.QUANT_METHODS:  # shares depend on the spec's grid
                return [_measure(kernels.split(method, w, t, key, spec=s), w, s) for s in specs]
            branches = kernels.split(method, w, t, key)
            return [_measure(branches, w, spec) for spec in specs]

        grid.append(jax.lax.map(one, thr))
    signal = jnp.mean(jnp.square(w.astype(jnp.float32)))
    return thr_mean, n_split, base, grid, signal


def _check_grid(thresholds, methods, specs, layers, seed) -> list[tuple[str, float]]:
    """Validates the grid through ``SplitConfig``/``QuantSpec``; returns threshold parts."""
    for name, seq in (("thresholds", thresholds), ("methods", methods), ("specs", specs)):
        if isinstance(seq, str) or not isinstance(seq, Sequence) or len(seq) == 0:
            raise ValueError(f"sweep {name} must be a non-empty sequence, got {seq!r}")
    for s in specs:
        if not isinstance(s, QuantSpec):
            raise TypeError(f"sweep specs must hold jaxsplit.QuantSpec, got {s!r}")
    for t in thresholds:
        if isinstance(t, Auto):
            raise TypeError(
                f"sweep thresholds must be resolvable (float, Relative, Sigma, Percentile), "
                f"got {t!r}; Auto searches thresholds itself (jaxsplit.auto)"
            )
        for m in methods:
            for s in specs if m in kernels.QUANT_METHODS else (None,):
                SplitConfig(layers=layers, threshold=t, method=m, quant=s, seed=seed)
    if len(set(methods)) != len(methods) or len(set(specs)) != len(specs):
        raise ValueError(f"sweep methods/specs must not repeat, got {methods!r} / {specs!r}")
    return [threshold_parts(t) for t in thresholds]


def sweep(
    params: Mapping,
    *,
    layers: Sequence[str] | Callable | str = ("**",),
    thresholds: Sequence[ThresholdSpec],
    methods: Sequence[str] = ("balance",),
    specs: Sequence[QuantSpec] = (QuantSpec(bits=8),),
    seed: int = 0,
    strict: bool = True,
    on_layer: Callable[[str], Any] | None = None,
) -> SweepResult:
    """Evaluates a grid of thresholds × methods × quantization specs on the selected layers.

    Args:
      params: any tree ``split_params`` accepts (unsplit layers only).
      layers: layer patterns as in ``SplitConfig.layers`` (default: every layer).
      thresholds: threshold specs (absolute floats, ``Relative``, ``Sigma``,
        ``Percentile``, also ``per_channel=True``), mixed freely.
      methods: split methods (``kernels.METHODS``); quantization-aware ones (``grid``,
        ``residual``) split once per spec, on that spec's grid.
      specs: ``QuantSpec``s; each branch is quantized with its own scale.
      seed: seed of ``"random"`` (folded with each layer's path, as in ``split_params``).
      strict: a pattern that matches no layer raises (else it is logged).
      on_layer: called with each layer's path once its grid is done (progress bars).

    Returns:
      A ``SweepResult``: rows ordered by layer (tree order), then method, spec, threshold.

    Raises:
      ValueError: an empty grid, repeated methods/specs, an invalid threshold or method
        (the message names it), an unmatched pattern (``strict``), a kernel holding
        NaN/inf or already split.
      TypeError: a spec is not a ``QuantSpec``, or a selected kernel is not floating.

    Example:
      >>> import numpy as np
      >>> from jaxsplit import Relative
      >>> w = np.array([[0.1, -0.2], [0.3, 4.0]], np.float32)
      >>> res = sweep({"d": {"kernel": w}}, layers="d", thresholds=[Relative(0.5)],
      ...             specs=[QuantSpec(bits=4)])
      >>> r = res.rows[0]
      >>> r.threshold, r.threshold_abs, r.n_split, r.extra_nonzero
      ('rel:0.5', 2.0, 1, 0.25)
    """
    layers = (layers,) if isinstance(layers, str) else layers
    parts = _check_grid(thresholds, methods, specs, layers, seed)
    cfg = SplitConfig(layers=layers, strict=strict)
    selected, _, _ = _resolve_selection(params, cfg)
    kinds = tuple(k for k, _ in parts)
    values = jnp.asarray([v for _, v in parts], jnp.float32)
    labels = [threshold_label(t) for t in thresholds]
    rows: list[SweepRow] = []
    for layer in selected:
        reason = _check_layer(layer)
        if reason is not None:
            logger.warning("sweep: %s skipped (%s)", layer.path, reason)
            continue
        w = layer.array
        if not bool(jnp.all(jnp.isfinite(w))):
            raise ValueError(
                f"layer {layer.path!r}: kernel holds NaN/inf; sweep needs finite weights"
            )
        key = kernels.stochastic_key(seed, layer.path)
        with _x64(w.dtype):
            out = _sweep_kernel(
                w, values, key, kinds=kinds, methods=tuple(methods), specs=tuple(specs)
            )
        rows.extend(_rows(layer.path, w, labels, tuple(methods), tuple(specs), out))
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
                        extra_nonzero=int(extra[i]) / size,
                        mse_before=before,
                        mse=m,
                        predicted_mse=float(pred[i]),
                        predicted_mse_correlated=float(pred_c[i]),
                        reduction=1.0 - m / before if before > 0 else math.nan,
                        sqnr_before_db=sqnr_db(signal, before),
                        sqnr_db=sqnr_db(signal, m),
                    )
                )
    return rows


def cli_commands():
    """``jaxsplit sweep`` for ``jaxsplit.cli``'s registration hook (defined in ``cli_sweep``)."""
    from jaxsplit.cli_sweep import sweep_command

    return [sweep_command()]
