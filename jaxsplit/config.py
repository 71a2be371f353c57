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

from jaxsplit import kernels

__all__ = [
    "SplitConfig",
    "Relative",
    "Sigma",
    "Percentile",
    "ThresholdSpec",
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


@dataclasses.dataclass(frozen=True)
class Relative:
    """Threshold ``fraction × max|W|`` of each layer.

    ``Relative(0.5)`` splits the top half of the range.

    Example:
      >>> Relative(0.5)
      Relative(fraction=0.5)
    """

    fraction: float

    def __post_init__(self):
        object.__setattr__(
            self,
            "fraction",
            check_real("Relative", "fraction", self.fraction, hi=1.0, hi_inclusive=True),
        )


@dataclasses.dataclass(frozen=True)
class Sigma:
    """Threshold ``k × std(W)`` of each layer (``Sigma(3)``: values beyond three sigmas).

    Example:
      >>> Sigma(3)
      Sigma(k=3.0)
    """

    k: float

    def __post_init__(self):
        object.__setattr__(self, "k", check_real("Sigma", "k", self.k))


@dataclasses.dataclass(frozen=True)
class Percentile:
    """Threshold at the ``p``-th percentile of each layer's ``|W|`` (``Percentile(99.9)``).

    Example:
      >>> Percentile(99.9)
      Percentile(p=99.9)
    """

    p: float

    def __post_init__(self):
        object.__setattr__(
            self, "p", check_real("Percentile", "p", self.p, hi=100.0, hi_inclusive=True)
        )


ThresholdSpec = float | Relative | Sigma | Percentile
_THRESHOLD_HELP = "a finite float >= 0, Relative(f), Sigma(k) or Percentile(p)"


def threshold_parts(spec: ThresholdSpec) -> tuple[str, float]:
    """``(kind, value)`` of a spec: the kind is static under ``jit``, the value is data.

    Example:
      >>> threshold_parts(Sigma(3)), threshold_parts(0.5)
      (('sigma', 3.0), ('absolute', 0.5))
    """
    if isinstance(spec, Relative):
        return "relative", spec.fraction
    if isinstance(spec, Sigma):
        return "sigma", spec.k
    if isinstance(spec, Percentile):
        return "percentile", spec.p
    return "absolute", float(spec)


def resolve_parts(kind: str, value, w: jax.Array) -> jax.Array:
    """The absolute threshold for kernel ``w`` from ``threshold_parts`` (``value`` may be traced).

    Statistics are taken over the finite values of ``w``, in float32 (so bfloat16 and
    float16 kernels get accurate statistics); callers cast the result to ``w``'s dtype
    before comparing, as for an absolute threshold. Works under ``jit``.
    """
    value = jnp.asarray(value, jnp.float32)
    if kind == "absolute":
        return value
    a = jnp.abs(w.astype(jnp.float32))
    finite = jnp.isfinite(a)
    if kind == "relative":
        return value * jnp.max(jnp.where(finite, a, 0.0), initial=0.0)
    if kind == "sigma":
        x = jnp.where(finite, w.astype(jnp.float32), jnp.nan)
        return value * jnp.sqrt(jnp.nanvar(x))
    if kind == "percentile":
        return jnp.nanpercentile(jnp.where(finite, a, jnp.nan), value)
    raise ValueError(f"unknown threshold kind {kind!r}")


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
        ``Percentile(p)``, resolved per layer. Values with ``|w| > threshold`` are split.
      method: one of ``kernels.METHODS`` (``"balance"``, ``"random"``).
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
    seed: int = 0
    strict: bool = True
    allow_nonfinite: bool = False
    verbose: bool = False

    def __post_init__(self):
        object.__setattr__(self, "layers", _check_layers(self.layers))
        th = self.threshold
        if not isinstance(th, Relative | Sigma | Percentile):
            if isinstance(th, bool) or not isinstance(th, numbers.Real):
                raise TypeError(
                    f"SplitConfig.threshold must be {_THRESHOLD_HELP}, got {th!r} "
                    f"({type(th).__name__})"
                )
            object.__setattr__(self, "threshold", check_real("SplitConfig", "threshold", th))
        if not isinstance(self.method, str) or self.method not in kernels.METHODS:
            raise ValueError(
                f"SplitConfig.method must be one of {list(kernels.METHODS)}, got {self.method!r}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise TypeError(f"SplitConfig.seed must be an int, got {self.seed!r}")
        if not 0 <= int(self.seed) < 2**63:
            raise ValueError(f"SplitConfig.seed must be in [0, 2**63), got {self.seed!r}")
        for name in ("strict", "allow_nonfinite", "verbose"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"SplitConfig.{name} must be a bool, got {getattr(self, name)!r}")


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
