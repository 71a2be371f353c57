"""An independent float64 numpy reference for simulated quantization (shared by tests)."""

import numpy as np

from jaxsplit.quant import QuantSpec


def ref_quantize(x, spec: QuantSpec) -> np.ndarray:
    """Independent float64 reference with exact division."""
    x = np.asarray(x, np.float64)
    if spec.granularity == "per_tensor":
        axes = None
    else:
        ax = spec.axis % x.ndim
        axes = tuple(i for i in range(x.ndim) if i != ax)
    if spec.symmetric:
        s = np.max(np.abs(x), axis=axes, keepdims=True) / spec.qmax
        zp = np.zeros_like(s)
    else:
        lo = np.minimum(np.min(x, axis=axes, keepdims=True), 0)
        hi = np.maximum(np.max(x, axis=axes, keepdims=True), 0)
        s = (hi - lo) / (spec.qmax - spec.qmin)
        with np.errstate(divide="ignore", invalid="ignore"):
            zp = np.clip(np.round(spec.qmin - lo / s), spec.qmin, spec.qmax)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = (np.clip(np.round(x / s) + zp, spec.qmin, spec.qmax) - zp) * s
    return np.where(s > 0, q, 0.0)


def ref_scale(x, spec: QuantSpec) -> np.ndarray:
    """Symmetric scale in float64 (scalar per tensor, one per channel otherwise)."""
    x = np.asarray(x, np.float64)
    if spec.granularity == "per_tensor":
        return np.max(np.abs(x)) / spec.qmax
    ax = spec.axis % x.ndim
    axes = tuple(i for i in range(x.ndim) if i != ax)
    return np.max(np.abs(x), axis=axes, keepdims=True) / spec.qmax


def ref_layer(w, branches, spec: QuantSpec) -> dict:
    """Every figure of a quant_error row, computed independently in float64 numpy."""
    w = np.asarray(w, np.float64)
    bs = [np.asarray(b, np.float64) for b in branches]
    after = sum(ref_quantize(b, spec) for b in bs)

    def widrow(x):
        return np.mean((x != 0) * np.broadcast_to(ref_scale(x, spec), x.shape) ** 2) / 12

    def rms(s):
        return float(np.sqrt(np.mean(np.square(s))))

    nz = np.stack([b != 0 for b in bs])
    return {
        "n_split": int(np.sum(nz.sum(0) >= 2)) if len(bs) > 1 else 0,
        "extra_nonzero": int(nz.sum() - np.sum(w != 0)),
        "maxabs": float(np.max(np.abs(w))),
        "maxabs_branches": [float(np.max(np.abs(b))) for b in bs],
        "scale": rms(ref_scale(w, spec)),
        "scale_branches": [rms(ref_scale(b, spec)) for b in bs],
        "mse_before": float(np.mean((ref_quantize(w, spec) - w) ** 2)),
        "mse_after": float(np.mean((after - w) ** 2)),
        "pred_before": widrow(w),
        "pred_after": sum(widrow(b) for b in bs),
        "signal": float(np.mean(w**2)),
    }


# --- the exact reference (bit-identical target of quant.quantize) ----------------------------


def compute_dtype(dtype) -> np.dtype:
    """The reference's compute dtype: float32, or float64 for float64 input."""
    return np.promote_types(np.dtype(dtype), np.float32)


def _exact_one(v: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, np.generic, np.generic]:
    """Quantize the values ``v`` (compute dtype) with one scale: ``(q, scale, zero_point)``.

    Every numpy operation on arrays of one float dtype is correctly rounded in that dtype
    (numpy's ``/`` is a true IEEE division), which is the definition the library matches.
    """
    ft = v.dtype.type
    qmin, qmax = ft(spec.qmin), ft(spec.qmax)
    zero = ft(0)
    if spec.symmetric:
        s = (np.max(np.abs(v)) if v.size else zero) / qmax
        zp = zero
    else:
        lo = min(np.min(v), zero) if v.size else zero
        hi = max(np.max(v), zero) if v.size else zero
        s = ft(hi - lo) / ft(spec.qmax - spec.qmin)
        zp = np.clip(np.rint(qmin - lo / s), qmin, qmax) if s > 0 else qmin
    if not s > 0:
        return np.zeros_like(v), ft(s), ft(zp)
    if spec.symmetric:  # the sign of a zero survives: rint(-0.3 / s) * s == -0.0
        q = np.clip(np.rint(v / s), qmin, qmax) * s
    else:
        q = (np.clip(np.rint(v / s) + zp, qmin, qmax) - zp) * s
    return q.astype(v.dtype), ft(s), ft(zp)


def ref_quantize_exact(x, spec: QuantSpec, *, with_params: bool = False):
    """Independent element-by-group numpy reference, in ``compute_dtype(x.dtype)``.

    Loops over the tensor / each channel / each (group, channel) explicitly, so it shares
    no layout code with the library. Returns ``Q(x)`` cast back to ``x``'s dtype, and with
    ``with_params`` also ``(scale, zero_point)`` in the shapes ``quant.QParams`` documents.
    """
    x = np.asarray(x)
    ft = compute_dtype(x.dtype)
    xf = x.astype(ft)
    if spec.granularity == "per_tensor":
        q, s, zp = _exact_one(xf.ravel(), spec)
        out, scales, zps = q.reshape(x.shape), np.asarray(s), np.asarray(zp)
    elif spec.granularity == "per_channel":
        ax = spec.axis % x.ndim
        out = np.empty_like(xf)
        pshape = [1] * x.ndim
        pshape[ax] = x.shape[ax]
        scales, zps = np.empty(x.shape[ax], ft), np.empty(x.shape[ax], ft)
        for c in range(x.shape[ax]):
            idx = (slice(None),) * ax + (c,)
            q, scales[c], zps[c] = _exact_one(xf[idx].ravel(), spec)
            out[idx] = q.reshape(xf[idx].shape)
        scales, zps = scales.reshape(pshape), zps.reshape(pshape)
    else:
        ax = spec.axis % x.ndim
        moved = np.moveaxis(xf, ax, -1)
        d_out = moved.shape[-1]
        flat = moved.reshape(-1, d_out)  # C order over the other axes
        d_in, g = flat.shape[0], spec.group_size
        n_groups = max(1, -(-d_in // g))
        qflat = np.empty_like(flat)
        scales, zps = np.empty((n_groups, d_out), ft), np.empty((n_groups, d_out), ft)
        for c in range(d_out):
            for k in range(n_groups):
                rows = slice(k * g, min((k + 1) * g, d_in))
                qflat[rows, c], scales[k, c], zps[k, c] = _exact_one(flat[rows, c], spec)
        out = np.moveaxis(qflat.reshape(moved.shape), -1, ax)
    out = out.astype(x.dtype)
    return (out, scales, zps) if with_params else out
