"""Per-layer weight statistics (``jaxsplit inspect``): range, spread, tails, outlier ranking.

Per-tensor quantization's step is ``max|W| / qmax``, so its error relative to the
weights' spread grows with ``(max|W| / std)²``: layers with the largest ``max/std``
(heavy tails, high kurtosis) lose most to quantization and gain most from moving their
outliers into a twin branch. ``rank_by_outliers`` sorts layers that way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from jaxsplit.tree import WEIGHT_NAMES, Weights, branch_weights, find_layers

__all__ = ["LayerStats", "weight_stats", "layer_stats", "rank_by_outliers"]


class LayerStats(NamedTuple):
    """Statistics of one layer's weight (one row per branch for a split layer).

    Attributes:
      path: layer path (``…/branch_i`` for a branch of a split layer).
      kind: ``dense``, ``conv``, ``embed`` or ``kernel-Nd``, plus ``branch i/k`` if split.
      shape, dtype: the weight's.
      max_abs, std, max_over_std, kurtosis: over the finite values, computed in float64;
        ``kurtosis`` is the excess kurtosis (0 for a Gaussian). ``None`` where undefined
        (non-float weight, no finite value, zero spread).
      nonfinite: number of NaN/inf values.
    """

    path: str
    kind: str
    shape: tuple[int, ...]
    dtype: str
    max_abs: float | None
    std: float | None
    max_over_std: float | None
    kurtosis: float | None
    nonfinite: int

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-friendly dict (``shape`` as a list)."""
        return {**self._asdict(), "shape": list(self.shape)}


def weight_stats(w) -> tuple[float | None, float | None, float | None, float | None, int]:
    """``(max_abs, std, max_over_std, excess_kurtosis, nonfinite)`` of one array.

    Args:
      w: an array; non-float arrays give ``None`` statistics.

    Returns:
      The statistics of ``w``'s finite values, in float64 (``None`` where undefined).

    Example:
      >>> weight_stats(np.array([1.0, -1.0, 1.0, -1.0, np.nan]))
      (1.0, 1.0, 1.0, -2.0, 1)
    """
    a = np.asarray(w)
    if not np.issubdtype(a.dtype, np.floating) and a.dtype.kind != "V":
        return None, None, None, None, 0
    flat = a.reshape(-1)
    blocks = [flat[i : i + _BLOCK] for i in range(0, flat.size, _BLOCK)]
    # two passes over float64 blocks: memory stays O(block) whatever the kernel's size
    n, total, max_abs = 0, 0.0, 0.0
    for b in blocks:
        x = b.astype(np.float64)
        x = x[np.isfinite(x)]
        if x.size:
            n, total = n + x.size, total + float(np.sum(x))
            max_abs = max(max_abs, float(np.max(np.abs(x))))
    bad = int(flat.size - n)
    if n == 0:
        return None, None, None, None, bad
    mean = total / n
    m2 = m4 = 0.0
    for b in blocks:
        x = b.astype(np.float64)
        d = x[np.isfinite(x)] - mean
        d *= d
        m2, m4 = m2 + float(np.sum(d)), m4 + float(np.sum(d * d))
    var = m2 / n
    if var == 0.0:
        return max_abs, 0.0, None, None, bad
    std = math.sqrt(var)
    kurt = float(m4 / n / var**2 - 3.0)
    return max_abs, std, max_abs / std, kurt, bad


_BLOCK = 1 << 20  # values per float64 block of ``weight_stats`` (8 MiB)


def _kind(path: str, weight: str, ndim: int) -> str:
    if weight.endswith("embedding"):
        return "embed"
    if ndim == 2:
        return "dense"
    if ndim >= 3 and "conv" in path.rsplit("/", 1)[-1].lower():
        return "conv"
    return f"{weight}-{ndim}d"


def layer_stats(tree: Mapping, weights: Weights = WEIGHT_NAMES) -> list[LayerStats]:
    """Statistics of every layer in a tree, in tree order.

    Args:
      tree: any tree ``find_layers`` accepts (linen variables, params dict, ``nnx.State``).
      weights: which leaves are weights (``SplitConfig.weights``: leaf names or a
        predicate ``(leaf_path, array) -> bool``); split layers are found regardless.

    Returns:
      One ``LayerStats`` per layer, or per branch of a split layer.

    Raises:
      ValueError: a split layer's branches are malformed.

    Example:
      >>> p = {"Dense_0": {"kernel": np.array([[4.0, -4.0, 0, 0], [0, 0, 0, 0]])}}
      >>> s = layer_stats({"params": p})[0]
      >>> s.path, s.kind, s.max_abs, s.std, s.max_over_std
      ('Dense_0', 'dense', 4.0, 2.0, 2.0)
    """
    rows = []
    for layer in find_layers(tree, weights).values():
        if layer.branches:
            nodes = [
                (f"{layer.path}/branch_{i}", f" branch {i}/{layer.branches}")
                for i in range(layer.branches)
            ]
        else:
            nodes = [(layer.path, "")]
        for (path, suffix), w in zip(nodes, branch_weights(layer), strict=True):
            w = np.asarray(w)
            kind = _kind(layer.path, layer.weight, w.ndim) + suffix
            rows.append(LayerStats(path, kind, tuple(w.shape), str(w.dtype), *weight_stats(w)))
    return rows


def rank_by_outliers(rows: list[LayerStats]) -> list[LayerStats]:
    """Rows sorted by ``max_over_std``, largest first (those gain most from a split).

    Rows without the statistic (non-float, constant) come last, in tree order.

    Example:
      >>> a = LayerStats("a", "dense", (2,), "float32", 1.0, 1.0, 1.0, -2.0, 0)
      >>> b = a._replace(path="b", max_over_std=9.0)
      >>> [r.path for r in rank_by_outliers([a, b])]
      ['b', 'a']
    """
    return sorted(rows, key=lambda r: (r.max_over_std is None, -(r.max_over_std or 0.0)))
