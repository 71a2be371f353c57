"""The ``jaxsplit`` command: inspect, split, report, sweep checkpoints; the demo.

Exit codes: ``0`` ok, ``2`` bad usage or arguments (fix the command line), ``1`` runtime
failure (unreadable/corrupt/empty checkpoint, unsplittable weights, unwritable output),
``130`` interrupted (Ctrl-C). Errors are one line on stderr; ``--debug`` adds the
traceback. Nothing is written unless the whole command succeeds.

Subcommands are ``Command`` records (``cli.ui``), one module each; ``COMMANDS`` is the
static table, in help order. Errors are told apart by type, never by message text:
``UsageError`` and the library's configuration errors (``errors.ConfigError``,
``errors.ConfigTypeError``, ``errors.UnmatchedPatternError``) exit 2, other
``ValueError``/``TypeError``/``OSError`` exit 1.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import traceback
from collections.abc import Iterator, Sequence

from jaxsplit import __version__
from jaxsplit.cli import demo, inspect, report, split, sweep
from jaxsplit.cli.ui import UI, Command, UsageError
from jaxsplit.errors import ConfigError, ConfigTypeError, UnmatchedPatternError
from jaxsplit.io import CheckpointError

__all__ = ["COMMANDS", "build_parser", "main"]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

#: Every subcommand, in help order.
COMMANDS: tuple[Command, ...] = (
    inspect.COMMAND,
    split.COMMAND,
    report.COMMAND,
    sweep.COMMAND,
    demo.COMMAND,
)

#: Library errors that mean "fix the command line" (exit 2).
USAGE_ERRORS = (UsageError, ConfigError, ConfigTypeError, UnmatchedPatternError)


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
    cmds = COMMANDS if cmds is None else cmds
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
        names = ", ".join(c.name for c in COMMANDS)
        return _fail(
            EXIT_USAGE, "jaxsplit", f"a command is required ({names}); see jaxsplit --help"
        )
    ui = _make_ui(getattr(args, "json", False))
    prog = f"jaxsplit {args.command.name}"
    with _log_to_stderr(logging.INFO if args.verbose else logging.WARNING):
        try:
            code = args.command.run(args, ui)
            return EXIT_OK if code is None else int(code)
        except USAGE_ERRORS as e:
            return _fail(EXIT_USAGE, prog, str(e), args.debug)
        except KeyboardInterrupt:
            return _fail(EXIT_INTERRUPTED, prog, "interrupted; no output written", args.debug)
        except Exception as e:
            if isinstance(e, OSError | ValueError | TypeError | CheckpointError):
                return _fail(EXIT_FAILURE, prog, str(e), args.debug)
            msg = f"internal error: {type(e).__name__}: {e} (rerun with --debug)"
            return _fail(EXIT_FAILURE, prog, msg, args.debug)


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
