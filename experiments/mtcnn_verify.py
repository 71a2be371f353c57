"""Checks that the Flax MTCNN rebuild with the shipped weights behaves like MTCNN (float).

Run: ``python -m experiments.mtcnn_verify`` -> ``experiments/results/mtcnn_verify.{md,png}``.

Checks, on three photographs that ship with installed packages (no download):
  1. the cascade finds exactly one face on the Grace Hopper portrait, with O-Net
     probability near 1 and landmarks in anatomical order (eyes above nose above
     mouth, left eye left of right eye, all inside the box);
  2. it finds no face on scikit-learn's two sample photographs (temple, flower);
  3. negative controls — a wrong layout should break or degrade it: the transposed
     image (the Caffe-era H/W convention), the BGR channel order, and the dense
     layer fed without the ``(W, H, C)`` permute.
"""

from __future__ import annotations

import argparse
import logging
import os

import jax
import numpy as np

from experiments import mtcnn_detect, mtcnn_nets, report

logger = logging.getLogger("jaxsplit")


def _no_permute_variables() -> dict:
    """R/O-Net variables equivalent to flattening in (H, W, C) order (the permute dropped)."""
    out = {}
    for name, fc, c in (("rnet", "fc4", 64), ("onet", "fc5", 128)):
        _, v = mtcnn_nets.load_variables(name)
        k = v["params"][fc]["kernel"]
        side = int(round((k.shape[0] // c) ** 0.5))
        swapped = k.reshape(side, side, c, -1).transpose(1, 0, 2, 3).reshape(k.shape)
        params = {**v["params"], fc: {**v["params"][fc], "kernel": swapped}}
        out[name] = {"params": params}
    return out


def landmark_checks(face: np.ndarray, pts: np.ndarray) -> dict[str, bool]:
    """Anatomical-order checks of one O-Net landmark set ``(5, 2)`` against its box."""
    (lex, ley), (rex, rey), (nx, ny), (lmx, lmy), (rmx, rmy) = pts
    x1, y1, x2, y2 = face[:4]
    return {
        "left eye left of right eye": lex < rex,
        "mouth left corner left of right corner": lmx < rmx,
        "eyes above nose": max(ley, rey) < ny,
        "nose above mouth": ny < min(lmy, rmy),
        "nose between eyes (x)": lex < nx < rex,
        "all landmarks inside the box": bool(
            np.all((pts[:, 0] > x1) & (pts[:, 0] < x2) & (pts[:, 1] > y1) & (pts[:, 1] < y2))
        ),
    }


def _onet_on(variables: dict, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """O-Net ``(face prob, landmarks)`` on normalised 48x48 crops."""
    model, _ = mtcnn_nets.load_variables("onet")
    out = mtcnn_detect.batched(jax.jit(model.apply), variables, x)
    return out[2][:, 1], out[1]


def run() -> tuple[list[dict], list[dict], dict, dict]:
    """Cascade rows, control rows, per-image detections, landmark checks of the Hopper face."""
    images = mtcnn_detect.sample_images()
    dets = {name: mtcnn_detect.detect(img) for name, img in images.items()}
    transposed = mtcnn_detect.detect(np.ascontiguousarray(images["hopper"].swapaxes(0, 1)))
    rows = [_row(f"{name}", d) for name, d in dets.items()]
    rows.append(_row("hopper, transposed (control: Caffe H/W convention)", transposed))

    hopper = dets["hopper"]
    checks = landmark_checks(hopper.faces[0], hopper.landmarks[0]) if len(hopper.faces) else {}
    # Controls on the exact crops O-Net saw: the face crop must lose confidence or its
    # landmarks must move when the layout is wrong.
    x = hopper.onet_inputs
    _, loaded = mtcnn_nets.load_variables("onet")
    p0, lm0 = _onet_on(loaded, x)
    i = int(np.argmax(p0))
    controls = []
    for name, variables, xin in (
        ("as loaded", loaded, x),
        ("BGR channel order", loaded, np.ascontiguousarray(x[..., ::-1])),
        ("no (W,H,C) permute before fc5", _no_permute_variables()["onet"], x),
        ("crop transposed (H<->W)", loaded, np.ascontiguousarray(x.swapaxes(1, 2))),
    ):
        p, lm = _onet_on(variables, xin)
        controls.append(
            {
                "O-Net input": name,
                "prob on the face crop": float(p[i]),
                "crops with prob > 0.7": f"{int((p > 0.7).sum())}/{len(p)}",
                "landmark shift (fraction of box)": float(np.abs(lm[i] - lm0[i]).max()),
            }
        )
    return rows, controls, dets, checks


def _row(name: str, d) -> dict:
    return {
        "image": name,
        "P-Net max prob": float(max(m.max() for m in d.pnet_maps.values())),
        "P-Net proposals": len(d.proposals),
        "R-Net kept": len(d.refined),
        "O-Net faces": len(d.faces),
        "best O-Net prob": float(d.faces[:, 4].max()) if len(d.faces) else 0.0,
    }


def plot(dets: dict, images: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 8))
    for col, (name, img) in enumerate(images.items()):
        d = dets[name]
        ax = axes[0, col]
        ax.imshow(img)
        for x1, y1, x2, y2, p in d.faces:
            ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color="red", lw=2))
            ax.text(x1, y1 - 5, f"{p:.3f}", color="red")
        for pts in d.landmarks:
            ax.plot(pts[:, 0], pts[:, 1], "o", color="lime", ms=4)
        ax.set_title(f"{name}: {len(d.faces)} face(s) after O-Net")
        ax.axis("off")
        # the pyramid level whose 12-pixel window matches a ~160-pixel face (Hopper's)
        scale = min(d.pnet_maps, key=lambda s: abs(12 / s - 160))
        im = axes[1, col].imshow(d.pnet_maps[scale], vmin=0, vmax=1, cmap="magma")
        axes[1, col].set_title(f"P-Net face prob., scale {scale:.3f} (~{12 / scale:.0f} px faces)")
        axes[1, col].axis("off")
    fig.colorbar(im, ax=axes[1, :].tolist(), shrink=0.8)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None) -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logger.setLevel(logging.INFO)
    images = mtcnn_detect.sample_images()
    rows, controls, dets, checks = run()
    png = "mtcnn_verify.png"
    os.makedirs(report.RESULTS, exist_ok=True)
    plot(dets, images, os.path.join(report.RESULTS, png))
    cols = list(rows[0])
    lines = report.header("MTCNN float check", report.command("experiments.mtcnn_verify"))
    lines += [
        "The Flax rebuild (`experiments/mtcnn_nets.py`) with the `mtcnn` package's shipped",
        "weights, run as a P-Net -> R-Net -> O-Net cascade (`experiments/mtcnn_detect.py`).",
        "",
        *report.table(rows, cols),
        "",
        "Negative controls on the crops O-Net saw in the Hopper run (the face crop is the",
        "one O-Net scored highest as loaded; landmark shift is the largest coordinate change",
        "relative to the as-loaded landmarks, in units of the crop side):",
        "",
        *report.table(controls, list(controls[0])),
        "",
        "Landmark checks on the Hopper face (first O-Net detection):",
        "",
        *[f"- {k}: {'ok' if v else 'FAILED'}" for k, v in checks.items()],
        "",
    ]
    if len(dets["hopper"].faces):
        f, pts = dets["hopper"].faces[0], dets["hopper"].landmarks[0]
        lines += [
            f"Hopper face box (x1, y1, x2, y2) = {np.round(f[:4]).astype(int).tolist()}, "
            f"landmarks (x, y) = {np.round(pts).astype(int).tolist()}.",
            "",
        ]
    lines += [f"![detections and P-Net maps]({png})"]
    logger.info("wrote %s", report.write("mtcnn_verify.md", lines))


if __name__ == "__main__":
    main()
