"""Splitting ablation on MTCNN's pretrained P-Net, R-Net and O-Net.

Run: ``python -m experiments.mtcnn_convnets`` -> ``experiments/results/mtcnn_convnets.md``,
``mtcnn_convnets.png`` and ``mtcnn_convnets_layers.csv``.

For every network, every ``QuantSpec`` (8/6/4 bits × per-tensor/per-channel weights,
activations in float) and every split configuration (no split, ``balance`` at several
thresholds, ``random``, and the newer methods where the library has them), with all
Conv/Dense kernels selected:

* weight level, per layer and per network: ``jaxsplit.quant_error`` (measured MSE of
  ``sum_i Q(W_i)`` against ``W``, Widrow's prediction, reduction, extra non-zeros);
* output level, on natural image crops (P-Net: 64×64 crops of the photographs at
  several scales; R-Net / O-Net: 24×24 / 48×48 crops of the float cascade's P-Net
  proposals, faces and non-faces): SQNR of the raw head outputs (box and landmark
  regression, class logits), mean ``|Δ p(face)|``, face/non-face decisions flipped,
  and each layer's output SQNR (errors accumulated through the network);
* cost: parameters and multiply-accumulates the twin branches add.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

import jaxsplit as js
from experiments import mtcnn_detect, mtcnn_nets, quantsim, report
from jaxsplit.measure import sqnr_db
from jaxsplit.tree import find_layers

logger = logging.getLogger("jaxsplit")

__all__ = ["mtcnn_inputs", "evaluate_net", "run", "main"]


def mtcnn_inputs(n_pnet_per_image: int = 24, max_crops: int = 192, seed: int = 0) -> dict:
    """Normalised inputs per network from the three sample photographs.

    P-Net: ``n_pnet_per_image`` random 64×64 crops per photo, from the photo resized so its
    short side is 96, 192 and 384 pixels. R-Net / O-Net: crops of the float cascade's
    P-Net proposals (at most ``max_crops``, evenly subsampled).
    """
    rng = np.random.default_rng(seed)
    images = mtcnn_detect.sample_images()
    pnet, boxes = [], []
    for img in images.values():
        h, w = img.shape[:2]
        for short in (96, 192, 384):
            s = short / min(h, w)
            small = mtcnn_detect.resize(img, round(w * s), round(h * s))
            for _ in range(n_pnet_per_image // 3):
                y = rng.integers(0, small.shape[0] - 64 + 1)
                x = rng.integers(0, small.shape[1] - 64 + 1)
                pnet.append(small[y : y + 64, x : x + 64])
        d = mtcnn_detect.detect(img)
        boxes.append((img, mtcnn_detect.square(d.proposals)))
    n = sum(len(b) for _, b in boxes)
    keep = max(1, -(-n // max_crops))  # every keep-th proposal
    out = {"pnet": mtcnn_nets.normalize(np.stack(pnet))}
    for name, size in (("rnet", 24), ("onet", 48)):
        out[name] = np.concatenate([mtcnn_detect.crops(img, b[::keep], size) for img, b in boxes])
    return out


def _face_prob(name: str, outputs) -> np.ndarray:
    return np.asarray(outputs[-1])[..., 1]


def evaluate_net(
    name: str,
    x: np.ndarray,
    specs: Sequence,
    variants: Sequence[quantsim.Variant],
    *,
    seed: int = 0,
) -> tuple[list[dict], list[dict]]:
    """Network-level and layer-level rows for one MTCNN network.

    Args:
      name: ``'pnet'``, ``'rnet'`` or ``'onet'``.
      x: normalised input batch for that network.
      specs: ``QuantSpec`` objects.
      variants: split configurations (``quantsim.Variant``).
      seed: seed of the ``random`` method.
    """
    model, variables = mtcnn_nets.load_variables(name)
    params = variables["params"]
    layers = find_layers(params)
    ws = {p: jnp.asarray(lay.array) for p, lay in layers.items()}
    fwd = quantsim.forward_with_intermediates(model)
    ref_out, ref_inter = fwd(quantsim.jnp_tree(variables), x)
    macs = quantsim.layer_macs(params, ref_inter)
    n_params = sum(w.size for w in ws.values())
    heads = mtcnn_nets.HEADS[name]
    ref_heads = np.concatenate([np.ravel(ref_inter[h]) for h in heads])
    p_ref = _face_prob(name, ref_out)
    net_rows, layer_rows = [], []
    for spec in specs:
        for v in variants:
            cfg = v.config(list(layers), spec, seed)
            params2 = None if cfg is None else js.split_params(params, cfg)
            st = jax.device_get(quantsim.measure(ws, quantsim.twin_branches(params, params2), spec))
            sim = quantsim.with_kernels(params, {p: s["sim"] for p, s in st.items()})
            out, inter = fwd(quantsim.jnp_tree({"params": sim}), x)
            split = (
                []
                if params2 is None
                else [q for q, lay in find_layers(params2).items() if lay.branches]
            )
            before = sum(float(s["mse_before"]) * ws[p].size for p, s in st.items())
            after = sum(float(s["mse_after"]) * ws[p].size for p, s in st.items())
            signal = sum(float(s["signal"]) * ws[p].size for p, s in st.items())
            extra = sum(int(s["extra_nonzero"]) for s in st.values())
            p = _face_prob(name, out)
            base = {"net": name, "spec": quantsim.spec_label(spec), "variant": v.label}
            net_rows.append(
                {
                    **base,
                    "bits": spec.bits,
                    "granularity": spec.granularity,
                    "layers split": f"{len(split)}/{len(ws)}",
                    # rounded: (W,) vs (W, 0) differ by float noise (~1e-5 %) when unsplit
                    "weight MSE reduction %": round(100.0 * (1.0 - after / before), 3),
                    "weight SQNR dB": sqnr_db(signal, after),
                    "extra nonzeros %": 100.0 * extra / n_params,
                    "dense extra params %": 100.0 * sum(ws[q].size for q in split) / n_params,
                    "dense extra MACs %": 100.0 * sum(macs[q] for q in split) / sum(macs.values()),
                    "output SQNR dB": quantsim.sqnr_db(
                        ref_heads, np.concatenate([np.ravel(inter[h]) for h in heads])
                    ),
                    "mean |dp_face|": float(np.mean(np.abs(p - p_ref))),
                    "decisions flipped %": 100.0 * float(np.mean((p > 0.5) != (p_ref > 0.5))),
                }
            )
            for path, s in st.items():
                w = np.asarray(ws[path])
                mb, ma = float(s["mse_before"]), float(s["mse_after"])
                layer_rows.append(
                    {
                        **base,
                        "layer": path,
                        "shape": "x".join(map(str, w.shape)),
                        "max/std": float(np.abs(w).max() / w.std()),
                        "split %": 100.0 * int(s["n_split"]) / w.size,
                        "extra nonzeros": int(s["extra_nonzero"]),
                        "mse before": mb,
                        "mse after": ma,
                        "widrow before": float(s["pred_before"]),
                        "widrow after (naive)": float(s["pred_after"]),
                        "widrow after (correlated)": float(s["pred_after_corr"]),
                        "reduction %": round(100.0 * (1.0 - ma / mb), 3) if mb else 0.0,
                        "layer output SQNR dB": quantsim.sqnr_db(ref_inter[path], inter[path]),
                    }
                )
        logger.info("%s: %s done", name, quantsim.spec_label(spec))
    return net_rows, layer_rows


def run(
    bits: Sequence[int] = (8, 6, 4),
    granularities: Sequence[str] = ("per_tensor", "per_channel"),
    nets: Sequence[str] = ("pnet", "rnet", "onet"),
    inputs: dict | None = None,
    variants: Sequence[quantsim.Variant] | None = None,
) -> tuple[list[dict], list[dict], list[str]]:
    """All rows of the ablation: ``(net rows, layer rows, methods not available)``."""
    missing: list[str] = []
    if variants is None:
        variants, missing = quantsim.default_variants()
    inputs = mtcnn_inputs() if inputs is None else inputs
    specs = [quantsim.make_spec(b, g) for g in granularities for b in bits]
    net_rows, layer_rows = [], []
    for name in nets:
        a, b = evaluate_net(name, inputs[name], specs, variants)
        net_rows += a
        layer_rows += b
    return net_rows, layer_rows, missing


def plot(net_rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nets = list(dict.fromkeys(r["net"] for r in net_rows))
    grans = list(dict.fromkeys(r["granularity"] for r in net_rows))
    variants = list(dict.fromkeys(r["variant"] for r in net_rows))
    color = dict(zip(variants, js.plot.colors(len(variants)), strict=True))  # no repeats
    fig, axes = plt.subplots(
        len(grans), len(nets), figsize=(4.2 * len(nets), 3.4 * len(grans)), squeeze=False
    )
    for i, g in enumerate(grans):
        for j, n in enumerate(nets):
            ax = axes[i, j]
            for v in variants:
                rows = sorted(
                    (
                        r
                        for r in net_rows
                        if (r["net"], r["granularity"], r["variant"]) == (n, g, v)
                    ),
                    key=lambda r: r["bits"],
                )
                style = "--" if v == "none" else "-o"
                ax.plot(
                    [r["bits"] for r in rows],
                    [r["output SQNR dB"] for r in rows],
                    style,
                    color=color[v],
                    label=v,
                    ms=3,
                )
            ax.set_title(f"{n}, weights {g}")
            ax.set_xlabel("weight bits")
            ax.set_ylabel("head output SQNR (dB)")
            ax.grid(alpha=0.3)
    axes[0, -1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


NET_COLS = [
    "variant",
    "layers split",
    "weight MSE reduction %",
    "weight SQNR dB",
    "extra nonzeros %",
    "output SQNR dB",
    "mean |dp_face|",
    "decisions flipped %",
]
LAYER_COLS = [
    "layer",
    "shape",
    "max/std",
    "split %",
    "mse before",
    "widrow before",
    "mse after",
    "widrow after (correlated)",
    "reduction %",
    "layer output SQNR dB",
]


def write_results(net_rows, layer_rows, missing, n_inputs, out_dir: str, note: str = "") -> None:
    os.makedirs(out_dir, exist_ok=True)
    plot(net_rows, os.path.join(out_dir, "mtcnn_convnets.png"))
    with open(os.path.join(out_dir, "mtcnn_convnets_layers.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(layer_rows[0]))
        w.writeheader()
        w.writerows(layer_rows)
    lines = report.header("MTCNN P/R/O-Net: split ablation", "python -m experiments.mtcnn_convnets")
    if note:
        lines.insert(-1, f"- {note}")
    lines += [
        "Pretrained weights of the `mtcnn` package (float rebuild checked in",
        "[mtcnn_verify.md](mtcnn_verify.md)). Every Conv/Dense kernel selected; weights",
        "fake-quantized (symmetric, narrow range, one scale per tensor or per output channel,",
        "each branch with its own scale), biases, PReLU slopes and activations in float.",
        "Inputs: "
        + ", ".join(
            f"{n} {k} crops {s}x{s}"
            for n, k, s in (
                (n, n_inputs[n], {"pnet": 64, "rnet": 24, "onet": 48}[n])
                for n in ("pnet", "rnet", "onet")
                if n in n_inputs
            )
        )
        + " (see the module docstring).",
        "",
        "Columns: *weight MSE reduction* = 1 - sum_layers MSE(sum_i Q(W_i)) / MSE(Q(W)) over all "
        "kernel elements; *extra nonzeros* = parameters the twins add if stored sparsely, as % "
        "of the network's kernel parameters; *output SQNR* over the raw head outputs (box/"
        "landmark regression and class logits) against the float network; *decisions flipped*"
        " = face/non-face at p = 0.5 that differ from float.",
        "",
    ]
    if missing:
        lines += [
            f"**Not measured:** {', '.join(missing)} — not available in jaxsplit when this ran "
            "(left out, not estimated).",
            "",
        ]
    lines += ["![output SQNR vs bits](mtcnn_convnets.png)", ""]
    for name in dict.fromkeys(r["net"] for r in net_rows):
        lines += [f"## {name}", ""]
        for spec in dict.fromkeys(r["spec"] for r in net_rows):
            rows = [r for r in net_rows if (r["net"], r["spec"]) == (name, spec)]
            lines += [f"### {name}, {spec}", "", *report.table(rows, NET_COLS), ""]
    lines += _cost_section(net_rows)
    lines += _layer_section(layer_rows)
    report.write("mtcnn_convnets.md", lines, out_dir)


def _cost_section(net_rows) -> list[str]:
    rows = {}
    for r in net_rows:
        if r["variant"] != "none" and r["granularity"] == "per_tensor":
            key = (r["net"], r["variant"])
            prev = rows.get(key, {"net": r["net"], "variant": r["variant"]})
            prev[f"extra nonzeros % (int{r['bits']})"] = r["extra nonzeros %"]
            prev["dense extra params %"] = r["dense extra params %"]
            prev["dense extra MACs %"] = r["dense extra MACs %"]
            rows[key] = prev
    rows = list(rows.values())
    if not rows:
        return []
    cols = list(dict.fromkeys(k for r in rows for k in r))
    return [
        "## Cost of the twins",
        "",
        "Sparse storage adds only the twins' non-zeros; run as dense twin convolutions, every "
        "split layer's parameters and multiply-accumulates are paid twice.",
        "",
        *report.table(rows, cols),
        "",
    ]


def _layer_section(layer_rows) -> list[str]:
    lines = [
        "## Per layer (int8 and int4 per tensor; every spec in mtcnn_convnets_layers.csv)",
        "",
    ]
    for net in dict.fromkeys(r["net"] for r in layer_rows):
        for spec in ("int8 per_tensor", "int4 per_tensor"):
            for variant in ("none", "balance rel0.5"):
                rows = [
                    r
                    for r in layer_rows
                    if (r["net"], r["spec"], r["variant"]) == (net, spec, variant)
                ]
                if rows:
                    lines += [f"### {net}, {spec}, {variant}", "", *report.table(rows, LAYER_COLS)]
                    lines.append("")
    return lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 6, 4])
    ap.add_argument(
        "--granularity", nargs="+", default=["per_tensor", "per_channel"], dest="granularities"
    )
    ap.add_argument("--nets", nargs="+", default=["pnet", "rnet", "onet"])
    ap.add_argument("--out", default=report.RESULTS, help="results folder")
    ap.add_argument(
        "--save-rows", metavar="JSON", help="only measure and save the rows (one process per net)"
    )
    ap.add_argument(
        "--combine", nargs="+", metavar="JSON", help="write the results from saved rows"
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logger.setLevel(logging.INFO)
    if args.combine:
        parts = []
        for path in args.combine:
            with open(path) as f:
                parts.append(json.load(f))
        net_rows = [r for p in parts for r in p["net_rows"]]
        layer_rows = [r for p in parts for r in p["layer_rows"]]
        missing = sorted({m for p in parts for m in p["missing"]})
        n_inputs = {k: v for p in parts for k, v in p["n_inputs"].items()}
        note = (
            "run as one process per network (`--nets NET --save-rows F.json`), then "
            f"`--combine` of {len(parts)} row files"
        )
        write_results(net_rows, layer_rows, missing, n_inputs, args.out, note)
        logger.info("wrote %s/mtcnn_convnets.md", args.out)
        return
    inputs = mtcnn_inputs()
    net_rows, layer_rows, missing = run(args.bits, args.granularities, args.nets, inputs=inputs)
    n_inputs = {k: len(v) for k, v in inputs.items()}
    if args.save_rows:
        with open(args.save_rows, "w") as f:
            json.dump(
                {
                    "net_rows": net_rows,
                    "layer_rows": layer_rows,
                    "missing": missing,
                    "n_inputs": {k: n_inputs[k] for k in args.nets},
                },
                f,
            )
        logger.info("saved rows to %s", args.save_rows)
        return
    write_results(net_rows, layer_rows, missing, n_inputs, args.out)
    logger.info("wrote %s/mtcnn_convnets.md", args.out)


if __name__ == "__main__":
    main()
