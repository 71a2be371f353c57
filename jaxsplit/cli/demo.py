"""``jaxsplit demo``: the built-in job (``jaxsplit.demo``), its table, markdown and plot."""

from __future__ import annotations

import argparse
import os

from rich.table import Table

from jaxsplit.cli.ui import UI, Command, UsageError, add_json_flag, stage_bars
from jaxsplit.demo import DemoConfig, markdown, overhead, pivot, plot, run_demo

__all__ = ["COMMAND", "DEFAULT_OUT"]

DEFAULT_OUT = "demo_out"


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 2 epochs, int8/int4, no Auto row, no MiniLM",
    )
    p.add_argument(
        "--no-minilm", action="store_true", help="skip the pretrained transformer (MiniLM) part"
    )
    p.add_argument(
        "--out",
        default=DEFAULT_OUT,
        metavar="DIR",
        help=f"where demo.md and demo.png go (default: {DEFAULT_OUT})",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of data split, init, batches")
    p.add_argument("--epochs", type=int, help="training epochs (default 30, --quick 2)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    add_json_flag(p)


def _demo_run(args: argparse.Namespace, ui: UI) -> int:
    kw: dict = {"seed": args.seed}
    if args.no_minilm:
        kw["minilm"] = False
    if args.epochs is not None:
        kw["epochs"] = args.epochs
    try:
        config = DemoConfig.quick(**kw) if args.quick else DemoConfig(**kw)
    except ValueError as e:
        raise UsageError(str(e).replace("DemoConfig.", "--")) from None
    _check_out_dir(args.out)
    with stage_bars(ui) as report:
        result = run_demo(config, progress=report)
    os.makedirs(args.out, exist_ok=True)
    md_path = os.path.join(args.out, "demo.md")
    with open(md_path, "w", encoding="utf-8") as f:
        f.write(markdown(result) + "\n")
    png = None if args.no_plot else plot(result, os.path.join(args.out, "demo.png"))
    if ui.json:
        ui.print_json({**result.to_dict(), "markdown": md_path, "plot": png})
        return 0
    _print_demo(ui, result)
    ui.note(f"wrote {md_path}" + (f" and {png}" if png else ""))
    return 0


def _check_out_dir(path: str) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"--out {path!r} exists and is not a directory")


def _print_demo(ui: UI, result) -> None:
    variants, bits, acc = pivot(result, "accuracy")
    _, _, sqnr = pivot(result, "weight_sqnr_db")
    t = Table(
        title=(
            f"digits CNN: fp32 test accuracy {result.fp32_accuracy:.2%} "
            f"({result.n_test} images, {result.n_params} parameters); "
            "weights per tensor, each branch its own scale"
        ),
        title_justify="left",
    )
    t.add_column("variant")
    for b in bits:
        t.add_column(f"int{b} acc", justify="right")
    for b in bits:
        t.add_column(f"int{b} SQNR dB", justify="right")
    t.add_column("extra params", justify="right")
    for v in variants:
        t.add_row(
            v,
            *(f"{acc[v, b]:.2%}" for b in bits),
            *(f"{sqnr[v, b]:.1f}" for b in bits),
            overhead(result, v),
        )
    ui.out.print(t)
    if result.minilm_rows:
        rows = result.minilm_rows
        mvars = list(dict.fromkeys(r.variant for r in rows))
        mbits = list(dict.fromkeys(r.bits for r in rows))
        cos = {(r.variant, r.bits): r.cosine for r in rows}
        m = Table(
            title=f"paraphrase-MiniLM-L3-v2: mean embedding cosine ({result.minilm_note})",
            title_justify="left",
        )
        m.add_column("variant")
        for b in mbits:
            m.add_column(f"int{b} cosine", justify="right")
        m.add_column("extra nnz", justify="right")
        for v in mvars:
            fr = sorted({f"{r.extra_params_frac:.2%}" for r in rows if r.variant == v})
            m.add_row(v, *(f"{cos[v, b]:.4f}" for b in mbits), "-".join([fr[0], fr[-1]][: len(fr)]))
        ui.out.print(m)
    elif result.minilm_note:
        ui.note(f"MiniLM: {result.minilm_note}")
    ui.note(
        f"took {result.total_seconds:.1f} s (training {result.train_seconds:.1f} s, "
        f"MiniLM {result.minilm_seconds:.1f} s)"
    )


COMMAND = Command(
    name="demo",
    help="train a small CNN on sklearn digits; quantized accuracy with and without splits",
    add_arguments=_demo_args,
    run=_demo_run,
)
