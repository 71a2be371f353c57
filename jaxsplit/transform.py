"""``split_params`` / ``merge_params``: select → threshold → kernels, one compiled call per layer.

Eager (concrete arrays): every selected layer is dispatched first and the host syncs
once at the end (split counts, non-finite counts); layers with nothing above the
threshold come back as the same objects. Traced (inside a user's ``jit``): values are
unknown, so the output *structure* is static — every selected float layer gets its
branches (``branch_1`` all zeros where nothing exceeds) and non-finite values simply
stay on ``branch_0`` (as with ``allow_nonfinite=True``). Merging either result gives
the same values.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxsplit import auto, kernels
from jaxsplit.config import Auto, SplitConfig, resolve_parts, threshold_parts
from jaxsplit.select import Layer, find_layers, params_root, select_layers, unwrap

__all__ = [
    "LayerPlan",
    "SplitReport",
    "split_params",
    "split_with_report",
    "merge_params",
    "match_layers",
]

logger = logging.getLogger("jaxsplit")


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """What happens (or would happen) to one selected layer.

    Attributes:
      path: layer path.
      action: ``"split"`` or ``"skip"``.
      reason: why a layer is skipped (``None`` when split).
      n_split: values above the threshold (``None`` when unknown, i.e. traced).
      n_total: number of values in the kernel.
      threshold: the absolute threshold used, as a Python float, or a tuple of floats
        (one per output channel) for per-channel thresholds (``None`` if unknown).
      shape, dtype: the kernel's.
      auto: for an ``Auto`` threshold, the ``AutoChoice`` (method, threshold, MSE before
        and after, extra non-zeros); ``None`` otherwise.
    """

    path: str
    action: str
    reason: str | None
    n_split: int | None
    n_total: int
    threshold: float | tuple[float, ...] | None
    shape: tuple[int, ...]
    dtype: str
    auto: auto.AutoChoice | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class SplitReport:
    """Per-pattern matches and per-layer plans of one split (or dry run).

    Attributes:
      patterns: ``{pattern: matched paths}``.
      layers: one ``LayerPlan`` per selected layer, in tree order.
      available: every layer path in the tree.
    """

    patterns: dict[str, tuple[str, ...]]
    layers: tuple[LayerPlan, ...]
    available: tuple[str, ...]

    @property
    def split_paths(self) -> tuple[str, ...]:
        return tuple(p.path for p in self.layers if p.action == "split")

    @property
    def unmatched(self) -> tuple[str, ...]:
        return tuple(k for k, v in self.patterns.items() if not v)

    def to_dict(self) -> dict[str, Any]:
        return {
            "patterns": {k: list(v) for k, v in self.patterns.items()},
            "layers": [p.to_dict() for p in self.layers],
            "available": list(self.available),
        }


@functools.partial(jax.jit, static_argnames=("kind", "method", "branches", "spec"))
def _split_one(w, value, key, *, kind: str, method: str, branches: int = 2, spec=None):
    """One fused pass: threshold, branches, split count, non-finite count."""
    thr = resolve_parts(kind, value, w)
    ws = kernels.split(method, w, thr, key, branches=branches, spec=spec)
    n_split = jnp.sum(kernels.split_mask(w, thr), dtype=jnp.int32)
    n_bad = jnp.sum(~jnp.isfinite(w), dtype=jnp.int32)
    return ws, n_split, n_bad, thr, None


@functools.partial(jax.jit, static_argnames=("auto_cfg", "method", "branches"))
def _auto_one(w, key, *, auto_cfg: Auto, method: str, branches: int):
    """``_split_one`` for an ``Auto`` threshold: search, then split (one compiled call)."""
    ws, info = auto.search(w, key, auto=auto_cfg, method=method, branches=branches)
    mask = kernels.split_mask(w, info["threshold"]) & info["split"]
    n_bad = jnp.sum(~jnp.isfinite(w), dtype=jnp.int32)
    return ws, jnp.sum(mask, dtype=jnp.int32), n_bad, info["threshold"], info


def _dispatch(w, key, cfg: SplitConfig):
    """The compiled split of one kernel under ``cfg`` (fixed or ``Auto`` threshold)."""
    if isinstance(cfg.threshold, Auto):
        return _auto_one(w, key, auto_cfg=cfg.threshold, method=cfg.method, branches=cfg.branches)
    kind, value = threshold_parts(cfg.threshold)
    return _split_one(
        w, value, key, kind=kind, method=cfg.method, branches=cfg.branches, spec=cfg.spec
    )


def _threshold_value(thr) -> float | tuple[float, ...]:
    """A concrete threshold as a float, or a tuple of floats when per channel."""
    a = np.asarray(thr, np.float64)
    return float(a) if a.size == 1 else tuple(float(x) for x in a.reshape(-1))


def _auto_choice(cfg: SplitConfig, info) -> auto.AutoChoice:
    methods = auto.search_methods(cfg.method, cfg.threshold.spec)
    return auto.choice(info, methods, cfg.threshold.candidates)


@functools.partial(jax.jit, static_argnames=("kind",))
def _count_one(w, value, *, kind: str):
    thr = resolve_parts(kind, value, w)
    return jnp.sum(kernels.split_mask(w, thr), dtype=jnp.int32), jnp.sum(~jnp.isfinite(w)), thr


def _x64(dtype) -> contextlib.AbstractContextManager:
    """float64 kernels need x64 mode (else jax would silently compute in float32)."""
    if jnp.dtype(dtype) == jnp.float64 and not jax.config.jax_enable_x64:
        return jax.enable_x64(True)
    return contextlib.nullcontext()


def _check_layer(layer: Layer) -> str | None:
    """Raises for layers that cannot be split; returns a skip reason or ``None``."""
    w = layer.array
    if layer.branches:
        raise ValueError(
            f"layer {layer.path!r} is already split into {layer.branches} branches; "
            f"call merge_params first (splitting a split tree is not supported)"
        )
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(
            f"layer {layer.path!r}: {layer.weight} has dtype {w.dtype}; only floating "
            f"kernels (float16, bfloat16, float32, float64) can be split"
        )
    if w.size == 0:
        return "empty kernel"
    return None


def _resolve_selection(params, cfg: SplitConfig):
    if not isinstance(cfg, SplitConfig):
        raise TypeError(f"cfg must be a jaxsplit.SplitConfig, got {type(cfg).__name__}")
    if cfg.layers is None or (not callable(cfg.layers) and len(cfg.layers) == 0):
        logger.warning("SplitConfig.layers is %r: nothing is split", cfg.layers)
    selected, matches = select_layers(params, cfg.layers)
    available = tuple(find_layers(params))
    unmatched = [k for k, v in matches.items() if not v]
    if unmatched:
        msg = (
            f"SplitConfig.layers pattern(s) {unmatched} matched no layer; available layer "
            f"paths: {list(available) or '(none: the tree holds no kernel/embedding)'}"
        )
        if cfg.strict:
            raise ValueError(msg)
        logger.warning(msg)
    return selected, matches, available


def _is_traced(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def split_with_report(params: Mapping, cfg: SplitConfig) -> tuple[Mapping, SplitReport]:
    """``split_params`` that also returns the per-layer ``SplitReport``.

    Example:
      >>> import numpy as np
      >>> p = {"Dense_0": {"kernel": np.array([[0.5, 4.0]], np.float32), "bias": np.zeros(2)}}
      >>> p2, rep = split_with_report(p, SplitConfig(layers=["Dense_0"], threshold=1.0))
      >>> rep.layers[0].n_split, p2["Dense_0"]["branch_1"]["kernel"].tolist()
      (1, [[0.0, 2.0]])
    """
    selected, matches, available = _resolve_selection(params, cfg)
    pending = []  # (layer, device outputs) dispatched before any host sync
    plans: dict[str, LayerPlan] = {}
    for layer in selected:
        w = layer.array
        reason = _check_layer(layer)
        if reason is not None:
            plans[layer.path] = _plan(layer, "skip", reason, 0, None)
            continue
        with _x64(w.dtype):
            out = _dispatch(w, _layer_key(cfg, layer), cfg)
        pending.append((layer, out))

    replacements = {}
    for layer, (ws, *stats) in pending:
        if _is_traced(ws[0]):
            plans[layer.path] = _plan(layer, "split", None, None, None)
            replacements[layer.keys] = _branches(layer, ws)
            continue
        plans[layer.path] = plan = _host_plan(layer, cfg, *stats)
        if plan.action == "split":
            ws = [_keep_sharding(w, layer.array) for w in ws]
            replacements[layer.keys] = _branches(layer, ws)

    report = SplitReport(matches, tuple(plans[lay.path] for lay in selected), available)
    if cfg.verbose:
        for plan in report.layers:
            logger.info("%s", _log_line(plan))
    return _rebuild(params, replacements), report


def split_params(params: Mapping, cfg: SplitConfig) -> Mapping:
    """Splits the selected layers of a parameter tree into twin branches.

    Each selected layer ``{'kernel': W, 'bias': b, ...}`` becomes
    ``{'branch_0': {'kernel': W1, 'bias': b, ...}, 'branch_1': {'kernel': W2}}`` with
    ``W1 + W2 == W`` bit for bit. Untouched layers and subtrees are returned as the
    same objects; inputs are never mutated. Pure, and fine inside ``jax.jit`` (see the
    module docstring for the traced rule).

    Args:
      params: linen variables (only ``params`` is touched), a params dict,
        ``FrozenDict``, ``nnx.State`` or its pure dict.
      cfg: a ``SplitConfig``.

    Returns:
      A new tree of the same container types.

    Raises:
      ValueError: a pattern matched no layer (``strict``), a selected layer is already
        split, or holds NaN/inf (unless ``allow_nonfinite``).
      TypeError: ``cfg`` is not a ``SplitConfig``, or a selected kernel is not floating.

    Example:
      >>> import numpy as np
      >>> from jaxsplit import SplitConfig
      >>> p = {"Dense_0": {"kernel": np.array([[0.5, -4.0]], np.float32), "bias": np.zeros(2)}}
      >>> p2 = split_params(p, SplitConfig(layers=["Dense_0"], threshold=1.0))
      >>> sorted(p2["Dense_0"]), p2["Dense_0"]["branch_0"]["kernel"].tolist()
      (['branch_0', 'branch_1'], [[0.5, -2.0]])
    """
    return split_with_report(params, cfg)[0]


def match_layers(params: Mapping, cfg: SplitConfig) -> SplitReport:
    """Dry run: which paths each pattern matches and what would happen to each layer.

    Raises like ``split_params`` (unmatched pattern under ``strict``, non-float or
    already-split layers, non-finite values) but computes no branches.

    Example:
      >>> import numpy as np
      >>> p = {"a": {"kernel": np.array([3.0, 0.1])}, "b": {"kernel": np.array([0.2])}}
      >>> rep = match_layers(p, SplitConfig(layers=["*"], threshold=1.0))
      >>> [(q.path, q.action, q.reason) for q in rep.layers]
      [('a', 'split', None), ('b', 'skip', 'no value above threshold')]
    """
    selected, matches, available = _resolve_selection(params, cfg)
    plans = []
    for layer in selected:
        reason = _check_layer(layer)
        if reason is not None:
            plans.append(_plan(layer, "skip", reason, 0, None))
            continue
        with _x64(layer.array.dtype):
            if isinstance(cfg.threshold, Auto):  # the search is the dry run's answer
                stats = _dispatch(layer.array, _layer_key(cfg, layer), cfg)[1:]
            else:
                kind, value = threshold_parts(cfg.threshold)
                stats = (*_count_one(layer.array, value, kind=kind), None)
        plans.append(_host_plan(layer, cfg, *stats))
    return SplitReport(matches, tuple(plans), available)


def _layer_key(cfg: SplitConfig, layer: Layer):
    return kernels.stochastic_key(cfg.seed, layer.path) if cfg.method == "random" else None


def _host_plan(layer: Layer, cfg: SplitConfig, n_split, n_bad, thr, info) -> LayerPlan:
    """The ``LayerPlan`` from one layer's concrete statistics (a host sync).

    Raises:
      ValueError: non-finite values without ``cfg.allow_nonfinite``.
    """
    n_split, n_bad, thr = int(n_split), int(n_bad), _threshold_value(thr)
    if n_bad and not cfg.allow_nonfinite:
        raise ValueError(
            f"layer {layer.path!r}: {layer.weight} holds {n_bad} non-finite "
            f"value(s) (NaN/inf); pass allow_nonfinite=True to keep them on "
            f"branch_0"
        )
    choice = None if info is None else _auto_choice(cfg, info)
    if choice is not None and not choice.split:
        why = "no candidate beats not splitting"
        return _plan(layer, "skip", why, 0, None, choice)
    if n_split == 0:
        return _plan(layer, "skip", "no value above threshold", 0, thr, choice)
    return _plan(layer, "split", None, n_split, thr, choice)


def merge_params(params2: Mapping) -> Mapping:
    """Sums every split layer's branches back into one layer (inverse of ``split_params``).

    ``merge_params(split_params(p, cfg))`` equals ``p`` bit for bit. Unsplit layers are
    returned as the same objects.

    Raises:
      ValueError: a branch other than ``branch_0`` holds leaves besides its kernel (they
        would be lost), or branch kernels disagree in shape/dtype.

    Example:
      >>> import numpy as np
      >>> from jaxsplit import SplitConfig, split_params
      >>> p = {"d": {"kernel": np.array([0.3, 7.0], np.float32)}}
      >>> m = merge_params(split_params(p, SplitConfig(layers=["d"], threshold=1.0)))
      >>> np.array_equal(m["d"]["kernel"], p["d"]["kernel"])
      True
    """
    replacements = {}
    for layer in find_layers(params2).values():
        if not layer.branches:
            continue
        node, wname = layer.node, layer.weight
        ws = []
        for i in range(layer.branches):
            b = node[f"branch_{i}"]
            extra = [str(k) for k in b if k != wname]
            if i and extra:
                raise ValueError(
                    f"layer {layer.path!r}: branch_{i} holds {extra} besides "
                    f"{wname!r}; only branch_0 may carry bias/other leaves"
                )
            ws.append(unwrap(b[wname]))
        if any(w.shape != ws[0].shape or w.dtype != ws[0].dtype for w in ws):
            raise ValueError(
                f"layer {layer.path!r}: branch kernels disagree: "
                f"{[(tuple(w.shape), str(w.dtype)) for w in ws]}"
            )
        with _x64(ws[0].dtype):
            total = _keep_sharding(_sum(*ws), ws[0])
        b0 = node["branch_0"]
        replacements[layer.keys] = _like(
            b0, {k: (_wrap_like(v, total) if k == wname else v) for k, v in b0.items()}
        )
    return _rebuild(params2, replacements)


@jax.jit
def _sum(*ws):
    return functools.reduce(jnp.add, ws)


# --- tree plumbing -------------------------------------------------------------------------


def _plan(layer: Layer, action, reason, n_split, thr, choice=None) -> LayerPlan:
    w = layer.array
    return LayerPlan(
        layer.path,
        action,
        reason,
        n_split,
        int(w.size),
        thr,
        tuple(w.shape),
        str(w.dtype),
        choice,
    )


def _log_line(plan: LayerPlan) -> str:
    t = plan.threshold
    if t is None:
        thr = "traced"
    elif isinstance(t, tuple):
        thr = f"per channel {min(t):.6g}..{max(t):.6g}"
    else:
        thr = f"{t:.6g}"
    if plan.auto is not None:
        a = plan.auto
        thr += (
            f", auto: {a.method or 'none'}, mse {a.mse_unsplit:.3g} -> {a.mse:.3g}, "
            f"extra {a.extra:.2%}"
        )
    if plan.action == "split":
        n = "?" if plan.n_split is None else plan.n_split
        return f"{plan.path}: split {n}/{plan.n_total} values (threshold {thr})"
    return f"{plan.path}: skipped, {plan.reason} (threshold {thr})"


def _like(node: Mapping, items: dict) -> Mapping:
    """A mapping of ``node``'s type (dict, FrozenDict, nnx.State) holding ``items``."""
    try:
        return type(node)(items)
    except TypeError:
        return dict(items)


def _wrap_like(original, value):
    """``value`` wrapped like ``original`` (an ``nnx.Variable`` stays a Variable)."""
    if hasattr(original, "replace") and hasattr(original, "get_value"):
        return original.replace(value)
    return value


def _keep_sharding(out, like):
    sharding = getattr(like, "sharding", None)
    if sharding is None or _is_traced(out) or not isinstance(like, jax.Array):
        return out
    return out if out.sharding == sharding else jax.device_put(out, sharding)


def _branches(layer: Layer, ws) -> Mapping:
    """``{'branch_0': {..., weight: ws[0]}, 'branch_i': {weight: ws[i]}}``; other leaves on 0."""
    node, wname = layer.node, layer.weight
    orig = node[wname]
    out = {
        "branch_0": _like(
            node, {k: (_wrap_like(orig, ws[0]) if k == wname else v) for k, v in node.items()}
        )
    }
    for i, w in enumerate(ws[1:], start=1):
        out[f"branch_{i}"] = _like(node, {wname: _wrap_like(orig, w)})
    return _like(node, out)


def _rebuild(tree: Mapping, replacements: dict[tuple, Mapping]) -> Mapping:
    """A copy of ``tree`` with the nodes at the given key paths (from the params root)
    replaced; subtrees without replacements are returned as the same objects."""
    if not replacements:
        return tree
    _, prefix = params_root(tree)
    full = {(*prefix, *keys): node for keys, node in replacements.items()}
    prefixes = {keys[:i] for keys in full for i in range(len(keys))}

    def go(node: Mapping, keys: tuple):
        if keys in full:
            return full[keys]
        if keys not in prefixes:
            return node
        return _like(
            node, {k: go(v, (*keys, k)) if isinstance(v, Mapping) else v for k, v in node.items()}
        )

    return go(tree, ())
