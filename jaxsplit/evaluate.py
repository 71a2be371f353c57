"""Weight-level error report: what a split buys under simulated quantization, layer by layer.

``quant_error(params, params2, spec)`` pairs every layer of the original tree with the same
path in the split tree (``jaxsplit.tree.find_layers``), quantizes ``W`` and each branch
``W_i`` **separately** (each with its own scale) and measures ``Q(W)`` and ``sum_i Q(W_i)``
against ``W``, beside Widrow's prediction (naive, and corrected for branches that round
identically, see ``jaxsplit.quant``) and the price: the extra non-zero parameters the
branches hold. Every figure is ``jaxsplit.measure``'s, computed in float32 (float64 for
float64 kernels). Renderings (markdown, rich) are in ``jaxsplit.render``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxsplit import quant
from jaxsplit.errors import ConfigTypeError, UnsplittableError
from jaxsplit.measure import TwinCost, measure, reduction, sqnr_db, twin_cost
from jaxsplit.quant import QuantSpec
from jaxsplit.tree import WEIGHT_NAMES, Layer, Weights, branch_weights, find_layers, x64

__all__ = ["LayerError", "Report", "quant_error"]

#: Branches must sum to the original kernel within this fraction of ``max|W|``.
SUM_RTOL = 1e-5


@dataclasses.dataclass(frozen=True)
class LayerError:
    """Quantization error of one layer, before (``Q(W)``) and after (``sum_i Q(W_i)``) the split.

    MSE figures are per element of the kernel. A per-channel ``scale`` is summarised by
    its root mean square over channels (the value that sets the mean error).

    Attributes:
      path, shape, dtype: the kernel's.
      branches: 1 for a layer the split left alone, else ``k``.
      n_total: values in the kernel.
      n_split: values held (non-zero) by two or more branches.
      extra_nonzero: ``sum_i nnz(W_i) - nnz(W)``, the parameters the split adds
        (``extra_fraction``: as a fraction of ``n_total``).
      maxabs: ``max|W|``; ``maxabs_branches``: ``max|W_i|`` per branch.
      scale, scale_branches: quantization steps of ``W`` and of each ``W_i``.
      mse_before, mse_after: measured ``mean((Q(W) - W)²)`` and ``mean((sum_i Q(W_i) - W)²)``.
      pred_before: Widrow for ``Q(W)``; ``pred_after``: naive Widrow sum over branches;
        ``pred_after_corr``: Widrow with identical branches rounding identically.
      signal: ``mean(W²)``.
      effective_bits: storage bits per weight (``measure``: ``branch_0`` at ``spec.bits``,
        the twins' non-zeros at the twin spec's bits plus ``measure.INDEX_BITS``).
      twin_nonzero: non-zeros per twin (``branch_1 …``; empty for an unsplit layer).
      itemsize: bytes per value of the kernel.

    The run-time cost of the twins, dense and sparse (``jaxsplit.measure.twin_cost``), is
    ``cost``; its fields are also properties (``extra_macs_dense`` …).
    """

    path: str
    shape: tuple[int, ...]
    dtype: str
    branches: int
    n_total: int
    n_split: int
    extra_nonzero: int
    maxabs: float
    maxabs_branches: tuple[float, ...]
    scale: float
    scale_branches: tuple[float, ...]
    mse_before: float
    mse_after: float
    pred_before: float
    pred_after: float
    pred_after_corr: float
    signal: float
    effective_bits: float = float("nan")
    twin_nonzero: tuple[int, ...] = ()
    itemsize: int = 4

    @property
    def cost(self) -> TwinCost:
        """Extra multiply-adds (per application) and weight bytes, dense and sparse twins."""
        return twin_cost(self.n_total, self.itemsize, self.twin_nonzero)

    @property
    def extra_macs_dense(self) -> int:
        """Multiply-adds per application the twins add run as dense layers."""
        return self.cost.extra_macs_dense

    @property
    def extra_macs_sparse(self) -> int:
        """Multiply-adds per application the twins add run as sparse products."""
        return self.cost.extra_macs_sparse

    @property
    def extra_bytes_dense(self) -> int:
        """Weight bytes of the twins stored dense."""
        return self.cost.extra_bytes_dense

    @property
    def extra_bytes_sparse(self) -> int:
        """Weight bytes of the twins stored sparse (values + ``measure.index_bytes``)."""
        return self.cost.extra_bytes_sparse

    @property
    def split_fraction(self) -> float:
        """``n_split / n_total``."""
        return self.n_split / self.n_total if self.n_total else 0.0

    @property
    def ratio_before(self) -> float:
        """Measured / predicted MSE of ``Q(W)`` (1 when Widrow holds)."""
        return _ratio(self.mse_before, self.pred_before)

    @property
    def ratio_after(self) -> float:
        """Measured / corrected-predicted MSE of ``sum_i Q(W_i)``."""
        return _ratio(self.mse_after, self.pred_after_corr)

    @property
    def ratio_after_naive(self) -> float:
        """Measured / naive-predicted MSE of ``sum_i Q(W_i)``."""
        return _ratio(self.mse_after, self.pred_after)

    @property
    def sqnr_before(self) -> float:
        """SQNR of ``Q(W)`` in dB."""
        return sqnr_db(self.signal, self.mse_before)

    @property
    def sqnr_after(self) -> float:
        """SQNR of ``sum_i Q(W_i)`` in dB."""
        return sqnr_db(self.signal, self.mse_after)

    @property
    def extra_fraction(self) -> float:
        """``extra_nonzero / n_total``."""
        return self.extra_nonzero / self.n_total if self.n_total else 0.0

    @property
    def reduction(self) -> float:
        """The fraction of the error the split removes (``measure.reduction``)."""
        return reduction(self.mse_before, self.mse_after)

    def to_dict(self) -> dict[str, Any]:
        """Every field and derived figure as plain Python values (tuples become lists)."""
        d = {
            k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()
        }
        for name in _DERIVED:
            d[name] = getattr(self, name)
        return d


_DERIVED = (
    "split_fraction",
    "ratio_before",
    "ratio_after",
    "ratio_after_naive",
    "sqnr_before",
    "sqnr_after",
    "extra_fraction",
    "reduction",
    "extra_macs_dense",
    "extra_macs_sparse",
    "extra_bytes_dense",
    "extra_bytes_sparse",
)


def _ratio(a: float, b: float) -> float:
    if b == 0:
        return 1.0 if a == 0 else math.inf
    return a / b


@dataclasses.dataclass(frozen=True)
class Report:
    """Per-layer ``LayerError`` rows and totals over all layers (element-weighted).

    Attributes:
      spec: the ``QuantSpec`` used.
      layers: one row per layer of the original tree, in tree order.
    """

    spec: QuantSpec
    layers: tuple[LayerError, ...]

    def total(self) -> dict[str, float]:
        """Totals over layers: counts summed, MSE figures weighted by each layer's size.

        Cost: ``macs`` is the multiply-adds of one application of every kernel (their
        sizes summed), ``weight_bytes`` their bytes; ``extra_macs_dense`` /
        ``extra_macs_sparse`` / ``extra_bytes_dense`` / ``extra_bytes_sparse`` what the
        twins add (``jaxsplit.measure.twin_cost``), beside ``extra_nonzero``.

        Example:
          >>> import numpy as np
          >>> w = np.array([[0.1, 2.0]], np.float32)
          >>> r = quant_error({"d": {"kernel": w}}, {"d": {"kernel": w}}, QuantSpec())
          >>> r.total()["n_total"], r.total()["reduction"]
          (2, 0.0)
        """
        n = sum(r.n_total for r in self.layers)

        def mean(name):
            return sum(getattr(r, name) * r.n_total for r in self.layers) / n if n else 0.0

        before, after = mean("mse_before"), mean("mse_after")
        signal = mean("signal")
        return {
            "layers": len(self.layers),
            "layers_split": sum(r.branches > 1 for r in self.layers),
            "n_total": n,
            "n_split": sum(r.n_split for r in self.layers),
            "extra_nonzero": sum(r.extra_nonzero for r in self.layers),
            "extra_fraction": sum(r.extra_nonzero for r in self.layers) / n if n else 0.0,
            "mse_before": before,
            "mse_after": after,
            "pred_before": mean("pred_before"),
            "pred_after": mean("pred_after"),
            "pred_after_corr": mean("pred_after_corr"),
            "sqnr_before": sqnr_db(signal, before),
            "sqnr_after": sqnr_db(signal, after),
            "reduction": reduction(before, after),
            "effective_bits": mean("effective_bits"),
            "macs": n,
            "weight_bytes": sum(r.n_total * r.itemsize for r in self.layers),
            **{name: sum(getattr(r, name) for r in self.layers) for name in TwinCost._fields},
        }

    def to_dict(self) -> dict[str, Any]:
        """``{'spec': ..., 'layers': [...], 'total': {...}}`` of plain Python values."""
        return {
            "spec": self.spec.to_dict(),
            "layers": [r.to_dict() for r in self.layers],
            "total": self.total(),
        }


@functools.partial(jax.jit, static_argnames=("spec", "twin_spec"))
def _layer_stats(w, branches, spec: QuantSpec, twin_spec=None) -> dict[str, jax.Array]:
    """All array statistics of one layer in one compiled call."""
    ft = jnp.promote_types(w.dtype, jnp.float32)
    wf = w.astype(ft)
    bf = [b.astype(ft) for b in branches]
    before = measure(wf, (wf,), spec)
    after = measure(wf, bf, spec, twin_spec=twin_spec)
    nz = jnp.stack([b != 0 for b in bf])
    return {
        "n_split": jnp.sum(jnp.sum(nz, axis=0) >= 2),
        "extra_nonzero": after.extra_nonzero,
        "maxabs": jnp.max(jnp.abs(wf)),
        "maxabs_branches": jnp.stack([jnp.max(jnp.abs(b)) for b in bf]),
        "scale": _rms(quant.scale(wf, spec)),
        "scale_branches": jnp.stack([_rms(quant.scale(b, spec)) for b in bf]),
        "mse_before": before.mse,
        "mse_after": after.mse,
        "pred_before": before.mse_widrow,
        "pred_after": after.mse_widrow,
        "pred_after_corr": after.mse_widrow_correlated,
        "signal": jnp.mean(jnp.square(wf)),
        "sum_error": jnp.max(jnp.abs(sum(bf) - wf)),
        "effective_bits": after.effective_bits,
        "twin_nonzero": jnp.stack([jnp.count_nonzero(b) for b in bf[1:]] or [jnp.int32(0)]),
    }


def _rms(s: jax.Array) -> jax.Array:
    """A per-tensor scale as is; per-channel scales by their root mean square."""
    return s if s.ndim == 0 else jnp.sqrt(jnp.mean(jnp.square(s)))


def _pair_layers(params: Mapping, params2: Mapping, weights) -> list[tuple[Layer, Layer]]:
    """Layers of both trees paired by path, with every mismatch reported at once."""
    a, b = find_layers(params, weights), find_layers(params2, weights)
    split_in_a = [p for p, lay in a.items() if lay.branches]
    if split_in_a:
        raise ValueError(
            f"params must be the original (unsplit) tree, but layer(s) {split_in_a} hold "
            f"branches; pass merge_params(params) or the tree you split"
        )
    if set(a) != set(b):
        raise ValueError(
            f"params and params2 hold different layers: only in params: "
            f"{sorted(set(a) - set(b))}, only in params2: {sorted(set(b) - set(a))}"
        )
    pairs = [(a[p], b[p]) for p in a]
    for la, lb in pairs:
        wa = la.array
        if not jnp.issubdtype(wa.dtype, jnp.floating):
            raise UnsplittableError(
                la.path,
                f"layer {la.path!r}: {la.weight} has dtype {wa.dtype}; only floating "
                f"kernels can be quantized",
            )
        shapes = [tuple(x.shape) for x in branch_weights(lb)]
        if any(s != tuple(wa.shape) for s in shapes):
            raise ValueError(
                f"layer {la.path!r}: params has shape {tuple(wa.shape)} but params2 holds {shapes}"
            )
    return pairs


def quant_error(
    params: Mapping,
    params2: Mapping,
    spec: QuantSpec,
    *,
    weights: Weights = WEIGHT_NAMES,
    twin_spec: QuantSpec | None = None,
) -> Report:
    """Measured and predicted quantization error of every layer, before and after a split.

    Args:
      params: the original tree (linen variables, params dict, ``FrozenDict``, ``nnx.State``
        or its pure dict); its layers must not be split.
      params2: the same tree after ``split_params`` (split layers hold ``branch_i``
        children); a layer left alone is compared with itself.
      spec: the ``QuantSpec`` applied to ``W`` and to each branch separately.
      weights: which leaves are weights (``SplitConfig.weights``: leaf names or a
        predicate ``(leaf_path, array) -> bool``); split layers are found regardless.
      twin_spec: the ``QuantSpec`` of every branch but ``branch_0`` (a mixed-precision
        twin, ``Auto(twin_spec=...)``); default ``spec``.

    Returns:
      A ``Report`` with one ``LayerError`` per layer of ``params``, in tree order.

    Raises:
      TypeError: ``spec`` is not a ``QuantSpec``, or a kernel is not floating point.
      ValueError: the trees hold different layer paths or shapes, ``params`` is already
        split, or a layer's branches do not sum to its kernel (not the same weights).

    Example:
      >>> import numpy as np
      >>> from jaxsplit import SplitConfig, split_params
      >>> p = {"Dense_0": {"kernel": np.array([[0.25, -1.0], [4.0, 0.5]], np.float32)}}
      >>> p2 = split_params(p, SplitConfig(layers=["Dense_0"], threshold=2.0))
      >>> row = quant_error(p, p2, QuantSpec(bits=3)).layers[0]
      >>> row.branches, row.n_split, row.extra_nonzero, [round(s, 4) for s in row.scale_branches]
      (2, 1, 1, [0.6667, 0.6667])
      >>> round(row.reduction, 3)
      0.525
    """
    if not isinstance(spec, QuantSpec):
        raise ConfigTypeError(
            "quant_error",
            "spec",
            f"spec must be a jaxsplit.QuantSpec, got {spec!r} ({type(spec).__name__})",
        )
    pairs = _pair_layers(params, params2, weights)
    pending = []
    for la, lb in pairs:
        w = la.array
        with x64(w.dtype):
            pending.append((la, w, _layer_stats(w, tuple(branch_weights(lb)), spec, twin_spec)))
    rows = []
    for la, w, stats in pending:
        s = jax.device_get(stats)
        if float(s["sum_error"]) > SUM_RTOL * float(s["maxabs"]):
            raise ValueError(
                f"layer {la.path!r}: params2's branches do not sum to params' kernel (max "
                f"difference {float(s['sum_error']):.3g}, max|W| {float(s['maxabs']):.3g}); "
                f"params2 must be a split of params"
            )
        rows.append(_row(la, w, s))
    return Report(spec, tuple(rows))


def _row(layer: Layer, w, s: dict) -> LayerError:
    k = len(s["maxabs_branches"])
    return LayerError(
        path=layer.path,
        shape=tuple(int(d) for d in w.shape),
        dtype=str(w.dtype),
        branches=k,
        n_total=int(w.size),
        n_split=int(s["n_split"]) if k > 1 else 0,
        extra_nonzero=int(s["extra_nonzero"]),
        maxabs=float(s["maxabs"]),
        maxabs_branches=tuple(float(x) for x in s["maxabs_branches"]),
        scale=float(s["scale"]),
        scale_branches=tuple(float(x) for x in s["scale_branches"]),
        twin_nonzero=tuple(int(x) for x in s["twin_nonzero"]) if k > 1 else (),
        itemsize=int(w.dtype.itemsize),
        **{
            name: float(s[name])
            for name in (
                "mse_before",
                "mse_after",
                "pred_before",
                "pred_after",
                "pred_after_corr",
                "signal",
                "effective_bits",
            )
        },
    )
