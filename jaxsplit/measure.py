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
* ``output_error`` (with ``calibration=C``, the second moment of the layer's inputs):
  the expected output error ``E||x (W - sum_i Q(W_i))||^2 = trace(Eᵀ C E)`` per input
  sample, ``E`` the reconstruction error reshaped to ``(d_in, d_out)`` (all axes but the
  last, C order: a Dense kernel's axis 0, a Conv kernel's receptive field ``kh·kw·cin``);
  ``C`` is ``E[x xᵀ]`` ``(d_in, d_in)`` or its diagonal ``(d_in,)`` (``calibration_check``
  validates it). ``nan`` without calibration.
* ``effective_bits``: storage per weight of the split, ``bits`` for every value of the
  dense ``branch_0`` plus, for every non-zero of the other (sparse) branches, their
  value bits and ``INDEX_BITS`` (16) for its position: ``bits + nnz_twins ·
  (twin_bits + INDEX_BITS) / size`` (a 16-bit column index per non-zero, as a CSR
  layout of rows up to 65536 wide stores it; scales are ignored). Unsplit: ``bits``.
* ``twin_cost``: what the twins (``branch_1 …``) add at run time, in both forms: as
  *dense* layers (each a whole second layer: ``size`` multiply-adds per application of
  the kernel and ``size · itemsize`` bytes) and as *sparse* products (one multiply-add
  per stored value and ``nnz · (itemsize + index_bytes(size))`` bytes). An
  *application* is one input row of a ``Dense`` (a token) or one output position of a
  ``Conv``: the multiply-adds of one application of the original kernel are its size.
* ``index_bytes(size)``: the on-disk index cost of one stored value of a sparse twin (the
  byte figures of ``twin_cost``; ``effective_bits`` counts the in-memory CSR form): its flat
  C-order position, int32 (int64 for ``size >= 2**31``), as ``jaxsplit.sparse_io``
  stores it on disk. (``jax.experimental.sparse.BCOO`` holds one int32 per axis in
  memory; the figure counts the compact form.)
* ``reduction(before, after)``: the fraction of the error removed, ``1 - after/before``.
* ``sqnr_db(signal, noise)``: ``10 log10(signal / noise)``.

``Auto`` (``jaxsplit.search``), ``sweep``, ``quant_error``, the demo and the experiments
all call ``measure`` (or ``measure_split``, the same figures of an elementwise split that is
never written, and ``measure_candidate``, which picks between the two); nothing else
computes these figures.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxsplit import blocks, kernels, quant
from jaxsplit.errors import CalibrationError

__all__ = [
    "INDEX_BITS",
    "Measurement",
    "measure",
    "measure_counted",
    "measure_split",
    "measure_candidate",
    "extra_nonzero",
    "effective_bits",
    "calibration_check",
    "reduction",
    "sqnr_db",
    "TwinCost",
    "twin_cost",
    "index_bytes",
]

#: Bits stored per non-zero of a sparse twin for its position (``effective_bits``).
INDEX_BITS = 16


class Measurement(NamedTuple):
    """Error and cost of one split candidate (arrays; scalars per element where MSE).

    Attributes:
      mse: measured MSE of ``sum_i Q(W_i)`` against ``W``.
      mse_widrow: Widrow's naive prediction of ``mse``.
      mse_widrow_correlated: Widrow's prediction with identical branches rounding alike.
      extra_nonzero: extra non-zero values (int32 count).
      extra_fraction: ``extra_nonzero / W.size`` (float32).
      output_error: ``trace(Eᵀ C E)`` under ``calibration=C`` (``nan`` without).
      effective_bits: storage bits per weight including the twins' indices.
      twin_nonzero: non-zeros of every branch but ``branch_0`` (int32): the sparse
        storage ``effective_bits`` charges (``Auto(cost="twin")``'s budget).
    """

    mse: jax.Array
    mse_widrow: jax.Array
    mse_widrow_correlated: jax.Array
    extra_nonzero: jax.Array
    extra_fraction: jax.Array
    output_error: jax.Array
    effective_bits: jax.Array
    twin_nonzero: jax.Array


@functools.partial(jax.jit, static_argnames=("spec", "twin_spec"))
def measure(
    w: jax.Array,
    branches,
    spec: quant.QuantSpec,
    *,
    calibration: jax.Array | None = None,
    twin_spec: quant.QuantSpec | None = None,
) -> Measurement:
    """The error and cost of splitting ``w`` into ``branches`` under ``spec``.

    Pure ``jnp``: call it inside ``jit``, ``lax.map`` or ``vmap``; it is jitted itself
    (``spec``, ``twin_spec`` static), so eager calls compile once per shape and
    configuration (its blocked passes are loops that would otherwise compile anew at every
    call: 0.46 s -> 2 ms a call on 512²). Computed in float32
    (float64 for float64 kernels). Per-tensor specs without a calibration: the branches'
    scales from their extremes, then the error and the counts, each in one pass of
    cache-sized blocks (``jaxsplit.blocks``; float sums in that order, counts exact; the
    CPU may count a subnormal value as zero, as it flushes computed subnormals).

    Args:
      w: the original kernel (normally ``sum(branches)``).
      branches: a sequence of arrays of ``w``'s shape; ``(w,)`` measures not splitting.
      spec: the ``QuantSpec`` each branch is quantized with (its own scale each).
      calibration: the second moment of the layer's inputs, ``(d_in,)`` or ``(d_in,
        d_in)`` (see the module docstring); fills ``output_error``.
      twin_spec: the ``QuantSpec`` of every branch but ``branch_0`` (mixed precision);
        default ``spec``. Widrow's predictions then treat the branches as independent.

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
      >>> c = jnp.ones(1)  # a 1-D kernel has d_in = 1; E[x^2] = 1: output error = sum E^2
      >>> m = measure(w, (w,), QuantSpec(bits=4), calibration=c)
      >>> bool(jnp.isclose(m.output_error, 4 * m.mse)), float(m.effective_bits)
      (True, 4.0)
    """
    branches = tuple(branches)
    quant.check_branches(branches, w)
    if calibration is None and _per_tensor(spec, twin_spec):
        return _measured(w, (w, *branches), lambda w_, *bs: bs, spec, twin_spec)
    ft = jnp.promote_types(w.dtype, jnp.float32)
    mixed = twin_spec is not None and twin_spec != spec and len(branches) > 1
    recon = None
    if not mixed:
        m = quant.branches_mse(branches, w, spec)
        mse, naive, corr = m.measured, m.predicted, m.predicted_correlated
        twin_bits = spec.bits
    else:
        recon = _recon(branches, spec, ft, twin_spec)
        mse = jnp.mean(jnp.square(recon - w.astype(ft)))
        specs = (spec,) + (twin_spec,) * (len(branches) - 1)
        # branches under different specs round independently: naive == correlated
        naive = corr = sum(quant.widrow_mse(b, s) for b, s in zip(branches, specs, strict=True))
        twin_bits = twin_spec.bits
    extra = extra_nonzero(w, branches)
    size = max(int(w.size), 1)
    if calibration is None:
        out = jnp.full((), jnp.nan, ft)
    else:
        if recon is None:
            recon = _recon(branches, spec, ft)
        out = _output_error(w.astype(ft) - recon, calibration)
    nnz_twins = sum((jnp.count_nonzero(b).astype(jnp.int32) for b in branches[1:]), jnp.int32(0))
    bits = spec.bits + nnz_twins.astype(jnp.float32) * (twin_bits + INDEX_BITS) / size
    return Measurement(
        mse,
        naive,
        corr,
        extra,
        extra.astype(jnp.float32) / size,
        out,
        jnp.asarray(bits, jnp.float32),
        nnz_twins,
    )


def measure_split(
    w: jax.Array, split, spec: quant.QuantSpec, *, twin_spec: quant.QuantSpec | None = None
) -> Measurement:
    """``measure(w, split(w), spec)`` for an elementwise ``split``, never writing the branches.

    ``split`` maps an array to its branches value by value (``kernels.elementwise``); it
    runs twice over ``w`` in cache-sized blocks (``jaxsplit.blocks``): once for the
    branches' scales, once for the errors and counts. On a 4096² float32 kernel that is
    ~4x faster than splitting and measuring the stored branches. Per-tensor specs, no
    calibration (``measure`` takes those). The figures are ``measure``'s: the same counts,
    the same float sums up to their order.

    Args:
      w: the kernel.
      split: an elementwise function of an array to a tuple of arrays of its shape that
        sum to it (and of zeros to zeros).
      spec: a per-tensor ``QuantSpec``.
      twin_spec: a per-tensor ``QuantSpec`` of every branch but ``branch_0``.

    Returns:
      A ``Measurement`` (``output_error`` is ``nan``).

    Raises:
      ValueError: ``spec`` or ``twin_spec`` is not per tensor.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxsplit import kernels
      >>> from jaxsplit.quant import QuantSpec
      >>> w = jnp.array([0.1, -0.2, 0.3, 4.0])
      >>> f = kernels.elementwise("clip", w, 1.0)
      >>> m, m0 = measure_split(w, f, QuantSpec(bits=4)), measure(w, f(w), QuantSpec(bits=4))
      >>> bool(jnp.isclose(m.mse, m0.mse)), int(m.extra_nonzero) == int(m0.extra_nonzero)
      (True, True)
    """
    if not _per_tensor(spec, twin_spec):
        raise ValueError(
            f"measure_split needs per-tensor specs, got spec={spec!r}, twin_spec={twin_spec!r}"
        )
    return _measured(w, (w,), split, spec, twin_spec)


@functools.partial(jax.jit, static_argnames=("method", "spec", "branches", "twin_spec"))
def measure_candidate(
    method: str,
    w: jax.Array,
    threshold,
    key: jax.Array | None = None,
    *,
    spec: quant.QuantSpec,
    branches: int = 2,
    twin_spec: quant.QuantSpec | None = None,
    calibration: jax.Array | None = None,
):
    """``measure`` of ``kernels.split(method, w, threshold, ...)``, and the branches if stored.

    Where the split is cheap to recompute (``kernels.RECOMPUTED``), elementwise
    (``kernels.elementwise``), measured without a calibration and run in blocks here
    (``blocks.blocked``), the branches are never written (``measure_split``) and come back
    as ``None``; otherwise the kernel is split, the branches measured and returned. Jitted
    (``method``, ``spec``, ``branches``, ``twin_spec`` static), like ``measure``.

    Returns:
      ``(Measurement, branches or None)``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxsplit.quant import QuantSpec
      >>> w = jnp.array([0.5, -0.25, 4.0])
      >>> m, bs = measure_candidate("clip", w, 1.0, spec=QuantSpec(bits=4))
      >>> int(m.extra_nonzero), [b.tolist() for b in bs]
      (1, [[0.5, -0.25, 1.0], [0.0, 0.0, 3.0]])
    """
    args = dict(branches=branches, spec=spec, twin_spec=twin_spec, calibration=calibration)
    if (
        calibration is None
        and method in kernels.RECOMPUTED
        and blocks.blocked(w.shape)
        and _per_tensor(spec, twin_spec)
    ):
        f = kernels.elementwise(method, w, threshold, **args)
        if f is not None:
            return measure_split(w, f, spec, twin_spec=twin_spec), None
    bs = tuple(kernels.split(method, w, threshold, key, **args))
    return measure(w, bs, spec, calibration=calibration, twin_spec=twin_spec), bs


def _per_tensor(spec, twin_spec) -> bool:
    return all(s is None or s.granularity == "per_tensor" for s in (spec, twin_spec))


def _measured(w, arrays, f, spec, twin_spec) -> Measurement:
    """``measure`` (no calibration, per tensor) of the branches ``f(*arrays)``, ``w =
    arrays[0]``: the scales from the branches' extremes, then the errors and counts,
    both in blocks (``jaxsplit.blocks``)."""
    ft = jnp.promote_types(w.dtype, jnp.float32)
    k = len(jax.eval_shape(f, *arrays))
    mixed = twin_spec is not None and twin_spec != spec and k > 1
    specs = (spec,) + ((twin_spec if mixed else spec),) * (k - 1)
    ext = blocks.extremes_in_blocks(lambda *xs: tuple(b.astype(ft) for b in f(*xs)), arrays)
    qps = [quant.qparams(e, s) for e, s in zip(ext, specs, strict=True)]
    pairs = [] if mixed else [(i, j) for i in range(k) for j in range(i + 1, k)]

    def reduce(*xs):
        bs = f(*xs)
        rec = sum(
            quant.quantize(b.astype(ft), s, params=qp)
            for b, s, qp in zip(bs, specs, qps, strict=True)
        )
        err = jnp.sum(jnp.square(rec - xs[0].astype(ft)))
        nz = [b != 0 for b in bs]
        nnz = [jnp.count_nonzero(z).astype(jnp.int32) for z in nz]
        # values that two branches hold alike (Widrow's correlated term)
        same = [jnp.count_nonzero(nz[i] & (bs[j] == bs[i])).astype(jnp.int32) for i, j in pairs]
        return err, nnz, jnp.count_nonzero(xs[0]).astype(jnp.int32), same

    err, nnz, nnz_w, same = blocks.sum_in_blocks(reduce, arrays)
    size = int(w.size)
    s2 = [jnp.square(qp.scale.astype(ft)) for qp in qps]
    twelfth = max(size, 1) * 12
    naive = sum(n.astype(ft) * v for n, v in zip(nnz, s2, strict=True)) / twelfth
    corr = naive + sum(
        (jnp.where(qps[i].scale == qps[j].scale, 2 * c.astype(ft) * s2[i], 0) for (i, j), c
         in zip(pairs, same, strict=True)),
        jnp.zeros((), ft),
    ) / twelfth  # fmt: skip
    extra = sum(nnz, jnp.int32(0)) - nnz_w
    nnz_twins = sum(nnz[1:], jnp.int32(0))
    twin_bits = (twin_spec if mixed else spec).bits
    bits = spec.bits + nnz_twins.astype(jnp.float32) * (twin_bits + INDEX_BITS) / max(size, 1)
    return Measurement(
        (err / size).astype(ft),
        naive.astype(ft),
        corr.astype(ft),
        extra,
        extra.astype(jnp.float32) / max(size, 1),
        jnp.full((), jnp.nan, ft),
        jnp.asarray(bits, jnp.float32),
        nnz_twins,
    )


def measure_counted(
    values: jax.Array,
    counts: jax.Array,
    size,
    branches,
    spec: quant.QuantSpec,
    *,
    twin_spec: quant.QuantSpec | None = None,
) -> Measurement:
    """``measure`` of a kernel given as distinct ``values`` with their ``counts``.

    Each ``values[i]`` (and its branches' values) stands for ``counts[i]`` values of a
    kernel of ``size`` values, every branch quantized with its own scale over ``values``
    (the kernel's scale when ``values`` holds the kernel's values: ``jaxsplit.table``).
    The sums are weighted by the counts: the same figures as ``measure`` of the kernel, up
    to the order of the float32 sums. Widrow's predictions are ``nan`` (as
    ``screen.lean``'s) and so is ``output_error`` (no calibration).

    Args:
      values: ``(n,)`` the distinct values (an entry with count 0 is ignored by the
        sums, but counts in the branches' scales).
      counts: ``(n,)`` integer counts.
      size: the kernel's size (may be traced).
      branches: a sequence of ``(n,)`` arrays, the branches of ``values``.
      spec, twin_spec: as for ``measure`` (per tensor).

    Returns:
      A ``Measurement``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxsplit.quant import QuantSpec
      >>> w = jnp.array([0.1, 0.1, -0.2, 4.0])
      >>> v, n = jnp.array([0.1, -0.2, 4.0]), jnp.array([2, 1, 1])
      >>> bs = (jnp.array([0.1, -0.2, 1.0]), jnp.array([0, 0, 3.0]))
      >>> m = measure_counted(v, n, 4, bs, QuantSpec(bits=4))
      >>> m0 = measure(w, tuple(b[jnp.array([0, 0, 1, 2])] for b in bs), QuantSpec(bits=4))
      >>> bool(jnp.isclose(m.mse, m0.mse)), int(m.extra_nonzero), float(m.effective_bits)
      (True, 1, 9.0)
    """
    branches = tuple(branches)
    ft = jnp.promote_types(values.dtype, jnp.float32)
    mixed = twin_spec is not None and twin_spec != spec and len(branches) > 1
    recon = _recon(branches, spec, ft, twin_spec if mixed else None)
    n = counts.astype(jnp.int32)
    size_f = jnp.maximum(jnp.asarray(size, ft), 1)
    mse = jnp.sum(n.astype(ft) * jnp.square(recon - values.astype(ft))) / size_f

    def nnz(b):
        return jnp.sum(jnp.where(b != 0, n, 0))

    extra = sum((nnz(b) for b in branches), jnp.int32(0)) - nnz(values)
    nnz_twins = sum((nnz(b) for b in branches[1:]), jnp.int32(0))
    twin_bits = twin_spec.bits if mixed else spec.bits
    bits = spec.bits + nnz_twins.astype(jnp.float32) * (twin_bits + INDEX_BITS) / size_f
    nan = jnp.full((), jnp.nan, ft)
    return Measurement(
        mse,
        nan,
        nan,
        extra,
        extra.astype(jnp.float32) / size_f.astype(jnp.float32),
        nan,
        jnp.asarray(bits, jnp.float32),
        nnz_twins,
    )


def _recon(branches, spec, ft, twin_spec=None) -> jax.Array:
    """``sum_i Q(W_i)`` in ``ft``, ``branch_0`` under ``spec``, the others ``twin_spec``."""
    specs = (spec,) + (twin_spec or spec,) * (len(branches) - 1)
    return sum(quant.quantize(b.astype(ft), s) for b, s in zip(branches, specs, strict=True))


def _output_error(err: jax.Array, c: jax.Array) -> jax.Array:
    """``trace(Eᵀ C E)`` with ``E`` the error as ``(d_in, d_out)``."""
    e = err.reshape(1, -1) if err.ndim < 2 else err.reshape(-1, err.shape[-1])
    c = jnp.asarray(c).astype(e.dtype)
    if c.ndim == 1:
        return jnp.sum(c[:, None] * jnp.square(e))
    return jnp.sum((c @ e) * e)


def calibration_check(path: str, shape: tuple[int, ...], c) -> None:
    """Raises unless ``c`` is a valid second moment for a kernel of ``shape``.

    Raises:
      CalibrationError: ``c`` is neither ``(d_in,)`` nor ``(d_in, d_in)``, with
        ``d_in = prod(shape[:-1])`` (a message naming the layer and both shapes).

    Example:
      >>> import numpy as np
      >>> calibration_check("Dense_0", (3, 2), np.ones(3))
      >>> calibration_check("Dense_0", (3, 2), np.ones(2))  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      jaxsplit.errors.CalibrationError: calibration['Dense_0'] has shape (2,); the kernel (3, 2) ...
    """
    d_in = math.prod(shape[:-1])  # 1 for a 1-D kernel
    got = tuple(int(d) for d in getattr(c, "shape", ()))
    if got not in ((d_in,), (d_in, d_in)):
        raise CalibrationError(
            path,
            f"calibration[{path!r}] has shape {got}; the kernel {tuple(shape)} needs "
            f"({d_in},) or ({d_in}, {d_in}) (d_in = {d_in}: all kernel axes but the last)",
        )


def effective_bits(
    size: int, nnz_twins: int, bits: int, twin_bits: int | None = None, index_bits: int = INDEX_BITS
) -> float:
    """Storage bits per weight of a split (see the module docstring's cost model).

    Example:
      >>> effective_bits(1000, 20, 4), effective_bits(1000, 20, 4, twin_bits=8)
      (4.4, 4.48)
    """
    tb = bits if twin_bits is None else twin_bits
    return bits + nnz_twins * (tb + index_bits) / max(size, 1)


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
