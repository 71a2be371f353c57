"""The demo's built-in workload: a small CNN trained on scikit-learn's bundled digits.

Everything here is deterministic for a given seed (data split, initialisation,
batch order) and needs no download: ``sklearn.datasets.load_digits`` ships with
scikit-learn. Training takes a few seconds on two CPU cores.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = ["DigitsCNN", "Digits", "load_digits_split", "train", "accuracy"]

logger = logging.getLogger("jaxsplit")


class DigitsCNN(nn.Module):
    """Two 3×3 convolutions and two dense layers for 8×8 grey digits (about 38k parameters).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> v = DigitsCNN().init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
      >>> sorted(v["params"])
      ['Conv_0', 'Conv_1', 'Dense_0', 'Dense_1']
    """

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Conv(16, (3, 3))(x))
        x = nn.relu(nn.Conv(32, (3, 3), strides=2)(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(64)(x))
        return nn.Dense(10)(x)


@dataclasses.dataclass(frozen=True)
class Digits:
    """Train/test arrays: images ``(N, 8, 8, 1)`` float32 in ``[0, 1]``, labels int32."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits_split(seed: int = 0, test_fraction: float = 0.25) -> Digits:
    """scikit-learn's digits (1797 images), split stratified and reproducibly.

    Args:
      seed: seed of the train/test split.
      test_fraction: share of the images held out for testing, in ``(0, 1)``.

    Returns:
      A ``Digits`` with images scaled to ``[0, 1]``.

    Raises:
      ImportError: scikit-learn is missing (install the ``demo`` extra).
      ValueError: ``test_fraction`` is not in ``(0, 1)``.

    Example:
      >>> d = load_digits_split()
      >>> d.x_train.shape, d.x_test.shape
      ((1347, 8, 8, 1), (450, 8, 8, 1))
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            'the demo needs scikit-learn: pip install -e ".[demo]" (or pip install scikit-learn)'
        ) from e
    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[..., None]
    y = data.target.astype(np.int32)
    xtr, xte, ytr, yte = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return Digits(xtr, ytr, xte, yte)


def _loss(params, x, y):
    logits = DigitsCNN().apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@functools.partial(jax.jit, static_argnames="learning_rate")
def _step(params, opt_state, x, y, *, learning_rate: float):
    """One Adam step (module level, so the compiled step is shared by every ``train`` call)."""
    loss, g = jax.value_and_grad(_loss)(params, x, y)
    updates, opt_state = optax.adam(learning_rate).update(g, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def train(
    data: Digits,
    *,
    seed: int = 0,
    epochs: int = 30,
    batch_size: int = 64,
    learning_rate: float = 3e-3,
    on_epoch: Callable[[int, float], Any] | None = None,
) -> tuple[nn.Module, Mapping]:
    """Trains ``DigitsCNN`` with optax Adam; returns ``(model, variables)``.

    One compiled step per shuffled minibatch (the last partial batch of an epoch is
    dropped). A Python loop of jitted steps, not ``lax.scan``: on XLA:CPU the scanned
    convolution gradients compiled ~5x slower and ran ~10x slower here.

    Args:
      data: the dataset from ``load_digits_split``.
      seed: seeds initialisation and the batch order.
      epochs: passes over the training set (``>= 1``).
      batch_size: minibatch size (``>= 1``, at most the training set size).
      learning_rate: Adam's step size.
      on_epoch: called as ``on_epoch(epoch, mean_loss)`` after each epoch (progress).

    Returns:
      The model and its trained linen variables ``{'params': ...}``.

    Raises:
      ValueError: ``epochs`` or ``batch_size`` out of range.

    Example:
      >>> d = load_digits_split()
      >>> model, v = train(d, epochs=1)
      >>> 0.0 <= accuracy(model, v, d.x_test, d.y_test) <= 1.0
      True
    """
    n = len(data.x_train)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be an int in [1, {n}], got {batch_size!r}")
    model = DigitsCNN()
    params = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, *data.x_train.shape[1:])))[
        "params"
    ]
    steps = n // batch_size
    rng = np.random.default_rng(seed)
    opt_state = optax.adam(learning_rate).init(params)
    for e in range(epochs):
        order = rng.permutation(n)[: steps * batch_size].reshape(steps, batch_size)
        losses = []
        for idx in order:
            params, opt_state, loss = _step(
                params, opt_state, data.x_train[idx], data.y_train[idx], learning_rate=learning_rate
            )
            losses.append(loss)
        loss = float(jnp.mean(jnp.stack(losses)))
        if on_epoch is not None:
            on_epoch(e, loss)
    logger.info("digits CNN trained: %d epochs, final loss %.4f", epochs, loss)
    return model, {"params": params}


def accuracy(
    model: nn.Module,
    variables: Mapping,
    x: np.ndarray,
    y: np.ndarray,
    apply_fn: Callable | None = None,
) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``.

    Args:
      model: the linen module.
      variables: its variables (possibly a split tree when ``apply_fn`` sums branches).
      x, y: images and integer labels.
      apply_fn: ``apply_fn(model, variables, x) -> logits``; default ``model.apply``.

    Returns:
      The fraction of correct predictions, a Python float.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> d = load_digits_split()
      >>> model = DigitsCNN()
      >>> v = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))  # untrained
      >>> isinstance(accuracy(model, v, d.x_test, d.y_test), float)
      True
    """
    logits = model.apply(variables, x) if apply_fn is None else apply_fn(model, variables, x)
    return float(jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(y)))
