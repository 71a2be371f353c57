"""``SplitConfig`` and the threshold specs; all validation of user settings lives here.

Configs are frozen, keyword-only and hashable, so they can be static arguments to
``jax.jit``. Every error names the field, shows the value and says what is valid.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxsplit import kernels, quant

__all__ = [
    "SplitConfig",
    "Relative",
    "Sigma",
    "Percentile",
    "Auto",
    "ThresholdSpec",
    "CONFIG_METHODS",
    "resolve_threshold",
    "threshold_parts",
    "resolve_parts",
]


def check_real(
    owner: str,
    field: str,
    value: Any,
    *,
    lo: float = 0.0,
    hi: float = math.inf,
    hi_inclusive: bool = False,
) -> float:
    """Validates a finite real number in ``[lo, hi)`` (or ``[lo, hi]``) and returns it as float.

    Raises:
      TypeError: ``value`` is not a real number (bools are rejected too).
      ValueError: ``value`` is NaN, infinite or outside the range.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{owner}.{field} must be a real number, got {value!r} ({type(value).__name__})"
        )
    v = float(value)
    upper_ok = v <= hi if hi_inclusive else v < hi
    if not math.isfinite(v) or v < lo or not upper_ok:
        bracket = "]" if hi_inclusive else ")"
        raise ValueError(
            f"{owner}.{field} must be a finite number in [{lo:g}, {hi:g}{bracket}, got {value!r}"
        )
    return v


def _check_flag(owner: str, field: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{owner}.{field} must be a bool, got {value!r} ({type(value).__name__})")


def _spec_repr(self) -> str:
    """``Relative(fraction=0.5)``; ``per_channel`` is shown only when set."""
    value = dataclasses.astuple(self)[0]
    name = dataclasses.fields(self)[0].name
    tail = ", per_channel=True" if self.per_channel else ""
    return f"{type(self).__name__}({name}={value!r}{tail})"


@dataclasses.dataclass(frozen=True, repr=False)
class Relative:
    """Threshold ``fraction × max|W|`` of each layer (or of each output channel).

    ``Relative(0.5)`` splits the top half of the range. With ``per_channel=True`` the
    maximum is taken per output channel (the kernel's last axis), which suits
    per-channel quantization: a tensor-wide threshold leaves small channels unsplit.

    Example:
      >>> Relative(0.5), Relative(0.5, per_channel=True)
      (Relative(fraction=0.5), Relative(fraction=0.5, per_channel=True))
    """

    fraction: float
    per_channel: bool = False
    __repr__ = _spec_repr

    def __post_init__(self):
        object.__setattr__(
            self,
            "fraction",
            check_real("Relative", "fraction", self.fraction, hi=1.0, hi_inclusive=True),
        )
        _check_flag("Relative", "per_channel", self.per_channel)


@dataclasses.dataclass(frozen=True, repr=False)
class Sigma:
    """Threshold ``k × std(W)`` of each layer (``Sigma(3)``: values beyond three sigmas).

    ``per_channel=True``: one standard deviation per output channel (last axis).

    Example:
      >>> Sigma(3)
      Sigma(k=3.0)
    """

    k: float
    per_channel: bool = False
    __repr__ = _spec_repr

    def __post_init__(self):
        object.__setattr__(self, "k", check_real("Sigma", "k", self.k))
        _check_flag("Sigma", "per_channel", self.per_channel)


@dataclasses.dataclass(frozen=True, repr=False)
class Percentile:
    """Threshold at the ``p``-th percentile of each layer's ``|W|`` (``Percentile(99.9)``).

    ``per_channel=True``: one percentile per output channel (last axis).

    Example:
      >>> Percentile(99.9)
      Percentile(p=99.9)
    """

    p: float
    per_channel: bool = False
    __repr__ = _spec_repr

    def __post_init__(self):
        object.__setattr__(
            self, "p", check_real("Percentile", "p", self.p, hi=100.0, hi_inclusive=True)
        )
        _check_flag("Percentile", "per_channel", self.per_channel)


@dataclasses.dataclass(frozen=True)
class Auto:
    """Search each layer's threshold (and with ``method="auto"``, its method).

    Per layer, ``jaxsplit.auto`` measures the weight MSE of ``sum_i Q(W_i)`` against ``W``
    under ``spec`` for ``candidates`` thresholds (half of them fractions of ``max|W|``,
    half chosen so a given fraction of the values is split) in one compiled call, and
    keeps the best one whose extra non-zero parameters (summed over the branches, minus
    the layer's own, as a fraction of its size) stay within ``max_extra``. If no
    candidate beats not splitting, the layer is left untouched. Per-channel ``spec``:
    thresholds are per output channel.

    Attributes:
      spec: the ``QuantSpec`` the branches will be quantized with.
      candidates: number of thresholds tried per method, 2 to 1024.
      max_extra: budget on extra non-zeros as a fraction of the layer's parameters
        (``0.02`` = 2%), or ``None`` for no budget.

    Example:
      >>> from jaxsplit.quant import QuantSpec
      >>> Auto(QuantSpec(bits=8), max_extra=0.02).candidates
      64
      >>> Auto(QuantSpec(bits=8), candidates=1)
      Traceback (most recent call last):
      ...
      ValueError: Auto.candidates must be an int in [2, 1024], got 1
    """

    spec: quant.QuantSpec
    candidates: int = 64
    max_extra: float | None = None

    def __post_init__(self):
        if not isinstance(self.spec, quant.QuantSpec):
            raise TypeError(
                f"Auto.spec must be a jaxsplit.QuantSpec, got {self.spec!r} "
                f"({type(self.spec).__name__})"
            )
        c = self.candidates
        if isinstance(c, bool) or not isinstance(c, numbers.Integral):
            raise TypeError(f"Auto.candidates must be an int in [2, 1024], got {c!r}")
        if not 2 <= c <= 1024:
            raise ValueError(f"Auto.candidates must be an int in [2, 1024], got {c!r}")
        object.__setattr__(self, "candidates", int(c))
        if self.max_extra is not None:
            object.__setattr__(self, "max_extra", check_real("Auto", "max_extra", self.max_extra))


ThresholdSpec = float | Relative | Sigma | Percentile | Auto
_THRESHOLD_HELP = "a finite float >= 0, Relative(f), Sigma(k), Percentile(p) or Auto(spec)"
#: ``SplitConfig.method`` values: the kernels' methods, and ``"auto"`` (needs ``Auto``).
CONFIG_METHODS = (*kernels.METHODS, "auto")


def threshold_parts(spec: ThresholdSpec) -> tuple[str, float]:
    """``(kind, value)`` of a spec: the kind is static under ``jit``, the value is data.

    A per-channel spec's kind ends in ``"/channel"``.

    Example:
      >>> threshold_parts(Sigma(3)), threshold_parts(0.5)
      (('sigma', 3.0), ('absolute', 0.5))
      >>> threshold_parts(Relative(0.5, per_channel=True))
      ('relative/channel', 0.5)
    """
    if isinstance(spec, Auto):
        raise TypeError("Auto thresholds are searched per layer (jaxsplit.auto), not resolved")
    if isinstance(spec, Relative):
        kind, value = "relative", spec.fraction
    elif isinstance(spec, Sigma):
        kind, value = "sigma", spec.k
    elif isinstance(spec, Percentile):
        kind, value = "percentile", spec.p
    else:
        return "absolute", float(spec)
    return (f"{kind}/channel" if spec.per_channel else kind), value


def resolve_parts(kind: str, value, w: jax.Array) -> jax.Array:
    """The absolute threshold for kernel ``w`` from ``threshold_parts`` (``value`` may be traced).

    Statistics are taken over the finite values of ``w``, in float32 (so bfloat16 and
    float16 kernels get accurate statistics); callers cast the result to ``w``'s dtype
    before comparing, as for an absolute threshold. A scalar, or for a ``"/channel"``
    kind an array of shape ``(1, ..., 1, C)`` that broadcasts against ``w`` (one
    threshold per index of the last axis). Works under ``jit``.

    Example:
      >>> import jax.numpy as jnp
      >>> resolve_parts("relative/channel", 0.5, jnp.array([[1.0, -4.0], [2.0, 0.0]])).tolist()
      [[1.0, 2.0]]
    """
    value = jnp.asarray(value, jnp.float32)
    base, _, per = kind.partition("/")
    if base == "absolute":
        return value
    if per not in ("", "channel") or base not in ("relative", "sigma", "percentile"):
        raise ValueError(f"unknown threshold kind {kind!r}")
    axes = tuple(range(w.ndim - 1)) if per and w.ndim else None
    keep = bool(axes is not None)
    a = jnp.abs(w.astype(jnp.float32))
    finite = jnp.isfinite(a)
    if base == "relative":
        return value * jnp.max(jnp.where(finite, a, 0.0), axis=axes, keepdims=keep, initial=0.0)
    if base == "sigma":
        x = jnp.where(finite, w.astype(jnp.float32), jnp.nan)
        return value * jnp.sqrt(jnp.nanvar(x, axis=axes, keepdims=keep))
    return jnp.nanpercentile(jnp.where(finite, a, jnp.nan), value, axis=axes, keepdims=keep)


def resolve_threshold(spec: ThresholdSpec, w: jax.Array) -> jax.Array:
    """The absolute threshold a spec gives for kernel ``w``, as a float32 scalar.

    Example:
      >>> import jax.numpy as jnp
      >>> float(resolve_threshold(Relative(0.5), jnp.array([1.0, -4.0])))
      2.0
    """
    return resolve_parts(*threshold_parts(spec), w)


LayerPredicate = Callable[[str, Any], bool]


@dataclasses.dataclass(frozen=True, kw_only=True)
class SplitConfig:
    """What to split, where, and how.

    Attributes:
      layers: which layers to split. ``None`` or empty: nothing is processed (a
        warning is logged). A sequence of patterns, each an exact layer path
        (``"block_1/Dense_0"``), a glob whose ``*``/``?`` do not cross ``/`` (``**``
        does), or an ``"re:"``-prefixed regex matched with ``fullmatch``; a single
        string is one pattern. Or a callable ``(path, layer) -> bool``.
      threshold: absolute float ``>= 0`` or ``Relative(f)``, ``Sigma(k)``,
        ``Percentile(p)`` (each optionally ``per_channel=True``), resolved per layer; or
        ``Auto(spec, ...)``, searched per layer. Values with ``|w| > threshold`` are split.
      method: one of ``kernels.METHODS`` (``"balance"``, ``"random"``, ``"clip"``,
        ``"grid"``, ``"residual"``), or ``"auto"`` (with an ``Auto`` threshold: the
        best of ``auto.AUTO_METHODS`` per layer).
      branches: 2, 4 or 8; more than 2 only with ``"balance"`` (exact k-way shares).
      quant: the ``QuantSpec`` the branches will be quantized with; needed by
        ``"grid"`` and ``"residual"``. ``Auto`` carries its own (give at most one, or
        the same one twice).
      seed: integer seed for ``"random"``; folded with each layer's path.
      strict: a pattern that matches no layer raises ``ValueError`` (listing the
        available paths); ``False`` only logs a warning.
      allow_nonfinite: permit NaN/inf in selected kernels (they stay on ``branch_0``);
        otherwise such a kernel raises ``ValueError`` naming the layer.
      verbose: log one INFO line per selected layer on ``logging.getLogger("jaxsplit")``.

    Example:
      >>> cfg = SplitConfig(layers=["Dense_0", "block_*/Conv_0"], threshold=Relative(0.5))
      >>> cfg.layers, cfg.method
      (('Dense_0', 'block_*/Conv_0'), 'balance')
      >>> SplitConfig(layers=["Dense_0"], threshold=-1.0)
      Traceback (most recent call last):
      ...
      ValueError: SplitConfig.threshold must be a finite number in [0, inf), got -1.0
    """

    layers: Sequence[str] | LayerPredicate | None
    threshold: ThresholdSpec = 0.0
    method: str = "balance"
    branches: int = 2
    quant: quant.QuantSpec | None = None
    seed: int = 0
    strict: bool = True
    allow_nonfinite: bool = False
    verbose: bool = False

    def __post_init__(self):
        object.__setattr__(self, "layers", _check_layers(self.layers))
        th = self.threshold
        if not isinstance(th, Relative | Sigma | Percentile | Auto):
            if isinstance(th, bool) or not isinstance(th, numbers.Real):
                raise TypeError(
                    f"SplitConfig.threshold must be {_THRESHOLD_HELP}, got {th!r} "
                    f"({type(th).__name__})"
                )
            object.__setattr__(self, "threshold", check_real("SplitConfig", "threshold", th))
        if not isinstance(self.method, str) or self.method not in CONFIG_METHODS:
            raise ValueError(
                f"SplitConfig.method must be one of {list(CONFIG_METHODS)}, got {self.method!r}"
            )
        self._check_method_options()
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise TypeError(f"SplitConfig.seed must be an int, got {self.seed!r}")
        if not 0 <= int(self.seed) < 2**63:
            raise ValueError(f"SplitConfig.seed must be in [0, 2**63), got {self.seed!r}")
        for name in ("strict", "allow_nonfinite", "verbose"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"SplitConfig.{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def spec(self) -> quant.QuantSpec | None:
        """The branches' ``QuantSpec``: ``quant``, else the ``Auto`` threshold's, else None."""
        if self.quant is not None:
            return self.quant
        return self.threshold.spec if isinstance(self.threshold, Auto) else None

    def _check_method_options(self):
        b, m, q = self.branches, self.method, self.quant
        if isinstance(b, bool) or b not in kernels.BRANCHES:
            raise ValueError(
                f"SplitConfig.branches must be one of {list(kernels.BRANCHES)}, got {b!r}"
            )
        if b != 2 and m != "balance":
            raise ValueError(
                f"SplitConfig.branches={b} needs method='balance' (exact k-way shares), "
                f"got method={m!r}"
            )
        if q is not None and not isinstance(q, quant.QuantSpec):
            raise TypeError(
                f"SplitConfig.quant must be a jaxsplit.QuantSpec or None, got {q!r} "
                f"({type(q).__name__})"
            )
        auto = self.threshold if isinstance(self.threshold, Auto) else None
        if m == "auto" and auto is None:
            raise ValueError(
                f"SplitConfig.method='auto' needs threshold=Auto(spec), got "
                f"threshold={self.threshold!r}"
            )
        if auto is not None and q is not None and q != auto.spec:
            raise ValueError(
                f"SplitConfig.quant={q!r} differs from the Auto threshold's spec "
                f"{auto.spec!r}; give one of them"
            )
        if m in kernels.QUANT_METHODS and self.spec is None:
            raise ValueError(
                f"SplitConfig.method={m!r} needs quant=QuantSpec(...) (or an Auto threshold)"
            )
        if m == "grid" and not self.spec.symmetric:
            raise ValueError(
                f"SplitConfig.method='grid' needs a symmetric QuantSpec, got {self.spec!r}"
            )


def _check_layers(layers):
    if layers is None or callable(layers):
        return layers
    if isinstance(layers, str):
        layers = (layers,)
    if not isinstance(layers, Sequence):
        raise TypeError(
            "SplitConfig.layers must be None, a sequence of path patterns or a "
            f"callable (path, layer) -> bool, got {layers!r} ({type(layers).__name__})"
        )
    out = []
    for i, p in enumerate(layers):
        if not isinstance(p, str) or not p:
            raise TypeError(
                f"SplitConfig.layers[{i}] must be a non-empty string (exact path, "
                f"glob or 're:' regex), got {p!r}"
            )
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as e:
                raise ValueError(
                    f"SplitConfig.layers[{i}] is not a valid regex: {p!r} ({e})"
                ) from e
        out.append(p)
    return tuple(out)
