"""Helpers shared by the CLI tests: run ``jaxsplit`` in-process, check one-line errors."""

import re

from jaxsplit import cli


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
