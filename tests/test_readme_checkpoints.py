"""The README's "Checkpoints and the command line" Python examples run and print what they say."""

import pathlib
import re

README = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_checkpoint_examples_run_and_print_their_comments(tmp_path, monkeypatch, capsys):
    section = README.split("## Checkpoints and the command line", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})
        printed = capsys.readouterr().out.splitlines()
        expected = [ln[2:] for ln in code.splitlines() if re.match(r"# \S", ln)]
        assert printed == expected, (printed, expected)
