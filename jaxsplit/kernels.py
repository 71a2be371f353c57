"""Array-level split arithmetic: pure ``jnp`` functions on one kernel, no trees.

Every method returns a tuple of branch arrays whose left-to-right sum equals the
input **bit for bit**. Values are split when ``|w| > threshold`` (strict), with the
threshold cast to the kernel's dtype first (PPQ parity); NaN is never split and
``±inf`` is never split (it stays on ``branch_0``, ``branch_1`` gets ``0`` there).

Exactness, argued per method:

* ``balance``: ``w2 = w / 2`` and ``w1 = w - w2``. Halving is exact for normal
  numbers; where it is not (subnormal results, or XLA flushing them to zero on CPU),
  ``w - w2`` is still exact by Sterbenz' lemma (``w2`` lies in ``[0, w]`` with
  the same sign, and ``w - 0 == w``), so ``w1 + w2 == w``. On CPU, XLA flushes
  subnormal results to zero, so a value below twice the smallest normal number may
  stay whole on ``branch_0`` (exact all the same).
* ``random``: ``u ~ U[0.5, 1)``, ``big = w * u`` rounded, so ``|big|`` lies in
  ``[|w|/2, |w|]`` and ``w - big`` is exact (Sterbenz). A fair coin decides which
  branch receives ``big``.
"""

from __future__ import annotations

import math
import zlib

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.random import threefry2x32_p

__all__ = ["METHODS", "split_mask", "balance", "random", "split", "stochastic_key", "element_bits"]

#: Split methods this module implements (``SplitConfig.method`` accepts these).
METHODS = ("balance", "random")


def split_mask(w: jax.Array, threshold) -> jax.Array:
    """Boolean mask of the values that a split divides: finite and ``|w| > threshold``.

    Args:
      w: a floating-point array.
      threshold: a scalar (or an array broadcastable to ``w``); cast to ``w.dtype``
        before the comparison, as PPQ does.

    Returns:
      A bool array of ``w``'s shape.

    Example:
      >>> import jax.numpy as jnp
      >>> split_mask(jnp.array([0.1, -0.5, 0.7, jnp.inf]), 0.5).tolist()
      [False, False, True, False]
    """
    t = jnp.asarray(threshold).astype(w.dtype)
    return (jnp.abs(w) > t) & jnp.isfinite(w)


def balance(w: jax.Array, threshold) -> tuple[jax.Array, jax.Array]:
    """PPQ's ``balance`` split: values above the threshold are halved between two branches.

    Args:
      w: a floating-point kernel of any shape.
      threshold: absolute threshold (scalar, or an array broadcastable to ``w``).

    Returns:
      ``(w1, w2)`` in ``w``'s dtype with ``w1 + w2 == w`` bit for bit; where
      ``|w| <= threshold`` (or ``w`` is not finite), ``w1 = w`` and ``w2 = 0``.

    Example:
      >>> import jax.numpy as jnp
      >>> w1, w2 = balance(jnp.array([0.25, -3.0, 2.0]), 1.0)
      >>> w1.tolist(), w2.tolist()
      ([0.25, -1.5, 1.0], [0.0, -1.5, 1.0])
    """
    half = w / 2
    mask = split_mask(w, threshold) & (half != 0)  # a flushed half: keep the value whole
    w2 = jnp.where(mask, half, jnp.zeros_like(w))
    w1 = jnp.where(mask, w - w2, w)
    return w1, w2


def element_bits(key: jax.Array, shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """Two independent ``uint32`` words per element: Threefry-2x32 of the element's flat index.

    Elementwise by construction (each element hashes its own row-major index with the
    key), so it is reproducible on every backend and needs no communication when the
    leading or the last axis is sharded. Kernels of rank > 2 are hashed as the 2-D view
    ``(prod(shape[:-1]), shape[-1])`` (same indices, same bits): XLA on CPU takes 20-30 s
    to compile Threefry over a rank-4 array (jax 0.10), about 1 s over a rank-2 one.

    Example:
      >>> import jax
      >>> a, b = element_bits(jax.random.key(0), (2, 3))
      >>> a.shape, a.dtype.name, bool((a != b).any())
      ((2, 3), 'uint32', True)
    """
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    key = key.astype(jnp.uint32)
    size = math.prod(shape)
    if size > 2**32:
        raise ValueError(f"element_bits supports up to 2**32 elements, got shape {shape}")
    view = shape if len(shape) <= 2 else (size // max(shape[-1], 1), shape[-1])
    index = jnp.zeros(view, jnp.uint32)
    stride = 1
    for d in reversed(range(len(view))):
        index = index + lax.broadcasted_iota(jnp.uint32, view, d) * jnp.uint32(stride % 2**32)
        stride *= view[d]
    words = threefry2x32_p.bind(key[0], key[1], index, jnp.zeros(view, jnp.uint32))
    return tuple(x.reshape(shape) for x in words)


def random(w: jax.Array, threshold, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Random shares: each split value is divided at a random point, bit-exactly.

    Unlike PPQ (whose ``W1 = W - W2`` is computed from a float draw and can be one
    ulp off), the larger share ``big = w * u`` with ``u ~ U[0.5, 1)`` makes
    ``w - big`` exact, and a fair coin decides which branch receives it, so each
    branch's share is uniform over ``[0, w]`` and ``w1 + w2 == w`` exactly. The
    random words come from ``element_bits`` (Threefry keyed by ``key``).

    Args:
      w: a floating-point kernel (up to ``2**32`` elements).
      threshold: absolute threshold (scalar, or broadcastable to ``w``).
      key: a ``jax.random`` key (typed or raw ``uint32[2]``).

    Returns:
      ``(w1, w2)`` with ``w1 + w2 == w`` bit for bit; shares lie between 0 and ``w``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> w = jnp.array([0.1, 3.0, -5.0])
      >>> w1, w2 = random(w, 1.0, jax.random.key(0))
      >>> bool(jnp.all(w1 + w2 == w)), float(w2[0])
      (True, 0.0)
    """
    mask = split_mask(w, threshold)
    b_share, b_coin = element_bits(key, w.shape)
    # 23 random mantissa bits -> [1, 2) -> [0.5, 1); rounding to w's dtype stays in [0.5, 1]
    one_two = lax.bitcast_convert_type((b_share >> 9) | jnp.uint32(0x3F800000), jnp.float32)
    u = (one_two * 0.5).astype(w.dtype)
    big = w * u
    small = w - big  # exact (Sterbenz) unless it is subnormal and XLA flushes it to zero:
    big = jnp.where(small == 0, w, big)  # then keep the value whole, still exact
    coin = (b_coin & 1) == 1
    zero = jnp.zeros_like(w)
    w1 = jnp.where(mask, jnp.where(coin, big, small), w)
    w2 = jnp.where(mask, jnp.where(coin, small, big), zero)
    return w1, w2


def stochastic_key(seed: int, path: str) -> jax.Array:
    """The per-layer key: ``seed`` folded with a stable hash of the layer ``path``.

    Because the key depends only on ``(seed, path)``, a layer's random split never
    depends on which other layers are selected or on their order.

    Example:
      >>> import jax
      >>> k1, k2 = stochastic_key(0, "Dense_0"), stochastic_key(0, "Dense_0")
      >>> bool((jax.random.key_data(k1) == jax.random.key_data(k2)).all())
      True
    """
    return jax.random.fold_in(jax.random.key(seed), zlib.crc32(path.encode("utf-8")))


def split(
    method: str, w: jax.Array, threshold, key: jax.Array | None = None
) -> tuple[jax.Array, ...]:
    """Dispatches to a method by name; returns the branches (``sum == w`` bit for bit).

    This is the one place ``transform`` calls, so new methods only touch this module
    (and ``METHODS``).

    Example:
      >>> import jax.numpy as jnp
      >>> [b.tolist() for b in split("balance", jnp.array([4.0]), 1.0)]
      [[2.0], [2.0]]
    """
    if method == "balance":
        return balance(w, threshold)
    if method == "random":
        if key is None:
            raise ValueError("method 'random' needs a key")
        return random(w, threshold, key)
    raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
