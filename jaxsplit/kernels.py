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

import zlib

import jax
import jax.numpy as jnp

__all__ = ["METHODS", "split_mask", "balance", "random", "split", "stochastic_key"]

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
    mask = split_mask(w, threshold)
    w2 = jnp.where(mask, w / 2, jnp.zeros_like(w))
    w1 = jnp.where(mask, w - w2, w)
    return w1, w2


def random(w: jax.Array, threshold, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Random shares: each split value is divided at a random point, bit-exactly.

    Unlike PPQ (whose ``W1 = W - W2`` is computed from a float draw and can be one
    ulp off), the larger share ``big = w * u`` with ``u ~ U[0.5, 1)`` makes
    ``w - big`` exact, and a fair coin decides which branch receives it, so each
    branch's share is uniform-ish over ``[0, w]`` and ``w1 + w2 == w`` exactly.

    Args:
      w: a floating-point kernel.
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
    k_share, k_coin = jax.random.split(key)
    u = jax.random.uniform(k_share, w.shape, dtype=w.dtype, minval=0.5, maxval=1.0)
    big = w * u
    small = w - big
    coin = jax.random.bernoulli(k_coin, 0.5, w.shape)
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
