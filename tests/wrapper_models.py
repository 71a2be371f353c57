"""Shared fixtures for the wrapper tests: numpy-initialised variables (no RNG compiles)."""

import jax
import numpy as np


def np_init(model, *args, seed=0, scale=0.5, **kwargs):
    """``model.init``'s tree filled with numpy normals (variances with positive values).

    Avoids compiling flax's random initialisers, which dominates test time on CPU.
    """
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kwargs))
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "var":
            return rng.uniform(0.5, 1.5, s.shape).astype(s.dtype)
        return (scale * rng.standard_normal(s.shape)).astype(s.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def randn(*shape, seed=1):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def nnx_np_init(ctor, seed=0, scale=0.5):
    """``ctor(nnx.Rngs(0))`` built abstractly, then filled like ``np_init``."""
    from flax import nnx

    graphdef, shapes = nnx.split(nnx.eval_shape(lambda: ctor(nnx.Rngs(0))))
    rng = np.random.default_rng(seed)

    def fill(path, s):
        names = [str(getattr(p, "key", getattr(p, "name", p))) for p in path]
        if "var" in names:
            return rng.uniform(0.5, 1.5, s.shape).astype(s.dtype)
        return jax.numpy.asarray((scale * rng.standard_normal(s.shape)).astype(s.dtype))

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, shapes))
