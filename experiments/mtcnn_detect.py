"""A minimal MTCNN cascade (P-Net -> R-Net -> O-Net) in numpy + the Flax nets, and its photos.

Used to check that the float networks load correctly and to collect the natural
image crops the quantization experiments feed each network. It follows the
``mtcnn`` package's stages (image pyramid with factor 0.709 from a 20-pixel minimum
face, area resizing, thresholds 0.6/0.7/0.7, NMS 0.5/0.7/0.7, square boxes) closely
enough for those purposes; it is not a drop-in detector (no batching, no final
landmark refinement).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import numpy as np

from experiments import mtcnn_nets

__all__ = [
    "Detection",
    "sample_images",
    "resize",
    "pyramid_scales",
    "nms",
    "square",
    "crops",
    "batched",
    "detect",
]

Apply = Callable[..., tuple]


def sample_images() -> dict[str, np.ndarray]:
    """Three RGB uint8 photographs that ship with installed packages (no download).

    ``china`` and ``flower`` are scikit-learn's ``load_sample_images`` (no faces);
    ``hopper`` is matplotlib's ``grace_hopper.jpg`` sample portrait (one face).
    """
    import matplotlib.cbook as cbook
    from PIL import Image
    from sklearn.datasets import load_sample_images

    out = dict(zip(("china", "flower"), load_sample_images().images, strict=True))
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        out["hopper"] = np.asarray(Image.open(f).convert("RGB"))
    return out


def resize(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """Area (box-filter) resize of an RGB uint8 image, as the package's TF ``AREA`` resize."""
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((width, height), Image.BOX))


def pyramid_scales(height: int, width: int, min_face: int = 20, factor: float = 0.709):
    """Scales at which P-Net's 12-pixel window sees faces from ``min_face`` pixels up."""
    scales, s = [], 12.0 / min_face
    while min(height, width) * s >= 12:
        scales.append(s)
        s *= factor
    return scales


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Indices kept by greedy non-maximum suppression (IoU over union), best first."""
    order, keep = np.argsort(-scores), []
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        lo = np.maximum(boxes[i, :2], boxes[rest, :2])
        hi = np.minimum(boxes[i, 2:4], boxes[rest, 2:4])
        inter = np.prod(np.clip(hi - lo, 0, None), axis=1)
        order = rest[inter / (area[i] + area[rest] - inter) <= iou]
    return np.asarray(keep, int)


def square(boxes: np.ndarray) -> np.ndarray:
    """``(x1, y1, x2, y2)`` boxes grown to squares about their centres."""
    wh = boxes[:, 2:4] - boxes[:, :2]
    side = wh.max(axis=1, keepdims=True)
    centre = boxes[:, :2] + wh / 2
    return np.concatenate([centre - side / 2, centre + side / 2], axis=1)


def crops(img: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """Normalised ``(N, size, size, 3)`` crops (zero-padded outside the image)."""
    from PIL import Image

    pil = Image.fromarray(img)
    out = [
        np.asarray(pil.crop(tuple(int(round(v)) for v in b)).resize((size, size), Image.BOX))
        for b in boxes[:, :4]
    ]
    return mtcnn_nets.normalize(np.stack(out)) if out else np.zeros((0, size, size, 3), np.float32)


@dataclasses.dataclass(frozen=True)
class Detection:
    """What the cascade saw on one image.

    Attributes:
      pnet_maps: ``{scale: face-probability map}`` from P-Net.
      proposals: P-Net boxes after NMS, ``(N, 5)`` = box + score.
      refined: R-Net survivors, ``(M, 5)``.
      faces: O-Net survivors, ``(K, 5)``; ``landmarks``: ``(K, 5, 2)`` pixel ``(x, y)``
        for left eye, right eye, nose, left and right mouth corner.
      rnet_inputs, onet_inputs: the normalised crops fed to R-Net and O-Net.
    """

    pnet_maps: dict
    proposals: np.ndarray
    refined: np.ndarray
    faces: np.ndarray
    landmarks: np.ndarray
    rnet_inputs: np.ndarray
    onet_inputs: np.ndarray


@functools.cache
def _pretrained() -> dict:
    return {n: mtcnn_nets.load_variables(n) for n in mtcnn_nets.NETS}


@functools.cache
def _jitted() -> dict[str, Apply]:
    return {n: jax.jit(m.apply) for n, (m, _) in _pretrained().items()}


def batched(fn: Apply, variables: dict, x: np.ndarray, block: int = 64) -> list[np.ndarray]:
    """``fn(variables, x)`` with the batch padded to a multiple of ``block`` (fewer compiles)."""
    n = len(x)
    pad = -n % block
    xp = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)]) if pad else x
    return [np.asarray(a)[:n] for a in fn(variables, xp)]


def _apply_fns(variables: dict | None) -> tuple[dict, dict[str, Apply]]:
    """Variables per net (overrides or pretrained) and the cached jitted apply functions."""
    loaded = _pretrained()
    v = {n: (variables or {}).get(n, loaded[n][1]) for n in loaded}
    return v, _jitted()


def detect(
    img: np.ndarray,
    *,
    variables: dict | None = None,
    thresholds=(0.6, 0.7, 0.7),
    min_face: int = 20,
) -> Detection:
    """Runs the three networks on one RGB uint8 image.

    Args:
      img: ``(H, W, 3)`` uint8 RGB.
      variables: optional ``{'pnet'|'rnet'|'onet': variables}`` replacing the pretrained ones.
      thresholds: face-probability thresholds of the three stages.
      min_face: smallest face (pixels) the pyramid looks for.
    """
    v, f = _apply_fns(variables)
    h, w = img.shape[:2]
    maps, found = {}, []
    for s in pyramid_scales(h, w, min_face):
        x = mtcnn_nets.normalize(resize(img, int(np.ceil(w * s)), int(np.ceil(h * s))))[None]
        reg, prob = (np.asarray(a[0]) for a in f["pnet"](v["pnet"], x))
        maps[s] = prob[..., 1]
        yy, xx = np.nonzero(prob[..., 1] > thresholds[0])
        if yy.size:
            cells = np.stack([xx * 2, yy * 2, xx * 2 + 12, yy * 2 + 12], 1) / s
            boxes = cells + reg[yy, xx] * (12 / s)
            score = prob[yy, xx, 1]
            k = nms(boxes, score, 0.5)
            found.append(np.c_[boxes[k], score[k]])
    proposals = np.concatenate(found) if found else np.zeros((0, 5))
    proposals = proposals[nms(proposals[:, :4], proposals[:, 4], 0.7)]

    refined, r_in = _stage(img, square(proposals), 24, f["rnet"], v["rnet"], thresholds[1])
    faces, o_in, lm = _stage(img, square(refined), 48, f["onet"], v["onet"], thresholds[2])
    return Detection(maps, proposals, refined, faces, lm, r_in, o_in)


def _stage(img, boxes, size, fn, variables, threshold):
    """One refinement stage: crop, classify, regress, keep, NMS (O-Net also landmarks)."""
    x = crops(img, boxes, size)
    if not len(x):
        empty = np.zeros((0, 5))
        return (empty, x) if size == 24 else (empty, x, np.zeros((0, 5, 2)))
    out = batched(fn, variables, x)
    reg, prob = out[0], out[-1][:, 1]
    side = boxes[:, 2:3] - boxes[:, 0:1]
    moved = np.c_[boxes[:, :4] + reg * side, prob]
    keep = np.nonzero(prob > threshold)[0]
    keep = keep[nms(moved[keep, :4], prob[keep], 0.7)]
    if size == 24:
        return moved[keep], x
    lm = out[1][keep]
    pts = np.stack(
        [
            boxes[keep, 0:1] + lm[:, :5] * side[keep],
            boxes[keep, 1:2] + lm[:, 5:] * side[keep],
        ],
        axis=-1,
    )
    return moved[keep], x, pts
