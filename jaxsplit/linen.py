"""Run Flax linen models on split trees: the ``apply`` interceptor and the ``Split`` module.

``apply(model, variables2, x)`` runs the user's unchanged model on a tree made by
``split_params``: a method interceptor (``flax.linen.intercept_methods``) looks at
each running module's own ``params``; where they hold ``branch_0 … branch_{k-1}``,
every branch runs through a clone of the module (the layer's own code; branches
``>= 1`` with ``use_bias=False``) and the outputs are summed. Reading the module's
own variables (rather than looking its path up in the input tree) keeps this right
inside lifted transforms such as ``nn.scan``, where a layer sees its slice of a
stacked tree; the module's path names it in every error.

``Split(layer)`` is the same computation as a module, for models that are split by
design: its params are exactly the tree contract's split layer.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any

import flax.errors
import flax.linen as nn
import jax.numpy as jnp

from jaxsplit import sparse_run
from jaxsplit._wrap import call_branches, check_branches, sum_branches, unsupported_error
from jaxsplit.config import SplitConfig
from jaxsplit.errors import ConfigError, ConfigTypeError
from jaxsplit.split import split_params
from jaxsplit.tree import (
    WEIGHT_NAMES,
    Weights,
    branch_count,
    branch_name,
    check_weights,
    find_layers,
    leaf_branch_count,
    make_branches,
    split_weight,
    unwrap,
    weight_leaves,
    weight_name,
)

__all__ = ["SUPPORTED", "LayerSpec", "apply", "Split"]

logger = logging.getLogger("jaxsplit")

_SPARSE_AND_WEIGHT_FN = ConfigError(
    "apply",
    "weight_fn",
    "weight_fn= cannot transform sparse twins (sparse_below= or BCOO twins from "
    "sparse_run.sparsify): quantize the branches first (js.tree.map_branch_weights), "
    "then sparsify",
)

WeightFn = Callable[[Any], Any]


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """How a supported linen layer is split.

    Attributes:
      weight: the param that is split (``'kernel'`` or ``'embedding'``).
      init: the field holding the weight's initializer (zeroed for branches ``>= 1``).
      methods: the methods that are linear in the weight (run branch-wise).
    """

    weight: str
    init: str
    methods: tuple[str, ...] = ("__call__",)


_KERNEL = LayerSpec("kernel", "kernel_init")

#: Layer types whose output is linear in the weight with the bias switched by
#: ``use_bias``, so ``f(x; W1, b) + f(x; W2, no bias) == f(x; W1 + W2, b)``.
SUPPORTED: dict[type, LayerSpec] = {
    nn.Dense: _KERNEL,
    nn.DenseGeneral: _KERNEL,
    nn.Conv: _KERNEL,
    nn.ConvTranspose: _KERNEL,
    nn.ConvLocal: _KERNEL,
    nn.Einsum: _KERNEL,
    nn.Embed: LayerSpec("embedding", "embedding_init", ("__call__", "attend")),
}


def _path(module: nn.Module) -> str:
    return "/".join(str(p) for p in module.path) or "(root module)"


def _spec(module: nn.Module, path: str, why: str) -> LayerSpec:
    spec = SUPPORTED.get(type(module))
    if spec is None:
        raise unsupported_error(path, module, SUPPORTED, why)
    return spec


def _branch_clone(layer: nn.Module, i: int) -> nn.Module:
    """An unbound clone of ``layer`` that runs branch ``i``: the same class and settings,
    except that branches ``>= 1`` carry no bias and initialise their weight to zero."""
    updates: dict[str, Any] = {"parent": None, "name": None}
    if i:
        if any(f.name == "use_bias" for f in dataclasses.fields(layer)):
            updates["use_bias"] = False
        updates[SUPPORTED[type(layer)].init] = nn.initializers.zeros_init()
    return layer.clone(**updates)


def _check_nodes(path: str, nodes: list[Mapping], weight: str) -> None:
    """Branches >= 1 hold only the weight, and all weights have one shape."""
    shapes = []
    for i, node in enumerate(nodes):
        if weight not in node:
            raise ValueError(f"layer {path!r}: branch_{i} holds no {weight!r}")
        extra = [str(k) for k in node if k != weight]
        if i and extra:
            raise ValueError(
                f"layer {path!r}: branch_{i} holds {extra} besides {weight!r}; only "
                f"branch_0 may carry the bias (it would be silently ignored)"
            )
        shapes.append(tuple(jnp.shape(unwrap(node[weight]))))
    if len(set(shapes)) > 1:
        raise ValueError(f"layer {path!r}: branch {weight} shapes differ: {shapes}")


def _merged_own(own: Mapping, weights, weight_fn: WeightFn | None, path: str):
    """``own`` with each of the module's *own* weights (not its submodules') replaced by
    ``sum_i weight_fn(W_i)`` (``sum_i W_i`` without ``weight_fn``); ``None`` if there is
    nothing to replace. A node-level split becomes its ``branch_0`` with the summed weight."""
    fn = (lambda w: w) if weight_fn is None else weight_fn

    def total(ws):
        return sum_branches(lambda i: fn(nn.meta.unbox(ws[i])), len(ws))

    try:
        k = branch_count(own, weights, path)
    except ValueError as e:
        raise ValueError(f"layer {path!r}: {e}") from None
    if k:
        w = split_weight(own, weights, path)
        nodes = [own[branch_name(i)] for i in range(k)]
        _check_nodes(path, nodes, w)
        b0 = dict(nodes[0])
        b0[w] = total([n[w] for n in nodes])
        return b0
    names = weight_leaves(own, weights, path)
    split = [n for n in names if leaf_branch_count(own[n])]
    if not split and weight_fn is None:
        return None
    if not names:
        return None
    out = dict(own)
    for n in names:
        leaf = own[n]
        nb = leaf_branch_count(leaf)
        out[n] = total([leaf[branch_name(i)] for i in range(nb)] if nb else [leaf])
    return out


class _Interceptor:
    """One per ``apply`` call; ``inside`` lets the branch clones' own calls through, and
    ``root_merged`` the root of a weight-sum re-run (its weights are already summed)."""

    def __init__(self, weight_fn: WeightFn | None, weights):
        self.weight_fn = weight_fn
        self.weights = weights
        self.inside = False
        self.root_merged = False

    def __call__(self, next_fun, args, kwargs, context):
        module = context.module
        if self.inside or isinstance(module, Split) or module.scope is None:
            return next_fun(*args, **kwargs)
        if self.root_merged and not module.path:
            return next_fun(*args, **kwargs)
        own = module.variables.get("params")
        if not isinstance(own, Mapping) or not own:
            return next_fun(*args, **kwargs)
        path = _path(module)
        try:
            k = branch_count(own, self.weights, path)
        except ValueError as e:
            raise ValueError(f"layer {path!r}: {e}") from None
        name = context.method_name
        spec = SUPPORTED.get(type(module))
        if spec is None or any(leaf_branch_count(v) for v in own.values()):
            return self._weight_sum(module, own, path, next_fun, name, args, kwargs)
        if k:
            if name == "setup":  # the branches set themselves up
                return None
            nodes = [own[branch_name(i)] for i in range(k)]
        elif self.weight_fn is not None and weight_name(own, self.weights) is not None:
            if name not in spec.methods:
                return next_fun(*args, **kwargs)
            nodes = [own]
        else:
            return next_fun(*args, **kwargs)
        if name not in spec.methods:
            raise TypeError(
                f"layer {path!r} ({type(module).__name__}) is split; only its "
                f"methods {list(spec.methods)} can run on branches, not {name!r}"
            )
        _check_nodes(path, nodes, spec.weight)
        self.inside = True
        try:
            return sum_branches(
                lambda i: self._run(module, path, spec, nodes[i], i, name, args, kwargs),
                len(nodes),
            )
        finally:
            self.inside = False

    def _weight_sum(self, module, own, path, next_fun, name, args, kwargs):
        """Any other module: re-run its method on its variables with its own weights
        replaced by ``sum_i weight_fn(W_i)`` (equal to summing the branch outputs
        wherever the output is linear in the weight; exact to the unsplit model always)."""
        merged = _merged_own(sparse_run.densify(own), self.weights, self.weight_fn, path)
        if merged is None:
            return next_fun(*args, **kwargs)
        if name == "setup":  # the re-run sets itself up on the summed weights
            return None
        variables = {**module.variables, "params": merged}
        scope = module.scope
        rngs = {r: module.make_rng(r) for r in getattr(scope, "rngs", {})}
        mutable = [c for c in variables if c != "params" and module.is_mutable_collection(c)]
        clone = module.clone(parent=None, name=None)
        prev, self.root_merged = self.root_merged, True
        try:
            out = clone.apply(
                variables, *args, method=name, rngs=rngs or None, mutable=mutable or False, **kwargs
            )
        except (flax.errors.ScopeParamShapeError, flax.errors.ScopeParamNotFoundError) as e:
            raise ValueError(
                f"layer {path!r}: summed weights do not fit the module {type(module).__name__}: {e}"
            ) from None
        finally:
            self.root_merged = prev
        if mutable:
            out, updates = out
            for col, tree in updates.items():
                for key, value in tree.items():
                    module.put_variable(col, key, value)
        return out

    def _run(self, module, path, spec, node, i, name, args, kwargs):
        params = dict(node)
        if sparse_run.is_sparse(params[spec.weight]):  # a sparse twin (sparse_run.sparsify)
            w = unwrap(params[spec.weight])
            if self.weight_fn is not None:
                raise _SPARSE_AND_WEIGHT_FN
            y = sparse_run.linen_product(module, w, *args) if name == "__call__" else None
            if y is not None:
                return y
            logger.debug("layer %r: branch_%d has no sparse form here; runs dense", path, i)
            params[spec.weight] = w.todense()
        if self.weight_fn is not None:
            params[spec.weight] = self.weight_fn(nn.meta.unbox(params[spec.weight]))
        try:
            return _branch_clone(module, i).apply({"params": params}, *args, method=name, **kwargs)
        except (flax.errors.ScopeParamShapeError, flax.errors.ScopeParamNotFoundError) as e:
            raise ValueError(
                f"layer {path!r}: branch_{i} params do not fit the module "
                f"{type(module).__name__}: {e}"
            ) from None


def apply(
    model: nn.Module,
    variables: Mapping,
    *args,
    method: str | Callable | None = None,
    mutable: Any = False,
    weight_fn: WeightFn | None = None,
    weights: Weights = WEIGHT_NAMES,
    sparse_below: float | None = None,
    **kwargs,
):
    """``model.apply`` that runs split layers as the sum of their branches.

    Layers whose params hold ``branch_0 … branch_{k-1}`` run each branch with the
    layer's own code and sum the outputs; other layers run unchanged, so an unsplit
    tree gives exactly ``model.apply``'s result. Works under ``jax.jit``,
    ``jax.grad`` and ``jax.vmap``, with ``mutable=[...]`` and other collections.

    Args:
      model: the user's (unchanged) linen model.
      variables: its variables, with any layers split by ``split_params``.
      *args: positional arguments of the method.
      method: the method to run, as for ``model.apply``.
      mutable: collections that may change, as for ``model.apply``.
      weight_fn: optional per-weight transform ``w -> w'`` (e.g. fake quantization),
        applied to the weight of every supported layer that runs: to each branch
        separately for split layers, to the single weight otherwise. ``None``
        changes nothing.
      sparse_below: run twins (``branch_1 …``) with fewer non-zeros per value than this
        as sparse products (``jaxsplit.sparse_run``: ``Dense`` and ``Conv``; other types
        run dense). ``None``: as stored (``BCOO`` twins from ``sparse_run.sparsify``
        always run sparse, also under ``jit``).
      **kwargs: other keyword arguments of ``model.apply`` (``rngs=``) or the method.

    Returns:
      What ``model.apply`` returns (output, and updated collections if ``mutable``).

    Raises:
      TypeError: ``weight_fn`` is not callable; a split layer (or, with ``weight_fn``, a layer
        owning a weight) is not of a ``SUPPORTED`` type; the message names its path.
      ValueError: a split layer's branches do not fit the module (path named).

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxsplit as js
      >>> model = nn.Sequential([nn.Dense(3), nn.relu, nn.Dense(2)])
      >>> v = model.init(jax.random.key(0), jnp.ones((1, 4)))
      >>> v2 = js.split_params(v, js.SplitConfig(layers=["layers_0"], threshold=0.1))
      >>> y2 = js.linen.apply(model, v2, jnp.ones((1, 4)))
      >>> bool(jnp.allclose(y2, model.apply(v, jnp.ones((1, 4))), rtol=1e-5))
      True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a flax.linen.Module, got {type(model).__name__}")
    if weight_fn is not None and not callable(weight_fn):
        raise ConfigTypeError(
            "apply", "weight_fn", f"weight_fn must be None or a callable w -> w', got {weight_fn!r}"
        )
    weights = check_weights(weights, "apply")
    if sparse_run.check_sparse_below("apply", sparse_below):
        if weight_fn is not None:
            raise _SPARSE_AND_WEIGHT_FN
        variables = sparse_run.sparsify(variables, sparse_below)
    with nn.intercept_methods(_Interceptor(weight_fn, weights)):
        return model.apply(variables, *args, method=method, mutable=mutable, **kwargs)


class Split(nn.Module):
    """A supported layer as ``branches`` twin submodules ``branch_0 …`` whose outputs are summed.

    The branches are clones of ``layer`` (same class and settings); only ``branch_0``
    has a bias, and branches ``>= 1`` initialise their weight to zero, so a fresh
    ``Split`` computes exactly what ``layer`` would. Its params are the tree contract's
    split layer, so ``merge_params``, ``apply(..., weight_fn=...)`` (which quantizes each
    branch separately) and checkpoints work on it unchanged. Load an existing layer's
    params with ``Split.from_params``.

    Inside an ``@nn.compact`` method, write ``Split(nn.Dense(16, parent=None))`` to keep
    the template layer from taking an automatic name (``Dense_0``) of its own.

    Attributes:
      layer: the layer to split (an unbound module of a ``SUPPORTED`` type).
      branches: number of branches (an int >= 2).

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> split = Split(nn.Dense(2))
      >>> v = split.init(jax.random.key(0), jnp.ones((1, 3)))
      >>> jax.tree.map(jnp.shape, v["params"])
      {'branch_0': {'bias': (2,), 'kernel': (3, 2)}, 'branch_1': {'kernel': (3, 2)}}
    """

    layer: nn.Module
    branches: int = 2

    def setup(self):
        check_branches("Split", self.branches)
        _spec(self.layer, _path(self), "Split wraps it")
        for i in range(self.branches):
            setattr(self, branch_name(i), _branch_clone(self.layer, i))

    def __call__(self, *args, **kwargs):
        """Sum of the branches' ``__call__``."""
        return self._sum("__call__", args, kwargs)

    def attend(self, *args, **kwargs):
        """Sum of the branches' ``attend`` (for a split ``nn.Embed``)."""
        return self._sum("attend", args, kwargs)

    def _sum(self, method, args, kwargs):
        valid = SUPPORTED[type(self.layer)].methods
        where = f"Split({type(self.layer).__name__}) at {_path(self)!r}"
        return call_branches(self, self.branches, method, valid, args, kwargs, where)

    @staticmethod
    def from_params(layer_params: Mapping, **cfg_fields) -> Mapping:
        """The params of a ``Split`` holding an existing layer's params, via ``split_params``.

        Args:
          layer_params: one layer's params (``{'kernel': W, 'bias': b}``).
          **cfg_fields: ``SplitConfig`` fields other than ``layers`` (``threshold=``,
            ``method=``, ``seed=`` …), validated there.

        Returns:
          ``{'branch_0': {...}, 'branch_1': {...}}`` with ``W1 + W2 == W`` bit for bit;
          when nothing exceeds the threshold, ``branch_1`` holds zeros.

        Raises:
          TypeError: ``layers`` was passed (the layer is given), or bad config fields.
          ValueError: no ``kernel``/``embedding`` array in ``layer_params``, or bad config.

        Example:
          >>> import numpy as np
          >>> p = {"kernel": np.array([[0.5, 4.0]], np.float32), "bias": np.zeros(2)}
          >>> p2 = Split.from_params(p, threshold=1.0)
          >>> p2["branch_0"]["kernel"].tolist(), p2["branch_1"]["kernel"].tolist()
          ([[0.5, 2.0]], [[0.0, 2.0]])
        """
        if "layers" in cfg_fields:
            raise TypeError("Split.from_params takes no 'layers': the layer is given")
        if not isinstance(layer_params, Mapping) or weight_name(layer_params) is None:
            raise ValueError(
                "Split.from_params needs one layer's params holding a 'kernel' or "
                f"'embedding' array, got {type(layer_params).__name__} with keys "
                f"{list(layer_params) if isinstance(layer_params, Mapping) else '-'}"
            )
        cfg = SplitConfig(layers=("layer",), **cfg_fields)
        tree = {"layer": layer_params}
        out = split_params(tree, cfg)["layer"]
        if branch_count(out):
            return out
        layer = find_layers(tree)["layer"]
        return make_branches(layer, [layer.array, jnp.zeros_like(layer.array)])
