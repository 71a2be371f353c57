"""Value tables of 16-bit kernels: every ``Auto`` candidate measured exactly, at a sample's cost.

A bfloat16 or float16 kernel holds at most 65 536 distinct values (a Llama-shaped
2048×8192 bf16 kernel: ~10 000 of its 16.8M). Under a per-tensor ``QuantSpec`` every
split method but ``random`` (whose shares hash each value's position) and
``compensate`` under a matrix calibration (which couples the values of a column) splits
each value by a function of that value and of per-tensor figures (the threshold, the
max-abs or min/max of the kernel or of one of its branches, the scales). Those figures
are maxima and minima over the values present, so the split of the **table** of
distinct values gives every value the branches that the split of the whole kernel gives
it, and sums weighted by each value's count give ``measure``'s figures
(``measure.measure_counted``). ``Auto(scope="tree")`` curves of such kernels measure
every candidate this way (``search.table_curve``: exhaustive and exact, where the screen
only predicts most of them), and the chosen split is written by gathering the table's
branches (``split_table``).

* ``applies``: when the table gives the kernel's split (static: dtype, size, spec,
  methods; no calibration).
* ``value_table``: the table on the host (numpy, in row blocks: no temporary as large
  as the kernel): the distinct values, their counts, and each bit pattern's entry.
* ``split_table``: the branches of the whole kernel from the table's (one gather each).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxsplit import kernels, quant

__all__ = [
    "MIN_SIZE",
    "MIN_ENTRIES",
    "ValueTable",
    "applies",
    "value_table",
    "pattern_counts",
    "from_counts",
    "split_table",
    "split_table_donated",
]

#: Smallest kernel measured from its table (smaller ones are measured whole: cheap).
MIN_SIZE = 2**18
#: Fewest entries of a table (padded to a power of two at least this, so that a few
#: table sizes, i.e. compiled programs, serve every kernel shape).
MIN_ENTRIES = 1024
_BLOCK = 1 << 20  # values counted per ``np.bincount`` (an int64 temporary of 8 MiB)


class ValueTable(NamedTuple):
    """A 16-bit kernel as its distinct values (host arrays).

    Attributes:
      values: ``(n,)`` the distinct values in the kernel's dtype, ascending bit pattern,
        padded to ``n`` (a power of two, at least ``MIN_ENTRIES``) with copies of the
        first value (count 0: the maxima over the table stay the kernel's).
      counts: ``(n,)`` int32, how many kernel values each entry stands for.
      index: ``(65536,)`` int32, the entry of each bit pattern (0 for absent patterns).
      size: the kernel's size.
    """

    values: np.ndarray
    counts: np.ndarray
    index: np.ndarray
    size: int


def applies(
    dtype,
    shape: tuple[int, ...],
    spec: quant.QuantSpec,
    methods: tuple[str, ...],
    *,
    twin_spec: quant.QuantSpec | None = None,
    calibrated: bool = False,
) -> bool:
    """Whether the value table gives the split and the measurement of every candidate.

    16-bit floating kernels of at least ``MIN_SIZE`` values, per-tensor ``spec`` (and
    ``twin_spec``), no ``random``, no calibration (the output error weighs each value by
    its input row).

    Example:
      >>> import jax.numpy as jnp
      >>> q = quant.QuantSpec(bits=4)
      >>> applies(jnp.bfloat16, (2048, 512), q, ("clip", "compensate"))
      True
      >>> applies(jnp.float32, (2048, 512), q, ("clip",))
      False
      >>> applies(jnp.bfloat16, (8, 8), q, ("clip",))
      False
    """
    dt = np.dtype(dtype)
    per_tensor = all(s is None or s.granularity == "per_tensor" for s in (spec, twin_spec))
    return (
        jnp.issubdtype(dt, jnp.floating)
        and dt.itemsize == 2
        and math.prod(shape) >= MIN_SIZE
        and per_tensor
        and "random" not in methods
        and not calibrated
    )


def value_table(w, min_entries: int = MIN_ENTRIES) -> ValueTable:
    """The table of a 16-bit kernel: its distinct values, their counts, each pattern's entry.

    Counted in blocks of ``2**20`` values on the host (the kernel is read once; nothing
    as large as it is allocated).

    Args:
      w: a 16-bit floating array (numpy or jax).
      min_entries: the table's smallest padded size.

    Returns:
      A ``ValueTable``.

    Raises:
      TypeError: ``w`` is not a 16-bit floating array.

    Example:
      >>> import numpy as np
      >>> t = value_table(np.array([0.5, -1.0, 0.5, 0.5], np.float16), min_entries=4)
      >>> t.values.tolist(), t.counts.tolist(), t.size
      ([0.5, -1.0, 0.5, 0.5], [3, 1, 0, 0], 4)
      >>> bool((t.values[t.index[np.array([0.5, -1.0], np.float16).view(np.uint16)]]
      ...       == np.array([0.5, -1.0], np.float16)).all())
      True
    """
    a = np.asarray(w)
    if not (np.issubdtype(a.dtype, np.floating) or a.dtype.name == "bfloat16") or (
        a.dtype.itemsize != 2
    ):
        raise TypeError(f"w must be a 16-bit floating array, got dtype {a.dtype}")
    return from_counts(pattern_counts(a), a.dtype, int(a.size), min_entries)


def pattern_counts(a) -> np.ndarray:
    """``(65536,)`` int64: how often each bit pattern occurs in the 16-bit array ``a``
    (counted in blocks of ``2**20``; the counts of a kernel's blocks add up to its own).

    Example:
      >>> int(pattern_counts(np.array([1.0, 1.0], np.float16))[15360])
      2
    """
    bits = np.asarray(a).reshape(-1).view(np.uint16)
    counts = np.zeros(1 << 16, np.int64)
    for i in range(0, bits.size, _BLOCK):
        counts += np.bincount(bits[i : i + _BLOCK], minlength=1 << 16)
    return counts


def from_counts(counts: np.ndarray, dtype, size: int, min_entries: int = MIN_ENTRIES) -> ValueTable:
    """The ``ValueTable`` of a kernel of ``size`` values of ``dtype`` whose bit patterns
    occur ``counts`` times (``pattern_counts``, summed over its blocks if read in blocks).

    Example:
      >>> t = from_counts(pattern_counts(np.array([2.0, 2.0, 3.0], np.float16)), np.float16, 3, 4)
      >>> t.values.tolist(), t.counts.tolist()
      ([2.0, 3.0, 2.0, 2.0], [2, 1, 0, 0])
    """
    present = np.flatnonzero(counts)
    n = max(min_entries, 1 << max(int(present.size) - 1, 0).bit_length())
    patterns = np.full(n, present[0] if present.size else 0, np.uint16)
    patterns[: present.size] = present
    cnt = np.zeros(n, np.int32)
    cnt[: present.size] = counts[present]
    index = np.zeros(1 << 16, np.int32)
    index[present] = np.arange(present.size, dtype=np.int32)
    return ValueTable(patterns.view(np.dtype(dtype)), cnt, index, int(size))


def _split_table(
    w, values, index, threshold, key, *, method, branches=2, spec=None, twin_spec=None
):
    bs = kernels.split(
        method, values, threshold, key, branches=branches, spec=spec, twin_spec=twin_spec
    )
    at = index[jax.lax.bitcast_convert_type(w, jnp.uint16).astype(jnp.int32)]
    return tuple(b[at] for b in bs)


#: ``split_table(w, values, index, threshold, key, method=..., branches=2, spec=None,
#: twin_spec=None)``: the branches of the kernel ``w`` (``value_table(w)``'s ``values``
#: and ``index``) as ``kernels.split`` of ``w`` gives them: the table's branches,
#: gathered by each value's bit pattern (``applies`` must hold).
split_table = jax.jit(_split_table, static_argnames=("method", "branches", "spec", "twin_spec"))
#: ``split_table`` with ``w`` donated: ``branch_0`` may take over the kernel's buffer.
split_table_donated = jax.jit(
    _split_table, static_argnames=("method", "branches", "spec", "twin_spec"), donate_argnums=(0,)
)
