"""Threshold sweeps: the weight quantization MSE of ``balance`` at N candidate thresholds.

Per candidate ``t`` the branches are quantized separately (symmetric per-tensor int8,
round-half-even, scale ``max|branch| / 127``) and the error is
``mean((Q(W1) + Q(W2) - W)²)``. Three ways to compute all N:

* ``loop``: a Python loop over one jitted candidate (split, two scales, quantize, MSE);
* ``vmap``: ``jit(vmap(candidate))``, which materializes N copies of each branch;
* ``fused``: the scales of every candidate from one ``max`` pass per candidate
  (``max|W2| = max|W| / 2`` when anything is split, ``max|W1|`` = the largest value
  ``<= t`` or ``max|W| / 2``), then ``lax.map`` over candidates of one fused reduction that
  never writes a branch: N+1 reads of the kernel, nothing written.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxsplit import kernels

QMAX = 127.0


def _q(x, s):
    safe = jnp.where(s > 0, s, 1.0)
    return jnp.where(s > 0, jnp.clip(jnp.round(x / safe), -QMAX, QMAX) * safe, 0.0)


@jax.jit
def candidate_mse(w, t):
    """The reference: split with ``kernels.balance``, quantize each branch, MSE."""
    w1, w2 = kernels.balance(w, t)
    s1, s2 = jnp.max(jnp.abs(w1)) / QMAX, jnp.max(jnp.abs(w2)) / QMAX
    return jnp.mean(jnp.square(_q(w1, s1) + _q(w2, s2) - w))


def loop(w, ts):
    return jnp.stack([candidate_mse(w, t) for t in ts])


vmapped = jax.jit(jax.vmap(candidate_mse, in_axes=(None, 0)))


@jax.jit
def fused(w, ts):
    """All candidates' MSE: N ``max`` passes for the scales, N fused error passes."""
    a = jnp.abs(w)
    amax = jnp.max(a)

    def scales(t):
        t = t.astype(w.dtype)
        split = amax > t
        below = jnp.max(jnp.where(a <= t, a, 0.0))
        half = jnp.where(split, amax / 2, 0.0)
        return jnp.maximum(below, half) / QMAX, half / QMAX

    s1, s2 = lax.map(scales, ts)

    def err(args):
        t, s1, s2 = args
        m = (a > t.astype(w.dtype)) & jnp.isfinite(w)
        half = w / 2
        w1 = jnp.where(m, w - half, w)
        w2 = jnp.where(m, half, 0.0)
        return jnp.mean(jnp.square(_q(w1, s1) + _q(w2, s2) - w))

    return lax.map(err, (ts, s1, s2))
