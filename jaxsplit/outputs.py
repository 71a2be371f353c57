"""Output-level evaluation: float model vs fake-quantized original vs fake-quantized split model.

For weight quantization the split model's output is ``sum_i (Q(W_i) X) + b``, which is
``(sum_i Q(W_i)) X + b``: the original model run with every kernel replaced by the sum of its
separately quantized branches (``quantized_weights``). That tree drives the original model
(linen or NNX), so no wrapper is needed and layer paths stay those of the original model.
Activations (``act_bits``) are fake-quantized per tensor at the input of every
Dense/Conv-like layer, with scales calibrated by max-abs over the given inputs in the float
model; both branches of a split layer see the same input, so this equals quantizing the
input of each branch. Per-layer outputs are captured with ``nn.intercept_methods`` (linen)
or probe modules on a copy of the model (NNX).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from jaxsplit import quant
from jaxsplit.errors import ConfigError, ConfigTypeError
from jaxsplit.measure import TwinCost, extra_nonzero, sqnr_db, twin_cost
from jaxsplit.quant import QuantSpec
from jaxsplit.select import select_layers
from jaxsplit.split import merge_params
from jaxsplit.tree import (
    WEIGHT_NAMES,
    Weights,
    branch_weights,
    find_layers,
    map_branch_weights,
    rebuild,
)

__all__ = [
    "OutputError",
    "LayerOutput",
    "OutputReport",
    "quantized_weights",
    "evaluate_outputs",
    "run_with_hook",
]

LINEN_LAYERS = (nn.Dense, nn.DenseGeneral, nn.Conv, nn.ConvTranspose, nn.Einsum)
NNX_LAYERS = (nnx.Linear, nnx.LinearGeneral, nnx.Conv, nnx.ConvTranspose, nnx.Einsum)


@dataclasses.dataclass(frozen=True)
class OutputError:
    """Quantized model output against the float output.

    Attributes:
      mse: mean squared difference over all output elements.
      sqnr: ``10·log10(mean(y²) / mse)`` in dB.
      cosine: cosine similarity per sample (leading axis), averaged.
      agreement: fraction of samples whose argmax over the last axis matches the float
        model's (``None`` for outputs with fewer than 2 dimensions).
    """

    mse: float
    sqnr: float
    cosine: float
    agreement: float | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class LayerOutput:
    """SQNR (dB) of one layer's output in the quantized original and split models."""

    path: str
    sqnr_before: float
    sqnr_after: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class OutputReport:
    """What quantization does to a model's outputs, before and after the split.

    Attributes:
      spec: weight ``QuantSpec``; ``act_bits``: activation bits (``None``: float activations).
      before: original model with quantized weights vs float; ``after``: split model.
      layers: per Dense/Conv-like layer call, output SQNR before/after (call order).
      extra_nonzero: parameters the split adds (its cost), over all layers
        (``jaxsplit.measure.extra_nonzero``).
      n_weights: values in all layer weights (so ``extra_fraction`` is a fraction of them).
      macs: multiply-adds of the original model's Dense/Conv-like layer calls over
        ``inputs``; ``weight_bytes``: bytes of all layer weights.
      extra_macs_dense, extra_macs_sparse: multiply-adds the twins add over the same
        calls, run as dense layers or as sparse products; ``extra_bytes_dense``,
        ``extra_bytes_sparse``: their weight bytes (``jaxsplit.measure.twin_cost``). A
        call's multiply-adds are ``(output elements / W.shape[-1]) · W.size``: exact for
        ``Dense`` and ``Conv`` (``ConvTranspose`` as XLA runs it, on the dilated input);
        an estimate for ``DenseGeneral``/``Einsum`` with several output axes.
    """

    spec: QuantSpec
    act_bits: int | None
    before: OutputError
    after: OutputError
    layers: tuple[LayerOutput, ...]
    extra_nonzero: int
    n_weights: int = 0
    macs: int = 0
    weight_bytes: int = 0
    extra_macs_dense: int = 0
    extra_macs_sparse: int = 0
    extra_bytes_dense: int = 0
    extra_bytes_sparse: int = 0

    @property
    def extra_fraction(self) -> float:
        """``extra_nonzero / n_weights``."""
        return self.extra_nonzero / self.n_weights if self.n_weights else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values."""
        return {
            "spec": self.spec.to_dict(),
            "act_bits": self.act_bits,
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "layers": [r.to_dict() for r in self.layers],
            "extra_nonzero": self.extra_nonzero,
            "n_weights": self.n_weights,
            "extra_fraction": self.extra_fraction,
            **{
                k: getattr(self, k)
                for k in ("macs", "weight_bytes", *(f for f in TwinCost._fields))
            },
        }


def quantized_weights(
    params: Mapping,
    spec: QuantSpec,
    *,
    quantize: Callable = quant.quantize,
    layers=None,
    weights: Weights = WEIGHT_NAMES,
    twin_spec: QuantSpec | None = None,
) -> Mapping:
    """The tree with every layer's weight replaced by ``sum_i Q(W_i)`` (branches merged).

    Split layers are quantized branch by branch (each with its own scale) and summed, so
    the result runs on the *original* model; unsplit layers get ``Q(W)``. Other leaves
    (biases, batch statistics) are unchanged; containers are preserved.

    Args:
      params: any supported tree, split or not.
      spec: the weight ``QuantSpec``.
      quantize: ``quant.quantize``, or ``quant.fake_quant`` for a tree to train through
        (straight-through gradients into every branch; see ``jaxsplit.qat``).
      layers: which layers to quantize, as ``SplitConfig.layers`` (patterns or a
        predicate); ``None``: every layer. Other layers keep their float weights (split
        ones are merged).
      weights: which leaves are weights (``SplitConfig.weights``: leaf names or a
        predicate ``(leaf_path, array) -> bool``); split layers are found regardless.
      twin_spec: the ``QuantSpec`` of the twins (``branch_1 …``) for mixed-precision
        splits (``Auto(twin_spec=...)``); ``None``: every branch under ``spec``.

    Returns:
      An unsplit tree of the same container types.

    Example:
      >>> import numpy as np
      >>> p = {"d": {"branch_0": {"kernel": np.array([0.3, 1.0], np.float32)},
      ...            "branch_1": {"kernel": np.array([0.0, 1.0], np.float32)}}}
      >>> quantized_weights(p, QuantSpec(bits=2))["d"]["kernel"].tolist()
      [0.0, 2.0]
    """
    if layers is None:
        chosen = find_layers(params, weights).values()
    else:
        chosen = select_layers(params, layers, weights)[0]

    def q(w, i):
        return quantize(w, spec if i == 0 or twin_spec is None else twin_spec)

    replacements = {layer.keys: map_branch_weights(layer, q, with_index=True) for layer in chosen}
    return merge_params(rebuild(params, replacements))


def _weight_counts(params2: Mapping, weights) -> tuple[int, int]:
    """``(extra non-zeros, values)`` over every layer weight of a (split) tree."""
    extra, size = 0, 0
    for layer in find_layers(params2, weights).values():
        ws = branch_weights(layer)
        size += int(ws[0].size)
        if layer.branches:
            extra += int(extra_nonzero(sum(jnp.asarray(w) for w in ws), ws))
    return extra, size


def _costs(params2: Mapping, calls: list[tuple[str, tuple]], weights) -> dict[str, int]:
    """MACs and bytes of the layer calls ``[(path, output shape)]`` and of the twins."""
    layers = find_layers(params2, weights)
    out = dict.fromkeys(("macs", "weight_bytes", *TwinCost._fields), 0)
    for layer in layers.values():
        ws = branch_weights(layer)
        out["weight_bytes"] += int(ws[0].size) * jnp.dtype(ws[0].dtype).itemsize
        cost = twin_cost(ws[0].size, jnp.dtype(ws[0].dtype).itemsize, _twin_nnz(ws))
        out["extra_bytes_dense"] += cost.extra_bytes_dense
        out["extra_bytes_sparse"] += cost.extra_bytes_sparse
    for path, shape in calls:
        layer = layers.get(path)
        if layer is None:
            continue
        ws = branch_weights(layer)
        w = ws[0]
        apps = _prod(shape) // max(int(w.shape[-1]), 1) if w.ndim else 0
        cost = twin_cost(w.size, 1, _twin_nnz(ws))
        out["macs"] += apps * int(w.size)
        out["extra_macs_dense"] += apps * cost.extra_macs_dense
        out["extra_macs_sparse"] += apps * cost.extra_macs_sparse
    return out


def _twin_nnz(ws) -> list[int]:
    return [int(jnp.count_nonzero(jnp.asarray(w))) for w in ws[1:]]


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


# --- running a model with hooks -----------------------------------------------------------

# A hook: (path, call, x) -> y, where call(x) runs the layer on (possibly changed) input x.
Hook = Callable[[str, Callable, jax.Array], jax.Array]


def _run_linen(model, variables, args, kwargs, hook: Hook):
    def interceptor(next_fun, a, kw, context):
        if context.method_name != "__call__" or not isinstance(context.module, LINEN_LAYERS):
            return next_fun(*a, **kw)
        path = "/".join(str(p) for p in context.module.path)
        return hook(path, lambda x: next_fun(x, *a[1:], **kw), a[0])

    with nn.intercept_methods(interceptor):
        return model.apply(variables, *args, **kwargs)


class _Probe(nnx.Module):
    """Stands in for an NNX layer on a copy of the model and routes its calls to a hook."""

    def __init__(self, inner, path: str, hook: Hook):
        self.inner = inner
        self.path = path
        self.hook = hook

    def __call__(self, x, *a, **kw):
        return self.hook(self.path, lambda v: self.inner(v, *a, **kw), x)


def _run_nnx(model, state, args, kwargs, hook: Hook):
    copy = nnx.clone(model)  # fresh Variables: the user's model is never touched
    if state is not None:
        nnx.update(copy, state)
    targets = [(p, m) for p, m in nnx.iter_modules(copy) if p and isinstance(m, NNX_LAYERS)]
    for path, m in targets:
        parent = copy
        for key in path[:-1]:
            parent = parent[key] if isinstance(key, int) else getattr(parent, key)
        probe = _Probe(m, "/".join(str(p) for p in path), hook)
        if isinstance(path[-1], int):
            parent[path[-1]] = probe
        else:
            setattr(parent, path[-1], probe)
    return copy(*args, **kwargs)


def run_with_hook(model, variables, args, kwargs, hook: Hook):
    """Runs a linen or NNX ``model`` with every Dense/Conv/Einsum call routed to ``hook``.

    ``hook(path, call, x)`` receives the layer's path, the layer as a function of its
    input and the input; it returns the layer's output (``call(x)``, or of a changed
    input). NNX models run on a clone (the user's model is never touched).

    Example:
      >>> import jax.numpy as jnp, flax.linen as nn
      >>> seen = []
      >>> m = nn.Dense(2)
      >>> v = m.init(jax.random.key(0), jnp.ones((1, 3)))
      >>> _ = run_with_hook(m, v, (jnp.ones((1, 3)),), {},
      ...                   lambda p, call, x: seen.append(x.shape) or call(x))
      >>> seen
      [(1, 3)]
    """
    if isinstance(model, nn.Module):
        return _run_linen(model, variables, args, kwargs, hook)
    if isinstance(model, nnx.Module):
        return _run_nnx(model, variables, args, kwargs, hook)
    raise TypeError(
        f"model must be a flax.linen.Module or a flax.nnx.Module, got {type(model).__name__}"
    )


def _runner(model, kwargs: dict, act_spec: QuantSpec | None):
    """``(run, paths)``: ``run(variables, act, args) -> (output, [(max|x|, y)] per layer call)``
    compiled once per tree structure; ``paths`` lists the layer paths in call order (filled when
    ``run`` is traced)."""
    paths: list[str] = []

    @jax.jit
    def run(variables, act, args):
        calls: list = []
        out = run_with_hook(model, variables, args, kwargs, _recorder(calls, act, act_spec))
        paths[:] = [c[0] for c in calls]
        return out, [(c[1], c[2]) for c in calls]

    return run, paths


def _recorder(calls: list, act: dict | None, act_spec: QuantSpec | None) -> Hook:
    """A hook that fake-quantizes inputs with calibrated scales and records calls in order."""

    def hook(path, call, x):
        if act is not None:
            qp = quant.QParams(act[path], jnp.zeros((), jnp.float32))
            x = quant.quantize(x, act_spec, params=qp)
        y = call(x)
        calls.append((path, jnp.max(jnp.abs(x.astype(jnp.float32))), y))
        return y

    return hook


@jax.jit
def _error_stats(y: jax.Array, yq: jax.Array) -> dict[str, jax.Array]:
    """MSE, signal power, mean per-sample cosine and top-1 agreement, in one compiled call."""
    y, yq = y.astype(jnp.float32), yq.astype(jnp.float32)
    flat = y.reshape(y.shape[0], -1) if y.ndim >= 1 else y.reshape(1, -1)
    flatq = yq.reshape(flat.shape)
    num = jnp.sum(flat * flatq, axis=1)
    den = jnp.linalg.norm(flat, axis=1) * jnp.linalg.norm(flatq, axis=1)
    cos = jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), jnp.where(num == 0, 1.0, 0.0))
    out = {
        "mse": jnp.mean(jnp.square(yq - y)),
        "signal": jnp.mean(jnp.square(y)),
        "cosine": jnp.mean(cos),
    }
    if y.ndim >= 2:
        out["agreement"] = jnp.mean(jnp.argmax(y, -1) == jnp.argmax(yq, -1))
    return out


def _output_error(y: jax.Array, yq: jax.Array) -> OutputError:
    st = {k: float(v) for k, v in jax.device_get(_error_stats(y, yq)).items()}
    return OutputError(
        st["mse"], sqnr_db(st["signal"], st["mse"]), st["cosine"], st.get("agreement")
    )


def _flat_output(out) -> jax.Array:
    leaves = jax.tree_util.tree_leaves(out)
    if len(leaves) == 1:
        return jnp.asarray(leaves[0])
    n = jnp.shape(leaves[0])[0] if jnp.ndim(leaves[0]) else 1
    return jnp.concatenate([jnp.reshape(x, (n, -1)) for x in leaves], axis=1)


def evaluate_outputs(
    model,
    params: Mapping | None,
    params2: Mapping,
    inputs,
    spec: QuantSpec,
    act_bits: int | None = None,
    *,
    apply_kwargs: Mapping | None = None,
    weights: Weights = WEIGHT_NAMES,
) -> OutputReport:
    """Float output vs fake-quantized outputs of the original and the split model.

    Weights are fake-quantized per layer (each branch of a split layer separately, see
    ``quantized_weights``); with ``act_bits``, every Dense/Conv-like layer's input is also
    fake-quantized (symmetric, per tensor, scale from max-abs over ``inputs`` in the float
    model, the same scales for both quantized models).

    Args:
      model: a ``flax.linen.Module``, or an ``nnx.Module`` (its own weights are the original).
      params: linen variables of the original model; for NNX an ``nnx.State`` (or
        ``None``: the model's own state).
      params2: the same tree after ``split_params``.
      inputs: one array, or a tuple of positional arguments for the model.
      spec: weight ``QuantSpec``.
      act_bits: activation bits (2–16) or ``None`` for float activations.
      apply_kwargs: keyword arguments for every call (e.g. ``{"train": False}``).
      weights: which leaves are weights (``SplitConfig.weights``: leaf names or a
        predicate ``(leaf_path, array) -> bool``); split layers are found regardless.

    Returns:
      An ``OutputReport``.

    Raises:
      TypeError: ``model`` is neither linen nor NNX, or ``spec`` is not a ``QuantSpec``.
      ValueError: ``act_bits`` is out of range.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> from jaxsplit import SplitConfig, Relative, split_params
      >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(4)])
      >>> x = jax.random.normal(jax.random.key(0), (8, 16))
      >>> v = model.init(jax.random.key(1), x)
      >>> v2 = split_params(v, SplitConfig(layers=["**"], threshold=Relative(0.5)))
      >>> r = evaluate_outputs(model, v, v2, x, QuantSpec(bits=4), act_bits=8)
      >>> r.after.sqnr > r.before.sqnr, [lay.path for lay in r.layers]
      (True, ['layers_0', 'layers_2'])
    """
    if not isinstance(spec, QuantSpec):
        raise ConfigTypeError(
            "evaluate_outputs",
            "spec",
            f"spec must be a jaxsplit.QuantSpec, got {spec!r} ({type(spec).__name__})",
        )
    if act_bits is not None and (
        isinstance(act_bits, bool) or not isinstance(act_bits, int) or not 2 <= act_bits <= 16
    ):
        raise ConfigError(
            "evaluate_outputs",
            "act_bits",
            f"act_bits must be None or an int in [2, 16], got {act_bits!r}",
        )
    act_spec = None if act_bits is None else QuantSpec(bits=act_bits)
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    kwargs = dict(apply_kwargs or {})
    if params is None and isinstance(model, nnx.Module):
        params = nnx.state(model)

    if not isinstance(model, nn.Module | nnx.Module):
        raise TypeError(
            f"model must be a flax.linen.Module or a flax.nnx.Module, got {type(model).__name__}"
        )
    run, paths = _runner(model, kwargs, act_spec)
    y, float_calls = run(params, None, args)
    act = None
    if act_spec is not None:
        amax: dict[str, jax.Array] = {}
        for path, (m, _) in zip(paths, float_calls, strict=True):
            amax[path] = jnp.maximum(amax.get(path, 0.0), m)
        act = {path: m / act_spec.qmax for path, m in amax.items()}
    yb, calls_b = run(quantized_weights(params, spec, weights=weights), act, args)
    ya, calls_a = run(quantized_weights(params2, spec, weights=weights), act, args)
    layers = []
    for path, (_, f), (_, b), (_, a) in zip(paths, float_calls, calls_b, calls_a, strict=True):
        layers.append(LayerOutput(path, _layer_sqnr(f, b), _layer_sqnr(f, a)))
    y, yb, ya = _flat_output(y), _flat_output(yb), _flat_output(ya)
    return OutputReport(
        spec,
        act_bits,
        _output_error(y, yb),
        _output_error(y, ya),
        tuple(layers),
        *_weight_counts(params2, weights),
        **_costs(
            params2,
            [(p, jnp.shape(f)) for p, (_, f) in zip(paths, float_calls, strict=True)],
            weights,
        ),
    )


def _layer_sqnr(f: jax.Array, q: jax.Array) -> float:
    st = jax.device_get(_error_stats(f, q))
    return sqnr_db(float(st["signal"]), float(st["mse"]))
