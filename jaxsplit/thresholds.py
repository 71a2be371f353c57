"""Threshold objects: ``Absolute``, ``Relative``, ``Sigma``, ``Percentile``.

Each resolves itself on a kernel (``t.resolve(w)``), labels itself in the CLI's syntax
(``t.label``: ``0.5``, ``rel:0.5``, ``sigma:3``, ``pct:99.9``, ``/ch`` when per channel)
and parses back from that text (``parse``). Under ``jit`` the *rule* (``t.kind``, per
channel or not, the channel axis) is static and ``t.value`` is data, so thresholds of one
kind share a compiled program (``resolve_rule``).

The per-channel axis has one source, ``channel_axis``: a per-channel threshold takes one
value per index of the kernel's channel axis (the last axis of a Flax kernel by default,
or ``QuantSpec.axis`` where a spec is known, see ``SplitConfig.channel_axis``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jaxsplit.errors import ConfigError, ConfigTypeError
from jaxsplit.validate import check_flag, check_real

__all__ = [
    "Threshold",
    "Absolute",
    "Relative",
    "Sigma",
    "Percentile",
    "KINDS",
    "SYNTAX",
    "as_threshold",
    "channel_axis",
    "parse",
    "resolve_rule",
]

#: The CLI syntax of a threshold, for help texts and errors.
SYNTAX = "T (absolute), rel:F (F x max|W|), sigma:K (K x std), pct:P (percentile); /ch: per channel"


def channel_axis(ndim: int, axis: int = -1) -> int:
    """``axis`` of an ``ndim``-dimensional kernel as a non-negative index.

    Raises:
      ConfigError: ``axis`` is out of range for the kernel.

    Example:
      >>> channel_axis(4), channel_axis(2, 0)
      (3, 0)
    """
    if not -ndim <= axis < ndim:
        raise ConfigError(
            "QuantSpec",
            "axis",
            f"channel axis {axis} is out of range for a {ndim}-d kernel "
            f"(valid: {-ndim} to {ndim - 1})",
        )
    return axis % ndim


def resolve_rule(kind: str, value, w: jax.Array, axis: int | None = None) -> jax.Array:
    """The absolute threshold of rule ``kind`` with ``value`` (may be traced) for kernel ``w``.

    Statistics are taken over the finite values of ``w``, in float32 (so bfloat16 and
    float16 kernels get accurate statistics); callers cast the result to ``w``'s dtype
    before comparing. ``axis=None``: a scalar; else one threshold per index of that
    (non-negative) axis, shaped to broadcast against ``w``. Works under ``jit``.

    Example:
      >>> import jax.numpy as jnp
      >>> resolve_rule("relative", 0.5, jnp.array([[1.0, -4.0], [2.0, 0.0]]), axis=1).tolist()
      [[1.0, 2.0]]
    """
    value = jnp.asarray(value, jnp.float32)
    if kind == "absolute":
        return value
    if kind not in KINDS:
        raise ConfigError("Threshold", "kind", f"unknown threshold kind {kind!r}; valid: {KINDS}")
    per = axis is not None and w.ndim > 0
    axes = tuple(i for i in range(w.ndim) if i != axis) if per else None
    a = jnp.abs(w.astype(jnp.float32))
    finite = jnp.isfinite(a)
    if kind == "relative":
        return value * jnp.max(jnp.where(finite, a, 0.0), axis=axes, keepdims=per, initial=0.0)
    if kind == "sigma":
        # two fused reductions over the finite values (``nanvar`` would materialise
        # float32 copies of the kernel: 7x a bfloat16 kernel's bytes at peak)
        x = w.astype(jnp.float32)
        n = jnp.sum(finite, axis=axes, keepdims=per, dtype=jnp.float32)
        mean = jnp.sum(jnp.where(finite, x, 0.0), axis=axes, keepdims=per) / n
        d = jnp.where(finite, x - mean, 0.0)
        return value * jnp.sqrt(jnp.sum(d * d, axis=axes, keepdims=per) / n)
    return jnp.nanpercentile(jnp.where(finite, a, jnp.nan), value, axis=axes, keepdims=per)


class Threshold:
    """Base of the threshold objects (frozen dataclasses holding one number).

    Attributes (class level):
      kind: the rule's static name (``"relative"``).
      prefix: its CLI prefix (``"rel:"``).
    """

    kind: ClassVar[str]
    prefix: ClassVar[str]
    per_channel: bool = False
    value: float  # the number the rule is parameterised by (data under ``jit``)

    @property
    def label(self) -> str:
        """The CLI text of this threshold (``parse(t.label) == t``)."""
        return f"{self.prefix}{self.value:g}{'/ch' if self.per_channel else ''}"

    def resolve(self, w: jax.Array, axis: int = -1) -> jax.Array:
        """The absolute threshold for kernel ``w`` (per index of ``axis`` if per channel).

        Example:
          >>> import jax.numpy as jnp
          >>> float(Relative(0.5).resolve(jnp.array([1.0, -4.0])))
          2.0
        """
        ax = channel_axis(w.ndim, axis) if self.per_channel and w.ndim else None
        return resolve_rule(self.kind, self.value, w, ax)

    def __repr__(self) -> str:
        name = dataclasses.fields(self)[0].name
        tail = ", per_channel=True" if self.per_channel else ""
        return f"{type(self).__name__}({name}={self.value!r}{tail})"


class _Statistic(Threshold):
    """A threshold resolved from a statistic of ``|W|``; ``value`` is its one number."""

    @property
    def value(self) -> float:
        """The rule's number (``fraction``, ``k`` or ``p``)."""
        return dataclasses.astuple(self)[0]


def _init(self, owner: str, field: str, **bounds) -> None:
    object.__setattr__(self, field, check_real(owner, field, getattr(self, field), **bounds))
    check_flag(owner, "per_channel", self.per_channel)


@dataclasses.dataclass(frozen=True, repr=False)
class Absolute(Threshold):
    """A fixed threshold: values with ``|w| > value`` split (a plain float means this).

    Example:
      >>> Absolute(0.5), Absolute(0.5).label
      (Absolute(value=0.5), '0.5')
    """

    value: float
    kind: ClassVar[str] = "absolute"
    prefix: ClassVar[str] = ""

    def __post_init__(self):
        object.__setattr__(self, "value", check_real("Absolute", "value", self.value))


@dataclasses.dataclass(frozen=True, repr=False)
class Relative(_Statistic):
    """Threshold ``fraction × max|W|`` of each layer (or of each output channel).

    ``Relative(0.5)`` splits the top half of the range. With ``per_channel=True`` the
    maximum is taken per output channel (see ``channel_axis``), which suits per-channel
    quantization: a tensor-wide threshold leaves small channels unsplit.

    Example:
      >>> Relative(0.5), Relative(0.5, per_channel=True).label
      (Relative(fraction=0.5), 'rel:0.5/ch')
    """

    fraction: float
    per_channel: bool = False
    kind: ClassVar[str] = "relative"
    prefix: ClassVar[str] = "rel:"

    def __post_init__(self):
        _init(self, "Relative", "fraction", hi=1.0, hi_inclusive=True)


@dataclasses.dataclass(frozen=True, repr=False)
class Sigma(_Statistic):
    """Threshold ``k × std(W)`` of each layer (``Sigma(3)``: values beyond three sigmas).

    ``per_channel=True``: one standard deviation per output channel.

    Example:
      >>> Sigma(3)
      Sigma(k=3.0)
    """

    k: float
    per_channel: bool = False
    kind: ClassVar[str] = "sigma"
    prefix: ClassVar[str] = "sigma:"

    def __post_init__(self):
        _init(self, "Sigma", "k")


@dataclasses.dataclass(frozen=True, repr=False)
class Percentile(_Statistic):
    """Threshold at the ``p``-th percentile of each layer's ``|W|`` (``Percentile(99.9)``).

    ``per_channel=True``: one percentile per output channel.

    Example:
      >>> Percentile(99.9)
      Percentile(p=99.9)
    """

    p: float
    per_channel: bool = False
    kind: ClassVar[str] = "percentile"
    prefix: ClassVar[str] = "pct:"

    def __post_init__(self):
        _init(self, "Percentile", "p", hi=100.0, hi_inclusive=True)


_CLASSES = (Absolute, Relative, Sigma, Percentile)
#: Rule names, static under ``jit``.
KINDS = tuple(c.kind for c in _CLASSES)
_BY_PREFIX = {c.prefix: c for c in _CLASSES}


def as_threshold(x: Any, *, owner: str = "SplitConfig", field: str = "threshold") -> Threshold:
    """A threshold object for ``x`` (a float becomes ``Absolute``).

    Raises:
      ConfigTypeError: ``x`` is neither a real number nor a threshold object.
      ConfigError: ``x`` is a negative or non-finite number.

    Example:
      >>> as_threshold(0.5), as_threshold(Sigma(2))
      (Absolute(value=0.5), Sigma(k=2.0))
    """
    if isinstance(x, Threshold):
        return x
    return Absolute(check_real(owner, field, x))


def parse(text: str) -> Threshold:
    """A threshold from its CLI text: ``T``, ``rel:F``, ``sigma:K``, ``pct:P``, optional ``/ch``.

    Raises:
      ConfigError: unknown prefix, not a number, ``/ch`` on an absolute threshold, or a
        value the threshold rejects (the message starts with the quoted text and shows
        the syntax).

    Example:
      >>> parse("sigma:3"), parse("0.5"), parse("rel:0.5/ch")
      (Sigma(k=3.0), Absolute(value=0.5), Relative(fraction=0.5, per_channel=True))
    """
    if not isinstance(text, str):
        raise ConfigTypeError("threshold", "text", f"{text!r}: threshold text must be a str")
    body, per = (text[:-3], True) if text.endswith("/ch") else (text, False)
    prefix, sep, number = body.rpartition(":")
    cls = _BY_PREFIX.get(f"{prefix}:" if sep else "")
    if cls is None:
        raise ConfigError("threshold", "text", f"{text!r}: unknown kind {prefix!r}; use {SYNTAX}")
    try:
        value = float(number)
    except ValueError:
        raise ConfigError("threshold", "text", f"{text!r} is not a number; use {SYNTAX}") from None
    if per and cls is Absolute:
        raise ConfigError("threshold", "text", f"{text!r}: an absolute threshold has no /ch form")
    try:
        if cls is Absolute:  # a plain number is what SplitConfig.threshold takes
            return as_threshold(value)
        return cls(value, per_channel=per)
    except (ConfigError, ConfigTypeError) as e:
        raise ConfigError("threshold", "text", f"{text!r}: {e}") from None
