"""MTCNN's P-Net, R-Net and O-Net rebuilt in Flax linen, with the `mtcnn` package's weights.

The networks follow Zhang et al., "Joint Face Detection and Alignment using
Multi-task Cascaded Convolutional Networks" (2016) and the layer-for-layer Keras
port in the ``mtcnn`` PyPI package (``mtcnn/network/{pnet,rnet,onet}.py``): 3×3 /
2×2 VALID convolutions, PReLU after every hidden layer (one slope per channel,
shared over space), max-pooling (TF ``SAME`` or ``VALID``), and for R/O-Net a
``(H, W, C) -> (W, H, C)`` permute before flattening (the weights come from the
original Caffe models, which were trained on transposed images; the permute keeps
the dense layer's row order).

The weights are the numpy arrays the package ships in
``mtcnn/assets/weights/{pnet,rnet,onet}.lz4`` (a ``joblib`` list in Keras
``model.weights`` order). We locate that folder with ``importlib.util.find_spec``
and never ``import mtcnn`` (its ``__init__`` imports TensorFlow).

Stored layout (checked in ``tests/test_experiments.py``): conv kernels are
``(kh, kw, in, out)`` as Flax expects, conv PReLU slopes are ``(1, 1, C)``, dense
kernels ``(in, out)``, dense PReLU slopes ``(C,)``. Inputs are RGB images in
``(N, H, W, 3)`` normalised as the package does, ``(pixel - 127.5) / 128``.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "PReLU",
    "PNet",
    "RNet",
    "ONet",
    "NETS",
    "INPUT_SIZE",
    "HEADS",
    "weights_dir",
    "load_raw",
    "load_variables",
    "normalize",
]

#: Input side length each network was trained on (P-Net is fully convolutional).
INPUT_SIZE = {"pnet": 12, "rnet": 24, "onet": 48}

#: The output layers of each network (raw outputs: box/landmark regression, class logits).
HEADS = {
    "pnet": ("conv4_1", "conv4_2"),
    "rnet": ("fc5_1", "fc5_2"),
    "onet": ("fc6_1", "fc6_2", "fc6_3"),
}


class PReLU(nn.Module):
    """``x if x > 0 else alpha * x`` with one learned slope per channel (last axis).

    The slope is stored as ``alpha`` (not ``kernel``), so jaxsplit never selects it.
    """

    shape: Sequence[int]

    @nn.compact
    def __call__(self, x):
        alpha = self.param("alpha", nn.initializers.constant(0.25), tuple(self.shape))
        return jnp.where(x > 0, x, alpha * x)


def _conv(features: int, k: int, name: str) -> nn.Conv:
    return nn.Conv(features, (k, k), padding="VALID", name=name)


def _pool(x, k: int, padding: str):
    return nn.max_pool(x, (k, k), strides=(2, 2), padding=padding)


def _flatten_wh(x):
    """Keras ``Permute((2, 1, 3))`` then ``Flatten``: row order ``(W, H, C)``."""
    return jnp.transpose(x, (0, 2, 1, 3)).reshape(x.shape[0], -1)


class PNet(nn.Module):
    """Proposal network: any ``(N, H, W, 3)`` input -> ``(bbox (N,h,w,4), prob (N,h,w,2))``.

    One output cell per 12×12 window at stride 2; ``prob[..., 1]`` is the face probability.
    """

    @nn.compact
    def __call__(self, x):
        x = PReLU((1, 1, 10), name="prelu1")(_conv(10, 3, "conv1")(x))
        x = _pool(x, 2, "SAME")
        x = PReLU((1, 1, 16), name="prelu2")(_conv(16, 3, "conv2")(x))
        x = PReLU((1, 1, 32), name="prelu3")(_conv(32, 3, "conv3")(x))
        bbox = nn.Conv(4, (1, 1), name="conv4_1")(x)
        prob = nn.softmax(nn.Conv(2, (1, 1), name="conv4_2")(x))
        return bbox, prob


class RNet(nn.Module):
    """Refinement network: ``(N, 24, 24, 3)`` -> ``(bbox (N, 4), prob (N, 2))``."""

    @nn.compact
    def __call__(self, x):
        x = PReLU((1, 1, 28), name="prelu1")(_conv(28, 3, "conv1")(x))
        x = _pool(x, 3, "SAME")
        x = PReLU((1, 1, 48), name="prelu2")(_conv(48, 3, "conv2")(x))
        x = _pool(x, 3, "VALID")
        x = PReLU((1, 1, 64), name="prelu3")(_conv(64, 2, "conv3")(x))
        x = PReLU((128,), name="prelu4")(nn.Dense(128, name="fc4")(_flatten_wh(x)))
        bbox = nn.Dense(4, name="fc5_1")(x)
        prob = nn.softmax(nn.Dense(2, name="fc5_2")(x))
        return bbox, prob


class ONet(nn.Module):
    """Output network: ``(N, 48, 48, 3)`` -> ``(bbox (N,4), landmarks (N,10), prob (N,2))``.

    Landmarks are five ``x`` then five ``y`` coordinates, relative to the crop (0..1).
    """

    @nn.compact
    def __call__(self, x):
        x = PReLU((1, 1, 32), name="prelu1")(_conv(32, 3, "conv1")(x))
        x = _pool(x, 3, "SAME")
        x = PReLU((1, 1, 64), name="prelu2")(_conv(64, 3, "conv2")(x))
        x = _pool(x, 3, "VALID")
        x = PReLU((1, 1, 64), name="prelu3")(_conv(64, 3, "conv3")(x))
        x = _pool(x, 2, "SAME")
        x = PReLU((1, 1, 128), name="prelu4")(_conv(128, 2, "conv4")(x))
        x = PReLU((256,), name="prelu5")(nn.Dense(256, name="fc5")(_flatten_wh(x)))
        bbox = nn.Dense(4, name="fc6_1")(x)
        landmarks = nn.Dense(10, name="fc6_2")(x)
        prob = nn.softmax(nn.Dense(2, name="fc6_3")(x))
        return bbox, landmarks, prob


#: name -> (module class, stored array names in Keras ``model.weights`` order).
NETS = {
    "pnet": (
        PNet,
        (
            *("conv1/kernel", "conv1/bias", "prelu1/alpha"),
            *("conv2/kernel", "conv2/bias", "prelu2/alpha"),
            *("conv3/kernel", "conv3/bias", "prelu3/alpha"),
            *("conv4_1/kernel", "conv4_1/bias", "conv4_2/kernel", "conv4_2/bias"),
        ),
    ),
    "rnet": (
        RNet,
        (
            *("conv1/kernel", "conv1/bias", "prelu1/alpha"),
            *("conv2/kernel", "conv2/bias", "prelu2/alpha"),
            *("conv3/kernel", "conv3/bias", "prelu3/alpha"),
            *("fc4/kernel", "fc4/bias", "prelu4/alpha"),
            *("fc5_1/kernel", "fc5_1/bias", "fc5_2/kernel", "fc5_2/bias"),
        ),
    ),
    "onet": (
        ONet,
        (
            *("conv1/kernel", "conv1/bias", "prelu1/alpha"),
            *("conv2/kernel", "conv2/bias", "prelu2/alpha"),
            *("conv3/kernel", "conv3/bias", "prelu3/alpha"),
            *("conv4/kernel", "conv4/bias", "prelu4/alpha"),
            *("fc5/kernel", "fc5/bias", "prelu5/alpha"),
            *("fc6_1/kernel", "fc6_1/bias", "fc6_2/kernel", "fc6_2/bias"),
            *("fc6_3/kernel", "fc6_3/bias"),
        ),
    ),
}


def _check_name(name: str) -> None:
    if name not in NETS:
        raise ValueError(f"name must be one of {sorted(NETS)}, got {name!r}")


def weights_dir() -> str | None:
    """The ``mtcnn`` package's ``assets/weights`` folder, or ``None`` if not installed.

    Found with ``importlib.util.find_spec`` so that TensorFlow is never imported.
    """
    spec = importlib.util.find_spec("mtcnn")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = os.path.join(root, "assets", "weights")
        if all(os.path.isfile(os.path.join(path, f"{n}.lz4")) for n in NETS):
            return path
    return None


def load_raw(name: str) -> list[np.ndarray]:
    """The stored arrays of one network (``'pnet'``, ``'rnet'`` or ``'onet'``), as shipped.

    Raises:
      ValueError: unknown ``name``.
      FileNotFoundError: the ``mtcnn`` package (or its weight files) is not installed.
    """
    import joblib

    _check_name(name)
    folder = weights_dir()
    if folder is None:
        raise FileNotFoundError(
            "the mtcnn package's weight files were not found; install the 'experiments' "
            "extra (pip install -e '.[experiments]')"
        )
    return list(joblib.load(os.path.join(folder, f"{name}.lz4")))


def load_variables(name: str) -> tuple[nn.Module, dict]:
    """``(module, {'params': ...})`` of one pretrained MTCNN network.

    Every stored array is placed by name and checked against the shape that
    ``module.init`` gives, so a layout mismatch fails loudly instead of silently.

    Raises:
      ValueError: unknown ``name``, or a stored array's count/shape does not match.
      FileNotFoundError: the weight files are not installed.
    """
    raw = load_raw(name)
    cls, names = NETS[name]
    if len(raw) != len(names):
        raise ValueError(f"{name}: expected {len(names)} stored arrays, found {len(raw)}")
    model = cls()
    size = INPUT_SIZE[name]
    shapes = jax.eval_shape(  # shapes only, no compute
        lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)))
    )["params"]
    params: dict[str, dict[str, np.ndarray]] = {}
    for key, arr in zip(names, raw, strict=True):
        layer, leaf = key.split("/")
        want = tuple(shapes[layer][leaf].shape)
        if tuple(arr.shape) != want:
            raise ValueError(f"{name}: {key} stored as {arr.shape}, the network needs {want}")
        params.setdefault(layer, {})[leaf] = np.asarray(arr, np.float32)
    return model, {"params": params}


def normalize(images: np.ndarray) -> np.ndarray:
    """``(pixel - 127.5) / 128`` as float32: the input scaling MTCNN was trained with."""
    return ((np.asarray(images, np.float32) - 127.5) / 128.0).astype(np.float32)
