"""What every ``jaxsplit`` subcommand shares: the ``Command`` record, the ``UI`` it writes
through, ``UsageError`` (exit 2), tables and progress bars."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["UsageError", "UI", "Command", "add_json_flag", "table", "stage_bars", "finite"]


class UsageError(Exception):
    """Bad command-line usage or argument value: exit code 2."""


@dataclasses.dataclass(frozen=True)
class UI:
    """Where a subcommand writes: rich consoles for stdout/stderr and the output mode.

    Attributes:
      out: console for results (tables) on stdout.
      err: console for progress and notes on stderr.
      json: print machine-readable JSON on stdout instead of tables.
    """

    out: Any
    err: Any
    json: bool = False

    def print_json(self, data: Any) -> None:
        """Prints ``data`` as strict JSON (NaN/inf become ``null``) on stdout."""
        print(json.dumps(finite(data), indent=2, allow_nan=False), file=self.out.file)

    def note(self, text: str) -> None:
        """A one-line human note on stderr (stdout stays clean for results and JSON)."""
        print(text, file=self.err.file)

    @contextlib.contextmanager
    def progress(self, description: str, total: int | None = None) -> Iterator[Callable]:
        """A transient rich progress bar on stderr (only on a terminal); yields
        ``advance(n=1, *, completed=None, total=None, description=None)`` (``completed``,
        ``total``, ``description``, when given, replace the bar's)."""
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn

        with Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            console=self.err,
            transient=True,
            disable=not self.err.is_terminal,
        ) as bar:
            task = bar.add_task(description, total=total)

            def advance(n: int = 1, *, completed=None, total=None, description=None):
                if completed is None:
                    bar.update(task, advance=n, total=total, description=description)
                else:
                    bar.update(task, completed=completed, total=total, description=description)

            yield advance


@dataclasses.dataclass(frozen=True, kw_only=True)
class Command:
    """One ``jaxsplit`` subcommand.

    Attributes:
      name: the subcommand (``inspect``).
      help: one-line help.
      add_arguments: adds the subcommand's arguments to its ``argparse`` parser.
      run: ``run(args, ui)`` does the work and returns an exit code (``None`` means 0);
        it raises ``UsageError`` for bad arguments (exit 2) and lets library errors
        (``OSError``, ``ValueError``, ``TypeError``, ``io.CheckpointError``) propagate
        (exit 1).
    """

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, UI], int | None]


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    """Adds ``--json`` (machine-readable output on stdout) to a subcommand parser.

    Args:
      parser: the subcommand's parser (``args.json`` becomes ``ui.json``).

    Example:
      >>> p = argparse.ArgumentParser()
      >>> add_json_flag(p)
      >>> p.parse_args(["--json"]).json
      True
    """
    parser.add_argument(
        "--json", action="store_true", help="print machine-readable JSON instead of tables"
    )


def table(ui: UI, title: str, columns: list[str], rows: list[list[Any]]) -> None:
    """Prints a rich table on ``ui.out``; cells are plain text (no markup), ``None`` is ``-``.

    Args:
      ui: the command's ``UI``.
      title: the table's title.
      columns: headers (text columns are left-aligned, numbers right-aligned).
      rows: one list of cells per row (floats are printed with 4 significant digits).

    Example:
      >>> import io as _io
      >>> from rich.console import Console
      >>> ui = UI(out=Console(file=_io.StringIO(), width=60), err=None)
      >>> table(ui, "t", ["path", "max"], [["a/[b]", 1.23456]])
      >>> "a/[b]" in ui.out.file.getvalue() and "1.235" in ui.out.file.getvalue()
      True
    """
    from rich.table import Table
    from rich.text import Text

    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c, justify="left" if c in ("path", "kind", "action", "reason") else "right")
    for r in rows:
        t.add_row(*(Text(_fmt(x)) for x in r))
    ui.out.print(t)


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}"
    if isinstance(x, tuple):
        return "x".join(map(str, x)) or "scalar"
    return str(x)


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


def finite(x: Any) -> Any:
    """``x`` with NaN/inf floats as ``None`` (strict JSON), recursively.

    Example:
      >>> finite({"a": [1.0, float("nan")]})
      {'a': [1.0, None]}
    """
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [finite(v) for v in x]
    return x
