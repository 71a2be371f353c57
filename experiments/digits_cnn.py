"""The ``jaxsplit demo`` study over several seeds: quantized accuracy, mean ± std.

Run: ``python -m experiments.digits_cnn`` -> ``experiments/results/digits_cnn.{md,png}``.

Each seed re-draws the digits train/test split, the initialisation and the batch
order (``jaxsplit.demo.run_demo(DemoConfig(seed=s))``, the demo's own model, training
and evaluation); rows are then aggregated over seeds.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence

import numpy as np

import jaxsplit as js
from experiments import report

logger = logging.getLogger("jaxsplit")

__all__ = ["run", "aggregate", "main"]


def run(seeds: Sequence[int], **config) -> list:
    """One ``DemoResult`` per seed (``config`` goes to ``DemoConfig``)."""
    from jaxsplit.demo import DemoConfig, run_demo

    out = []
    for s in seeds:
        out.append(run_demo(DemoConfig(seed=s, **{"minilm": False, **config})))
        logger.info("digits_cnn: seed %d done", s)
    return out


def _ms(values) -> tuple[float, float]:
    v = np.asarray(values, np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def aggregate(results: Sequence) -> tuple[dict, list[dict]]:
    """``(fp32 stats, rows)``: per (variant, bits), mean and std over seeds."""
    groups: dict[tuple, list] = {}
    for res in results:
        for r in res.rows:
            groups.setdefault((r.variant, r.bits), []).append(r)
    rows = []
    for (variant, bits), rs in groups.items():
        acc, acc_sd = _ms([r.accuracy for r in rs])
        sq, sq_sd = _ms([r.weight_sqnr_db for r in rs])
        drop, drop_sd = _ms(
            [res.fp32_accuracy - r.accuracy for res, r in zip(results, rs, strict=True)]
        )
        rows.append(
            {
                "variant": variant,
                "bits": bits,
                "accuracy %": f"{100 * acc:.2f} ± {100 * acc_sd:.2f}",
                "drop vs fp32 (pp)": f"{100 * drop:.2f} ± {100 * drop_sd:.2f}",
                "weight SQNR dB": f"{sq:.2f} ± {sq_sd:.2f}",
                "extra params %": f"{100 * np.mean([r.extra_params_frac for r in rs]):.2f}",
                "_acc": acc,
                "_acc_sd": acc_sd,
                "_sqnr": sq,
                "_sqnr_sd": sq_sd,
            }
        )
    fp = _ms([res.fp32_accuracy for res in results])
    return {"mean": fp[0], "std": fp[1], "n": len(results)}, rows


def plot(rows: list[dict], fp32: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    color = dict(zip(variants, js.plot.colors(len(variants)), strict=True))  # no repeats
    for v in variants:
        rs = sorted((r for r in rows if r["variant"] == v), key=lambda r: r["bits"])
        b = [r["bits"] for r in rs]
        style = "--" if v == "no split" else "-o"
        a1.errorbar(b, [100 * r["_acc"] for r in rs], [100 * r["_acc_sd"] for r in rs],
                    fmt=style, color=color[v], capsize=3, label=v, ms=3)  # fmt: skip
        a2.errorbar(b, [r["_sqnr"] for r in rs], [r["_sqnr_sd"] for r in rs],
                    fmt=style, color=color[v], capsize=3, label=v, ms=3)  # fmt: skip
    a1.axhline(100 * fp32["mean"], color="black", lw=0.8, ls=":", label="fp32")
    a1.set(xlabel="weight bits (per tensor)", ylabel="test accuracy %", title="digits CNN")
    a2.set(xlabel="weight bits (per tensor)", ylabel="weight SQNR dB", title="all kernels")
    for a in (a1, a2):
        a.grid(alpha=0.3)
    a1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--out", default=report.RESULTS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logger.setLevel(logging.INFO)
    results = run(range(args.seeds))
    fp32, rows = aggregate(results)
    os.makedirs(args.out, exist_ok=True)
    plot(rows, fp32, os.path.join(args.out, "digits_cnn.png"))
    r0 = results[0]
    lines = report.header(
        "Digits CNN: quantized accuracy over seeds", report.command("experiments.digits_cnn")
    )
    lines += [
        f"`jaxsplit demo`'s study (`jaxsplit.demo.run_demo`) for seeds 0..{args.seeds - 1}: "
        f"each seed re-draws the train/test split ({r0.n_test} test images), the "
        f"initialisation and the batch order; {r0.config.epochs} epochs of Adam; "
        f"{r0.n_params} parameters. Weights quantized per tensor (symmetric), every kernel "
        f"selected, each branch with its own scale; activations in float. Mean ± sample "
        f"std over seeds.",
        "",
        f"fp32 test accuracy: {100 * fp32['mean']:.2f} ± {100 * fp32['std']:.2f} %",
        "",
    ]
    cols = [
        "variant",
        "bits",
        "accuracy %",
        "drop vs fp32 (pp)",
        "weight SQNR dB",
        "extra params %",
    ]
    lines += [*report.table(rows, cols), "", "![accuracy and SQNR vs bits](digits_cnn.png)"]
    report.write("digits_cnn.md", lines, args.out)
    logger.info("wrote %s/digits_cnn.md", args.out)


if __name__ == "__main__":
    main()
