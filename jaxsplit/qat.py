"""Quantization-aware fine-tuning of split twins (optax, straight-through ``fake_quant``).

The forward pass runs the *original* model on ``sum_i fake_quant(W_i)`` for every layer
(``outputs.quantized_weights`` with ``quant.fake_quant``), so any model whose
loss takes an unsplit parameter tree can be fine-tuned, linen or NNX alike. Gradients
flow straight through the rounding into every branch; each branch keeps its own scale
(recomputed from its max-abs every step, as at deployment). The split structure is
kept: the tree stays split, and a twin's zeros stay exactly zero, so a sparse ``clip``
twin keeps its cost in non-zero parameters (the merge skips zero addends, so they get no
gradient; ``keep_sparsity`` also masks the updates, for optimizers such as weight decay
that move parameters without a gradient).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxsplit import quant
from jaxsplit.outputs import quantized_weights
from jaxsplit.quant import QuantSpec
from jaxsplit.tree import branch_weights, find_layers

__all__ = ["QATResult", "quantized_loss", "finetune"]


@dataclasses.dataclass(frozen=True)
class QATResult:
    """What ``finetune`` returns.

    Attributes:
      params: the fine-tuned split tree (same structure as the input).
      losses: the quantized training loss before each step, then after the last one.
    """

    params: Any
    losses: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        """The losses (parameters are left out: they are arrays)."""
        return {"losses": list(self.losses)}


def quantized_loss(loss_fn: Callable, params2: Mapping, batch: Any, spec: QuantSpec):
    """``loss_fn`` on the fake-quantized, merged tree: what the deployed model would score.

    Args:
      loss_fn: ``(unsplit_params, batch) -> scalar``.
      params2: a (split) parameter tree.
      batch: passed to ``loss_fn`` as is.
      spec: the weights' ``QuantSpec``; every layer weight (each branch separately) is
        fake-quantized.

    Returns:
      The scalar loss, differentiable in ``params2`` (straight-through rounding).

    Example:
      >>> import jax.numpy as jnp
      >>> p = {"d": {"branch_0": {"kernel": jnp.array([0.3, 1.0])},
      ...            "branch_1": {"kernel": jnp.array([0.0, 1.0])}}}
      >>> def loss(q, x):
      ...     return jnp.sum(q["d"]["kernel"] * x)
      >>> float(quantized_loss(loss, p, jnp.ones(2), QuantSpec(bits=2)))
      2.0
    """
    return loss_fn(quantized_weights(params2, spec, quantize=quant.fake_quant), batch)


def _sparsity_masks(params2: Mapping):
    """A tree like ``params2``: ``w != 0`` for twin kernels (branches >= 1), else ``True``."""
    twins = set()
    for layer in find_layers(params2).values():
        for w in branch_weights(layer)[1:]:
            twins.add(id(w))
    return jax.tree.map(lambda x: (x != 0) if id(x) in twins else True, params2)


def finetune(
    loss_fn: Callable,
    params2: Mapping,
    data: Iterable,
    spec: QuantSpec,
    *,
    steps: int,
    optimizer: optax.GradientTransformation | None = None,
    keep_sparsity: bool = True,
) -> QATResult:
    """Fine-tunes a split tree for ``steps`` steps with every branch fake-quantized.

    Args:
      loss_fn: ``(unsplit_params, batch) -> scalar``, e.g.
        ``lambda p, b: mse(model.apply({"params": p}, b[0]), b[1])``.
      params2: a split (or partly split) params tree of plain arrays.
      data: an iterable of batches, cycled if shorter than ``steps``.
      spec: the weights' ``QuantSpec``.
      steps: number of optimizer steps, ``>= 1``.
      optimizer: an optax transformation (default ``optax.adam(1e-3)``).
      keep_sparsity: keep every twin's zero entries at zero (masked updates).

    Returns:
      ``QATResult(params, losses)``.

    Raises:
      ValueError: ``steps < 1`` or ``data`` is empty.
      TypeError: ``spec`` is not a ``QuantSpec``.

    Example:
      >>> import jax.numpy as jnp
      >>> p = {"d": {"branch_0": {"kernel": jnp.array([0.3, 0.9])},
      ...            "branch_1": {"kernel": jnp.array([0.0, 0.9])}}}
      >>> def loss(q, b):
      ...     return jnp.sum((q["d"]["kernel"] - b) ** 2)
      >>> res = finetune(loss, p, [jnp.array([0.5, 1.5])], QuantSpec(bits=3), steps=50,
      ...                optimizer=optax.adam(1e-2))
      >>> res.losses[-1] < res.losses[0], float(res.params["d"]["branch_1"]["kernel"][0])
      (True, 0.0)
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a jaxsplit.QuantSpec, got {spec!r}")
    opt = optax.adam(1e-3) if optimizer is None else optimizer
    masks = _sparsity_masks(params2) if keep_sparsity else None

    @jax.jit
    def step(p, state, batch):
        loss, grads = jax.value_and_grad(quantized_loss, argnums=1)(loss_fn, p, batch, spec)
        updates, state = opt.update(grads, state, p)
        if masks is not None:
            updates = jax.tree.map(lambda u, m: jnp.where(m, u, 0), updates, masks)
        return optax.apply_updates(p, updates), state, loss

    batches = itertools.cycle(data)
    state = opt.init(params2)
    losses = []
    p = params2
    batch = None
    for _ in range(steps):
        batch = next(batches, None)
        if batch is None:
            raise ValueError("data must hold at least one batch, got an empty iterable")
        p, state, loss = step(p, state, batch)
        losses.append(loss)
    final = jax.jit(quantized_loss, static_argnums=(0, 3))(loss_fn, p, batch, spec)
    return QATResult(p, tuple(float(x) for x in jax.device_get([*losses, final])))
