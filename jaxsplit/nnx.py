"""NNX module surgery: each split layer becomes a ``Split`` module summing ``branch_0 …``.

``split_model(model, cfg)`` splits ``nnx.state(model)`` with ``split_params`` and
returns a new model whose split layers are ``Split`` modules holding copies of the
layer as attributes ``branch_0 … branch_{k-1}`` (only ``branch_0`` keeps the bias).
So ``nnx.state(split_model(m, cfg))`` is ``split_params(nnx.state(m), cfg)`` with the
same ``branch_i`` names as a linen tree, and ``merge_model`` undoes it exactly.
``apply(model, x, weight_fn=...)`` runs a model with every weight (each branch on its
own) passed through a transform such as fake quantization.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsplit import sparse_run
from jaxsplit._wrap import call_branches, check_branches, sum_branches, unsupported_error
from jaxsplit.config import SplitConfig
from jaxsplit.errors import ConfigError, ConfigTypeError
from jaxsplit.split import merge_params, split_params
from jaxsplit.tree import (
    WEIGHT_NAMES,
    Weights,
    branch_name,
    branch_weights,
    check_weights,
    find_layers,
    like,
    map_branch_weights,
    raw,
    rebuild,
    wrap_like,
)

__all__ = ["SUPPORTED", "Split", "split_model", "merge_model", "sparsify_model", "apply"]

#: Layer types whose output is linear in the weight, with the bias optional:
#: ``{type: (weight attribute, methods that run branch-wise)}``.
SUPPORTED: dict[type, tuple[str, tuple[str, ...]]] = {
    nnx.Linear: ("kernel", ("__call__",)),
    nnx.LinearGeneral: ("kernel", ("__call__",)),
    nnx.Conv: ("kernel", ("__call__",)),
    nnx.ConvTranspose: ("kernel", ("__call__",)),
    nnx.Einsum: ("kernel", ("__call__",)),
    nnx.Embed: ("embedding", ("__call__", "attend")),
}


def _spec(module: Any, path: str, why: str) -> tuple[str, tuple[str, ...]]:
    spec = SUPPORTED.get(type(module))
    if spec is None:
        raise unsupported_error(path, module, SUPPORTED, why)
    return spec


def _branch_copy(layer: nnx.Module) -> nnx.Module:
    """A copy of ``layer`` for branch ``>= 1``: zero weight, no bias."""
    weight = _spec(layer, "(layer)", "Split wraps it")[0]
    copy = nnx.clone(layer)
    var = getattr(copy, weight)
    var.set_value(jnp.zeros_like(var.get_value()))
    if getattr(copy, "bias", None) is not None:
        copy.bias = nnx.data(None)
    for attr, off in (("use_bias", False), ("bias_shape", None)):
        if hasattr(copy, attr):
            setattr(copy, attr, off)
    return copy


class Split(nnx.Module):
    """A layer as ``branches`` twin copies ``branch_0 …`` whose outputs are summed.

    ``branch_0`` is ``layer`` itself (bias included); branches ``>= 1`` are copies with
    a zero weight and no bias, so a fresh ``Split`` computes exactly what ``layer``
    did. Its state uses the tree contract's names (``branch_i/kernel``).

    Args:
      layer: an NNX layer of a ``SUPPORTED`` type.
      branches: number of branches (an int >= 2).

    Raises:
      TypeError: ``layer`` is not of a supported type, or ``branches`` is not an int.
      ValueError: ``branches < 2``.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> split = Split(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
      >>> sorted(nnx.state(split)), split(jnp.ones((1, 3))).shape
      (['branch_0', 'branch_1'], (1, 2))
    """

    def __init__(self, layer: nnx.Module, branches: int = 2):
        self.num_branches = check_branches("Split", branches)
        _spec(layer, "(layer)", "Split wraps it")
        self.branch_0 = layer
        for i in range(1, self.num_branches):
            setattr(self, branch_name(i), _branch_copy(layer))

    def __call__(self, *args, **kwargs):
        """Sum of the branches' ``__call__``."""
        return self._sum("__call__", args, kwargs)

    def attend(self, *args, **kwargs):
        """Sum of the branches' ``attend`` (for a split ``nnx.Embed``)."""
        return self._sum("attend", args, kwargs)

    def _sum(self, method, args, kwargs):
        valid = SUPPORTED[type(self.branch_0)][1]
        where = f"Split({type(self.branch_0).__name__})"
        return call_branches(self, self.num_branches, method, valid, args, kwargs, where)


def _child(node: Any, key: Any) -> Any:
    if isinstance(key, str) and not isinstance(node, Mapping) and hasattr(node, key):
        return getattr(node, key)
    return node[key]


def _set_child(node: Any, key: Any, value: Any) -> None:
    if isinstance(key, str) and not isinstance(node, Mapping) and hasattr(node, key):
        setattr(node, key, value)
    else:
        node[key] = value


def _module_at(model: nnx.Module, keys: tuple) -> tuple[Any, Any, Any]:
    """``(parent, key, module)`` for a layer's key path."""
    parent = model
    for k in keys[:-1]:
        parent = _child(parent, k)
    return parent, keys[-1], _child(parent, keys[-1])


def _check_model(model: Any, name: str = "model") -> None:
    if not isinstance(model, nnx.Module):
        raise TypeError(f"{name} must be a flax.nnx.Module, got {type(model).__name__}")


def split_model(model: nnx.Module, cfg: SplitConfig) -> nnx.Module:
    """A copy of ``model`` whose split layers are ``Split`` modules (``model`` is unchanged).

    Args:
      model: an NNX model.
      cfg: a ``SplitConfig``; layer paths are those of ``nnx.state(model)``.

    Returns:
      A new model with ``nnx.state(new) == split_params(nnx.state(model), cfg)``
      bit for bit. Layers that ``split_params`` leaves alone stay as they are.

    Raises:
      TypeError: ``model`` is not an ``nnx.Module``, or a layer to split is not of a
        ``SUPPORTED`` type (the message names its path and type).
      ValueError: as ``split_params`` (unmatched pattern, non-finite weights, …).

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import jaxsplit as js
      >>> model = nnx.Sequential(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), nnx.relu)
      >>> model2 = split_model(model, js.SplitConfig(layers=["layers/0"], threshold=0.1))
      >>> type(model2.layers[0]).__name__, sorted(nnx.state(model2)["layers"][0])
      ('Split', ['branch_0', 'branch_1'])
      >>> bool(jnp.allclose(model2(jnp.ones((1, 4))), model(jnp.ones((1, 4))), rtol=1e-5))
      True
    """
    _check_model(model)
    state = nnx.state(model)
    state2 = split_params(state, cfg)
    before = find_layers(state, cfg.weights)
    new = [lay for p, lay in find_layers(state2).items() if lay.branches and not before[p].branches]
    for layer in new:  # check every layer before copying anything
        module = _module_at(model, layer.keys)[2]
        if layer.leaf or type(module) not in SUPPORTED:
            raise unsupported_error(
                layer.path,
                module,
                SUPPORTED,
                "it was selected for splitting (module surgery needs a layer linear in "
                "its one weight; run any module on a split state with "
                "js.nnx.apply(model, x, params=js.split_params(nnx.state(model), cfg)))",
            )
    model2 = nnx.clone(model)
    for layer in new:
        parent, key, module = _module_at(model2, layer.keys)
        _set_child(parent, key, Split(module, branches=layer.branches))
    nnx.update(model2, state2)
    return model2


def merge_model(model2: nnx.Module) -> nnx.Module:
    """A copy of ``model2`` with every ``Split`` replaced by one layer holding the summed weight.

    ``merge_model(split_model(m, cfg))`` has ``m``'s state bit for bit (as
    ``merge_params``).

    Raises:
      TypeError: ``model2`` is not an ``nnx.Module``, or a split layer in its state is
        not held by a ``jaxsplit.nnx.Split`` module.

    Example:
      >>> from flax import nnx
      >>> import jaxsplit as js
      >>> model = nnx.Sequential(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
      >>> m2 = split_model(model, js.SplitConfig(layers=["layers/0"], threshold=0.1))
      >>> type(merge_model(m2).layers[0]).__name__
      'Linear'
    """
    _check_model(model2, "model2")
    state2 = nnx.state(model2)
    split = [lay for lay in find_layers(state2).values() if lay.branches]
    for layer in split:
        module = _module_at(model2, layer.keys)[2]
        if not isinstance(module, Split):
            raise TypeError(
                f"layer {layer.path!r} ({type(module).__name__}) holds branch_* weights "
                f"but is not a jaxsplit.nnx.Split module; cannot merge it"
            )
    merged = merge_params(state2)
    model = nnx.clone(model2)
    for layer in split:
        parent, key, module = _module_at(model, layer.keys)
        _set_child(parent, key, module.branch_0)
    nnx.update(model, merged)
    return model


def sparsify_model(model: nnx.Module, sparse_below: float) -> nnx.Module:
    """A copy of ``model`` whose ``Split`` twins of density ``< sparse_below`` run sparse.

    Each such ``branch_i`` (``i >= 1``) of an ``nnx.Linear``/``nnx.Conv`` becomes a
    ``jaxsplit.sparse_run.SparseBranch`` holding the twin as a ``BCOO``; other twins
    stay dense. The copy computes the same outputs up to float rounding, also under
    ``nnx.jit`` (make it outside). ``model`` is unchanged.

    Raises:
      ConfigError: ``sparse_below`` is out of ``[0, 1]``.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import jaxsplit as js
      >>> m = nnx.Sequential(nnx.Linear(4, 4, rngs=nnx.Rngs(0)))
      >>> m2 = split_model(m, js.SplitConfig(layers=["layers/0"], threshold=js.Relative(0.5)))
      >>> ms = sparsify_model(m2, 1.0)
      >>> type(ms.layers[0].branch_1).__name__
      'SparseBranch'
      >>> bool(jnp.allclose(ms(jnp.ones((1, 4))), m(jnp.ones((1, 4))), atol=1e-6))
      True
    """
    below = sparse_run.check_sparse_below("sparsify_model", sparse_below)
    _check_model(model)
    copy = nnx.clone(model)
    for _, module in list(nnx.iter_modules(copy)):
        if not isinstance(module, Split) or not below:
            continue
        weight = SUPPORTED[type(module.branch_0)][0]
        for i in range(1, module.num_branches):
            twin = getattr(module, branch_name(i))
            if not hasattr(twin, weight):
                continue
            w = getattr(twin, weight).get_value()
            if SparseBranch.supports(twin, w.ndim - 2) and sparse_run.density(w) < below:
                setattr(module, branch_name(i), SparseBranch(twin, sparse_run.to_sparse(w)))
    return copy


SparseBranch = sparse_run.SparseBranch


def _transformed_state(model: nnx.Module, state, weight_fn: Callable, weights) -> Any:
    """``state`` with ``weight_fn`` applied to every layer weight, each branch on its own
    (any module: the module then sees ``weight_fn(W)``)."""
    replacements = {}
    for layer in find_layers(state, weights).values():
        if layer.branches:
            module = _module_at(model, layer.keys)[2]
            if not isinstance(module, Split):
                raise unsupported_error(layer.path, module, SUPPORTED, "it holds split weights")
        replacements[layer.keys] = map_branch_weights(layer, weight_fn)
    return rebuild(state, replacements)


def _summed_state(state2, weight_fn, weights) -> Any:
    """``state2`` with every weight (per ``weights``, and every split one) replaced by
    ``sum_i weight_fn(W_i)`` and its branches merged: the unsplit model's state. A plain
    sum (not ``merge_params``' bit-preserving one), so every branch gets the gradient."""
    fn = (lambda w: w) if weight_fn is None else weight_fn
    replacements = {}
    for layer in find_layers(state2, weights).values():
        if not layer.branches and weight_fn is None:
            continue
        ws = branch_weights(layer)
        total = sum_branches(lambda i, ws=ws: fn(ws[i]), len(ws))
        if layer.leaf or not layer.branches:
            leaf = layer.branch_leaf(0) if layer.branches else raw(layer.node)[layer.weight]
            new = wrap_like(leaf, total)
            if not layer.leaf:
                new = like(layer.node, {**raw(layer.node), layer.weight: new})
        else:
            b0 = raw(layer.node[branch_name(0)])
            new = like(b0, {**b0, layer.weight: wrap_like(b0[layer.weight], total)})
        replacements[layer.keys] = new
    return rebuild(state2, replacements)


def _params_only(pure: Mapping, like_tree: Mapping) -> dict:
    """The entries of ``pure`` at the paths of ``like_tree`` (the model's Params)."""
    out = {}
    for k, v in like_tree.items():
        if k not in pure:
            raise ValueError(f"params holds no {k!r}, which the model's Params have")
        out[k] = _params_only(pure[k], v) if isinstance(v, Mapping) else pure[k]
    return out


def apply(
    model: nnx.Module,
    *args,
    method: str = "__call__",
    weight_fn: Callable[[Any], Any] | None = None,
    params: Any = None,
    weights: Weights = WEIGHT_NAMES,
    sparse_below: float | None = None,
    **kwargs,
):
    """Calls ``model`` (split or not) with every layer weight passed through ``weight_fn``.

    The weight of every supported layer, and of each ``Split`` branch separately, is
    replaced by ``weight_fn(w)`` for this call only (the model's parameters are not
    changed); other state the call updates (``BatchNorm`` statistics, RNG counts) is
    written back to ``model`` as a plain call would. ``weight_fn=None`` is a plain call.
    Gradients flow through ``weight_fn`` (e.g. a straight-through fake quantizer).

    Args:
      model: an NNX model.
      *args: arguments of the method.
      method: the method to call.
      weight_fn: a per-weight transform ``w -> w'``, or ``None``.
      params: a split state of ``model`` (``js.split_params(nnx.state(model), cfg)``,
        any weights, any module), or ``None``. Given, the call runs ``model``'s own code
        with each weight replaced, for this call only, by ``sum_i weight_fn(W_i)`` (the
        Param values are swapped, so modules that are not linear as a whole, such as a
        gated MLP holding both of its weights, work): exact to the unsplit model without
        ``weight_fn``, differentiable with respect to ``params`` (each branch gets the
        merged weight's gradient), fine inside ``jax.jit``.
      weights: with ``params`` or ``weight_fn``, which leaves are weights (as
        ``SplitConfig.weights``).
      sparse_below: run ``Split`` twins with fewer non-zeros per value than this as
        sparse products (``sparsify_model``; not together with ``weight_fn``).
      **kwargs: keyword arguments of the method.

    Returns:
      The method's output.

    Raises:
      TypeError: ``model``/``weight_fn`` of the wrong type, or a module owning a weight
        that is not of a ``SUPPORTED`` type (path named).

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> model = nnx.Sequential(nnx.Linear(2, 1, use_bias=False, rngs=nnx.Rngs(0)))
      >>> model.layers[0].kernel[...] = jnp.array([[0.3], [0.6]])
      >>> apply(model, jnp.ones((1, 2)), weight_fn=jnp.round).tolist()
      [[1.0]]
    """
    _check_model(model)
    if weight_fn is not None and not callable(weight_fn):
        raise ConfigTypeError(
            "apply", "weight_fn", f"weight_fn must be None or a callable w -> w', got {weight_fn!r}"
        )
    weights = check_weights(weights, "apply")
    if sparse_run.check_sparse_below("apply", sparse_below):
        if weight_fn is not None or params is not None:
            raise ConfigError(
                "apply",
                "weight_fn",
                "weight_fn= / params= cannot transform sparse twins (sparse_below=): "
                "quantize the branches first, then sparsify",
            )
        smodel = sparsify_model(model, sparse_below)
        out = getattr(smodel, method)(*args, **kwargs)
        nnx.update(model, nnx.state(smodel, nnx.All(nnx.Variable, nnx.Not(nnx.Param))))
        return out
    if params is not None:
        graphdef, pstate, rest = nnx.split(model, nnx.Param, ...)
        summed = _summed_state(params, weight_fn, weights)
        pure = nnx.to_pure_dict(summed) if isinstance(summed, nnx.State) else summed
        nnx.replace_by_pure_dict(pstate, _params_only(pure, nnx.to_pure_dict(pstate)))
        qmodel = nnx.merge(graphdef, pstate, rest)
        out = getattr(qmodel, method)(*args, **kwargs)
        rest = nnx.state(qmodel, nnx.Not(nnx.Param))
        if jax.tree.leaves(rest):
            nnx.update(model, rest)
        return out
    if weight_fn is None:
        return getattr(model, method)(*args, **kwargs)
    graphdef, state = nnx.split(model)
    qmodel = nnx.merge(graphdef, _transformed_state(model, state, weight_fn, weights))
    out = getattr(qmodel, method)(*args, **kwargs)
    nnx.update(model, nnx.state(qmodel, nnx.Not(nnx.Param)))
    return out
