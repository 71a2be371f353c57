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
