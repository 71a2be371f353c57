"""THE error and cost of a split candidate, and the host-side figures derived from them.

Every figure jaxsplit reports is defined here, once:

* ``mse``: measured mean-squared error per element of ``sum_i Q(W_i)`` against ``W``,
  each branch quantized with its own scale (``quant.branches_mse``; ``(W,)`` as the only
  branch measures plain ``Q(W)``, i.e. *not splitting*).
* ``mse_widrow``: Widrow's prediction, each branch's non-zeros rounding independently
  with error ``scale_i² / 12``.
* ``mse_widrow_correlated``: the same, with branches that hold the same value under the
  same scale rounding alike (PPQ's ``balance`` halves: the reason it cannot remove more
  than 75% of the error).
* ``extra_nonzero``: non-zero values summed over the branches minus those of ``W``:
  the parameter cost of the split, as a count; ``extra_fraction`` is that count divided
  by ``W``'s size.
* ``twin_cost``: what the twins (``branch_1 …``) add at run time, in both forms: as
  *dense* layers (each a whole second layer: ``size`` multiply-adds per application of
  the kernel and ``size · itemsize`` bytes) and as *sparse* products (one multiply-add
  per stored value and ``nnz · (itemsize + index_bytes(size))`` bytes). An
  *application* is one input row of a ``Dense`` (a token) or one output position of a
  ``Conv``: the multiply-adds of one application of the original kernel are its size.
* ``index_bytes(size)``: THE index cost of one stored value of a sparse twin: its flat
  C-order position, int32 (int64 for ``size >= 2**31``), as ``jaxsplit.sparse_io``
  stores it on disk. (``jax.experimental.sparse.BCOO`` holds one int32 per axis in
  memory; the figure counts the compact form.)
* ``reduction(before, after)``: the fraction of the error removed, ``1 - after/before``.
* ``sqnr_db(signal, noise)``: ``10 log10(signal / noise)``.

``Auto`` (``jaxsplit.search``), ``sweep``, ``quant_error``, the demo and the experiments
all call ``measure``; nothing else computes these figures.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxsplit import quant

__all__ = [
    "Measurement",
    "measure",
    "extra_nonzero",
    "TwinCost",
    "twin_cost",
    "index_bytes",
    "reduction",
    "sqnr_db",
]


class Measurement(NamedTuple):
    """Error and cost of one split candidate (arrays; scalars per element where MSE).

    Attributes:
      mse: measured MSE of ``sum_i Q(W_i)`` against ``W``.
      mse_widrow: Widrow's naive prediction of ``mse``.
      mse_widrow_correlated: Widrow's prediction with identical branches rounding alike.
      extra_nonzero: extra non-zero values (int32 count).
      extra_fraction: ``extra_nonzero / W.size`` (float32).
    """

    mse: jax.Array
    mse_widrow: jax.Array
    mse_widrow_correlated: jax.Array
    extra_nonzero: jax.Array
    extra_fraction: jax.Array


def measure(w: jax.Array, branches, spec: quant.QuantSpec) -> Measurement:
    """The error and cost of splitting ``w`` into ``branches`` under ``spec``.

    Pure ``jnp``: call it inside ``jit``, ``lax.map`` or ``vmap``. Computed in float32
    (float64 for float64 kernels).

    Args:
      w: the original kernel (normally ``sum(branches)``).
      branches: a sequence of arrays of ``w``'s shape; ``(w,)`` measures not splitting.
      spec: the ``QuantSpec`` each branch is quantized with (its own scale each).

    Returns:
      A ``Measurement``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxsplit.quant import QuantSpec
      >>> w = jnp.array([0.1, -0.2, 0.3, 4.0])
      >>> m0 = measure(w, (w,), QuantSpec(bits=4))
      >>> m1 = measure(w, (jnp.array([0.1, -0.2, 0.3, 1.0]), jnp.array([0, 0, 0, 3.0])),
      ...              QuantSpec(bits=4))
      >>> int(m1.extra_nonzero), float(m1.extra_fraction), bool(m1.mse < m0.mse)
      (1, 0.25, True)
    """
    branches = tuple(branches)
    m = quant.branches_mse(branches, w, spec)
    extra = extra_nonzero(w, branches)
    return Measurement(
        m.measured,
        m.predicted,
        m.predicted_correlated,
        extra,
        extra.astype(jnp.float32) / max(int(w.size), 1),
    )


def extra_nonzero(w: jax.Array, branches) -> jax.Array:
    """Non-zeros summed over ``branches`` minus those of ``w`` (int32): a split's cost.

    Example:
      >>> import jax.numpy as jnp
      >>> int(extra_nonzero(jnp.array([2.0, 1.0]), (jnp.array([1.0, 1.0]), jnp.array([1.0, 0]))))
      1
    """
    nonzero = sum(jnp.count_nonzero(b).astype(jnp.int32) for b in branches)
    return nonzero - jnp.count_nonzero(w).astype(jnp.int32)


def index_bytes(size: int) -> int:
    """Bytes of the index stored with each value of a sparse twin of ``size`` values.

    A flat C-order position: 4 bytes (int32), 8 when ``size >= 2**31`` (as
    ``jaxsplit.sparse_io`` writes it).

    Example:
      >>> index_bytes(384 * 1536), index_bytes(2**31)
      (4, 8)
    """
    return 4 if size <= 2**31 - 1 else 8


class TwinCost(NamedTuple):
    """What a split layer's twins add at run time, dense and sparse (host-side ints).

    Attributes:
      extra_macs_dense: multiply-adds per application of the kernel with every twin run
        as a dense layer (``(k - 1) · size``).
      extra_macs_sparse: the same with twins run as sparse products (their non-zeros).
      extra_bytes_dense: weight bytes of the dense twins (``(k - 1) · size · itemsize``).
      extra_bytes_sparse: bytes of the sparse twins, values plus ``index_bytes`` each.
    """

    extra_macs_dense: int
    extra_macs_sparse: int
    extra_bytes_dense: int
    extra_bytes_sparse: int


def twin_cost(size: int, itemsize: int, twin_nonzeros) -> TwinCost:
    """The run-time cost of twins ``branch_1 …`` of a kernel of ``size`` values.

    Args:
      size: values in the kernel (each branch has as many).
      itemsize: bytes per value (4 for float32, 2 for bfloat16).
      twin_nonzeros: non-zeros of each twin (``branch_1 …``); empty for an unsplit layer.

    Returns:
      A ``TwinCost``.

    Example:
      >>> tuple(twin_cost(1000, 4, [20]))  # dense MACs, sparse MACs, dense bytes, sparse bytes
      (1000, 20, 4000, 160)
    """
    nnz = [int(n) for n in twin_nonzeros]
    return TwinCost(
        len(nnz) * int(size),
        sum(nnz),
        len(nnz) * int(size) * int(itemsize),
        sum(nnz) * (int(itemsize) + index_bytes(int(size))),
    )


def reduction(before: float, after: float) -> float:
    """The fraction of the error a split removes, ``1 - after / before``.

    ``0.0`` when there was no error and none was added; ``-inf`` when a split adds error
    to an exact layer.

    Example:
      >>> reduction(4.0, 1.0), reduction(0.0, 0.0)
      (0.75, 0.0)
    """
    if before == 0:
        return 0.0 if after == 0 else -math.inf
    return 1.0 - after / before


def sqnr_db(signal_power: float, noise_power: float) -> float:
    """Signal-to-quantization-noise ratio in dB, ``10·log10(signal / noise)``.

    ``inf`` for zero noise (and a non-zero signal); ``nan`` when both are zero.

    Example:
      >>> sqnr_db(1.0, 0.01), sqnr_db(1.0, 0.0)
      (20.0, inf)
    """
    if noise_power == 0:
        return math.inf if signal_power > 0 else math.nan
    if signal_power == 0:
        return -math.inf
    return 10.0 * math.log10(signal_power / noise_power)
