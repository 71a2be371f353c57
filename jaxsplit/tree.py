"""The tree contract in one module: layers, their paths, branch names, rebuilding trees.

Supported trees (``DESIGN.md`` "Tree contract", in ``shared/`` beside the project): linen
variables ``{'params': ..., ...}`` (only ``params`` is looked at), a bare params dict, a
``FrozenDict``, an ``nnx.State`` or its pure dict. A *layer* is a mapping holding an
array leaf named ``kernel`` or ``embedding``; a *split layer* is a mapping of
``branch_0 … branch_{k-1}`` layers. A layer's *path* is its ``/``-joined keys from the
params root. Split, merge, the wrappers and the evaluators all walk and rebuild trees
with these functions, so containers (dict, ``FrozenDict``, ``nnx.State``, ``nnx.Variable``
leaves) and identities of untouched subtrees are preserved the same way everywhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

WEIGHT_NAMES = ("kernel", "embedding")
_BRANCH_RE = re.compile(r"branch_(\d+)")

__all__ = [
    "Layer",
    "WEIGHT_NAMES",
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


def weight_name(node: Mapping) -> str | None:
    """``'kernel'``/``'embedding'`` if ``node`` is a (plain) layer, else ``None``."""
    for name in WEIGHT_NAMES:
        if name in node and is_array(node[name]):
            return name
    return None


def branch_count(node: Mapping) -> int:
    """``k`` if ``node`` is a split layer with ``branch_0 … branch_{k-1}``, else 0.

    Raises:
      ValueError: the node has ``branch_*`` keys that are not exactly ``0 … k-1``, or a
        branch that holds no kernel.
    """
    keys = [str(k) for k in node]
    if not keys or "branch_0" not in keys or not all(_BRANCH_RE.fullmatch(k) for k in keys):
        return 0
    idx = sorted(int(_BRANCH_RE.fullmatch(k).group(1)) for k in keys)
    if idx != list(range(len(idx))) or len(idx) < 2:
        raise ValueError(
            f"split layer has branches {sorted(keys)}; expected branch_0 … "
            f"branch_{{k-1}} with k >= 2"
        )
    for k in keys:
        if not isinstance(node[k], Mapping) or weight_name(node[k]) is None:
            raise ValueError(f"split layer branch {k!r} holds no 'kernel'/'embedding' array")
    return len(idx)


@dataclasses.dataclass(frozen=True)
class Layer:
    """A layer found in a tree.

    Attributes:
      path: ``/``-joined keys from the params root (``"block_1/Dense_0"``).
      keys: the original keys (ints stay ints, as in ``nnx.State`` of lists).
      node: the layer's mapping (for a split layer, the mapping of branches).
      weight: ``'kernel'`` or ``'embedding'``.
      branches: number of branches if already split, else 0.
    """

    path: str
    keys: tuple
    node: Mapping
    weight: str
    branches: int = 0

    @property
    def array(self):
        """The layer's weight array (``branch_0``'s for a split layer), unwrapped."""
        node = self.node["branch_0"] if self.branches else self.node
        return unwrap(node[self.weight])


def find_layers(tree: Mapping) -> dict[str, Layer]:
    """All layers of a tree, by path, in the tree's iteration order.

    Args:
      tree: linen variables, a params dict/``FrozenDict``, an ``nnx.State`` or its pure dict.

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
    """
    root, _ = params_root(tree)
    found: dict[str, Layer] = {}

    def walk(node: Mapping, keys: tuple):
        for k, child in node.items():
            if not isinstance(child, Mapping):
                continue
            ck = (*keys, k)
            path = "/".join(str(x) for x in ck)
            try:
                n = branch_count(child)
            except ValueError as e:
                raise ValueError(f"{path}: {e}") from None
            if n:
                found[path] = Layer(path, ck, child, weight_name(child["branch_0"]), n)
            elif (w := weight_name(child)) is not None:
                found[path] = Layer(path, ck, child, w, 0)
            else:
                walk(child, ck)

    walk(raw(root), ())
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
    return [unwrap(layer.node[branch_name(i)][layer.weight]) for i in range(layer.branches)]


def map_branch_weights(layer: Layer, fn: Callable[[Any], Any]) -> Mapping:
    """The layer's node with ``fn`` applied to each branch's weight (or the single weight).

    Other leaves are kept as they are; containers and ``nnx.Variable`` wrappers too.

    Example:
      >>> import numpy as np
      >>> p = {"d": {"kernel": np.array([1.0, 2.0]), "bias": np.zeros(2)}}
      >>> node = map_branch_weights(find_layers(p)["d"], lambda w: 2 * w)
      >>> node["kernel"].tolist(), node["bias"] is p["d"]["bias"]
      ([2.0, 4.0], True)
    """

    def one(node: Mapping) -> Mapping:
        w = node[layer.weight]
        new = wrap_like(w, fn(unwrap(w)))
        return like(node, {k: (new if k == layer.weight else v) for k, v in node.items()})

    if not layer.branches:
        return one(layer.node)
    return like(
        layer.node, {branch_name(i): one(layer.node[branch_name(i)]) for i in range(layer.branches)}
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

    Example:
      >>> import numpy as np
      >>> p = {"d": {"kernel": np.ones(2), "bias": np.zeros(2)}}
      >>> node = make_branches(find_layers(p)["d"], [np.ones(2), np.zeros(2)])
      >>> sorted(node), sorted(node["branch_0"]), sorted(node["branch_1"])
      (['branch_0', 'branch_1'], ['bias', 'kernel'], ['kernel'])
    """
    node, wname = layer.node, layer.weight
    orig = node[wname]
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
            k: _rebuilt(v, (*keys, k), full, prefixes) if isinstance(v, Mapping) else v
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
