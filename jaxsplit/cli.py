"""The ``jaxsplit`` command: inspect and split checkpoints (``python -m jaxsplit``).

Exit codes: ``0`` ok, ``2`` bad usage or arguments (fix the command line), ``1`` runtime
failure (unreadable/corrupt/empty checkpoint, unsplittable weights, unwritable output),
``130`` interrupted (Ctrl-C). Errors are one line on stderr; ``--debug`` adds the
traceback. Nothing is written unless the whole command succeeds.

Subcommands are ``Command`` records (name, help, ``add_arguments(parser)``,
``run(args, ui) -> exit code``). The built-in ones live in ``jaxsplit.cli_commands``;
other modules contribute theirs through the registration hook: every module named in
``EXTENSION_MODULES`` that exists is imported and its ``cli_commands()`` function must
return a sequence of ``Command`` (import heavy dependencies inside ``run``, not at
module level, so ``jaxsplit --help`` stays fast). Each subcommand parser gets ``-v``
and ``--debug``; call ``add_json_flag(parser)`` for ``--json``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import logging
import math
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

__all__ = [
    "Command",
    "UsageError",
    "UI",
    "EXTENSION_MODULES",
    "commands",
    "add_json_flag",
    "build_parser",
    "main",
]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

#: Modules that may register subcommands (``jaxsplit demo``, ``jaxsplit sweep``) through a
#: ``cli_commands() -> Sequence[Command]`` function; a module that does not exist is skipped.
EXTENSION_MODULES = ("jaxsplit.demo", "jaxsplit.sweep")


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
        print(json.dumps(_finite(data), indent=2, allow_nan=False), file=self.out.file)

    def note(self, text: str) -> None:
        """A one-line human note on stderr (stdout stays clean for results and JSON)."""
        print(text, file=self.err.file)

    @contextlib.contextmanager
    def progress(self, description: str, total: int | None = None) -> Iterator[Callable]:
        """A transient rich progress bar on stderr (only on a terminal); yields ``advance()``."""
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
            yield lambda n=1: bar.advance(task, n)


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


def commands() -> tuple[Command, ...]:
    """The built-in subcommands plus those registered by ``EXTENSION_MODULES``.

    Raises:
      ValueError: two commands share a name.

    Example:
      >>> [c.name for c in commands()][:2]
      ['inspect', 'split']
    """
    from jaxsplit import cli_commands

    found = list(cli_commands.cli_commands())
    for name in EXTENSION_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            raise
        found.extend(module.cli_commands())
    names = [c.name for c in found]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"jaxsplit subcommands registered twice: {dupes}")
    return tuple(found)


class _Parser(argparse.ArgumentParser):
    """``argparse`` that raises ``UsageError`` (one line, exit 2) instead of exiting."""

    def error(self, message):
        raise _ParseError(self.prog, message)


class _ParseError(UsageError):
    def __init__(self, prog: str, message: str):
        super().__init__(message)
        self.prog = prog


def build_parser(cmds: Sequence[Command] | None = None) -> argparse.ArgumentParser:
    """The ``jaxsplit`` argument parser with one subparser per command.

    Example:
      >>> args = build_parser().parse_args(["inspect", "ckpt", "--json"])
      >>> args.command.name, args.json
      ('inspect', True)
    """
    from jaxsplit import __version__

    cmds = commands() if cmds is None else cmds
    parser = _Parser(
        prog="jaxsplit",
        description="Split Flax checkpoints' layers into twin branches (W = W1 + W2).",
    )
    parser.add_argument("--version", action="version", version=f"jaxsplit {__version__}")
    common = _Parser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="log one line per layer")
    common.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=_Parser)
    for cmd in cmds:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help, parents=[common])
        cmd.add_arguments(p)
        p.set_defaults(command=cmd)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``jaxsplit`` with ``argv`` (default ``sys.argv[1:]``) and returns the exit code.

    Example:
      >>> main(["inspect", "/nonexistent/ckpt.npz"])
      2
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
    except _ParseError as e:
        return _fail(EXIT_USAGE, e.prog, f"{e} (see {e.prog} --help)")
    except SystemExit as e:  # --help / --version
        return e.code if isinstance(e.code, int) else EXIT_OK
    if not hasattr(args, "command"):
        names = ", ".join(c.name for c in commands())
        return _fail(
            EXIT_USAGE, "jaxsplit", f"a command is required ({names}); see jaxsplit --help"
        )
    ui = _make_ui(getattr(args, "json", False))
    prog = f"jaxsplit {args.command.name}"
    with _log_to_stderr(logging.INFO if args.verbose else logging.WARNING):
        try:
            code = args.command.run(args, ui)
            return EXIT_OK if code is None else int(code)
        except UsageError as e:
            return _fail(EXIT_USAGE, prog, str(e), args.debug)
        except KeyboardInterrupt:
            return _fail(EXIT_INTERRUPTED, prog, "interrupted; no output written", args.debug)
        except Exception as e:
            if _is_expected(e):
                return _fail(EXIT_FAILURE, prog, str(e), args.debug)
            msg = f"internal error: {type(e).__name__}: {e} (rerun with --debug)"
            return _fail(EXIT_FAILURE, prog, msg, args.debug)


def _is_expected(e: Exception) -> bool:
    from jaxsplit.io import CheckpointError

    return isinstance(e, OSError | ValueError | TypeError | CheckpointError)


def _fail(code: int, prog: str, message: str, debug: bool = False) -> int:
    """Prints ``PROG: error: MESSAGE`` as one line on stderr (traceback first if ``debug``)."""
    if debug:
        traceback.print_exc(file=sys.stderr)
    print(f"{prog}: error: {' '.join(message.split())}", file=sys.stderr)
    return code


def _make_ui(json_mode: bool) -> UI:
    from rich.console import Console

    out = Console(file=sys.stdout, highlight=False)
    if not out.is_terminal:
        out = Console(file=sys.stdout, highlight=False, width=200)
    err = Console(file=sys.stderr, highlight=False)
    return UI(out=out, err=err, json=json_mode)


@contextlib.contextmanager
def _log_to_stderr(level: int) -> Iterator[None]:
    """Routes ``logging.getLogger('jaxsplit')`` to stderr for one command, then restores it."""
    logger = logging.getLogger("jaxsplit")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def _finite(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x
