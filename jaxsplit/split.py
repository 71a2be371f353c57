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

import dataclasses
import functools
import logging
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxsplit import host, kernels, programs, search, table
from jaxsplit.config import Auto, SplitConfig
from jaxsplit.errors import (
    AlreadySplitError,
    CalibrationError,
    ConfigError,
    ConfigTypeError,
    NonFiniteError,
    UnmatchedPatternError,
    UnsplittableError,
)
from jaxsplit.measure import calibration_check
from jaxsplit.select import select_layers
from jaxsplit.thresholds import channel_axis
from jaxsplit.tree import (
    Layer,
    branch_name,
    branch_weights,
    find_layers,
    is_traced,
    keep_sharding,
    like,
    make_branches,
    rebuild,
    wrap_like,
    x64,
)

__all__ = [
    "LayerPlan",
    "SplitReport",
    "split_params",
    "split_with_report",
    "merge_params",
    "match_layers",
    "check_layer",
    "resolve_selection",
    "check_calibration",
    "check_sensitivity",
    "LayerCurve",
    "tree_curves",
    "tree_picks",
    "tree_splits",
    "TreePlan",
    "plan_tree",
    "split_planned",
    "tree_choice",
    "tabled",
    "tabled_curve",
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
    auto: search.AutoChoice | None = None

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


def check_layer(layer: Layer) -> str | None:
    """Raises for a layer that cannot be split; returns a skip reason or ``None``.

    Raises:
      AlreadySplitError: the layer is already split (a ``ValueError``).
      UnsplittableError: its weight is not floating point (a ``TypeError``).

    Example:
      >>> import numpy as np
      >>> from jaxsplit.tree import find_layers
      >>> check_layer(find_layers({"d": {"kernel": np.zeros((0, 2))}})["d"])
      'empty kernel'
    """
    w = layer.array
    if layer.branches:
        raise AlreadySplitError(
            layer.path,
            f"layer {layer.path!r} is already split into {layer.branches} branches; "
            f"call merge_params first (splitting a split tree is not supported)",
        )
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise UnsplittableError(
            layer.path,
            f"layer {layer.path!r}: {layer.weight} has dtype {w.dtype}; only floating "
            f"kernels (float16, bfloat16, float32, float64) can be split",
        )
    if w.size == 0:
        return "empty kernel"
    return None


def resolve_selection(params: Mapping, cfg: SplitConfig):
    """``(selected layers, {pattern: matched paths}, available paths)`` for ``cfg.layers``.

    Raises:
      ConfigTypeError: ``cfg`` is not a ``SplitConfig``.
      UnmatchedPatternError: a pattern matched no layer and ``cfg.strict`` (else a
        warning is logged).

    Example:
      >>> import numpy as np
      >>> sel, matches, avail = resolve_selection({"d": {"kernel": np.ones(2)}},
      ...                                         SplitConfig(layers=["*"]))
      >>> [lay.path for lay in sel], matches, avail
      (['d'], {'*': ('d',)}, ('d',))
    """
    if not isinstance(cfg, SplitConfig):
        raise ConfigTypeError(
            "split", "cfg", f"cfg must be a jaxsplit.SplitConfig, got {type(cfg).__name__}"
        )
    if cfg.layers is None or (not callable(cfg.layers) and len(cfg.layers) == 0):
        logger.warning("SplitConfig.layers is %r: nothing is split", cfg.layers)
    found = find_layers(params, cfg.weights)
    selected, matches = select_layers(params, cfg.layers, cfg.weights, found=found)
    available = tuple(found)
    unmatched = [k for k, v in matches.items() if not v]
    if unmatched:
        err = UnmatchedPatternError(unmatched, available)
        if cfg.strict:
            raise err
        logger.warning("%s", err)
    return selected, matches, available


def split_with_report(
    params: Mapping,
    cfg: SplitConfig,
    *,
    donate: bool = False,
    calibration: Mapping | None = None,
    sensitivity: Mapping | None = None,
) -> tuple[Mapping, SplitReport]:
    """``split_params`` that also returns the per-layer ``SplitReport``.

    Args:
      params: as for ``split_params``.
      cfg: a ``SplitConfig``.
      donate: as for ``split_params``.
      calibration: as for ``split_params``.
      sensitivity: as for ``split_params``.

    Returns:
      ``(new_tree, report)``.

    Raises:
      ValueError, TypeError: as ``split_params``.

    Example:
      >>> import numpy as np
      >>> p = {"Dense_0": {"kernel": np.array([[0.5, 4.0]], np.float32), "bias": np.zeros(2)}}
      >>> p2, rep = split_with_report(p, SplitConfig(layers=["Dense_0"], threshold=1.0))
      >>> rep.layers[0].n_split, p2["Dense_0"]["branch_1"]["kernel"].tolist()
      (1, [[0.0, 2.0]])
    """
    if not isinstance(donate, bool):
        raise ConfigTypeError(
            "split_params",
            "donate",
            f"donate must be a bool, got {donate!r} ({type(donate).__name__})",
        )
    selected, matches, available = resolve_selection(params, cfg)
    calib = check_calibration(calibration, selected, available)
    sens = check_sensitivity(sensitivity, selected, available, cfg)
    plans, todo = _checked(selected)
    if isinstance(cfg.threshold, Auto):
        run = functools.partial(_run_auto, donate=donate, calibration=calib, sensitivity=sens)
    else:
        run = _run_donated if donate else _run_fused
    replacements = {}
    for layer, ws, n_split, thr, *choice in run(todo, cfg):
        plans[layer.path] = plan = _result_plan(layer, n_split, thr, *choice)
        if plan.action == "skip":
            continue
        replacements[layer.keys] = make_branches(layer, [keep_sharding(w, layer.array) for w in ws])

    report = SplitReport(matches, tuple(plans[lay.path] for lay in selected), available)
    if cfg.verbose:
        for plan in report.layers:
            logger.info("%s", _log_line(plan))
    return rebuild(params, replacements), report


def split_params(
    params: Mapping,
    cfg: SplitConfig,
    *,
    donate: bool = False,
    calibration: Mapping | None = None,
    sensitivity: Mapping | None = None,
) -> Mapping:
    """Splits the selected layers of a parameter tree into twin branches.

    Each selected layer ``{'kernel': W, 'bias': b, ...}`` becomes
    ``{'branch_0': {'kernel': W1, 'bias': b, ...}, 'branch_1': {'kernel': W2}}`` with
    ``W1 + W2 == W`` bit for bit. Untouched layers and subtrees are returned as the
    same objects; inputs are never mutated. Pure, and fine inside ``jax.jit`` (see the
    module docstring for the traced rule). Each kernel is one compiled call (cached per
    shape and dtype) and the host syncs once per call, not once per layer.

    Args:
      params: linen variables (only ``params`` is touched), a params dict,
        ``FrozenDict``, ``nnx.State`` or its pure dict.
      cfg: a ``SplitConfig``.
      donate: let the split consume the selected kernels that are split: each such
        ``jax.Array`` is donated to its split, so ``branch_0`` can reuse its buffer and
        peak memory stays near ``2 ×`` the tree instead of ``3 ×``. The donated input
        arrays are deleted (using them afterwards raises). Statistics and every check
        run for all layers before anything is donated, so an error loses nothing.
        Numpy kernels, kernels shared by several selected layers, skipped layers and
        traced values are never donated. Under an ``Auto`` threshold the search runs
        first for every layer (and every check), then each split donates its kernel.
      calibration: ``{layer path: second moment of its inputs}`` (``js.calibrate``
        builds it): ``(d_in,)`` per-input-feature mean squares or ``(d_in, d_in)``
        ``E[x xᵀ]``, ``d_in`` the product of all kernel axes but the last. ``Auto``
        then scores candidates by the expected output error ``trace(Eᵀ C E)``
        (``jaxsplit.measure``) instead of the weight MSE; selected layers without an
        entry keep the weight MSE. Ignored by fixed thresholds.
      sensitivity: ``{layer path: s}`` (``js.sensitivity`` builds it), each selected
        layer's end-to-end weight: the output cost per unit of squared weight error
        (finite, ``>= 0``). ``Auto(scope="tree")`` then allocates its budget to minimise
        ``sum_l s_l × score_l`` (the predicted output cost) instead of the unweighted
        sum, and needs an entry for every selected layer. Each layer's choice within
        its own budget is unchanged by a positive weight, so ``scope="layer"`` and fixed
        thresholds ignore it.

    Returns:
      A new tree of the same container types.

    Raises:
      UnmatchedPatternError: a pattern matched no layer (``strict``).
      AlreadySplitError: a selected layer is already split.
      NonFiniteError: a selected layer holds NaN/inf (unless ``allow_nonfinite``).
      ConfigTypeError: ``cfg`` is not a ``SplitConfig`` or ``donate`` is not a bool.
      UnsplittableError: a selected kernel is not floating.
      CalibrationError: a calibration entry names no layer or has the wrong shape; a
        sensitivity entry names no layer, is not a finite number ``>= 0``, or (tree
        scope) a selected layer has none.
      (All are ``ValueError`` or ``TypeError`` subclasses, see ``jaxsplit.errors``.)

    Example:
      >>> import numpy as np
      >>> from jaxsplit import SplitConfig
      >>> p = {"Dense_0": {"kernel": np.array([[0.5, -4.0]], np.float32), "bias": np.zeros(2)}}
      >>> p2 = split_params(p, SplitConfig(layers=["Dense_0"], threshold=1.0))
      >>> sorted(p2["Dense_0"]), p2["Dense_0"]["branch_0"]["kernel"].tolist()
      (['branch_0', 'branch_1'], [[0.5, -2.0]])
    """
    return split_with_report(
        params, cfg, donate=donate, calibration=calibration, sensitivity=sensitivity
    )[0]


def check_calibration(
    calibration: Mapping | None, selected: list[Layer], available
) -> dict[str, jax.Array]:
    """The calibration entries of the selected layers, validated (see ``split_params``).

    Raises:
      ConfigTypeError: ``calibration`` is not a mapping.
      CalibrationError: a key is no layer path (the message lists the paths), or an
        entry's shape does not fit its kernel (it shows both).

    Example:
      >>> import numpy as np
      >>> lay = find_layers({"d": {"kernel": np.ones((3, 2))}})["d"]
      >>> sorted(check_calibration({"d": np.ones(3)}, [lay], ["d"]))
      ['d']
      >>> check_calibration({"e": np.ones(3)}, [lay], ["d"])
      Traceback (most recent call last):
      ...
      jaxsplit.errors.CalibrationError: calibration key 'e' is not a layer path; available: ['d']
    """
    if calibration is None:
        return {}
    _check_paths(calibration, "calibration", "array", available)
    out = {}
    for layer in selected:
        c = calibration.get(layer.path)
        if c is None:
            continue
        calibration_check(layer.path, tuple(layer.array.shape), c)
        out[layer.path] = jnp.asarray(c, jnp.promote_types(layer.array.dtype, jnp.float32))
    return out


def _check_paths(mapping, name: str, value: str, available) -> None:
    """Raises unless ``mapping`` (``split_params``'s argument ``name``) is a mapping whose
    keys are all layer paths (``ConfigTypeError`` / ``CalibrationError``)."""
    if not isinstance(mapping, Mapping):
        raise ConfigTypeError(
            "split_params",
            name,
            f"{name} must be a mapping {{layer path: {value}}} or None, got "
            f"{type(mapping).__name__}",
        )
    avail = set(available)
    for k in mapping:
        if k not in avail:
            raise CalibrationError(
                str(k), f"{name} key {k!r} is not a layer path; available: {list(available)}"
            )


def check_sensitivity(
    sensitivity: Mapping | None, selected: list[Layer], available, cfg: SplitConfig
) -> dict[str, float]:
    """The sensitivity weights of the selected layers, validated (see ``split_params``).

    Raises:
      ConfigTypeError: ``sensitivity`` is not a mapping.
      CalibrationError: a key is no layer path, a value is not a finite number
        ``>= 0``, or under ``Auto(scope="tree")`` a selected layer has no entry.

    Example:
      >>> import numpy as np
      >>> from jaxsplit import Auto, QuantSpec
      >>> lay = find_layers({"d": {"kernel": np.ones((3, 2))}})["d"]
      >>> cfg = SplitConfig(layers=["d"], threshold=Auto(QuantSpec(bits=4), max_extra=0.1,
      ...                   scope="tree"))
      >>> check_sensitivity({"d": 2}, [lay], ["d"], cfg)
      {'d': 2.0}
      >>> check_sensitivity({"d": -1.0}, [lay], ["d"], cfg)
      Traceback (most recent call last):
      ...
      jaxsplit.errors.CalibrationError: sensitivity of layer 'd' must be a finite number >= 0, ...
    """
    if sensitivity is None:
        return {}
    _check_paths(sensitivity, "sensitivity", "float", available)
    for k, v in sensitivity.items():
        ok = isinstance(v, int | float | np.number) and not isinstance(v, bool)
        if not ok or not np.isfinite(v) or v < 0:
            raise CalibrationError(
                str(k), f"sensitivity of layer {k!r} must be a finite number >= 0, got {v!r}"
            )
    out = {lay.path: float(sensitivity[lay.path]) for lay in selected if lay.path in sensitivity}
    a = cfg.threshold
    if sensitivity and isinstance(a, Auto) and a.scope == "tree":
        missing = [lay.path for lay in selected if lay.path not in out]
        if missing:
            raise CalibrationError(
                missing[0], f"Auto(scope='tree') weights every selected layer by its "
                f"sensitivity: no entry for {missing}",
            )  # fmt: skip
    elif sensitivity:
        logger.warning("sensitivity only changes Auto(scope='tree') choices: ignored here")
    return out


def match_layers(
    params: Mapping,
    cfg: SplitConfig,
    *,
    calibration: Mapping | None = None,
    sensitivity: Mapping | None = None,
) -> SplitReport:
    """Dry run: which paths each pattern matches and what would happen to each layer.

    Raises like ``split_params`` (unmatched pattern under ``strict``, non-float or
    already-split layers, non-finite values) but computes no branches: one read of each
    selected kernel, one host sync.

    Example:
      >>> import numpy as np
      >>> p = {"a": {"kernel": np.array([3.0, 0.1])}, "b": {"kernel": np.array([0.2])}}
      >>> rep = match_layers(p, SplitConfig(layers=["*"], threshold=1.0))
      >>> [(q.path, q.action, q.reason) for q in rep.layers]
      [('a', 'split', None), ('b', 'skip', 'no value above threshold')]
    """
    selected, matches, available = resolve_selection(params, cfg)
    calib = check_calibration(calibration, selected, available)
    sens = check_sensitivity(sensitivity, selected, available, cfg)
    plans, todo = _checked(selected)
    if isinstance(cfg.threshold, Auto):  # the search is the dry run's answer
        for layer, _, n, thr, choice in _run_auto(todo, cfg, calibration=calib, sensitivity=sens):
            plans[layer.path] = _result_plan(layer, n, thr, choice)
        return SplitReport(matches, tuple(plans[lay.path] for lay in selected), available)
    for layer, (n, thr) in zip(
        todo, _host_stats(todo, _dispatch_stats(todo, cfg), cfg), strict=True
    ):
        action, why = ("split", None) if n else ("skip", "no value above threshold")
        plans[layer.path] = _plan(layer, action, why, n, thr)
    return SplitReport(matches, tuple(plans[lay.path] for lay in selected), available)


# --- execution: fused (one program per kernel) or two-phase with donation -------------------


def _checked(selected: list[Layer]) -> tuple[dict[str, LayerPlan], list[Layer]]:
    """Skip plans for layers that cannot be processed, and the layers that can."""
    plans, todo = {}, []
    for layer in selected:
        reason = check_layer(layer)
        if reason is None:
            todo.append(layer)
        else:
            plans[layer.path] = _plan(layer, "skip", reason, 0, None)
    return plans, todo


def _key(cfg: SplitConfig, layer: Layer):
    return kernels.stochastic_key(cfg.seed, layer.path) if cfg.method == "random" else None


def _method_args(cfg: SplitConfig) -> dict:
    return {"method": cfg.method, "branches": cfg.branches, "spec": cfg.spec}


def _result_plan(layer: Layer, n_split, thr, choice=None) -> LayerPlan:
    """The plan of a processed layer (``n_split`` is ``None`` when traced)."""
    if choice is not None and not choice.split:
        return _plan(layer, "skip", "no candidate beats not splitting", 0, None, choice)
    if n_split == 0:
        return _plan(layer, "skip", "no value above threshold", 0, thr, choice)
    return _plan(layer, "split", None, n_split, thr, choice)


def _run_auto(
    todo: list[Layer], cfg: SplitConfig, *, donate: bool = False, calibration=None,
    sensitivity=None,
):  # fmt: skip
    """Yields ``(layer, branches, n_split, threshold, AutoChoice | None)``: each kernel's
    search and split as one program, all dispatched before the single host sync.

    With ``donate``, every kernel's non-finite check runs first (a statistics pass that
    consumes nothing), then each search-and-split program donates its kernel."""
    a = cfg.threshold
    calibration = calibration or {}
    if a.scope == "tree":
        yield from _run_tree(
            todo, cfg, donate=donate, calibration=calibration, sensitivity=sensitivity
        )
        return
    static = dataclasses.replace(a, max_extra=None)  # the budget is data: one program
    budget = jnp.float32(jnp.inf if a.max_extra is None else a.max_extra)
    donating = donate and not any(is_traced(layer.array) for layer in todo)
    if donating:  # phase 1: checks only (raises before anything is consumed)
        stats = [_stats(layer.array, "absolute", jnp.inf, None) for layer in todo]
        _host_stats(todo, stats, cfg)
        seen = _usage(todo)
    outs = []
    for layer in todo:
        w = layer.array
        fn = programs.auto_fused
        if donating and _donatable(w, seen):
            fn = programs.auto_fused_donated
        with x64(w.dtype):
            outs.append(
                fn(w, _key(cfg, layer), budget, calibration.get(layer.path), auto_cfg=static,
                   method=cfg.method, branches=cfg.branches)
            )  # fmt: skip
    host = _host_stats(todo, [(counts, thr) for _, counts, thr, _ in outs], cfg)
    infos = jax.device_get([info for _, _, _, info in outs if not is_traced(info["split"])])
    infos = iter(infos)
    methods = search.search_methods(cfg.method, a.spec)
    for layer, (ws, *_), (n, thr) in zip(todo, outs, host, strict=True):
        size = int(ws[0].size)
        choice = None if n is None else search.choice(next(infos), methods, a.candidates, size=size)
        yield layer, ws, n, thr, choice


def _run_tree(
    todo: list[Layer], cfg: SplitConfig, *, donate: bool, calibration: dict, sensitivity=None
):
    """``Auto(scope="tree")``: every layer's candidate curve (``tree_curves``), the
    allocation of the shared budget on the host (``tree_picks``), then one program per
    chosen split (``tree_splits``)."""
    if any(is_traced(layer.array) for layer in todo):
        raise ConfigError(
            "Auto",
            "scope",
            "Auto.scope='tree' chooses on the host and needs concrete arrays; inside "
            "jax.jit use scope='layer'",
        )
    curves, tables = _tree_curves(todo, cfg, calibration)
    curves_by_path = {lay.path: c for lay, c in zip(todo, curves, strict=True)}
    plan = plan_tree(curves_by_path, cfg, sensitivity=sensitivity)
    picks = [plan.picks[lay.path] for lay in todo]
    yield from _tree_splits(
        todo, curves, picks, cfg, donate=donate, budget_total=plan.budget,
        calibration=calibration, tables=tables,
    )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class LayerCurve:
    """One layer's ``Auto`` candidates on the host: pass 1 of ``Auto(scope="tree")``.

    Attributes:
      thresholds: ``(candidates, ...)`` the candidate thresholds (numpy).
      m: the ``Measurement`` of every candidate, arrays ``(methods, candidates)``
        (screened curves: ``inf`` errors where a candidate was not measured).
      base: the ``Measurement`` of not splitting.
      score: ``(methods, candidates)`` the figure minimised (``search.curve``).
      score0: the score of not splitting.
      size: the kernel's size.
    """

    thresholds: np.ndarray
    m: Any
    base: Any
    score: np.ndarray
    score0: float
    size: int


def tree_curves(
    layers: list[Layer], cfg: SplitConfig, *, calibration: Mapping | None = None
) -> list[LayerCurve]:
    """Every layer's candidate curve under ``cfg.threshold`` (an ``Auto``), one host sync.

    Non-finite kernels raise first (unless ``cfg.allow_nonfinite``). 16-bit kernels
    where ``table.applies`` (per-tensor specs, no ``random``, no calibration) get
    ``search.table_curve`` (every candidate measured exactly on the kernel's distinct
    values, and ``tree_splits`` gathers the chosen split from them); other kernels where
    ``search.screens`` holds get ``search.screened_curve`` (a few candidates measured at
    the layer's own budget and at ``screen.TREE_LEVELS`` multiples of it), the others
    ``search.curve`` (all measured). The streamed split calls it one layer at a time:
    the curves are the same either way.

    Raises:
      NonFiniteError: a kernel holds NaN/inf (unless ``allow_nonfinite``).

    Example:
      >>> import numpy as np
      >>> from jaxsplit import Auto, QuantSpec
      >>> lay = find_layers({"d": {"kernel": np.array([0.01, -0.02, 4.0], np.float32)}})["d"]
      >>> cfg = SplitConfig(layers=["d"], threshold=Auto(QuantSpec(bits=4), candidates=4,
      ...                   max_extra=0.5, scope="tree"), method="clip")
      >>> c, = tree_curves([lay], cfg)
      >>> c.score.shape, c.size, bool(c.score.min() < c.score0)
      ((1, 4), 3, True)
    """
    return _tree_curves(layers, cfg, calibration)[0]


def _tree_curves(
    layers: list[Layer], cfg: SplitConfig, calibration: Mapping | None
) -> tuple[list[LayerCurve], list[table.ValueTable | None]]:
    """``tree_curves``, with each layer's value table (``None`` where ``_tabled`` does not
    hold) for ``_tree_splits`` to split the same kernels from, without building it again."""
    a = cfg.threshold
    calibration = calibration or {}
    _host_stats(layers, [_stats(lay.array, "absolute", jnp.inf, None) for lay in layers], cfg)
    budget = jnp.inf if a.max_extra is None else a.max_extra
    out, tables = [], []
    for layer in layers:
        w = layer.array
        kw = {"spec": a.spec, "candidates": a.candidates, "method": cfg.method,
              "branches": cfg.branches}  # fmt: skip
        t = None
        with x64(w.dtype):
            if _tabled(w, cfg, calibration.get(layer.path)):
                t = table.value_table(w)
                thr = search.finite_thresholds(w, spec=a.spec, candidates=a.candidates)
                c = _table_curve(t, thr, cfg)
            elif search.screens(tuple(w.shape), a, cfg.method):
                c = search.screened_curve(
                    w, _key(cfg, layer), calibration.get(layer.path), budget, **kw
                )
            else:
                c = programs.curve(
                    w, _key(cfg, layer), calibration.get(layer.path), twin_spec=a.twin_spec,
                    **kw,
                )  # fmt: skip
        out.append(c)
        tables.append(t)
    host = jax.device_get(out)
    curves = [_layer_curve(h, int(lay.array.size)) for h, lay in zip(host, layers, strict=True)]
    return curves, tables


def _table_curve(t: table.ValueTable, thr, cfg: SplitConfig):
    """``search.table_curve`` of a value table at candidate thresholds ``thr`` (on device)."""
    a = cfg.threshold
    return search.table_curve(
        t.values, t.counts, t.size, thr, spec=a.spec, method=cfg.method,
        branches=cfg.branches, twin_spec=a.twin_spec,
    )  # fmt: skip


def _layer_curve(h: Mapping, size: int) -> LayerCurve:
    """A curve fetched to the host (``search.curve``'s mapping) as a ``LayerCurve``."""
    return LayerCurve(
        np.asarray(h["thresholds"]), h["m"], h["base"], np.asarray(h["score"]),
        float(h["score0"]), size,
    )  # fmt: skip


def tree_picks(
    curves: list[LayerCurve], cfg: SplitConfig, *, sensitivity: list[float] | None = None
) -> list[int]:
    """Each layer's candidate (flat index into its curve, ``-1``: not split) under the
    tree's budget, ``cfg.threshold.max_extra`` × the layers' total size (``search.allocate``,
    never worse than each layer within its own share).

    ``sensitivity`` (one weight ``>= 0`` per curve, ``js.sensitivity``) multiplies each
    layer's scores, so the allocation minimises the weighted total.

    Example:
      >>> import numpy as np
      >>> from jaxsplit import Auto, QuantSpec
      >>> w = np.array([0.01, -0.02, 0.03, 4.0], np.float32)
      >>> lays = list(find_layers({"a": {"kernel": w}, "b": {"kernel": w / 100}}).values())
      >>> auto = Auto(QuantSpec(bits=4), candidates=4, max_extra=0.125, scope="tree")
      >>> cfg = SplitConfig(layers=["*"], threshold=auto, method="clip")
      >>> [i >= 0 for i in tree_picks(tree_curves(lays, cfg), cfg)]  # one extra value: 'a'
      [True, False]
    """
    a = cfg.threshold
    budget = a.max_extra * sum(c.size for c in curves)
    weights = [1.0] * len(curves) if sensitivity is None else [float(s) for s in sensitivity]
    if len(weights) != len(curves):
        raise ConfigError(
            "tree_picks", "sensitivity", f"sensitivity needs one weight per curve "
            f"({len(curves)}), got {len(weights)}",
        )  # fmt: skip
    return search.allocate(
        [_spent(c.m, a.cost) for c in curves],
        [c.score * w for c, w in zip(curves, weights, strict=True)],
        [c.score0 * w for c, w in zip(curves, weights, strict=True)],
        budget,
        layer_budgets=[a.max_extra * c.size for c in curves],
    )


def tree_splits(
    layers: list[Layer],
    curves: list[LayerCurve],
    picks: list[int],
    cfg: SplitConfig,
    *,
    donate: bool = False,
    budget_total: int | None = None,
    calibration: Mapping | None = None,
):
    """Yields ``(layer, branches, n_split, threshold, AutoChoice)``: each layer split at
    its pick (``tree_picks``), one program each, one host sync.

    ``calibration`` (``{path: C}``, as ``tree_curves``'s) reaches the methods that use it
    (``compensate``), so the split is the candidate its curve measured.

    ``budget_total`` is the tree's budget in extra non-zeros for ``budget_share``
    (default: ``max_extra`` × the given layers' total size; the streamed split, which
    passes one layer at a time, gives the whole tree's).
    """
    yield from _tree_splits(
        layers, curves, picks, cfg, donate=donate, budget_total=budget_total,
        calibration=calibration,
    )  # fmt: skip


def _tree_splits(
    layers: list[Layer],
    curves: list[LayerCurve],
    picks: list[int],
    cfg: SplitConfig,
    *,
    donate: bool,
    budget_total: int | None,
    calibration: Mapping | None,
    tables: list[table.ValueTable | None] | None = None,
):
    """``tree_splits``; ``tables``: ``_tree_curves``'s for the same ``layers`` (built here
    where ``None``)."""
    a = cfg.threshold
    calibration = calibration or {}
    methods = search.search_methods(cfg.method, a.spec)
    if budget_total is None:
        budget_total = a.max_extra * sum(c.size for c in curves)
    seen = _usage(layers)
    if tables is None:
        tables = [None] * len(layers)
    outs = []
    for layer, c, pick, t in zip(layers, curves, picks, tables, strict=True):
        w = layer.array
        if pick < 0:
            outs.append((None, None, None))
            continue
        mi, ti = divmod(pick, a.candidates)
        thr = c.thresholds[ti]
        donated = donate and _donatable(w, seen)
        with x64(w.dtype):
            if _tabled(w, cfg, calibration.get(layer.path)):
                t = table.value_table(w) if t is None else t
                tab = table.split_table_donated if donated else table.split_table
                ws = tab(w, t.values, t.index, thr, _key(cfg, layer), method=methods[mi],
                         branches=cfg.branches, spec=a.spec, twin_spec=a.twin_spec)  # fmt: skip
            else:
                fn = programs.apply_donated if donated else programs.apply
                ws = fn(w, thr, _key(cfg, layer), method=methods[mi], branches=cfg.branches,
                        spec=a.spec, twin_spec=a.twin_spec,
                        calibration=calibration.get(layer.path))  # fmt: skip
            n = programs.counts(ws[0], thr, ws)  # non-finite values stay on branch_0
        outs.append((ws, n, thr))
    fetched = jax.device_get([n for _, n, _ in outs])
    for layer, c, pick, (ws, _, t), n in zip(layers, curves, picks, outs, fetched, strict=True):
        base, size = c.base, c.size
        if pick < 0:
            info = {"split": False, "method": 0, "threshold": 0.0, "mse": base.mse,
                    "mse_unsplit": base.mse, "extra_nonzero": 0,
                    "output_error": base.output_error, "output_error_unsplit": base.output_error,
                    "effective_bits": base.effective_bits}  # fmt: skip
            ch = search.choice(info, methods, a.candidates, size=size, budget_share=0.0)
            yield layer, (layer.array,), 0, None, ch
            continue
        ch = tree_choice(c, pick, cfg, budget_total)
        yield layer, ws, int(n[0]), _host_threshold(np.asarray(t)), ch


def tree_choice(curve: LayerCurve, pick: int, cfg: SplitConfig, budget_total) -> search.AutoChoice:
    """The ``AutoChoice`` of a layer split at its pick (``pick >= 0``) of ``curve``:
    method, threshold and the measured figures, with its share of ``budget_total``.

    Example:
      >>> import numpy as np
      >>> from jaxsplit import Auto, QuantSpec
      >>> tree = {"d": {"kernel": np.array([0.01, -0.02, 0.03, 4.0], np.float32)}}
      >>> cfg = SplitConfig(layers=["d"], method="clip", threshold=Auto(
      ...     QuantSpec(bits=4), candidates=4, max_extra=0.5, scope="tree"))
      >>> c, = tree_curves([find_layers(tree)["d"]], cfg)
      >>> ch = tree_choice(c, plan_tree({"d": c}, cfg).picks["d"], cfg, budget_total=2.0)
      >>> ch.method, ch.mse < ch.mse_unsplit, ch.budget_share
      ('clip', True, 0.5)
    """
    a = cfg.threshold
    methods = search.search_methods(cfg.method, a.spec)
    m, base = curve.m, curve.base
    mi, ti = divmod(pick, a.candidates)
    info = {"split": True, "method": mi, "threshold": curve.thresholds[ti], "mse": m.mse[mi, ti],
            "mse_unsplit": base.mse, "extra_nonzero": int(m.extra_nonzero[mi, ti]),
            "output_error": m.output_error[mi, ti],
            "output_error_unsplit": base.output_error,
            "effective_bits": m.effective_bits[mi, ti]}  # fmt: skip
    spent = int(_spent(m, a.cost)[mi, ti])
    share = spent / budget_total if budget_total > 0 else 0.0
    return search.choice(info, methods, a.candidates, size=curve.size, budget_share=share)


@dataclasses.dataclass(frozen=True)
class TreePlan:
    """The outcome of pass 1 of ``Auto(scope="tree")``: every layer's curve and pick.

    Attributes:
      curves: ``{layer path: LayerCurve}``.
      picks: ``{layer path: flat candidate index}`` (``-1``: not split).
      budget: the tree's budget (what ``Auto.cost`` counts), for ``budget_share``.
    """

    curves: Mapping[str, LayerCurve]
    picks: Mapping[str, int]
    budget: float


def plan_tree(
    curves: Mapping[str, LayerCurve], cfg: SplitConfig, *, sensitivity: Mapping | None = None
) -> TreePlan:
    """Allocates the tree's budget over ``curves`` (``tree_picks``), taken in path
    order so that the choice does not depend on the order the layers were read in.

    ``sensitivity``: ``{path: weight}`` for every curve (``split_params``'s, validated),
    or ``None`` (unweighted).

    Example:
      >>> import numpy as np
      >>> from jaxsplit import Auto, QuantSpec
      >>> auto = Auto(QuantSpec(bits=4), candidates=4, max_extra=0.5, scope="tree")
      >>> cfg = SplitConfig(layers=["*"], threshold=auto, method="clip")
      >>> lay = find_layers({"d": {"kernel": np.array([0.5, -0.25, 8.0], np.float32)}})["d"]
      >>> plan = plan_tree({"d": tree_curves([lay], cfg)[0]}, cfg)
      >>> plan.picks["d"] >= 0, plan.budget
      (True, 1.5)
    """
    paths = sorted(curves)
    if sensitivity:
        missing = [p for p in paths if p not in sensitivity]
        if missing:
            raise CalibrationError(missing[0], f"sensitivity has no entry for {missing}")
    weights = [float(sensitivity[p]) for p in paths] if sensitivity else None
    picks = tree_picks([curves[p] for p in paths], cfg, sensitivity=weights)
    budget = cfg.threshold.max_extra * sum(curves[p].size for p in paths)
    return TreePlan(dict(curves), dict(zip(paths, picks, strict=True)), budget)


def split_planned(
    params: Mapping,
    cfg: SplitConfig,
    plan: TreePlan,
    *,
    donate: bool = False,
    calibration: Mapping | None = None,
) -> tuple[Mapping, SplitReport]:
    """Pass 2 of ``Auto(scope="tree")``: ``split_with_report`` with the choices taken
    from ``plan`` (``plan_tree`` over ``tree_curves``) instead of searched.

    Give the ``calibration`` the plan's curves were measured with (``{path: C}``): a
    method that uses it (``compensate``) splits as its curve measured.

    ``params`` may hold any part of the tree the plan was made for (the streamed split
    gives one layer at a time); each selected, splittable layer must be in the plan. The
    result equals ``split_with_report(whole tree, cfg)``'s for those layers, bit for bit.

    Raises:
      ConfigError: ``cfg.threshold`` is not ``Auto(scope="tree")``.
      KeyError: a selected layer has no curve in ``plan``.
      As ``split_with_report`` otherwise.

    Example:
      >>> import numpy as np
      >>> from jaxsplit import Auto, QuantSpec
      >>> p = {"d": {"kernel": np.array([0.01, -0.02, 4.0], np.float32)}}
      >>> cfg = SplitConfig(layers=["d"], threshold=Auto(QuantSpec(bits=4), candidates=4,
      ...                   max_extra=0.5, scope="tree"), method="clip")
      >>> plan = plan_tree({"d": tree_curves([find_layers(p)["d"]], cfg)[0]}, cfg)
      >>> p2, rep = split_planned(p, cfg, plan)
      >>> rep.split_paths, np.array_equal(merge_params(p2)["d"]["kernel"], p["d"]["kernel"])
      (('d',), True)
    """
    a = cfg.threshold if isinstance(cfg, SplitConfig) else None
    if not (isinstance(a, Auto) and a.scope == "tree"):
        raise ConfigError(
            "split_planned", "cfg", f"cfg.threshold must be Auto(scope='tree'), got {a!r}"
        )
    selected, matches, available = resolve_selection(params, cfg)
    plans, todo = _checked(selected)
    missing = [lay.path for lay in todo if lay.path not in plan.curves]
    if missing:
        raise KeyError(f"plan has no curve for layer(s) {missing}; planned: {list(plan.curves)}")
    curves = [plan.curves[lay.path] for lay in todo]
    picks = [plan.picks[lay.path] for lay in todo]
    replacements = {}
    for layer, ws, n, thr, ch in tree_splits(
        todo, curves, picks, cfg, donate=donate, budget_total=plan.budget,
        calibration=calibration,
    ):  # fmt: skip
        plans[layer.path] = p = _result_plan(layer, n, thr, ch)
        if p.action == "split":
            replacements[layer.keys] = make_branches(
                layer, [keep_sharding(w, layer.array) for w in ws]
            )
    report = SplitReport(matches, tuple(plans[lay.path] for lay in selected), available)
    if cfg.verbose:
        for q in report.layers:
            logger.info("%s", _log_line(q))
    return rebuild(params, replacements), report


def _tabled(w, cfg: SplitConfig, calibration) -> bool:
    return tabled(w.dtype, tuple(w.shape), cfg, calibrated=calibration is not None)


def tabled(dtype, shape: tuple[int, ...], cfg: SplitConfig, *, calibrated: bool = False) -> bool:
    """Whether ``Auto(scope="tree")`` measures and splits a kernel of this dtype and shape
    from its value table (``jaxsplit.table``: 16-bit kernels of ``table.MIN_SIZE`` values
    or more, per-tensor specs, no ``random``, no calibration).

    Example:
      >>> from jaxsplit import Auto, QuantSpec
      >>> cfg = SplitConfig(layers=["*"], threshold=Auto(QuantSpec(bits=4), max_extra=0.05,
      ...                   scope="tree"))
      >>> tabled("bfloat16", (512, 512), cfg), tabled("float32", (512, 512), cfg)
      (True, False)
    """
    a = cfg.threshold
    methods = search.search_methods(cfg.method, a.spec)
    return table.applies(
        dtype, tuple(shape), a.spec, methods, twin_spec=a.twin_spec, calibrated=calibrated
    )


def tabled_curve(tab: table.ValueTable, rest, cfg: SplitConfig) -> LayerCurve:
    """``tree_curves``' curve of a kernel that ``tabled`` holds for, from its value table
    and its strided sample (``screen.sample_stride`` steps; ``search.table_thresholds``):
    the streamed split reads both in blocks, never the kernel whole.

    Example:
      >>> import numpy as np
      >>> from jaxsplit import Auto, QuantSpec, screen
      >>> w = (np.random.default_rng(0).standard_t(3, (512, 512)) * 0.02).astype(np.float16)
      >>> cfg = SplitConfig(layers=["*"], method="clip", threshold=Auto(QuantSpec(bits=4),
      ...                   max_extra=0.05, scope="tree"))
      >>> rest = w.reshape(-1)[:: screen.sample_stride(w.size)]
      >>> c = tabled_curve(table.value_table(w), rest, cfg)
      >>> ref, = tree_curves([find_layers({"d": {"kernel": w}})["d"]], cfg)
      >>> bool((c.score == ref.score).all()), c.size
      (True, 262144)
    """
    a = cfg.threshold
    with x64(tab.values.dtype):
        thr = search.table_thresholds(tab, rest, spec=a.spec, candidates=a.candidates)
        c = _table_curve(tab, thr, cfg)
    return _layer_curve(jax.device_get(c), int(tab.size))


def _spent(m, cost: str):
    """What the budget counts of a measured curve (``Auto.cost``)."""
    return m.twin_nonzero if cost == "twin" else m.extra_nonzero


def _usage(todo: list[Layer]) -> dict[int, int]:
    """How many selected layers share each kernel object (shared ones are not donated)."""
    seen: dict[int, int] = {}
    for layer in todo:
        seen[id(layer.array)] = seen.get(id(layer.array), 0) + 1
    return seen


def _rule(cfg: SplitConfig, w, t=None) -> tuple[str, float, int | None]:
    """``(kind, value, axis)``: the threshold's static rule and its data, for kernel ``w``
    (``t``: ``cfg.rule`` if the caller has it already; it is rebuilt on each access)."""
    t = cfg.rule if t is None else t
    axis = channel_axis(w.ndim, cfg.channel_axis) if t.per_channel and w.ndim else None
    return t.kind, t.value, axis


def _stats(w, kind, value, axis, key=None, **method):
    with x64(w.dtype):
        return programs.stats(w, value, key, kind=kind, axis=axis, **method)


#: Methods that concrete CPU kernels of ``host.MIN_BYTES`` and up split on the host (unless
#: ``host.malloc_huge_pages()``), into numpy's memory: ``balance`` (1.4-1.6x the fresh-output
#: floor on 1 x 4096² vs 2.6-3.3x compiled, same process) and ``clip`` (1.8-2.5x vs
#: 2.8-3.5x; its 14 numpy passes a block are 2.5x ``balance``'s). ``benchmarks/RESULTS.md``.
HOST_METHODS = ("balance", "clip")
#: Same-shape kernels of at most this many bytes are split ``GROUP`` at a time by one
#: program (``programs.fused_group``; the rest of a run as one more group): for them the
#: per-call dispatch is the cost (16 x 256²: 5.7 ms one program a kernel, PPQ 2.4 ms).
GROUP_MAX_BYTES = 256 * 1024
GROUP = 32
#: Methods grouped: plain elementwise programs, which compile in ~10 ms a kernel (``random``'s
#: Threefry takes ~1 s a kernel to compile on CPU: 32 of them in one program would not pay).
GROUP_METHODS = ("balance", "clip")


def _host_value(w, kind: str, value, axis, cfg: SplitConfig):
    """The absolute threshold at which ``host.split`` splits ``w`` for ``cfg``, or ``None``
    (the compiled program runs): ``HOST_METHODS``, kernels ``host.supports`` (concrete, on
    the CPU, ``host.MIN_BYTES`` and up), no huge-page ``malloc``, and an absolute or a
    per-tensor ``relative`` rule (``programs.threshold`` resolves it first: the same
    float32 the compiled program computes)."""
    if cfg.method not in HOST_METHODS or axis is not None or host.malloc_huge_pages():
        return None
    if kind not in ("absolute", "relative"):
        return None

    def ok(t) -> bool:
        return host.supports(
            w, t, kind="absolute", axis=None, method=cfg.method, branches=cfg.branches,
            min_bytes=host.MIN_BYTES,
        )  # fmt: skip

    if kind == "relative":
        if not ok(1.0):  # placement, dtype and size first: no statistic for nothing
            return None
        with x64(w.dtype):
            value = float(programs.threshold(_in_place(w), value, kind=kind))  # one sync
    return value if ok(value) else None


def _in_place(w):
    """A numpy kernel as a ``jax.Array`` over its own buffer where it is 64-byte aligned
    (``device_put(may_alias=True)``; a copy elsewhere); anything else as it is. Call it
    under ``x64(w.dtype)``: a program reads it before ``split_params`` returns."""
    return jax.device_put(w, may_alias=True) if isinstance(w, np.ndarray) else w


def _fused_one(w, value, layer: Layer, kind: str, axis, cfg: SplitConfig):
    """``programs.fused`` of one kernel (read in place where it is a numpy array)."""
    with x64(w.dtype):
        return programs.fused(
            _in_place(w), value, _key(cfg, layer), kind=kind, axis=axis, **_method_args(cfg)
        )


def _run_fused(todo: list[Layer], cfg: SplitConfig):
    """Yields ``(layer, branches, n_split, threshold)``: every kernel dispatched before the
    single host sync; counts are ``None`` when traced. Concrete CPU kernels that ``host``
    covers (``host.MIN_BYTES`` and up, ``HOST_METHODS``) are split there (same bits,
    outputs in numpy's memory); runs of ``GROUP`` small same-shape kernels share one program."""
    ws = [layer.array for layer in todo]
    rule = cfg.rule
    outs, on_host, groups = [None] * len(todo), [], {}
    for i, (layer, w) in enumerate(zip(todo, ws, strict=True)):
        kind, value, axis = _rule(cfg, w, rule)
        absolute = _host_value(w, kind, value, axis, cfg)
        if absolute is not None:
            on_host.append((i, absolute))
            continue
        if cfg.method in GROUP_METHODS and not is_traced(w) and w.nbytes <= GROUP_MAX_BYTES:
            sharding = getattr(w, "sharding", None)
            groups.setdefault((w.shape, w.dtype, sharding, kind, axis), []).append(i)
            continue
        outs[i] = _fused_one(w, value, layer, kind, axis, cfg)
    grouped = []
    for (_, dtype, _, kind, axis), idx in groups.items():
        if len(idx) == 1:  # a kernel of its own shape: its own program
            (i,) = idx
            outs[i] = _fused_one(ws[i], rule.value, todo[i], kind, axis, cfg)
            continue
        for s in range(0, len(idx), GROUP):  # groups of GROUP, then one of the rest
            part = idx[s : s + GROUP]
            with x64(dtype):
                res = programs.fused_group(
                    tuple(ws[i] for i in part), rule.value,
                    tuple(_key(cfg, todo[i]) for i in part), kind=kind, axis=axis,
                    **_method_args(cfg),
                )  # fmt: skip
            grouped.append((part, res))
    if on_host:
        done = host.split([ws[i] for i, _ in on_host], [t for _, t in on_host], cfg.method)
        for (i, _), out in zip(on_host, done, strict=True):
            outs[i] = out
    for part, (branches, counts, thrs) in grouped:
        for j, i in enumerate(part):  # the group's arrays, and this layer's row of them
            outs[i] = (branches[j], counts, thrs, j)
    host_stats = _host_stats(todo, [out[1:] for out in outs], cfg)
    for layer, out, (n, thr) in zip(todo, outs, host_stats, strict=True):
        yield layer, out[0], n, thr


def _run_donated(todo: list[Layer], cfg: SplitConfig):
    """Two phases: statistics and checks for every layer (nothing consumed yet), then
    the splits, donating each kernel that may be consumed."""
    if any(is_traced(layer.array) for layer in todo):
        yield from _run_fused(todo, cfg)  # donation means nothing to a tracer
        return
    stats = _dispatch_stats(todo, cfg)
    host = _host_stats(todo, stats, cfg)
    seen = _usage(todo)
    for layer, (_, thr_dev), (n, thr) in zip(todo, stats, host, strict=True):
        if n == 0:
            yield layer, None, 0, thr
            continue
        w = layer.array
        fn = programs.apply_donated if _donatable(w, seen) else programs.apply
        with x64(w.dtype):
            yield layer, fn(w, thr_dev, _key(cfg, layer), **_method_args(cfg)), n, thr


def _donatable(w, seen: dict[int, int]) -> bool:
    return isinstance(w, jax.Array) and seen[id(w)] == 1 and not w.is_deleted()


def _dispatch_stats(todo: list[Layer], cfg: SplitConfig) -> list:
    return [
        _stats(layer.array, *_rule(cfg, layer.array), _key(cfg, layer), **_method_args(cfg))
        for layer in todo
    ]


def _host_stats(todo: list[Layer], stats: list, cfg: SplitConfig) -> list[tuple]:
    """``[(n_split, threshold)]`` fetched in one transfer (``(None, None)`` if traced);
    raises for non-finite kernels unless ``cfg.allow_nonfinite``. An entry ``(counts,
    thresholds, j)`` is row ``j`` of a group's stacked arrays (fetched once)."""
    unique = {id(s[0]): s[:2] for s in stats if not is_traced(s[0])}  # a group's once
    fetched = dict(zip(unique, jax.device_get(list(unique.values())), strict=True))
    host = []
    for layer, s in zip(todo, stats, strict=True):
        if is_traced(s[0]):
            host.append((None, None))
            continue
        counts, thr = fetched[id(s[0])]
        if len(s) == 3:
            counts, thr = counts[s[2]], thr[s[2]]
        n_split, n_bad = (int(x) for x in counts)
        if n_bad and not cfg.allow_nonfinite:
            raise NonFiniteError.count(layer.path, layer.weight, n_bad)
        host.append((n_split, _host_threshold(thr)))
    return host


def _host_threshold(thr):
    """A scalar threshold as a float; a per-channel one as a tuple of floats."""
    return float(thr) if thr.size == 1 else tuple(float(x) for x in thr.ravel())


def merge_params(params2: Mapping) -> Mapping:
    """Sums every split layer's branches back into one layer (inverse of ``split_params``).

    ``merge_params(split_params(p, cfg))`` equals ``p`` bit for bit, whatever
    ``cfg.weights`` was (split layers are self-describing; a leaf split in place,
    ``{'branch_0': W1, 'branch_1': W2}``, becomes the leaf again). Unsplit layers are
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
        wname = layer.weight
        if not layer.leaf:
            for i in range(1, layer.branches):
                extra = [str(k) for k in layer.node[branch_name(i)] if k != wname]
                if extra:
                    raise ValueError(
                        f"layer {layer.path!r}: branch_{i} holds {extra} besides "
                        f"{wname!r}; only branch_0 may carry bias/other leaves"
                    )
        ws = branch_weights(layer)
        if any(w.shape != ws[0].shape or w.dtype != ws[0].dtype for w in ws):
            raise ValueError(
                f"layer {layer.path!r}: branch kernels disagree: "
                f"{[(tuple(w.shape), str(w.dtype)) for w in ws]}"
            )
        with x64(ws[0].dtype):
            total = keep_sharding(_sum(*ws), ws[0])
        if layer.leaf:  # the leaf split in place becomes the leaf again
            replacements[layer.keys] = wrap_like(layer.branch_leaf(0), total)
            continue
        b0 = layer.node[branch_name(0)]
        replacements[layer.keys] = like(
            b0, {k: (wrap_like(v, total) if k == wname else v) for k, v in b0.items()}
        )
    return rebuild(params2, replacements)


@jax.jit
def _sum(*ws):
    """Left-to-right sum of the branches; a zero addend leaves the bits alone, so subnormal
    values (which XLA on CPU flushes to zero in arithmetic) survive the round trip."""
    total = ws[0]
    for w in ws[1:]:
        total = jnp.where(w == 0, total, total + w)
    return total


@functools.cache
def _dtype_name(dtype) -> str:
    return str(dtype)  # numpy's dtype __str__ costs ~10 µs: once per dtype, not per layer


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
        _dtype_name(w.dtype),
        choice,
    )


def _log_line(plan: LayerPlan) -> str:
    t, a = plan.threshold, plan.auto
    if isinstance(t, tuple):
        thr = f"per channel {min(t):.6g}..{max(t):.6g}"
    else:
        thr = ("none" if a is not None else "traced") if t is None else f"{t:.6g}"
    if a is not None:
        thr += f"; auto: {a.method or 'untouched'}, mse {a.mse_unsplit:.3g} -> {a.mse:.3g}"
        thr += f", extra non-zeros {a.extra_fraction:.2%}"
    if plan.action == "split":
        n = "?" if plan.n_split is None else plan.n_split
        return f"{plan.path}: split {n}/{plan.n_total} values (threshold {thr})"
    return f"{plan.path}: skipped, {plan.reason} (threshold {thr})"
