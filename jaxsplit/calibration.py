"""``calibrate``: the second moments of each layer's inputs, for output-aware ``Auto``.

For a layer ``y = x W`` (``W`` as ``(d_in, d_out)``: a Dense kernel, or a Conv kernel
flattened over its receptive field ``kh·kw·cin`` in C order), the expected output error
of a reconstruction error ``E`` is ``E||x E||² = trace(Eᵀ C E)`` with ``C = E[x xᵀ]``
over the rows ``x`` the layer sees (every token, every output position of a Conv).
``calibrate`` runs the model on calibration batches, captures each Dense/Conv input
(``nn.intercept_methods`` for linen; probes on a clone for NNX, as
``jaxsplit.outputs``) and returns ``{layer path: C}``, which ``split_params(...,
calibration=C)`` and ``measure.measure(..., calibration=...)`` take.

``sensitivity`` says what ``C`` cannot: how much a layer's error matters at the model's
*output*. For each layer it estimates, from the float model, the expected increase of an
output metric (``1 - cos`` of the outputs, or their mean squared change) per unit of
squared weight error ``||ΔW||²_F``: the Gauss-Newton trace ``trace(Jᵀ M J) / size`` of
the metric's second-order form ``M`` seen through the layer's Jacobian ``J``, estimated
with Rademacher probes (Hutchinson) by forward-mode ``jax.jvp``. ``split_params(...,
sensitivity=...)`` weights each layer's score by it in ``Auto(scope="tree")``'s
allocation, so the shared budget goes where the output gains most.

Einsum weights are captured too (``einsum_rows``): ``nn.Einsum``/``nnx.Einsum`` and, in
linen, Gemma-style modules called as ``module(eqn, x)`` with one weight
``self.param(weight_name or "w", ...)`` (e.g. ``gating_einsum`` in a shared scope, whose
layer path is then ``<module path>/<weight name>``). Their rows are the inputs in the
kernel's flattened layout (``d_in = prod(shape[:-1])``, a head axis kept in the output
making ``C`` block-diagonal), provided the weight's last axis is an output axis of the
equation. Grouped/transposed convolutions and other einsums are not captured.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsplit.config import SplitConfig
from jaxsplit.errors import AlreadySplitError, ConfigError
from jaxsplit.outputs import run_with_hook
from jaxsplit.split import resolve_selection
from jaxsplit.tree import find_layers, like, rebuild, unwrap, wrap_like

__all__ = ["calibrate", "sensitivity", "output_metric", "input_rows", "einsum_rows", "KINDS",
           "METRICS"]  # fmt: skip

logger = logging.getLogger("jaxsplit")

#: ``calibrate(kind=...)``: the full ``E[x xᵀ]`` or its diagonal.
KINDS = ("matrix", "diagonal")
#: ``sensitivity(metric=...)``: how an output change is scored (``output_metric``).
METRICS = ("cosine", "mse")


def input_rows(module, x: jax.Array) -> jax.Array | None:
    """The ``(rows, d_in)`` inputs a Dense or Conv ``module`` multiplies by its kernel.

    ``None`` for layers whose input is not of that form (Einsum, grouped or transposed
    convolutions, general Dense with several contracted axes).

    Example:
      >>> import flax.linen as nn, jax.numpy as jnp
      >>> input_rows(nn.Dense(4), jnp.ones((2, 5, 3))).shape
      (10, 3)
      >>> input_rows(nn.Conv(4, (3, 3)), jnp.ones((1, 5, 5, 2))).shape  # SAME padding
      (25, 18)
    """
    if isinstance(module, nn.Dense | nnx.Linear):
        return x.reshape(-1, x.shape[-1])
    if isinstance(module, nn.Conv | nnx.Conv) and not isinstance(
        module, nn.ConvTranspose | nnx.ConvTranspose
    ):
        if getattr(module, "feature_group_count", 1) != 1:
            return None
        ks = tuple(module.kernel_size)
        nd = len(ks)
        strides = _tuple(module.strides, nd)
        padding = module.padding
        if isinstance(padding, str):
            if padding.upper() not in ("SAME", "VALID"):
                return None
            padding = padding.upper()
        elif isinstance(padding, int):
            padding = [(padding, padding)] * nd
        else:
            padding = [(p, p) if isinstance(p, int) else tuple(p) for p in padding]
        spatial = "DHW"[-nd:] if nd <= 3 else None
        if spatial is None:
            return None
        dn = (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")
        p = jax.lax.conv_general_dilated_patches(
            x,
            ks,
            strides,
            padding,
            lhs_dilation=_tuple(getattr(module, "input_dilation", 1), nd),
            rhs_dilation=_tuple(getattr(module, "kernel_dilation", 1), nd),
            dimension_numbers=dn,
        )
        cin = x.shape[-1]
        # patches come ordered (cin, *kernel_size); the kernel flattens (*kernel_size, cin)
        p = p.reshape(-1, cin, *ks)
        p = jnp.moveaxis(p, 1, -1)
        return p.reshape(p.shape[0], -1)
    return None


def einsum_rows(eqn: str, x: jax.Array, shape: tuple[int, ...]) -> jax.Array | None:
    """The ``(rows, d_in)`` inputs of ``jnp.einsum(eqn, x, w)`` in ``w``'s flattened layout.

    ``rows @ w.reshape(d_in, d_out)`` reproduces the einsum's output with ``w``'s last axis
    moved last (``d_in = prod(shape[:-1])``), so ``E[rowsᵀ rows]`` is the ``C`` of
    ``trace(Eᵀ C E)``. ``None`` unless ``w``'s last axis is an output axis of ``eqn`` that
    ``x`` does not carry.

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.arange(6.0).reshape(1, 2, 3)
      >>> einsum_rows("BTD,NDH->BTNH", x, (2, 3, 4)).shape  # rows B·T·N, d_in N·D
      (4, 6)
      >>> einsum_rows("BTD,DH->BTH", x, (3, 4)).shape
      (2, 3)
      >>> einsum_rows("BTD,ND->BTN", x, (2, 3)) is None  # last axis contracted
      True
    """
    eqn = eqn.replace(" ", "")
    if "->" not in eqn or eqn.count(",") != 1:
        return None
    ins, out = eqn.split("->")
    lhs, rhs = ins.split(",")
    if "." in rhs or not rhs or len(rhs) != len(shape):
        return None
    last = rhs[-1]
    if last not in out or last in lhs or out.count(last) != 1:
        return None
    d_in = math.prod(shape[:-1])
    basis = jnp.eye(d_in, dtype=x.dtype).reshape(*shape[:-1], d_in)
    rows = jnp.einsum(f"{lhs},{rhs}->{out.replace(last, '')}{last}", x, basis)
    return rows.reshape(-1, d_in)


def _einsum_call(module, args, kwargs):
    """``(eqn, x, weight name, weight shape)`` of an Einsum call, or ``None``."""
    if isinstance(module, nn.Einsum | nnx.Einsum):
        eqn = kwargs.get("einsum_str") or (args[1] if len(args) > 1 else None)
        eqn = eqn or module.einsum_str
        x = args[0] if args else kwargs.get("inputs")
        name = "kernel"
    elif isinstance(module, nn.Module) and len(args) == 2 and isinstance(args[0], str):
        eqn, x = args  # a Gemma-style ``Einsum(eqn, x)`` with one named weight
        name = getattr(module, "weight_name", "w")
    else:
        return None
    if not isinstance(eqn, str) or not hasattr(x, "shape"):
        return None
    if isinstance(module, nnx.Module):
        w = getattr(module, name, None)
    else:
        w = module.variables.get("params", {}).get(name)
    if w is None or not hasattr(w, "shape"):
        return None
    return eqn, x, name, tuple(w.shape)


def _tuple(v, n: int) -> tuple[int, ...]:
    if v is None:
        return (1,) * n
    return (int(v),) * n if isinstance(v, int) else tuple(int(a) for a in v)


def calibrate(
    model, variables, batches: Iterable, *, kind: str = "matrix"
) -> dict[str, np.ndarray]:
    """Second moments of every Dense/Conv layer's inputs over calibration ``batches``.

    Args:
      model: a ``flax.linen.Module`` (with ``variables``) or a ``flax.nnx.Module``
        (``variables``: ``None`` or an ``nnx.State`` to run it with).
      variables: linen variables, or ``None`` / an ``nnx.State`` for NNX.
      batches: an iterable of model inputs: each an array, or a tuple of positional
        arguments.
      kind: ``"matrix"``: ``E[x xᵀ]`` ``(d_in, d_in)``; ``"diagonal"``: the
        per-input-feature mean squares ``(d_in,)``.

    Returns:
      ``{layer path: float32 array}``, the mean over every input row of every batch.

    Raises:
      ConfigError: ``kind`` is not one of ``KINDS``, or ``batches`` is empty.

    Example:
      >>> import flax.linen as nn, jax, jax.numpy as jnp
      >>> m = nn.Dense(2)
      >>> v = m.init(jax.random.key(0), jnp.ones((1, 3)))
      >>> c = calibrate(m, v, [jnp.array([[1.0, 2.0, 0.0]])], kind="diagonal")
      >>> {k: a.tolist() for k, a in c.items()}
      {'': [1.0, 4.0, 0.0]}
    """
    if kind not in KINDS:
        raise ConfigError(
            "calibrate", "kind", f"calibrate kind must be one of {list(KINDS)}, got {kind!r}"
        )
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    fn = _moments_fn(model, kind)
    n_batches = 0
    for batch in batches:
        args = batch if isinstance(batch, tuple) else (batch,)
        for path, (s, n) in jax.device_get(fn(variables, args)).items():
            sums[path] = sums.get(path, 0) + np.asarray(s, np.float64)
            counts[path] = counts.get(path, 0) + int(n)
        n_batches += 1
    if not n_batches:
        raise ConfigError("calibrate", "batches", "calibrate needs at least one batch, got none")
    return {p: (sums[p] / max(counts[p], 1)).astype(np.float32) for p in sums}


def _own_weights(module, name: str) -> tuple[str, ...]:
    """``(name,)`` when the module's scope holds other array params besides ``name``
    (a shared scope such as Gemma's feed-forward: the layer path is then
    ``<path>/<name>``), else ``()``."""
    params = module.variables.get("params", {})
    others = [k for k, v in params.items() if k != name and getattr(v, "ndim", 0) >= 2]
    return (name,) if others else ()


def _moments_fn(model, kind: str):
    def moment(rows):
        r = rows.astype(jnp.float32)
        return jnp.sum(r * r, axis=0) if kind == "diagonal" else r.T @ r

    def add(acc, path, rows):
        if rows is None:
            return
        m = moment(rows)
        if path in acc:
            acc[path] = (acc[path][0] + m, acc[path][1] + rows.shape[0])
        else:
            acc[path] = (m, rows.shape[0])

    if isinstance(model, nn.Module):

        @jax.jit
        def run_linen(variables, args):
            acc: dict = {}

            def interceptor(next_fun, a, kw, context):
                if context.method_name == "__call__" and a:
                    mod = context.module
                    path = "/".join(str(p) for p in mod.path)
                    call = _einsum_call(mod, a, kw)
                    if call is not None:
                        eqn, x, name, shape = call
                        if not isinstance(mod, nn.Einsum) and name in _own_weights(mod, name):
                            path = f"{path}/{name}" if path else name
                        add(acc, path, einsum_rows(eqn, x, shape))
                    else:
                        add(acc, path, input_rows(mod, a[0]))
                return next_fun(*a, **kw)

            with nn.intercept_methods(interceptor):
                model.apply(variables, *args)
            return acc

        return run_linen
    if isinstance(model, nnx.Module):
        modules = {"/".join(str(p) for p in path): m for path, m in nnx.iter_modules(model)}

        def run_nnx(state, args):
            acc: dict = {}

            def hook(path, call, x):
                mod = modules[path]
                if isinstance(mod, nnx.Einsum):
                    add(acc, path, einsum_rows(mod.einsum_str, x, tuple(mod.kernel.shape)))
                else:
                    add(acc, path, input_rows(mod, x))
                return call(x)

            run_with_hook(model, state, args, {}, hook)
            return acc

        return run_nnx
    raise TypeError(
        f"model must be a flax.linen.Module or a flax.nnx.Module, got {type(model).__name__}"
    )


def output_metric(y: jax.Array, t: jax.Array, metric: str) -> jax.Array:
    """The second-order cost of a small change ``t`` of the outputs ``y`` (last axis:
    features, every other axis a row), averaged over the rows.

    ``"cosine"``: ``1 - cos(y, y + t) ≈ ½ ||t_⊥||² / ||y||²`` per row (``t_⊥``: ``t``
    without its component along ``y``; rows with ``y = 0`` count 0); ``"mse"``: the mean
    of ``t²`` over every element.

    Example:
      >>> import jax.numpy as jnp
      >>> y = jnp.array([[1.0, 0.0]])
      >>> round(float(output_metric(y, jnp.array([[0.5, 0.2]]), "cosine")), 6)  # ½ 0.2²
      0.02
      >>> round(float(output_metric(y, jnp.array([[0.5, 0.2]]), "mse")), 6)
      0.145
    """
    y = y.astype(jnp.float32)
    t = t.astype(jnp.float32)
    if metric == "mse":
        return jnp.mean(t * t)
    y2, t2 = y.reshape(-1, y.shape[-1]), t.reshape(-1, t.shape[-1])
    n2 = jnp.sum(y2 * y2, axis=1)
    safe = jnp.where(n2 > 0, n2, 1.0)
    perp = t2 - (jnp.sum(t2 * y2, axis=1) / safe)[:, None] * y2
    per_row = jnp.where(n2 > 0, 0.5 * jnp.sum(perp * perp, axis=1) / safe, 0.0)
    return jnp.mean(per_row)


def sensitivity(
    apply_fn,
    variables,
    batches: Iterable,
    *,
    layers=("**",),
    metric: str = "cosine",
    probes: int = 4,
    seed: int = 0,
) -> dict[str, float]:
    """Each layer's end-to-end sensitivity: the expected output cost per unit of
    squared weight error, from the float model.

    For layer ``l`` with weight ``W`` of ``size`` values, the cost of a small error
    ``ΔW`` is ``ΔWᵀ Jᵀ M J ΔW`` to second order (``J``: the outputs' Jacobian in ``W``;
    ``M``: ``output_metric``'s quadratic form; the metric's gradient is zero at the float
    model). For an error with no preferred direction this is ``s_l × ||ΔW||²_F`` with
    ``s_l = trace(Jᵀ M J) / size``, which is returned, estimated with ``probes``
    Rademacher vectors ``z`` per batch (``E[zᵀ A z] = trace A``) by ``jax.jvp``: one
    forward pass with a tangent per probe, no finite differences. Passed to
    ``split_params(..., sensitivity=...)``, ``s_l`` turns ``Auto(scope="tree")``'s
    per-layer scores (squared weight error, or with a calibration the output error per
    unit of input power, both ``||ΔW||²``-like) into predicted output costs, so the
    tree's budget goes to the layers whose errors the output feels most.

    Args:
      apply_fn: ``apply_fn(variables, *batch) -> outputs``, the float model (e.g.
        ``model.apply``, or a function returning the pooled output only); the last
        axis of ``outputs`` is the feature axis, every other axis a row.
      variables: its variables (linen variables, a params dict, ``nnx.State`` …, as
        ``split_params`` takes them); layers already split raise.
      batches: an iterable of inputs, each an array or a tuple of positional arguments
        (use other inputs than those you evaluate on).
      layers: ``SplitConfig.layers``-style patterns of the layers to estimate
        (default: every layer), selected as ``split.resolve_selection`` selects them.
      metric: one of ``METRICS``: ``"cosine"`` (``1 - cos`` per row) or ``"mse"``.
      probes: Rademacher probes per batch (``>= 1``); the estimate's relative spread
        falls as ``1 / sqrt(probes × rows × outputs)``.
      seed: the probes' seed (each layer and batch its own fold of it).

    Returns:
      ``{layer path: s_l}`` (floats ``>= 0``), the mean over batches and probes.

    Raises:
      ConfigError: ``metric``, ``probes`` or ``layers`` (as ``SplitConfig.layers``) is
        invalid, or ``batches`` is empty.
      UnmatchedPatternError: a pattern of ``layers`` matched no layer.
      AlreadySplitError: a selected layer is split (merge it first).

    Example:
      >>> import jax.numpy as jnp
      >>> v = {"params": {"d": {"kernel": jnp.eye(3, 2)}, "e": {"kernel": jnp.eye(2)}}}
      >>> def apply_fn(v, x):
      ...     return x @ v["params"]["d"]["kernel"] @ (4 * v["params"]["e"]["kernel"])
      >>> s = sensitivity(apply_fn, v, [jnp.array([[1.0, 0.0, 0.0]])], metric="mse")
      >>> s  # d: every error reaches the output ×4; e: only its first row is used
      {'d': 2.666..., 'e': 4.0}
    """
    if metric not in METRICS:
        raise ConfigError(
            "sensitivity", "metric", f"sensitivity metric must be one of {list(METRICS)}, "
            f"got {metric!r}",
        )  # fmt: skip
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise ConfigError(
            "sensitivity", "probes", f"sensitivity probes must be an int >= 1, got {probes!r}"
        )
    selected, _, _ = resolve_selection(variables, SplitConfig(layers=layers))
    for layer in selected:
        if layer.branches:
            raise AlreadySplitError(
                layer.path, f"layer {layer.path!r} is split; sensitivity needs the float "
                "model (merge_params first)",
            )  # fmt: skip
    paths = [lay.path for lay in selected]
    run = _sensitivity_fn(apply_fn, paths, metric)
    deltas = {lay.path: jnp.zeros_like(unwrap(lay.array)) for lay in selected}
    sums = dict.fromkeys(paths, 0.0)
    key = jax.random.key(seed)
    n_batches = 0
    for b, batch in enumerate(batches):
        args = batch if isinstance(batch, tuple) else (batch,)
        for i, p in enumerate(paths):
            for j in range(probes):
                k = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, i), b), j)
                z = jax.random.rademacher(k, deltas[p].shape, jnp.float32).astype(deltas[p].dtype)
                tangent = {q: (z if q == p else d) for q, d in deltas.items()}
                sums[p] += float(run(variables, deltas, tangent, args)) / deltas[p].size
        n_batches += 1
    if not n_batches:
        raise ConfigError(
            "sensitivity", "batches", "sensitivity needs at least one batch, got none"
        )
    return {p: sums[p] / (n_batches * probes) for p in paths}


def _sensitivity_fn(apply_fn, paths: list[str], metric: str):
    """A jitted ``(variables, deltas, tangent, args) -> metric of J·tangent``: the
    outputs as a function of additive weight deltas (zero), one compilation for every
    layer and probe."""

    def outputs(variables, deltas, args):
        found = find_layers(variables)
        reps = {}
        for p in paths:
            lay = found[p]
            orig = lay.node[lay.weight]
            w = wrap_like(orig, unwrap(orig) + deltas[p])
            reps[lay.keys] = w if lay.leaf else like(lay.node, {**lay.node, lay.weight: w})
        return apply_fn(rebuild(variables, reps), *args)

    @jax.jit
    def run(variables, deltas, tangent, args):
        y, t = jax.jvp(lambda d: outputs(variables, d, args), (deltas,), (tangent,))
        return output_metric(y, t, metric)

    return run
