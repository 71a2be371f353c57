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

__all__ = ["Measurement", "measure", "extra_nonzero", "reduction", "sqnr_db"]


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
