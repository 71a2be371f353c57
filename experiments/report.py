"""Shared output helpers for the experiment scripts: provenance header, tables, files."""

from __future__ import annotations

import datetime
import os
import platform
import sys
from collections.abc import Iterable, Mapping, Sequence

import jax

__all__ = ["RESULTS", "machine", "header", "fmt", "table", "write", "command"]

#: Where committed results live.
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def machine() -> str:
    """One line describing where the numbers came from."""
    dev = jax.devices()[0]
    return (
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores, "
        f"Python {platform.python_version()}, jax {jax.__version__} on {dev.platform}"
        f" ({dev.device_kind})"
    )


def header(title: str, command: str) -> list[str]:
    """Markdown title plus the command, UTC date and machine that produced the file."""
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return [
        f"# {title}",
        "",
        f"- command: `{command}`",
        f"- date: {now}",
        f"- machine: {machine()}",
        "",
    ]


def fmt(v) -> str:
    """Compact cell formatting: floats to 4 significant digits, others via ``str``."""
    if isinstance(v, float):
        if v != v:
            return "nan"
        if v == 0 or 1e-3 <= abs(v) < 1e5:
            return f"{v:.4g}"
        return f"{v:.3e}"
    return str(v)


def table(rows: Iterable[Mapping], columns: Sequence[str]) -> list[str]:
    """A markdown table of ``rows`` restricted to ``columns``."""
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return out


def write(name: str, lines: Sequence[str], out_dir: str = RESULTS) -> str:
    """Writes ``lines`` to ``out_dir/name`` and returns the path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    with open(path, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")
    return path


def command(module: str) -> str:
    """The command line that reproduces a run of ``python -m module``."""
    return " ".join(["python -m", module, *sys.argv[1:]])
