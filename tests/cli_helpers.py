"""Helpers shared by the CLI tests: run ``jaxsplit`` in-process, check one-line errors."""

import pathlib
import re
import shlex

from jaxsplit import cli

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def run_cli(capsys, *argv):
    """``(exit code, stdout, stderr)`` of ``jaxsplit ARGV`` run in this process."""
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_cli_error(result, code, pattern):
    """The command exited with ``code`` and printed exactly one error line matching ``pattern``."""
    got, _, err = result
    lines = err.strip().splitlines()
    assert got == code, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.search(pattern, lines[0]), lines[0]


def readme_commands(text: str | None = None) -> list[list[str]]:
    """Every ``jaxsplit ...`` command in the README's bash blocks, in order (``\\``
    continuations joined, ``a && jaxsplit b`` included)."""
    text = README.read_text() if text is None else text
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                argv = shlex.split(part, comments=True)
                if argv and argv[0] == "jaxsplit":
                    cmds.append(argv)
    return cmds
