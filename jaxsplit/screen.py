"""Cheap candidate scoring for ``Auto``: predict every candidate, measure only the best few.

``search`` used to measure every (method, threshold) candidate on the whole kernel and to
sort all of ``|W|`` for its candidate thresholds: on one 4096² layer that is 64-256 full
measurements plus a 16.8M-element sort (the sort alone was most of the time on CPU). This
module scores all candidates on a **sample** of the kernel and leaves the exact
measurement (``jaxsplit.measure``) to the best ``top`` of them:

* ``sample``: the ``tail`` largest ``|w|`` values, found exactly (a tournament over block
  maxima: the top ``k`` values lie in the ``k`` blocks with the largest maxima, level by
  level, so no pass sorts more than a few thousand values), plus a fixed strided sample
  of the rest, weighted so that sums over the sample estimate sums over the kernel.
  Because the sample holds the largest values, every branch's max-abs scale computed on
  it equals the kernel's for ``clip`` and ``grid`` (and for ``balance`` at thresholds
  taken from the tail); elsewhere it is within the sample's spacing.
* ``order_stats``: the ``k``-th largest ``|w|``, exact for ``k < tail``, else read from
  the sorted sample (``search.candidate_thresholds`` uses it for large per-tensor kernels).
* ``predict``: each candidate's split of the sample under the same kernels and the exact
  quantizer (``quant.quantize``), as a weighted MSE and a weighted count of extra
  non-zeros: an estimate, never reported.
* ``screen``: the ``top`` candidates by predicted MSE within the budget, measured exactly
  on the whole kernel; the others come back as ``inf`` so that ``search``'s choice (the
  best measured one within the budget, if it beats not splitting) runs unchanged on the
  confirmed ones only. Extra non-zeros of a choice are therefore always measured, and the
  budget is never exceeded.

The screen applies to per-tensor specs on kernels of at least ``MIN_SIZE`` values and every
method but ``random`` (whose shares hash each element's position in the kernel);
``applies`` says when, and ``search`` falls back to measuring every candidate otherwise
(per-channel and per-group specs, small kernels, ``random``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxsplit import kernels, quant
from jaxsplit.measure import Measurement, measure_candidate

__all__ = [
    "MIN_SIZE",
    "TAIL",
    "SAMPLE",
    "Sample",
    "applies",
    "sample",
    "sample_stride",
    "order_stats",
    "ranked",
    "TREE_LEVELS",
    "predict",
    "row_weights",
    "predictions",
    "picks",
    "tree_picks",
    "lean",
    "measure_picks",
    "screen",
]

#: Smallest kernel the screen handles (smaller ones are measured exhaustively: cheap).
MIN_SIZE = 2**18
#: Largest values kept exactly in the sample.
TAIL = 256
#: Target size of the strided part of the sample.
SAMPLE = 2**16
#: Multiples of the layer budget at which the tree-scope screen also measures its best
#: prediction (``tree_picks``): where a budget shared by the tree may move a layer.
TREE_LEVELS = (0.25, 0.5, 2.0, 4.0, 16.0)
_LEAF = 4096  # the tournament stops when this few block maxima remain
_BLOCK = 64


class Sample(NamedTuple):
    """A weighted sample of a kernel: its largest values exactly, a strided rest.

    Attributes:
      values: ``(tail + n,)`` signed values (the ``tail`` largest ``|w|`` first, in
        descending order of ``|w|``).
      weights: how many kernel values each sample value stands for (``1`` in the tail).
      tail_abs: the ``tail`` largest ``|w|``, descending.
      rest_abs: the strided part's ``|w|``, sorted descending.
      size: the kernel's size.
      index: each sample value's flat (C-order) position in the kernel.
    """

    values: jax.Array
    weights: jax.Array
    tail_abs: jax.Array
    rest_abs: jax.Array
    size: int
    index: jax.Array


def applies(shape: tuple[int, ...], spec: quant.QuantSpec, methods: tuple[str, ...]) -> bool:
    """Whether ``screen`` handles this kernel shape, spec and methods (static).

    Example:
      >>> applies((4096, 4096), quant.QuantSpec(bits=4), ("clip",))
      True
      >>> applies((4096, 4096), quant.QuantSpec(bits=4, granularity="per_channel"), ("clip",))
      False
    """
    return (
        spec.granularity == "per_tensor"
        and math.prod(shape) >= MIN_SIZE
        and "random" not in methods
    )


def _top_abs(a: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The ``k`` largest of ``a`` (flat, ``>= 0``), descending, and their flat positions
    (a position past the end stands for a padding zero)."""
    if a.size <= _LEAF:
        return jax.lax.top_k(a, k)
    pad = (-a.size) % _BLOCK
    if pad:
        a = jnp.pad(a, (0, pad))
    ab = a.reshape(-1, _BLOCK)
    kb = min(k, ab.shape[0])
    # the top k values lie in the kb blocks whose maxima are largest (each such value's
    # block has a maximum at least that value, and at most k blocks do)
    _, bi = _top_abs(jnp.max(ab, axis=1), kb)
    vals, j = jax.lax.top_k(ab[bi].reshape(-1), k)
    return vals, bi[j // _BLOCK] * _BLOCK + j % _BLOCK


def sample_stride(size: int, n: int = SAMPLE) -> int:
    """The odd stride of ``sample``'s strided part: positions ``0, stride, 2 stride, ...``.

    Example:
      >>> sample_stride(2**20), sample_stride(10)
      (17, 1)
    """
    return max(1, size // max(n, 1)) | 1


def sample(w: jax.Array, tail: int = TAIL, n: int = SAMPLE) -> Sample:
    """The ``tail`` largest ``|w|`` values exactly plus about ``n`` strided others, weighted.

    The stride is odd, so the strided part walks across the columns of a matrix instead
    of following one. Sample values at or above the tail's smallest ``|w|`` get weight
    ``0`` (the tail holds them); the others share the remaining ``size - tail`` values.

    Example:
      >>> import jax.numpy as jnp
      >>> s = sample(jnp.arange(-8.0, 8.0), tail=2, n=4)
      >>> s.tail_abs.tolist(), float(s.weights.sum())
      ([8.0, 7.0], 16.0)
    """
    wf = w.reshape(-1)
    a = jnp.abs(wf).astype(jnp.float32)
    size = int(wf.size)
    tail = min(tail, size)
    tail_abs, tail_at = _top_abs(a, tail)
    tail_w = jnp.where(tail_at < size, wf[jnp.minimum(tail_at, size - 1)], 0).astype(wf.dtype)
    stride = sample_stride(size, n)
    rest = wf[::stride]
    rest_at = jnp.arange(0, size, stride, dtype=tail_at.dtype)
    rest_a = jnp.abs(rest).astype(jnp.float32)
    keep = rest_a < tail_abs[-1]
    weight = (size - tail) / jnp.maximum(jnp.sum(keep), 1)
    weights = jnp.concatenate(
        [jnp.ones(tail, jnp.float32), jnp.where(keep, weight, 0.0).astype(jnp.float32)]
    )
    rest_sorted = -jnp.sort(-rest_a)
    index = jnp.minimum(jnp.concatenate([tail_at, rest_at]), size - 1)
    return Sample(jnp.concatenate([tail_w, rest]), weights, tail_abs, rest_sorted, size, index)


def order_stats(s: Sample, ks) -> jax.Array:
    """``desc(|w|)[k]`` for each static ``k``: exact below ``len(tail)``, else from the sample.

    Example:
      >>> import jax.numpy as jnp
      >>> s = sample(jnp.arange(1000.0), tail=8, n=100)
      >>> order_stats(s, [0, 7]).tolist()
      [999.0, 992.0]
    """
    return ranked(s.tail_abs, s.rest_abs, s.size, ks)


def ranked(tail_abs, rest_abs, size: int, ks) -> jax.Array:
    """``order_stats`` from its parts: ``desc(|w|)[k]`` from the exact ``tail_abs`` (the
    largest ``|w|``, descending) below its length, else from ``rest_abs`` (the strided
    sample's ``|w|``, descending) at the matching rank of a kernel of ``size`` values.

    Example:
      >>> ranked(jnp.array([9.0, 8.0]), jnp.array([7.0, 3.0, 1.0]), 6, [1, 4]).tolist()
      [8.0, 1.0]
    """
    ks = np.asarray(ks, int)
    tail = tail_abs.shape[0]
    n = rest_abs.shape[0]
    at = np.clip(np.round(ks * n / size).astype(int), 0, n - 1)
    exact = tail_abs[np.clip(ks, 0, tail - 1)]
    approx = rest_abs[at]
    return jnp.where(jnp.asarray(ks < tail), exact, approx)


def predict(
    s: Sample,
    thresholds: jax.Array,
    method: str,
    spec: quant.QuantSpec,
    *,
    branches: int = 2,
    key: jax.Array | None = None,
    row_weights: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Predicted ``(mse, extra_nonzero)`` of ``method`` at each threshold, from the sample.

    Each candidate splits the sample with ``kernels.split`` and quantizes every branch
    with ``quant.quantize`` (max-abs scales of the sample's branches, which hold the
    kernel's largest values); the squared errors and the non-zeros are summed with the
    sample's weights. Float32 arrays of shape ``(n,)``. With ``row_weights`` (one per
    sample value, e.g. the calibration's diagonal at each value's input row) every
    squared error is weighted too: ``mse × size`` then predicts the output error
    ``trace(Eᵀ diag(C) E)``.

    Example:
      >>> import jax.numpy as jnp
      >>> w = jnp.linspace(-1.0, 1.0, 4001) ** 3
      >>> s = sample(w, tail=64, n=500)
      >>> mse, extra = predict(s, jnp.array([0.97, 0.5]), "clip", quant.QuantSpec(bits=4))
      >>> int(extra[0]) == int(jnp.sum(jnp.abs(w) > 0.97))  # all in the tail: exact
      True
      >>> bool(abs(extra[1] / jnp.sum(jnp.abs(w) > 0.5) - 1) < 0.05)  # estimated
      True
    """
    x = s.values
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    nz0 = jnp.sum(s.weights * (x != 0))
    wt = s.weights if row_weights is None else s.weights * row_weights.astype(jnp.float32)

    def one(t):
        bs = kernels.split(method, x, t, key, branches=branches, spec=spec)
        recon = sum(quant.quantize(b, spec).astype(xf.dtype) for b in bs)
        err = jnp.sum(wt * jnp.square(recon - xf)) / s.size
        nz = sum(jnp.sum(s.weights * (b != 0)) for b in bs)
        return err.astype(jnp.float32), (nz - nz0).astype(jnp.float32)

    return jax.lax.map(one, thresholds)


def row_weights(s: Sample, shape: tuple[int, ...], calibration: jax.Array) -> jax.Array:
    """The calibration's diagonal at each sample value's input row (``predict``'s
    ``row_weights``): ``E`` is ``(d_in, d_out)``, ``d_out = shape[-1]`` (``jaxsplit.measure``).

    Example:
      >>> import jax.numpy as jnp
      >>> s = sample(jnp.arange(6.0).reshape(3, 2), tail=2, n=6)
      >>> row_weights(s, (3, 2), jnp.array([1.0, 2.0, 3.0])).tolist()
      [3.0, 3.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0]
    """
    c = jnp.asarray(calibration)
    diag = c if c.ndim == 1 else jnp.diagonal(c)
    d_out = shape[-1] if len(shape) >= 2 else s.size
    return diag.astype(jnp.float32)[s.index // max(d_out, 1)]


def predictions(
    w: jax.Array,
    thresholds: jax.Array,
    methods: tuple[str, ...],
    spec: quant.QuantSpec,
    *,
    branches: int = 2,
    key: jax.Array | None = None,
    calibration: jax.Array | None = None,
    sampled: Sample | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Predicted ``(score, extra)`` of every candidate, flat ``(len(methods) * n,)``.

    ``score`` is the predicted total squared error (``mse × size``) or, with
    ``calibration``, the predicted output error (its diagonal, see ``row_weights``).
    ``sampled``: ``sample(w)``, where the caller has taken it already.

    Example:
      >>> import numpy as np, jax.numpy as jnp
      >>> w = jnp.asarray(np.random.default_rng(0).standard_t(3, 2**12), jnp.float32)
      >>> score, extra = predictions(w, jnp.array([1.0, 4.0]), ("clip",), quant.QuantSpec(bits=4))
      >>> score.shape, bool(extra[0] > extra[1])
      ((2,), True)
    """
    s = sample(w) if sampled is None else sampled
    rw = None if calibration is None else row_weights(s, w.shape, calibration)
    preds = [
        predict(s, thresholds, m, spec, branches=branches, key=key, row_weights=rw) for m in methods
    ]
    p_mse = jnp.stack([p[0] for p in preds]).reshape(-1)
    return p_mse * w.size, jnp.stack([p[1] for p in preds]).reshape(-1)


def picks(p_score: jax.Array, p_extra: jax.Array, allowed, size: int, top: int) -> jax.Array:
    """The ``top`` best predictions within ``allowed`` extra non-zeros (then the
    cheapest over it, so that ``top`` indices always come back), flat indices.

    Example:
      >>> import jax.numpy as jnp
      >>> picks(jnp.array([3.0, 1.0, 2.0, 0.5]), jnp.array([1.0, 2.0, 2.0, 9.0]), 2, 10, 2).tolist()
      [1, 2]
    """
    within = p_extra <= allowed
    score = jnp.where(jnp.isfinite(p_score) & within, p_score, jnp.inf)
    top = max(1, min(top, score.size))
    fits = jnp.isfinite(score)
    # best predicted within the budget first (ranks in [0, 1]), then the cheapest over it
    worst = jnp.max(jnp.where(fits, score, 0.0))
    rank = jnp.where(fits, score / jnp.maximum(worst, 1e-30), 2.0 + p_extra / size)
    return jax.lax.top_k(-rank, top)[1]


def tree_picks(
    p_score: jax.Array,
    p_extra: jax.Array,
    budget,
    size: int,
    *,
    top: int,
    levels: tuple[float, ...] = TREE_LEVELS,
) -> jax.Array:
    """What the tree-scope screen measures: the ``top`` best predictions within the
    layer's own budget (``budget × size``, exactly what the layer-scope screen measures),
    then the best one within ``level × budget × size`` for each of ``levels`` (the points
    of the curve a shared budget may move the layer to). Flat indices; may repeat.

    Example:
      >>> import jax.numpy as jnp
      >>> s, x = jnp.array([3.0, 1.0, 2.0, 0.5]), jnp.array([1.0, 2.0, 2.0, 9.0])
      >>> tree_picks(s, x, 0.2, 10, top=1, levels=(0.5, 5.0)).tolist()
      [1, 0, 3]
    """
    out = [picks(p_score, p_extra, budget * size, size, top)]
    out += [picks(p_score, p_extra, lv * budget * size, size, 1) for lv in levels]
    return jnp.concatenate(out)


def lean(m: Measurement) -> Measurement:
    """``m`` without Widrow's predictions (``nan``), so that under ``jit`` XLA drops
    their computation: a choice needs the measured error and the counts only, and the
    predictions cost more than the measurement itself on CPU (2.5x for a 2048x8192
    bf16 ``clip`` candidate, load ~7).

    Example:
      >>> import jax.numpy as jnp
      >>> w = jnp.array([0.1, -0.2, 4.0])
      >>> from jaxsplit.measure import measure
      >>> m = lean(measure(w, (w,), quant.QuantSpec(bits=4)))
      >>> bool(jnp.isnan(m.mse_widrow)), bool(m.mse > 0)
      (True, True)
    """
    nan = jnp.full((), jnp.nan, m.mse_widrow.dtype)
    return m._replace(mse_widrow=nan, mse_widrow_correlated=nan)


def measure_picks(
    w: jax.Array,
    thresholds: jax.Array,
    chosen: jax.Array,
    methods: tuple[str, ...],
    spec: quant.QuantSpec,
    *,
    branches: int = 2,
    key: jax.Array | None = None,
    calibration: jax.Array | None = None,
    rank=None,
):
    """``measure`` of the ``chosen`` flat candidates (each once), ``(len(methods), n)``.

    Candidates not chosen get ``mse = output_error = inf`` (so no choice takes them),
    zero counts and ``nan`` predictions. A repeated index is measured once. Widrow's
    predictions are not computed (``lean``): nothing chooses by them.

    Each pick is measured by ``measure.measure_candidate``: methods cheap to recompute
    are measured in blocks without writing their branches, the others split the kernel.
    With ``rank`` (a function of one candidate's ``Measurement`` to a scalar, lower is
    better) the branches of the best-ranked pick among those that split the kernel are
    kept as they are measured, so a caller applying that pick need not split the kernel
    again (on ties the lower flat index, as ``argmin`` over the flat scores): ``(m, (flat,
    branches))``, ``flat`` that pick's flat index (``len(methods) * n`` and zero branches
    when every such rank is ``inf``); ``(m, None)`` when no pick splits the kernel.

    Example:
      >>> import numpy as np, jax.numpy as jnp
      >>> w = jnp.asarray(np.random.default_rng(0).standard_t(3, 64), jnp.float32)
      >>> m = measure_picks(w, jnp.array([1.0, 2.0]), jnp.array([1, 1]), ("clip",),
      ...                   quant.QuantSpec(bits=4))
      >>> np.isfinite(np.asarray(m.mse)).tolist()
      [[False, True]]
    """
    n = thresholds.shape[0]
    total = len(methods) * n
    k = chosen.shape[0]
    dup = jnp.any((chosen[None, :] == chosen[:, None]) & jnp.tril(jnp.ones((k, k), bool), -1), 1)
    ft = jnp.promote_types(w.dtype, jnp.float32)

    def run(m):  # one pick of method ``m``: (its lean measurement, its branches or None)
        def f(t):
            got, bs = measure_candidate(
                m, w, t, key, branches=branches, spec=spec, calibration=calibration
            )
            return lean(got), bs

        return f

    fs = [run(m) for m in methods]
    shapes = [jax.eval_shape(f, thresholds[0]) for f in fs]
    stored = [s[1] for s in shapes if s[1] is not None]

    def zero(proto):  # a skipped pick's figures (or branches)
        return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), proto)

    def pick(flat, gos):  # ``gos[method](threshold)`` of a flat candidate
        t = thresholds[flat % n]
        return jax.lax.switch(flat // n, gos, t) if len(gos) > 1 else gos[0](t)

    if rank is None or not stored:
        gos = [lambda t, f=f: f(t)[0] for f in fs]

        def one(a):
            flat, skip = a
            return jax.lax.cond(skip, lambda: zero(shapes[0][0]), lambda: pick(flat, gos))

        got = jax.lax.map(one, (chosen, dup))
        kept = None
    else:
        bzero = tuple(stored[0])

        def with_branches(f):  # a method's (measurement, branches: zeros if not stored)
            def go(t):
                m, bs = f(t)
                return m, zero(bzero) if bs is None else tuple(bs)

            return go

        gos = [with_branches(f) for f in fs]

        def exact(flat, skip):
            return jax.lax.cond(
                skip, lambda: (zero(shapes[0][0]), zero(bzero)), lambda: pick(flat, gos)
            )

        keeps = jnp.array([s[1] is not None for s in shapes])

        def step(best, a):
            m, bs = exact(*a)
            keep = keeps[a[0] // n] & ~a[1]
            r = jnp.where(keep, rank(m), jnp.inf).astype(jnp.float32)
            better = (r < best[0]) | ((r == best[0]) & (a[0] < best[1]) & jnp.isfinite(r))
            return jax.lax.cond(better, lambda: (r, a[0], bs), lambda: best), m

        init = (jnp.float32(jnp.inf), jnp.asarray(total, chosen.dtype), zero(bzero))
        (_, flat, bs), got = jax.lax.scan(step, init, (chosen, dup))
        kept = (flat, bs)
    at = jnp.where(dup, total, chosen)  # repeats dropped from the scatter
    fill = {"mse": jnp.inf, "output_error": jnp.inf}
    fields = {}
    for name, v in got._asdict().items():
        init = fill.get(name, jnp.nan if jnp.issubdtype(v.dtype, jnp.floating) else 0)
        if name == "output_error" and calibration is None:
            init = jnp.nan
        full = jnp.full((total,), init, v.dtype).at[at].set(v, mode="drop")
        fields[name] = full.reshape(len(methods), n)
    m = Measurement(**fields)
    m = m._replace(mse=m.mse.astype(ft))
    return m if rank is None else (m, kept)


def screen(
    w: jax.Array,
    thresholds: jax.Array,
    methods: tuple[str, ...],
    spec: quant.QuantSpec,
    budget: jax.Array,
    *,
    top: int,
    branches: int = 2,
    key: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Measured ``(mse, extra_nonzero)`` of the ``top`` best-predicted candidates, else ``inf``.

    Args:
      w: a finite floating-point kernel (per-tensor ``spec``; see ``applies``).
      thresholds: ``(n,)`` candidate thresholds, shared by the methods.
      methods: the methods (static).
      spec: the branches' ``QuantSpec``.
      budget: the largest extra non-zeros allowed, as a fraction of ``w.size`` (data).
      top: how many candidates to measure exactly (static, at least 1).
      branches: branch count.
      key: a key (unused by the methods the screen accepts).

    Returns:
      ``(mse, extra)`` of shape ``(len(methods), n)``: float (float32, or float64 for
      float64 kernels) and int32, the measured
      figures (``jaxsplit.measure``) at the confirmed candidates; ``inf`` and ``0``
      elsewhere.

    Example:
      >>> import numpy as np, jax.numpy as jnp
      >>> w = jnp.asarray(np.random.default_rng(0).standard_t(3, 2**18), jnp.float32)
      >>> thr = jnp.array([1.0, 2.0, 4.0])
      >>> mse, extra = screen(w, thr, ("clip",), quant.QuantSpec(bits=4), 1.0, top=1)
      >>> int(jnp.sum(jnp.isfinite(mse)))
      1
    """
    p_score, p_extra = predictions(w, thresholds, methods, spec, branches=branches, key=key)
    chosen = picks(p_score, p_extra, budget * w.size, w.size, top)
    m = measure_picks(w, thresholds, chosen, methods, spec, branches=branches, key=key)
    return m.mse, m.extra_nonzero
