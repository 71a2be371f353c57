"""Elementwise splits of one kernel read in flat blocks: memory bounded by the block.

``balance`` and ``clip`` at a per-tensor threshold split every value on its own: value
``i`` of the branches depends on value ``i`` of the kernel and on the threshold alone. So a
kernel can be read, split and written one flat block (C order) at a time, and the blocks
put side by side are the whole kernel's branches bit for bit. ``threshold`` resolves the
rule first (for ``Relative``, a pass of block maxima: a max is exact in any order, and the
one multiply is the compiled program's), and ``split_blocks`` splits block by block with
the routes ``split_params`` takes (``host.split`` where it applies, else the compiled
``programs.fused`` at the absolute threshold), which give the same bits.

``table_blocks`` does the same for a 16-bit kernel split from its value table
(``jaxsplit.table``): any method the table admits, gathered block by block.

``stream.split_checkpoint`` uses both for kernels bigger than its ``block_bytes``, so a
checkpoint's peak memory no longer grows with its largest tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import jax.numpy as jnp
import numpy as np

from jaxsplit import host, programs, table
from jaxsplit.tree import x64

__all__ = ["METHODS", "KINDS", "blocks", "supports", "threshold", "split_blocks", "table_blocks"]

#: Methods whose branches are elementwise in the kernel (``random`` folds the layer's
#: path into a key over the whole kernel; ``grid``, ``residual``, ``snap``, ``auto`` take
#: statistics or searches over it).
METHODS = ("balance", "clip")
#: Threshold rules resolvable from block maxima.
KINDS = ("absolute", "relative")

#: ``read(start, stop)``: elements ``[start, stop)`` of the flat kernel, a 1-D numpy array.
Reader = Callable[[int, int], np.ndarray]


def supports(kind: str, per_channel: bool, method: str, branches: int) -> bool:
    """Whether a kernel split with this rule and method can be split in blocks.

    Example:
      >>> supports("relative", False, "clip", 2), supports("sigma", False, "clip", 2)
      (True, False)
    """
    return kind in KINDS and not per_channel and method in METHODS and branches == 2


def blocks(size: int, block: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of each block of ``block`` elements (the last one shorter).

    Example:
      >>> list(blocks(10, 4))
      [(0, 4), (4, 8), (8, 10)]
    """
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive number of elements, got {block!r}")
    for start in range(0, size, block):
        yield start, min(start + block, size)


def threshold(read: Reader, size: int, block: int, kind: str, value: float) -> float:
    """The absolute float32 threshold of the rule, as ``programs.threshold`` resolves it
    for the whole kernel (``relative``: ``value`` times the largest finite ``|w|``, taken
    block by block; ``absolute``: ``value`` itself, nothing read).

    Example:
      >>> w = np.array([0.5, -4.0, np.nan, 2.0], np.float32)
      >>> threshold(lambda a, b: w[a:b], w.size, 3, "relative", 0.5)
      2.0
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS} to resolve from blocks, got {kind!r}")
    if kind == "absolute":
        return float(np.float32(value))
    top = np.float32(0.0)
    for start, stop in blocks(size, block):
        a = np.abs(read(start, stop).astype(np.float32))
        top = max(top, np.max(a, where=np.isfinite(a), initial=np.float32(0.0)))
    return float(programs.threshold(jnp.asarray([top]), value, kind="relative"))


def split_blocks(
    read: Reader, size: int, block: int, thr: float, method: str
) -> Iterator[tuple[int, np.ndarray, np.ndarray, int, int]]:
    """Yields ``(start, branch_0, branch_1, n_split, n_nonfinite)`` per block: 1-D numpy
    branches of elements ``[start, start + len)``, bit-identical to that range of the
    whole kernel's split at the absolute threshold ``thr`` (``programs.fused`` counts).

    Example:
      >>> w = np.array([0.5, -4.0, 3.0], np.float32)
      >>> [(s, a.tolist(), b.tolist(), n) for s, a, b, n, _ in
      ...  split_blocks(lambda a, b: w[a:b], 3, 2, 1.0, "balance")]
      [(0, [0.5, -2.0], [0.0, -2.0], 1), (2, [1.5], [1.5], 1)]
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS} to split in blocks, got {method!r}")
    rule = {"kind": "absolute", "axis": None, "method": method, "branches": 2}
    for start, stop in blocks(size, block):
        w = read(start, stop)
        if host.supports(w, thr, **rule):
            [((w1, w2), counts, _)] = host.split([w], [thr], method)
        else:
            with x64(w.dtype):
                (w1, w2), counts, _ = programs.fused(
                    jnp.asarray(w), thr, None, kind="absolute", method=method
                )
        n_split, n_bad = (int(x) for x in np.asarray(counts))
        yield start, np.asarray(w1), np.asarray(w2), n_split, n_bad


def table_blocks(
    read: Reader, size: int, block: int, dtype, thr, *, method: str, spec=None, twin_spec=None
) -> Iterator[tuple[int, np.ndarray, np.ndarray, int, int]]:
    """As ``split_blocks``, for a 16-bit kernel split from its value table (any method
    ``table.applies`` admits, at the threshold ``thr``): the table is counted in a first
    pass over the blocks, split once (``table.split_table``, the program the whole
    kernel's split gathers from), and each block gathered from it by bit pattern.

    Example:
      >>> w = np.array([0.5, -4.0, 3.0, 0.5], np.float16)
      >>> [(s, a.tolist(), b.tolist(), n) for s, a, b, n, _ in
      ...  table_blocks(lambda a, b: w[a:b], 4, 3, w.dtype, 1.0, method="balance")]
      [(0, [0.5, -2.0, 1.5], [0.0, -2.0, 1.5], 2), (3, [0.5], [0.0], 0)]
    """
    counts = np.zeros(1 << 16, np.int64)
    for start, stop in blocks(size, block):
        counts += table.pattern_counts(read(start, stop))
    tab = table.from_counts(counts, dtype, size)  # padded as the whole kernel's table
    with x64(tab.values.dtype):
        b0, b1 = (
            np.asarray(b)
            for b in table.split_table(
                tab.values,
                tab.values,
                tab.index,
                thr,
                None,
                method=method,
                branches=2,
                spec=spec,
                twin_spec=twin_spec,
            )  # fmt: skip
        )
    for start, stop in blocks(size, block):
        at = tab.index[read(start, stop).view(np.uint16)]
        w1, w2 = b0[at], b1[at]
        m = w2.astype(np.float32) != 0
        n_bad = int(np.count_nonzero(~m & ~np.isfinite(w1.astype(np.float32))))
        yield start, w1, w2, int(np.count_nonzero(m)), n_bad
