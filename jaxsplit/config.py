"""``SplitConfig`` and ``Auto``: declaration and validation of what to split and how.

Configs are frozen, keyword-only where they have several fields, and hashable, so they
can be static arguments to ``jax.jit``. Every error names the field, shows the value and
says what is valid, as a typed ``errors.ConfigError`` / ``errors.ConfigTypeError``.
"""

from __future__ import annotations

import dataclasses
import numbers
import re
from collections.abc import Callable, Sequence
from typing import Any

from jaxsplit import kernels, quant
from jaxsplit.errors import ConfigError, ConfigTypeError
from jaxsplit.thresholds import Threshold, as_threshold
from jaxsplit.tree import WEIGHT_NAMES, Weights, check_weights
from jaxsplit.validate import check_flag, check_int, check_real

__all__ = [
    "SplitConfig",
    "Auto",
    "ThresholdSpec",
    "CONFIG_METHODS",
    "AUTO_METHODS",
    "AUTO_SCOPES",
    "AUTO_COSTS",
]

#: ``Auto.scope`` values: a budget per layer, or one shared by the whole tree.
AUTO_SCOPES = ("layer", "tree")
#: ``Auto.cost`` values: what the budget counts.
AUTO_COSTS = ("extra", "twin")


@dataclasses.dataclass(frozen=True)
class Auto:
    """Search each layer's threshold (and, with ``method="auto"``, the default, its method).

    Per layer, ``jaxsplit.search`` measures (``jaxsplit.measure``) the weight MSE of
    ``sum_i Q(W_i)`` against ``W`` under ``spec`` for ``candidates`` thresholds (half of
    them fractions of ``max|W|``, half chosen so a given number of values is split) in one
    compiled call, and keeps the best one whose extra non-zero parameters (summed over the
    branches, minus the layer's own, as a fraction of its size) stay within
    ``max_extra``. If no candidate beats not splitting, the layer is left untouched.
    Per-channel ``spec``: thresholds are per channel along ``spec.axis``.

    Attributes:
      spec: the ``QuantSpec`` the branches will be quantized with.
      candidates: number of thresholds tried per method, 2 to 1024.
      max_extra: budget on extra non-zeros as a fraction of the layer's parameters
        (``0.02`` = 2%), or ``None`` for no budget.
      scope: ``"layer"`` (default): every layer keeps within ``max_extra`` of its own
        size; ``"tree"``: at most ``max_extra`` × (the selected layers' parameters)
        extra non-zeros over the whole tree, spent where they remove the most error
        (``search.allocate``; needs a ``max_extra``), or with ``split_params(...,
        sensitivity=js.sensitivity(...))`` the most predicted output cost.
      twin_spec: the ``QuantSpec`` of the sparse twin(s) (mixed precision, e.g. int8
        twins beside an int4 ``branch_0``); ``None``: ``spec``.
      cost: what ``max_extra`` counts: ``"extra"`` (the extra non-zeros, summed over the
        branches minus the layer's own) or ``"twin"`` (the twins' non-zeros: the sparse
        storage ``measure.effective_bits`` charges; a split that empties ``branch_0``
        into a dense twin, e.g. ``residual`` or a mixed-precision twin at threshold 0,
        costs what it stores). Default: ``"twin"`` with a ``twin_spec``, else ``"extra"``.

    Example:
      >>> from jaxsplit.quant import QuantSpec
      >>> Auto(QuantSpec(bits=8), max_extra=0.02).candidates
      64
      >>> Auto(QuantSpec(bits=8), candidates=1)
      Traceback (most recent call last):
      ...
      jaxsplit.errors.ConfigError: Auto.candidates must be an int in [2, 1024], got 1
      >>> Auto(QuantSpec(bits=4), max_extra=0.05, scope="tree").scope
      'tree'
      >>> Auto(QuantSpec(bits=4), scope="global")
      Traceback (most recent call last):
      ...
      jaxsplit.errors.ConfigError: Auto.scope must be one of ['layer', 'tree'], got 'global'
    """

    spec: quant.QuantSpec
    candidates: int = 64
    max_extra: float | None = None
    scope: str = "layer"
    twin_spec: quant.QuantSpec | None = None
    cost: str | None = None

    def __post_init__(self):
        if not isinstance(self.spec, quant.QuantSpec):
            raise ConfigTypeError(
                "Auto",
                "spec",
                f"Auto.spec must be a jaxsplit.QuantSpec, got {self.spec!r} "
                f"({type(self.spec).__name__})",
            )
        object.__setattr__(
            self, "candidates", check_int("Auto", "candidates", self.candidates, lo=2, hi=1024)
        )
        if self.max_extra is not None:
            object.__setattr__(self, "max_extra", check_real("Auto", "max_extra", self.max_extra))
        if not isinstance(self.scope, str) or self.scope not in AUTO_SCOPES:
            raise ConfigError(
                "Auto",
                "scope",
                f"Auto.scope must be one of {list(AUTO_SCOPES)}, got {self.scope!r}",
            )
        if self.scope == "tree" and self.max_extra is None:
            raise ConfigError(
                "Auto",
                "max_extra",
                "Auto.scope='tree' shares a budget over the tree: give max_extra=F "
                "(a fraction of the selected layers' parameters), got max_extra=None",
            )
        ts = self.twin_spec
        if ts is not None and not isinstance(ts, quant.QuantSpec):
            raise ConfigTypeError(
                "Auto",
                "twin_spec",
                f"Auto.twin_spec must be a jaxsplit.QuantSpec or None, got {ts!r} "
                f"({type(ts).__name__})",
            )
        if self.cost is None:
            object.__setattr__(self, "cost", "extra" if ts is None else "twin")
        if self.cost not in AUTO_COSTS:
            raise ConfigError(
                "Auto", "cost", f"Auto.cost must be one of {list(AUTO_COSTS)}, got {self.cost!r}"
            )


ThresholdSpec = float | Threshold | Auto
_THRESHOLD_HELP = (
    "a finite float >= 0, Absolute(t), Relative(f), Sigma(k), Percentile(p) or Auto(spec)"
)
#: ``SplitConfig.method`` values: the kernels' methods, and ``"auto"`` (search the method).
CONFIG_METHODS = (*kernels.METHODS, "auto")
#: The methods ``method="auto"`` chooses from (``grid``, ``snap``, ``compensate``: symmetric
#: specs only).
AUTO_METHODS = ("balance", "clip", "grid", "residual", "snap", "compensate")


LayerPredicate = Callable[[str, Any], bool]


class _Default:
    """The default of ``SplitConfig.threshold``/``method``: resolved in ``__post_init__``
    (``None`` stays an invalid value, so a forgotten argument is never silently accepted)."""

    def __repr__(self) -> str:
        return "<default>"


_DEFAULT = _Default()


@dataclasses.dataclass(frozen=True, kw_only=True)
class SplitConfig:
    """What to split, where, and how.

    Attributes:
      layers: which layers to split. ``None`` or empty: nothing is processed (a
        warning is logged). A sequence of patterns, each an exact layer path
        (``"block_1/Dense_0"``), a glob whose ``*``/``?`` do not cross ``/`` (``**``
        does), or an ``"re:"``-prefixed regex matched with ``fullmatch``; a single
        string is one pattern. Or a callable ``(path, layer) -> bool``.
      threshold: absolute float ``>= 0`` (default ``0.0``) or a threshold object
        (``Relative(f)``, ``Sigma(k)``, ``Percentile(p)``, ``Absolute(t)``, each but the
        last optionally ``per_channel=True``), resolved per layer; or ``Auto(spec, ...)``,
        searched per layer. Values with ``|w| > threshold`` are split.
      method: one of ``kernels.METHODS`` (``"balance"``, ``"random"``, ``"clip"``,
        ``"grid"``, ``"residual"``), or ``"auto"``: the best of ``AUTO_METHODS`` per
        layer. Default: ``"auto"`` with an ``Auto`` threshold, else ``"balance"``.
        ``method="auto"`` without a threshold searches one: ``threshold=Auto(spec)``.
      branches: 2, 4 or 8; more than 2 only with ``"balance"`` (exact k-way shares).
      spec: the ``QuantSpec`` the branches will be quantized with; needed by
        ``"grid"``, ``"residual"`` and ``"auto"``. An ``Auto`` threshold carries its own
        (give at most one, or the same one twice); ``spec`` is then set from it.
      seed: integer seed for ``"random"``; folded with each layer's path.
      strict: a pattern that matches no layer raises ``errors.UnmatchedPatternError``
        (listing the available paths); ``False`` only logs a warning.
      allow_nonfinite: permit NaN/inf in selected kernels (they stay on ``branch_0``);
        otherwise such a kernel raises ``errors.NonFiniteError`` naming the layer.
      verbose: log one INFO line per selected layer on ``logging.getLogger("jaxsplit")``.
      weights: which array leaves are weights: leaf names (default
        ``('kernel', 'embedding')``; e.g. ``("kernel", "w", "gating_einsum", "linear")``
        for Gemma) or a predicate ``(leaf_path, array) -> bool``. A node holding one
        weight is a layer at its path; a node holding several is one layer per weight
        at ``node/leaf``, split in place (``jaxsplit.tree``).

    Example:
      >>> from jaxsplit.thresholds import Relative
      >>> cfg = SplitConfig(layers=["Dense_0", "block_*/Conv_0"], threshold=Relative(0.5))
      >>> cfg.layers, cfg.method
      (('Dense_0', 'block_*/Conv_0'), 'balance')
      >>> SplitConfig(layers=["Dense_0"], threshold=-1.0)  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      jaxsplit.errors.ConfigError: SplitConfig.threshold must be a finite number ..., got -1.0
    """

    layers: Sequence[str] | LayerPredicate | None
    threshold: ThresholdSpec = _DEFAULT  # type: ignore[assignment]
    method: str = _DEFAULT  # type: ignore[assignment]
    branches: int = 2
    spec: quant.QuantSpec | None = None
    seed: int = 0
    strict: bool = True
    allow_nonfinite: bool = False
    verbose: bool = False
    weights: Weights = WEIGHT_NAMES

    def __post_init__(self):
        object.__setattr__(self, "layers", _check_layers(self.layers))
        object.__setattr__(self, "weights", check_weights(self.weights, "SplitConfig"))
        m, th = self.method, self.threshold
        m = None if m is _DEFAULT else m
        if (
            m is None
            and self.method is not _DEFAULT
            or (m is not None and (not isinstance(m, str) or m not in CONFIG_METHODS))
        ):
            raise ConfigError(
                "SplitConfig",
                "method",
                f"SplitConfig.method must be one of {list(CONFIG_METHODS)}, got {m!r}",
            )
        q = self.spec
        if q is not None and not isinstance(q, quant.QuantSpec):
            raise ConfigTypeError(
                "SplitConfig",
                "spec",
                f"SplitConfig.spec must be a jaxsplit.QuantSpec or None, got {q!r} "
                f"({type(q).__name__})",
            )
        if th is _DEFAULT:
            if m == "auto" and q is None:
                raise ConfigError(
                    "SplitConfig",
                    "spec",
                    "SplitConfig.method='auto' searches thresholds under a QuantSpec: give "
                    "spec=QuantSpec(...) or threshold=Auto(spec)",
                )
            th = Auto(q) if m == "auto" else 0.0
        if not isinstance(th, Threshold | Auto):
            if isinstance(th, bool) or not isinstance(th, numbers.Real):
                raise ConfigTypeError(
                    "SplitConfig",
                    "threshold",
                    f"SplitConfig.threshold must be {_THRESHOLD_HELP}, got {th!r} "
                    f"({type(th).__name__})",
                )
            th = as_threshold(th).value  # validates, naming SplitConfig.threshold
        elif m == "auto" and not isinstance(th, Auto):
            raise ConfigError(
                "SplitConfig",
                "threshold",
                f"SplitConfig.method='auto' searches the threshold too; give "
                f"threshold=Auto(spec) or no threshold, got threshold={th!r}",
            )
        object.__setattr__(self, "threshold", th)
        if m is None:
            object.__setattr__(self, "method", "auto" if isinstance(th, Auto) else "balance")
        if isinstance(th, Auto):
            if q is not None and q != th.spec:
                raise ConfigError(
                    "SplitConfig",
                    "spec",
                    f"SplitConfig.spec={q!r} differs from the Auto threshold's spec "
                    f"{th.spec!r}; give one of them",
                )
            object.__setattr__(self, "spec", th.spec)
        self._check_method_options()
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise ConfigTypeError(
                "SplitConfig", "seed", f"SplitConfig.seed must be an int, got {self.seed!r}"
            )
        if not 0 <= int(self.seed) < 2**63:
            raise ConfigError(
                "SplitConfig", "seed", f"SplitConfig.seed must be in [0, 2**63), got {self.seed!r}"
            )
        for name in ("strict", "allow_nonfinite", "verbose"):
            check_flag("SplitConfig", name, getattr(self, name))

    @property
    def rule(self) -> Threshold | Auto:
        """The threshold as an object (a float becomes ``thresholds.Absolute``).

        Example:
          >>> SplitConfig(layers=["d"], threshold=0.5).rule
          Absolute(value=0.5)
        """
        th = self.threshold
        return th if isinstance(th, Threshold | Auto) else as_threshold(th)

    @property
    def channel_axis(self) -> int:
        """The axis per-channel thresholds follow: ``spec.axis`` for a per-channel or
        per-group ``spec``, else the last axis (Flax kernels keep output channels last).

        Example:
          >>> spec = quant.QuantSpec(granularity="per_channel", axis=0)
          >>> SplitConfig(layers=["d"], spec=spec).channel_axis
          0
        """
        s = self.spec
        return -1 if s is None or s.granularity == "per_tensor" else s.axis

    def _check_method_options(self):
        b, m, q = self.branches, self.method, self.spec
        if isinstance(b, bool) or b not in kernels.BRANCHES:
            raise ConfigError(
                "SplitConfig",
                "branches",
                f"SplitConfig.branches must be one of {list(kernels.BRANCHES)}, got {b!r}",
            )
        if b != 2 and m != "balance":
            raise ConfigError(
                "SplitConfig",
                "branches",
                f"SplitConfig.branches={b} needs method='balance' (exact k-way shares), "
                f"got method={m!r}",
            )
        if m in kernels.QUANT_METHODS and q is None:
            raise ConfigError(
                "SplitConfig",
                "spec",
                f"SplitConfig.method={m!r} needs spec=QuantSpec(...) (or an Auto threshold)",
            )
        if m in ("grid", "snap", "compensate") and not q.symmetric:
            raise ConfigError(
                "SplitConfig",
                "method",
                f"SplitConfig.method={m!r} needs a symmetric QuantSpec, got {q!r}",
            )


def _check_layers(layers):
    if layers is None or callable(layers):
        return layers
    if isinstance(layers, str):
        layers = (layers,)
    if not isinstance(layers, Sequence):
        raise ConfigTypeError(
            "SplitConfig",
            "layers",
            "SplitConfig.layers must be None, a sequence of path patterns or a "
            f"callable (path, layer) -> bool, got {layers!r} ({type(layers).__name__})",
        )
    out = []
    for i, p in enumerate(layers):
        if not isinstance(p, str) or not p:
            raise ConfigTypeError(
                "SplitConfig",
                "layers",
                f"SplitConfig.layers[{i}] must be a non-empty string (exact path, "
                f"glob or 're:' regex), got {p!r}",
            )
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as e:
                raise ConfigError(
                    "SplitConfig",
                    "layers",
                    f"SplitConfig.layers[{i}] is not a valid regex: {p!r} ({e})",
                ) from e
        out.append(p)
    return tuple(out)
