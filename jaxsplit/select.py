"""Find layers in any supported tree and turn the user's patterns into one predicate.

Supported trees (DESIGN.md "Tree contract"): linen variables ``{'params': ..., ...}``
(only ``params`` is looked at), a bare params dict, a ``FrozenDict``, an ``nnx.State``
or its pure dict. A *layer* is a mapping holding an array leaf named ``kernel`` or
``embedding``; a *split layer* is a mapping of ``branch_0 … branch_{k-1}`` layers. A
layer's *path* is its ``/``-joined keys from the params root.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Callable, Mapping
from typing import Any

WEIGHT_NAMES = ("kernel", "embedding")
_BRANCH_RE = re.compile(r"branch_(\d+)")

__all__ = [
    "Layer",
    "WEIGHT_NAMES",
    "find_layers",
    "params_root",
    "unwrap",
    "is_array",
    "branch_count",
    "compile_patterns",
    "select_layers",
]


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


def _glob_to_regex(pattern: str) -> re.Pattern:
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = pattern.find("]", i + 1)
            if j == -1:
                out.append(re.escape(c))
            else:
                out.append(fnmatch.translate(pattern[i : j + 1])[4:-3])
                i = j
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out))


def _one_predicate(pattern: str) -> Callable[[str, Any], bool]:
    if pattern.startswith("re:"):
        rx = re.compile(pattern[3:])
        return lambda path, layer: rx.fullmatch(path) is not None
    if any(c in pattern for c in "*?["):
        rx = _glob_to_regex(pattern)
        return lambda path, layer: rx.fullmatch(path) is not None
    return lambda path, layer: path == pattern


def compile_patterns(layers) -> list[tuple[str, Callable[[str, Any], bool]]]:
    """``[(pattern_name, predicate)]`` for ``SplitConfig.layers`` (empty for ``None``/``[]``).

    A callable becomes one entry named after it. Example:
      >>> [name for name, _ in compile_patterns(("a/*", "re:b.*"))]
      ['a/*', 're:b.*']
      >>> compile_patterns(("a/*",))[0][1]("a/b/c", None)
      False
    """
    if layers is None:
        return []
    if callable(layers):
        return [(getattr(layers, "__name__", repr(layers)), layers)]
    return [(p, _one_predicate(p)) for p in layers]


def select_layers(tree: Mapping, layers) -> tuple[list[Layer], dict[str, tuple[str, ...]]]:
    """The layers a pattern set selects, and per pattern the paths it matched.

    Raises nothing for unmatched patterns; the caller decides (``strict``).
    """
    found = find_layers(tree)
    preds = compile_patterns(layers)
    matches: dict[str, list[str]] = {name: [] for name, _ in preds}
    selected: list[Layer] = []
    for path, layer in found.items():
        hit = False
        for name, pred in preds:
            if pred(path, layer.node):
                matches[name].append(path)
                hit = True
        if hit:
            selected.append(layer)
    return selected, {k: tuple(v) for k, v in matches.items()}
