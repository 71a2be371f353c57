"""What the linen interceptor, the linen ``Split`` module and the NNX ``Split`` share.

A split layer computes ``y = f(x; W1, b) + f(x; W2) + …``: every branch runs the
layer's own code (``f``) on its own weight, only ``branch_0`` adds the bias, and the
outputs are summed left to right. ``sum_branches`` is that sum; the framework modules
only say how to run branch ``i``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from jaxsplit.errors import ConfigError, ConfigTypeError
from jaxsplit.kernels import BRANCHES
from jaxsplit.tree import branch_name

__all__ = [
    "check_branches",
    "sum_branches",
    "call_branches",
    "unsupported_error",
]


def check_branches(owner: str, branches: Any) -> int:
    """Validates a branch count (one of ``kernels.BRANCHES``, as ``split_params``) and returns it.

    Raises:
      ConfigTypeError: ``branches`` is not an int.
      ConfigError: ``branches`` is not one of ``kernels.BRANCHES``.

    Example:
      >>> check_branches("Split", 2)
      2
    """
    msg = f"{owner}.branches must be one of {list(BRANCHES)} (as split_params), got {branches!r}"
    if isinstance(branches, bool) or not isinstance(branches, int):
        raise ConfigTypeError(owner, "branches", msg)
    if branches not in BRANCHES:
        raise ConfigError(owner, "branches", msg)
    return int(branches)


def sum_branches(run_branch: Callable[[int], Any], k: int) -> Any:
    """``run_branch(0) + run_branch(1) + … + run_branch(k-1)`` (leafwise for pytrees).

    Args:
      run_branch: runs the layer's own code on branch ``i``'s weights and returns its
        output (an array or a pytree of arrays).
      k: number of branches (``>= 1``).

    Returns:
      The sum, accumulated left to right in branch order.

    Example:
      >>> import jax.numpy as jnp
      >>> sum_branches(lambda i: jnp.float32(i + 1), 3).item()
      6.0
    """
    out = run_branch(0)
    for i in range(1, k):
        out = jax.tree.map(lambda a, b: a + b, out, run_branch(i))
    return out


def call_branches(owner: Any, k: int, method: str, valid, args, kwargs, where: str) -> Any:
    """Calls ``method`` on ``owner.branch_0 … branch_{k-1}`` and sums the outputs.

    Args:
      owner: a module holding the branches as attributes.
      k: number of branches.
      method: the method name (``"__call__"``, ``"attend"``).
      valid: the methods that may run branch-wise (linear in the weight).
      args, kwargs: the call's arguments.
      where: how errors name ``owner`` (its type and path).

    Raises:
      TypeError: ``method`` is not in ``valid``.

    Example:
      >>> class Two:
      ...     branch_0 = branch_1 = staticmethod(lambda x: 2 * x)
      >>> call_branches(Two(), 2, "__call__", ("__call__",), (3,), {}, "Two")
      12
    """
    if method not in valid:
        raise TypeError(f"{where} has no branch-wise {method!r}; valid: {list(valid)}")
    return sum_branches(
        lambda i: getattr(getattr(owner, branch_name(i)), method)(*args, **kwargs), k
    )


def unsupported_error(path: str, module: Any, supported, why: str) -> TypeError:
    """The error for a layer type the wrappers cannot run branch-wise.

    Example:
      >>> str(unsupported_error("blk/f", 1.0, (int,), "it holds split params"))[:40]
      "layer 'blk/f' (float): it holds split pa"
    """
    names = ", ".join(sorted(t.__name__ for t in supported))
    return TypeError(
        f"layer {path!r} ({type(module).__name__}): {why}, but only these layer types "
        f"can be split (linear in their weight, bias switched by their own settings): "
        f"{names}"
    )
