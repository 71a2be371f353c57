"""The README's linen and NNX wrapper examples run and print what they say."""

import contextlib
import io
import pathlib
import re

import numpy as np

README = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_wrapper_examples_run():
    section = README.split("## Running split models (linen and NNX)", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2 and all(len(b.splitlines()) <= 14 for b in blocks)
    ns: dict = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for i, code in enumerate(blocks):
            exec(compile(code, f"README wrappers example {i}", "exec"), ns)  # noqa: S102
    assert out.getvalue().split("\n")[0] == "Split ['branch_0', 'branch_1']"
    assert not np.allclose(ns["yq"], ns["model2"](ns["x"]), atol=1e-4)  # quant did something
    m1 = ns["model1"]
    assert type(m1.layers[0]).__name__ == "Linear"
    assert np.array_equal(m1.layers[0].kernel.get_value(), ns["model"].layers[0].kernel.get_value())
