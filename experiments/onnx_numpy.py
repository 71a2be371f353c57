"""A tiny numpy interpreter for ONNX graphs: an independent reference for ``experiments.minilm``.

It executes the graph node by node (topological order, as stored), implementing only
the operators the MiniLM export uses. It knows nothing of our Flax mapping, so agreement
with ``minilm.embed`` checks the mapping and the model code together, without needing
``onnxruntime``. Needs the ``onnx`` package to read the file.

Example:
  >>> import numpy as np
  >>> from experiments import minilm
  >>> ids = np.array([[101, 2023, 102]]); mask = np.ones_like(ids)
  >>> out = run(minilm.locate_onnx(), {"input_ids": ids, "attention_mask": mask})  # doctest: +SKIP
  >>> out["461"].shape  # doctest: +SKIP
  (1, 384)
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

__all__ = ["OPS", "run"]

try:  # scipy comes with scikit-learn (experiments/dev extras)
    from scipy.special import erf as _erf
except ModuleNotFoundError:  # pragma: no cover - slow but exact fallback
    _erf = np.vectorize(math.erf, otypes=[np.float64])


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _layer_norm(x, scale, bias, *, axis=-1, epsilon=1e-5, **_):
    x64 = x.astype(np.float64)
    mu = x64.mean(axis=axis, keepdims=True)
    var = ((x64 - mu) ** 2).mean(axis=axis, keepdims=True)
    return (((x64 - mu) / np.sqrt(var + epsilon)) * scale + bias).astype(x.dtype)


def _softmax(x, *, axis=-1, **_):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _slice(x, starts, ends, axes=None, steps=None, **_):
    axes = range(len(starts)) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    idx = [slice(None)] * x.ndim
    for s, e, a, st in zip(starts, ends, axes, steps, strict=True):
        idx[int(a)] = slice(int(s), int(e), int(st))
    return x[tuple(idx)]


def _reshape(x, shape, **_):
    shape = [x.shape[i] if d == 0 else int(d) for i, d in enumerate(shape)]
    return x.reshape(shape)


def _clip(x, lo=None, hi=None, **_):
    return np.clip(x, lo, hi).astype(x.dtype)


_DTYPES = {1: np.float32, 6: np.int32, 7: np.int64, 9: np.bool_, 11: np.float64}

#: ``op_type -> f(*inputs, **attributes)``.
OPS = {
    "Add": lambda a, b: a + b,
    "Sub": lambda a, b: a - b,
    "Mul": lambda a, b: a * b,
    "Div": lambda a, b: a / b,
    "MatMul": np.matmul,
    "Erf": lambda x: _erf(x).astype(x.dtype),
    "Equal": np.equal,
    "Where": np.where,
    "Identity": lambda x: x,
    "Shape": lambda x: np.array(x.shape, np.int64),
    "Gather": lambda x, i, axis=0: np.take(x, i, axis=axis),
    "Unsqueeze": lambda x, axes: np.expand_dims(x, tuple(int(a) for a in np.atleast_1d(axes))),
    "Concat": lambda *xs, axis: np.concatenate([np.atleast_1d(x) for x in xs], axis=axis),
    "Reshape": _reshape,
    "Transpose": lambda x, perm: np.transpose(x, perm),
    "Softmax": _softmax,
    "LayerNormalization": _layer_norm,
    "Slice": _slice,
    "Expand": lambda x, shape: x * np.ones(shape, x.dtype),
    "Cast": lambda x, to: x.astype(_DTYPES[to]),
    "ReduceSum": lambda x, axes, keepdims=1: x.sum(
        axis=tuple(int(a) for a in axes), keepdims=bool(keepdims)
    ),
    "Clip": _clip,
}


def run(path, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Runs the ONNX graph at ``path`` on ``feeds``; returns ``{graph output name: array}``.

    Raises:
      NotImplementedError: the graph uses an operator not in ``OPS``.
    """
    import onnx
    from onnx import numpy_helper

    g = onnx.load(str(path)).graph
    env = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    env.update({k: np.asarray(v) for k, v in feeds.items()})
    env[""] = None
    for node in g.node:
        attrs = _attrs(node)
        if node.op_type == "Constant":
            out = numpy_helper.to_array(attrs["value"])
        elif node.op_type == "ConstantOfShape":
            value = numpy_helper.to_array(attrs["value"]) if "value" in attrs else np.zeros(1)
            out = np.full(tuple(env[node.input[0]]), value[0], value.dtype)
        elif node.op_type in OPS:
            if "value" in attrs:
                attrs.pop("value")
            out = OPS[node.op_type](*(env[i] for i in node.input), **attrs)
        else:
            raise NotImplementedError(f"ONNX op {node.op_type!r} ({node.name})")
        env[node.output[0]] = np.asarray(out)
    return {o.name: env[o.name] for o in g.output}
