"""The tree contract in one module: layers, their paths, branch names, rebuilding trees.

Supported trees (``DESIGN.md`` "Tree contract", in ``shared/`` beside the project): linen
variables ``{'params': ..., ...}`` (only ``params`` is looked at), a bare params dict, a
``FrozenDict``, an ``nnx.State`` or its pure dict. A *layer* is a mapping holding an
array leaf named ``kernel`` or ``embedding``; a *split layer* is a mapping of
``branch_0 … branch_{k-1}`` layers. A layer's *path* is its ``/``-joined keys from the
params root. Split, merge, the wrappers and the evaluators all walk and rebuild trees
with these functions, so containers (dict, ``FrozenDict``, ``nnx.State``, ``nnx.Variable``
leaves) and identities of untouched subtrees are preserved the same way everywhere.

Which leaves are weights is the caller's choice (``weights=``: leaf names, default
``WEIGHT_NAMES``, or a predicate ``(leaf_path, array) -> bool``). A node holding one
weight is a layer at the node's path and splits into ``branch_i`` sub-nodes; a node
holding several (Gemma's gated MLP: ``gating_einsum`` and ``linear``) is one layer per
weight at ``node/leaf``, and such a *leaf layer* splits **in place**: the leaf becomes
``{'branch_0': W1, 'branch_1': W2}`` and the node's other leaves stay where they are.
Split layers are self-describing (found whatever ``weights`` says), so merging needs
no ``weights``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxsplit.errors import ConfigTypeError

WEIGHT_NAMES = ("kernel", "embedding")
_BRANCH_RE = re.compile(r"branch_(\d+)")

__all__ = [
    "Layer",
    "WEIGHT_NAMES",
    "Weights",
    "check_weights",
    "weight_leaves",
    "leaf_branch_count",
    "split_weight",
    "find_layers",
    "params_root",
    "unwrap",
    "is_array",
    "raw",
    "weight_name",
    "branch_count",
    "branch_name",
    "branch_weights",
    "map_branch_weights",
    "make_branches",
    "like",
    "wrap_like",
    "rebuild",
    "keep_sharding",
    "is_traced",
    "x64",
    "leaf_items",
    "set_in",
]


def branch_name(i: int) -> str:
    """The tree-contract name of branch ``i``.

    Example:
      >>> branch_name(1)
      'branch_1'
    """
    return f"branch_{i}"


def unwrap(x: Any) -> Any:
    """The array inside an ``nnx.Variable`` (or ``x`` itself for plain arrays)."""
    get = getattr(x, "get_value", None)
    if get is not None and not isinstance(x, Mapping):
        return get()
    return x


def is_array(x: Any) -> bool:
    """True for array-like leaves (jax/numpy arrays, nnx Variables holding one)."""
    x = unwrap(x)
    return not isinstance(x, Mapping) and hasattr(x, "shape") and hasattr(x, "dtype")


def raw(node: Any) -> Any:
    """The plain mapping inside an ``nnx.State`` (whose nested nodes are plain dicts).

    ``State.__getitem__`` re-wraps nested dicts in new ``State`` objects; walking the raw
    mapping keeps identities and rebuilds trees with the structure ``nnx.state`` gives.
    """
    return getattr(node, "raw_mapping", node) if isinstance(node, Mapping) else node


def params_root(tree: Mapping) -> tuple[Mapping, tuple]:
    """``(params, prefix)``: the params collection of linen variables, else the tree itself.

    Example:
      >>> params_root({"params": {"Dense_0": {}}, "batch_stats": {}})[1]
      ('params',)
    """
    if not isinstance(tree, Mapping):
        raise TypeError(
            f"params must be a mapping (dict, FrozenDict, nnx.State or linen "
            f"variables), got {type(tree).__name__}"
        )
    inner = tree.get("params") if "params" in tree else None
    if isinstance(inner, Mapping):
        return inner, ("params",)
    return tree, ()


Weights = tuple[str, ...] | Callable[[str, Any], bool]


def check_weights(weights: Any, owner: str = "SplitConfig") -> Weights:
    """Validates ``weights=`` (leaf names or a predicate) and returns it (names as a tuple).

    Raises:
      ConfigTypeError: not a non-empty sequence of non-empty strings, nor a callable.

    Example:
      >>> check_weights(["kernel", "w"])
      ('kernel', 'w')
      >>> check_weights([])  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      jaxsplit.errors.ConfigTypeError: SplitConfig.weights must be a non-empty sequence ..., got []
    """
    if callable(weights) and not isinstance(weights, str):
        return weights
    if isinstance(weights, str):
        weights = (weights,)
    ok = (
        isinstance(weights, Sequence)
        and len(weights) > 0
        and all(isinstance(w, str) and w for w in weights)
    )
    if not ok:
        raise ConfigTypeError(
            owner,
            "weights",
            f"{owner}.weights must be a non-empty sequence of leaf names (e.g. ('kernel', "
            f"'embedding', 'w')) or a callable (path, array) -> bool, got {weights!r}",
        )
    return tuple(weights)


def _is_weight(weights: Weights, name: Any, path: str, leaf: Any) -> bool:
    if callable(weights):
        return bool(weights(path, unwrap(leaf)))
    return str(name) in weights


def leaf_branch_count(x: Any) -> int:
    """``k`` if ``x`` is a leaf split in place, ``{'branch_0': W1, …}`` of arrays, else 0.

    Example:
      >>> import numpy as np
      >>> leaf_branch_count({"branch_0": np.ones(2), "branch_1": np.zeros(2)})
      2
      >>> leaf_branch_count({"branch_0": {"kernel": np.ones(2)}})
      0
    """
    if not isinstance(x, Mapping):
        return 0
    x = raw(x)
    keys = [str(k) for k in x]
    if len(keys) < 2 or not all(_BRANCH_RE.fullmatch(k) for k in keys):
        return 0
    if not all(is_array(v) for v in x.values()):
        return 0
    idx = sorted(int(_BRANCH_RE.fullmatch(k).group(1)) for k in keys)
    return len(idx) if idx == list(range(len(idx))) else 0


def weight_leaves(node: Mapping, weights: Weights = WEIGHT_NAMES, path: str = "") -> list:
    """The keys of ``node``'s weights: array leaves ``weights`` names, and leaves split in place.

    Args:
      node: a mapping.
      weights: leaf names or a predicate ``(leaf_path, array) -> bool``.
      path: ``node``'s path (the predicate sees ``path/leaf``).

    Example:
      >>> import numpy as np
      >>> weight_leaves({"w": np.ones(2), "b": np.ones(2)}, ("w",))
      ['w']
    """
    out = []
    named = not callable(weights)
    for k, v in raw(node).items():
        if isinstance(v, Mapping):
            if leaf_branch_count(v):
                out.append(k)
        elif named:  # the cheap name test first: most leaves are not weights
            if str(k) in weights and is_array(v):
                out.append(k)
        elif is_array(v) and _is_weight(weights, k, f"{path}/{k}" if path else str(k), v):
            out.append(k)
    return out


def weight_name(node: Mapping, weights: Weights = WEIGHT_NAMES, path: str = "") -> str | None:
    """The name of the one weight of ``node`` if it is a (plain, one-weight) layer, else ``None``.

    Example:
      >>> import numpy as np
      >>> weight_name({"kernel": np.ones(2), "bias": np.ones(2)})
      'kernel'
    """
    found = weight_leaves(node, weights, path)
    if len(found) == 1 and not leaf_branch_count(raw(node)[found[0]]):
        return found[0]
    return None


def split_weight(node: Mapping, weights: Weights = WEIGHT_NAMES, path: str = "") -> str | None:
    """The weight of a node-level split: named by ``weights`` in ``branch_0``, else the one
    array leaf every branch holds (branches >= 1 hold only the weight).

    Example:
      >>> import numpy as np
      >>> split_weight({"branch_0": {"w": np.ones(2), "b": np.ones(2)},
      ...               "branch_1": {"w": np.ones(2)}})
      'w'
    """
    b0 = raw(node["branch_0"])
    named = weight_leaves(b0, weights, path)
    if named:
        return named[0]
    common = [k for k in b0 if is_array(b0[k])]
    for i in range(1, len(node)):
        bi = raw(node[branch_name(i)])
        if not isinstance(bi, Mapping):
            return None
        common = [k for k in common if k in bi and is_array(bi[k])]
    return common[0] if len(common) == 1 else None


def branch_count(node: Mapping, weights: Weights = WEIGHT_NAMES, path: str = "") -> int:
    """``k`` if ``node`` is a split layer with ``branch_0 … branch_{k-1}`` sub-nodes, else 0.

    Raises:
      ValueError: the node has ``branch_*`` keys that are not exactly ``0 … k-1``, or a
        branch that holds no weight.

    Example:
      >>> import numpy as np
      >>> branch_count({"branch_0": {"w": np.ones(2)}, "branch_1": {"w": np.zeros(2)}})
      2
    """
    node = raw(node)
    keys = [str(k) for k in node]
    if not keys or "branch_0" not in keys or not all(_BRANCH_RE.fullmatch(k) for k in keys):
        return 0
    if not isinstance(node["branch_0"], Mapping):
        return 0  # a leaf split in place (leaf_branch_count) or not a split at all
    idx = sorted(int(_BRANCH_RE.fullmatch(k).group(1)) for k in keys)
    if idx != list(range(len(idx))) or len(idx) < 2:
        raise ValueError(
            f"split layer has branches {sorted(keys)}; expected branch_0 … "
            f"branch_{{k-1}} with k >= 2"
        )
    w = split_weight(node, weights, path)
    for k in keys:
        b = node[k]
        if not isinstance(b, Mapping) or w is None or w not in b or not is_array(b[w]):
            raise ValueError(f"split layer branch {k!r} holds no weight array")
    return len(idx)


@dataclasses.dataclass(frozen=True)
class Layer:
    """A layer found in a tree.

    Attributes:
      path: ``/``-joined keys from the params root (``"block_1/Dense_0"``).
      keys: the original keys (ints stay ints, as in ``nnx.State`` of lists) of the
        node a split replaces: the layer's node, or for a leaf layer the leaf
        (``(..., 'mlp', 'gating_einsum')``).
      node: the layer's mapping (for a split layer, the mapping of branches); for a
        leaf layer, the mapping holding the leaf.
      weight: the weight's leaf name (``'kernel'``, ``'embedding'``, ``'w'`` …).
      branches: number of branches if already split, else 0.
      leaf: ``True`` for one of several weights of a node (path ``node/leaf``), split
        in place as ``{'branch_0': W1, 'branch_1': W2}``.
    """

    path: str
    keys: tuple
    node: Mapping
    weight: str
    branches: int = 0
    leaf: bool = False

    @functools.cached_property
    def array(self):
        """The layer's weight array (``branch_0``'s for a split layer), unwrapped (read
        once: a ``Layer`` lives for one call over a tree that call does not change)."""
        if self.leaf:
            w = raw(self.node)[self.weight]
            return unwrap(raw(w)["branch_0"] if self.branches else w)
        node = raw(self.node)["branch_0"] if self.branches else self.node
        return unwrap(raw(node)[self.weight])

    def branch_leaf(self, i: int):
        """Branch ``i``'s weight leaf as stored (an ``nnx.Variable`` stays one)."""
        if self.leaf:
            return raw(raw(self.node)[self.weight])[branch_name(i)]
        return raw(raw(self.node)[branch_name(i)])[self.weight]


def find_layers(tree: Mapping, weights: Weights = WEIGHT_NAMES) -> dict[str, Layer]:
    """All layers of a tree, by path, in the tree's iteration order.

    Args:
      tree: linen variables, a params dict/``FrozenDict``, an ``nnx.State`` or its pure dict.
      weights: which array leaves are weights: leaf names (default ``WEIGHT_NAMES``,
        ``('kernel', 'embedding')``) or a predicate ``(leaf_path, array) -> bool``.
        A node holding one weight is a layer at its path; a node holding several is one
        *leaf layer* per weight at ``node/leaf``. Split layers are found whatever
        ``weights`` says. Weights held by the root itself are leaf layers at their names.

    Returns:
      ``{path: Layer}``. Layers are not searched for nested layers.

    Raises:
      ValueError: a ``branch_*`` mapping is malformed (message names its path).

    Example:
      >>> import numpy as np
      >>> p = {"Dense_0": {"kernel": np.ones((2, 3)), "bias": np.zeros(3)},
      ...      "block": {"Conv_0": {"kernel": np.ones((3, 3, 1, 4))}}}
      >>> list(find_layers({"params": p}))
      ['Dense_0', 'block/Conv_0']
      >>> mlp = {"mlp": {"gating_einsum": np.ones((2, 4, 8)), "linear": np.ones((8, 4))}}
      >>> list(find_layers(mlp, weights=("gating_einsum", "linear")))
      ['mlp/gating_einsum', 'mlp/linear']
    """
    root, _ = params_root(tree)
    found: dict[str, Layer] = {}

    def walk(node: Mapping, keys: tuple):
        for k, child in raw(node).items():
            if not isinstance(child, Mapping) or leaf_branch_count(child):
                continue
            ck = (*keys, k)
            path = "/".join(str(x) for x in ck)
            try:
                n = branch_count(child, weights, path)
            except ValueError as e:
                raise ValueError(f"{path}: {e}") from None
            if n:
                w = split_weight(raw(child), weights, path)
                found[path] = Layer(path, ck, child, w, n)
                continue
            leaves = weight_leaves(child, weights, path)
            inplace = [x for x in leaves if leaf_branch_count(raw(child)[x])]
            if len(leaves) == 1 and not inplace:
                found[path] = Layer(path, ck, child, leaves[0], 0)
            elif leaves:
                for x in leaves:
                    nb = leaf_branch_count(raw(child)[x])
                    found[f"{path}/{x}"] = Layer(f"{path}/{x}", (*ck, x), child, x, nb, True)
            else:
                walk(child, ck)

    for x in weight_leaves(root, weights):  # weights held by the root node itself
        found[str(x)] = Layer(str(x), (x,), root, x, leaf_branch_count(raw(root)[x]), True)
    try:
        walk(raw(root), ())
    finally:
        walk = None  # its closure refers to it: a cycle that would hold ``found`` (the arrays)
    return found


def branch_weights(layer: Layer) -> list:
    """The layer's weight arrays, one per branch (``[W]`` for an unsplit layer), unwrapped.

    Example:
      >>> import numpy as np
      >>> p = {"d": {"branch_0": {"kernel": np.ones(2)}, "branch_1": {"kernel": np.zeros(2)}}}
      >>> [w.tolist() for w in branch_weights(find_layers(p)["d"])]
      [[1.0, 1.0], [0.0, 0.0]]
    """
    if not layer.branches:
        return [layer.array]
    return [unwrap(layer.branch_leaf(i)) for i in range(layer.branches)]


def map_branch_weights(
    layer: Layer, fn: Callable[..., Any], *, with_index: bool = False
) -> Mapping:
    """The layer's node with ``fn`` applied to each branch's weight (or the single weight).

    Other leaves are kept as they are; containers and ``nnx.Variable`` wrappers too. For
    a leaf layer the result is the new leaf (what ``rebuild`` puts at ``layer.keys``).
    With ``with_index``, ``fn(w, i)`` also gets the branch index (0 for an unsplit layer).

    Example:
      >>> import numpy as np
      >>> p = {"d": {"kernel": np.array([1.0, 2.0]), "bias": np.zeros(2)}}
      >>> node = map_branch_weights(find_layers(p)["d"], lambda w: 2 * w)
      >>> node["kernel"].tolist(), node["bias"] is p["d"]["bias"]
      ([2.0, 4.0], True)
    """

    def apply(w, i: int):
        return fn(w, i) if with_index else fn(w)

    def one(node: Mapping, i: int = 0) -> Mapping:
        w = node[layer.weight]
        new = wrap_like(w, apply(unwrap(w), i))
        return like(node, {k: (new if k == layer.weight else v) for k, v in node.items()})

    if layer.leaf:
        leaf = raw(layer.node)[layer.weight]
        if not layer.branches:
            return wrap_like(leaf, apply(unwrap(leaf), 0))
        return like(
            leaf,
            {
                k: wrap_like(v, apply(unwrap(v), int(str(k).rpartition("_")[2])))
                for k, v in raw(leaf).items()
            },
        )
    if not layer.branches:
        return one(layer.node)
    return like(
        layer.node,
        {branch_name(i): one(layer.node[branch_name(i)], i) for i in range(layer.branches)},
    )


def like(node: Mapping, items: dict) -> Mapping:
    """A mapping of ``node``'s type (dict, FrozenDict, nnx.State) holding ``items``.

    Example:
      >>> from flax.core import FrozenDict
      >>> type(like(FrozenDict(a=1), {"b": 2})).__name__
      'FrozenDict'
    """
    try:
        return type(node)(items)
    except TypeError:
        return dict(items)


def wrap_like(original, value):
    """``value`` wrapped like ``original`` (an ``nnx.Variable`` stays a Variable).

    Example:
      >>> wrap_like(1.0, 2.0)
      2.0
    """
    if hasattr(original, "replace") and hasattr(original, "get_value"):
        return original.replace(value)
    return value


def is_traced(x) -> bool:
    """Whether ``x`` is a tracer (inside ``jit``/``grad``/``vmap``).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> is_traced(jnp.ones(1)), bool(jax.jit(lambda x: is_traced(x))(1.0) is not None)
      (False, True)
    """
    return isinstance(x, jax.core.Tracer)


def keep_sharding(out, like_array):
    """``out`` placed with ``like_array``'s sharding (a no-op for tracers and numpy).

    Example:
      >>> import jax.numpy as jnp
      >>> keep_sharding(jnp.ones(2), jnp.zeros(2)).shape
      (2,)
    """
    sharding = getattr(like_array, "sharding", None)
    if sharding is None or is_traced(out) or not isinstance(like_array, jax.Array):
        return out
    return out if out.sharding == sharding else jax.device_put(out, sharding)


def make_branches(layer: Layer, ws) -> Mapping:
    """``{'branch_0': {..., weight: ws[0]}, 'branch_i': {weight: ws[i]}}``; other leaves on 0.

    For a leaf layer: ``{'branch_0': ws[0], 'branch_1': ws[1], …}``, the new leaf.

    Example:
      >>> import numpy as np
      >>> p = {"d": {"kernel": np.ones(2), "bias": np.zeros(2)}}
      >>> node = make_branches(find_layers(p)["d"], [np.ones(2), np.zeros(2)])
      >>> sorted(node), sorted(node["branch_0"]), sorted(node["branch_1"])
      (['branch_0', 'branch_1'], ['bias', 'kernel'], ['kernel'])
    """
    node, wname = layer.node, layer.weight
    orig = raw(node)[wname]
    if layer.leaf:
        return like(node, {branch_name(i): wrap_like(orig, w) for i, w in enumerate(ws)})
    out = {
        branch_name(0): like(
            node, {k: (wrap_like(orig, ws[0]) if k == wname else v) for k, v in node.items()}
        )
    }
    for i, w in enumerate(ws[1:], start=1):
        out[branch_name(i)] = like(node, {wname: wrap_like(orig, w)})
    return like(node, out)


def rebuild(tree: Mapping, replacements: dict[tuple, Mapping]) -> Mapping:
    """A copy of ``tree`` with the nodes at the given key paths (from the params root)
    replaced; subtrees without replacements are returned as the same objects.

    Example:
      >>> t = {"params": {"a": {"kernel": 1}, "b": {"kernel": 2}}}
      >>> t2 = rebuild(t, {("a",): {"kernel": 3}})
      >>> t2["params"]["a"], t2["params"]["b"] is t["params"]["b"]
      ({'kernel': 3}, True)
    """
    if not replacements:
        return tree
    _, prefix = params_root(tree)
    full = {(*prefix, *keys): node for keys, node in replacements.items()}
    prefixes = {keys[:i] for keys in full for i in range(len(keys))}
    return _rebuilt(tree, (), full, prefixes)


def _rebuilt(node: Mapping, keys: tuple, full: dict, prefixes: set) -> Mapping:
    # a module-level recursion: a nested closure calling itself is a reference cycle that
    # keeps every replaced array alive until the garbage collector runs
    if keys in full:
        return full[keys]
    if keys not in prefixes:
        return node
    return like(
        node,
        {
            k: _rebuilt(v, (*keys, k), full, prefixes)
            if isinstance(v, Mapping) or (*keys, k) in full
            else v
            for k, v in raw(node).items()
        },
    )


def x64(dtype) -> contextlib.AbstractContextManager:
    """A context enabling x64 for float64 kernels (else jax would compute in float32).

    Example:
      >>> import numpy as np
      >>> with x64(np.float64):
      ...     pass
    """
    if jnp.dtype(dtype) == jnp.float64 and not jax.config.jax_enable_x64:
        return jax.enable_x64(True)
    return contextlib.nullcontext()


def leaf_items(tree: Mapping, keys: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """``(keys, leaf)`` of every non-mapping leaf of a nested mapping, in order.

    Example:
      >>> list(leaf_items({"a": {"b": 1}, "c": 2}))
      [(('a', 'b'), 1), (('c',), 2)]
    """
    for k, v in tree.items():
        if isinstance(v, Mapping):
            yield from leaf_items(v, (*keys, k))
        else:
            yield (*keys, k), v


def set_in(tree: dict, keys: tuple, value: Any) -> None:
    """Sets ``tree[k0][k1]…[kn] = value`` in place, creating the dicts on the way.

    Example:
      >>> t = {}
      >>> set_in(t, ("a", "b"), 1)
      >>> t
      {'a': {'b': 1}}
    """
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value
