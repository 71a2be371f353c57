"""Layer selection: every selector style becomes one predicate, and the match table.

``SplitConfig.layers`` holds exact paths (``"block_1/Dense_0"``), globs whose ``*``/``?``
do not cross ``/`` (``**`` does), ``"re:"``-prefixed regexes matched with ``fullmatch``, or
one callable ``(path, node) -> bool``. ``compile_patterns`` turns each into a predicate;
``select_layers`` applies them to the layers ``jaxsplit.tree.find_layers`` finds and
reports, per pattern, the paths it matched (so unmatched patterns can be reported).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Mapping
from typing import Any

from jaxsplit.tree import WEIGHT_NAMES, Layer, Weights, find_layers

__all__ = ["compile_patterns", "select_layers"]


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


def select_layers(
    tree: Mapping, layers, weights: Weights = WEIGHT_NAMES, *, found: dict | None = None
) -> tuple[list[Layer], dict[str, tuple[str, ...]]]:
    """The layers a pattern set selects, and per pattern the paths it matched.

    ``weights`` says which leaves are weights (``jaxsplit.tree.find_layers``); ``found``:
    that function's result when the caller has it already. Raises nothing for unmatched
    patterns; the caller decides (``strict``).

    Example:
      >>> import numpy as np
      >>> t = {"attn": {"q": {"w": np.ones(2)}}, "mlp": {"a": np.ones(2), "b": np.ones(2)}}
      >>> sel, m = select_layers(t, ["**"], weights=("w", "a", "b"))
      >>> [lay.path for lay in sel]
      ['attn/q', 'mlp/a', 'mlp/b']
    """
    found = find_layers(tree, weights) if found is None else found
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
