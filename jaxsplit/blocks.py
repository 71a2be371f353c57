"""Elementwise work and its reductions in cache-sized blocks (pure ``jnp``, CPU only).

XLA's CPU backend materializes every intermediate of a long elementwise computation
that it does not fuse (a loop, several outputs, a reduction beside an output), each a
pass over memory. Run block by block (``lax.map`` over a flat view of the arrays,
zero-padded to equal blocks of at most ``BLOCK`` values), those passes stay in the L2/L3
cache: ``kernels.compensate``'s code scan and ``measure``'s error of a split candidate
run 3-4x faster on a 4096² float32 kernel this way, and no whole-kernel temporary is
written.

* ``in_blocks(f, arrays)``: ``f(*arrays)`` for an elementwise ``f``, bit for bit.
* ``extremes_in_blocks(f, arrays)``: each output's per-block ``min`` and ``max`` (with 0),
  never writing the outputs: ``quant.qparams`` of them is the outputs' own (per tensor).
* ``sum_in_blocks(f, arrays)``: the sums over the blocks of ``f``'s per-block reductions
  (squared errors, counts): the same figures as ``f`` on the whole arrays, up to the
  order of float sums (integer counts are exact).

Elsewhere the functions run on the whole arrays: other backends (they fuse or tile on
their own), more than one device (a flat block would cross shards and lose the arrays'
sharding), fewer than 8192 values, or ``blocked=False``. Elementwise means: each output
value depends on the input values at its position only, and ``f`` accepts the zeros of
the padding (for the reductions, zeros must add nothing: ``f`` of zero inputs reduces
to zero, or to the ``min``/``max`` neutral 0).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["BLOCK", "in_blocks", "extremes_in_blocks", "sum_in_blocks", "blocked"]

#: The most values per block (a block's intermediates stay in the L2/L3 cache); arrays
#: of fewer than ``16 · BLOCK`` values run in 16 blocks of 4096 values or more.
BLOCK = 2**18


def blocked(shape: tuple[int, ...]) -> bool:
    """Whether arrays of ``shape`` run in blocks here (static: backend, devices, size).

    Example:
      >>> import jax
      >>> blocked((4096, 4096)) == (jax.default_backend() == "cpu" and jax.device_count() == 1)
      True
      >>> blocked((64, 64))
      False
    """
    return _count(math.prod(shape)) >= 2 and _here()


def _here() -> bool:
    return jax.default_backend() == "cpu" and jax.device_count() == 1


def _count(n: int) -> int:
    """Blocks for ``n`` values: ``ceil(n / BLOCK)``, at least 16 of 4096 or more."""
    return max(-(-n // BLOCK), min(16, n // 4096))


def _views(arrays, on: bool):
    """Flat ``(blocks, size)`` views of ``arrays``, or ``None`` (run whole)."""
    n = math.prod(arrays[0].shape)
    nb = _count(n)
    if not on or nb < 2 or not _here():
        return None
    per = -(-n // nb)
    size = -(-per // 128) * 128  # equal blocks, a multiple of 128 values
    return tuple(jnp.pad(a.reshape(-1), (0, nb * size - n)).reshape(nb, size) for a in arrays)


def in_blocks(f, arrays, blocked: bool = True):
    """``f(*arrays)`` for an elementwise ``f``, on the CPU in blocks of at most ``BLOCK`` values.

    The result is the same as ``f`` on the whole arrays, bit for bit (see the module
    docstring for when the blocks apply).

    Args:
      f: an elementwise function of ``len(arrays)`` arrays to an array or a tuple of
        arrays, each of the inputs' shape.
      arrays: arrays of one shape.
      blocked: ``False`` runs ``f`` on the whole arrays.

    Returns:
      ``f(*arrays)``.

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.arange(3.0 * BLOCK + 5)
      >>> a, b = in_blocks(lambda x: (x + 1, x * 2), (x,))
      >>> bool(jnp.all(a == x + 1)), bool(jnp.all(b == x * 2))
      (True, True)
    """
    shape = arrays[0].shape
    flat = _views(arrays, blocked)
    if flat is None:
        return f(*arrays)
    out = lax.map(lambda xs: f(*xs), flat)
    n = math.prod(shape)
    return jax.tree.map(lambda o: o.reshape(-1)[:n].reshape(shape), out)


def extremes_in_blocks(f, arrays, blocked: bool = True) -> tuple[jax.Array, ...]:
    """Per output ``o`` of an elementwise ``f``: its blocks' ``min`` and ``max`` (with 0).

    The outputs are reduced block by block and never written whole: a 1-D array per
    output holding every block's ``min(o, 0)`` and ``max(o, 0)`` (two entries where ``f``
    runs whole). Its own ``min``, ``max`` and ``max |.|`` are the output's (with 0), so
    ``quant.qparams`` and ``quant.scale`` of it, per tensor, are the output's exactly,
    for finite outputs. A ``nan`` fares as in any XLA max reduction: on the CPU it does
    not reliably propagate, and where it lands may change the result (``quant.scale`` of
    a kernel holding one too).

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.linspace(-3.0, 2.0, 3 * BLOCK)
      >>> (e,) = extremes_in_blocks(lambda x: (x * 2,), (x,))
      >>> float(e.min()), float(e.max()), e.shape[0] > 2
      (-6.0, 4.0, True)
    """

    def reduce(*xs):
        return tuple(jnp.stack([jnp.min(o, initial=0), jnp.max(o, initial=0)]) for o in f(*xs))

    flat = _views(arrays, blocked)
    if flat is None:
        return reduce(*arrays)
    return tuple(e.reshape(-1) for e in lax.map(lambda xs: reduce(*xs), flat))


def sum_in_blocks(f, arrays, blocked: bool = True):
    """The sum over the blocks of ``f``'s reductions: ``f(*arrays)`` computed block by block.

    ``f`` maps arrays of one shape to a pytree of scalars, each a sum (or a count) over
    its inputs' positions to which zeros add nothing; the result is that pytree summed
    over the blocks (``f`` of the whole arrays where the blocks do not apply). Integer
    results are exact; float sums differ from the whole-array reduction only in the
    order of the additions.

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.arange(3 * BLOCK, dtype=jnp.float32) % 5
      >>> s, n = sum_in_blocks(lambda x: (jnp.sum(x * x), jnp.count_nonzero(x)), (x,))
      >>> float(s) == float(jnp.sum(x * x)), int(n) == int(jnp.count_nonzero(x))
      (True, True)
    """
    flat = _views(arrays, blocked)
    if flat is None:
        return f(*arrays)
    parts = lax.map(lambda xs: f(*xs), flat)
    return jax.tree.map(lambda p: jnp.sum(p, axis=0), parts)
