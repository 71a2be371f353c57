"""``jaxsplit demo`` and ``jaxsplit sweep``: the CLI side of ``demo`` and ``sweep``.

Registered through ``jaxsplit.cli``'s hook (``demo.cli_commands`` / ``sweep.cli_commands``
return these ``Command`` records). Rendering and progress bars live here, in the CLI
layer; the library modules only return results.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Callable, Iterator

from jaxsplit.cli import UI, Command, UsageError, add_json_flag

__all__ = ["demo_command", "sweep_command"]

DEFAULT_OUT = "demo_out"


def demo_command() -> Command:
    """The ``jaxsplit demo`` subcommand."""
    return Command(
        name="demo",
        help="train a small CNN on sklearn digits; quantized accuracy with and without splits",
        add_arguments=_demo_args,
        run=_demo_run,
    )


def sweep_command() -> Command:
    """The ``jaxsplit sweep`` subcommand."""
    return Command(
        name="sweep",
        help="quantization error over a grid of thresholds x methods x bit widths",
        add_arguments=_sweep_args,
        run=_sweep_run,
    )


@contextlib.contextmanager
def stage_bars(ui: UI) -> Iterator[Callable[[str, int, int], None]]:
    """A ``progress(stage, done, total)`` callback that shows one rich bar per stage."""
    with contextlib.ExitStack() as stack:
        state: dict = {"stage": None, "advance": None, "done": 0}

        def report(stage: str, done: int, total: int) -> None:
            if stage != state["stage"]:
                stack.close()
                state.update(stage=stage, done=0)
                state["advance"] = stack.enter_context(ui.progress(stage, total))
            state["advance"](done - state["done"])
            state["done"] = done

        yield report


# --- demo ----------------------------------------------------------------------------------


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--quick", action="store_true", help="smoke test: 2 epochs, int8/int4, no Auto row"
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
    from jaxsplit.demo import DemoConfig, run_demo

    kw = {"seed": args.seed}
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
        f.write(result.to_markdown() + "\n")
    png = None if args.no_plot else result.plot(os.path.join(args.out, "demo.png"))
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
    from rich.table import Table

    from jaxsplit.demo_report import overhead, pivot

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
    ui.note(f"took {result.total_seconds:.1f} s (training {result.train_seconds:.1f} s)")


# --- sweep ---------------------------------------------------------------------------------


def _sweep_args(p: argparse.ArgumentParser) -> None:
    from jaxsplit.cli_commands import add_input_arguments

    add_input_arguments(p)
    p.add_argument(
        "--layers",
        nargs="+",
        default=["**"],
        metavar="PATTERN",
        help="layer paths, globs or re:REGEX (default: every layer)",
    )
    p.add_argument(
        "--thresholds",
        nargs="+",
        default=["rel:0.25", "rel:0.5", "rel:0.75"],
        metavar="T",
        help="T, rel:F, sigma:K or pct:P (default: rel:0.25 rel:0.5 rel:0.75)",
    )
    p.add_argument("--methods", nargs="+", default=["balance"], metavar="M", help="split methods")
    p.add_argument(
        "--bits", nargs="+", type=int, default=[8], metavar="B", help="bit widths (default 8)"
    )
    p.add_argument("--per-channel", action="store_true", help="per-channel quantization")
    p.add_argument("--seed", type=int, default=0, help="seed for the random method")
    p.add_argument("--csv", metavar="PATH", help="also write every row as CSV")
    add_json_flag(p)


def _sweep_run(args: argparse.Namespace, ui: UI) -> int:
    from jaxsplit.cli_commands import load_checkpoint, parse_threshold, require_layers, table
    from jaxsplit.quant import QuantSpec
    from jaxsplit.sweep import sweep

    thresholds = [parse_threshold(t) for t in args.thresholds]
    gran = "per_channel" if args.per_channel else "per_tensor"
    try:
        specs = [QuantSpec(bits=b, granularity=gran) for b in args.bits]
    except (TypeError, ValueError) as e:
        raise UsageError(f"--bits: {e}") from None
    tree = load_checkpoint(args.ckpt, args.format)
    n = len(require_layers(tree, args.ckpt))
    with ui.progress(f"sweeping {n} layers", n) as advance:
        try:
            result = sweep(
                tree,
                layers=args.layers,
                thresholds=thresholds,
                methods=args.methods,
                specs=specs,
                seed=args.seed,
                on_layer=lambda path: advance(),
            )
        except ValueError as e:
            if "matched no layer" in str(e) or "must be one of" in str(e):
                raise UsageError(str(e)) from None
            raise
    if args.csv:
        result.to_csv(args.csv)
    if ui.json:
        ui.print_json(result.to_dict())
        return 0
    cols = ["layer", "threshold", "method", "spec", "split %", "extra nz %", "MSE before"]
    cols += ["MSE", "Widrow corr.", "reduction %", "SQNR dB"]
    rows = [
        [
            r.layer,
            r.threshold,
            r.method,
            r.spec,
            100 * r.frac_split,
            100 * r.extra_nonzero,
            r.mse_before,
            r.mse,
            r.predicted_mse_correlated,
            100 * r.reduction,
            r.sqnr_db,
        ]
        for r in result.rows
    ]
    table(ui, f"{args.ckpt}: sweep ({len(result.rows)} rows)", cols, rows)
    if args.csv:
        ui.note(f"wrote {args.csv}")
    return 0
