"""The issue's output-level targets, shown on a synthetic heavy-tailed transformer-like MLP.

A residual stack of feed-forward blocks (``d -> 4d -> d``, GELU) with Student-t (df=3)
weights, every Dense kernel split and every branch fake-quantized per tensor; the metric
is the mean cosine of the model's outputs to the float outputs (``evaluate_outputs``).
Real pretrained transformer weights are held back for evaluation; this shows the same
pipeline on weights with comparable outliers.

    python -m experiments.methods_targets
"""

from __future__ import annotations

import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jaxsplit as js
from jaxsplit.outputs import evaluate_outputs


class Block(nn.Module):
    d: int

    @nn.compact
    def __call__(self, x):
        h = nn.gelu(nn.Dense(4 * self.d)(nn.LayerNorm()(x)))
        return x + nn.Dense(self.d)(h)


class Stack(nn.Module):
    d: int = 128
    depth: int = 4

    @nn.compact
    def __call__(self, x):
        for _ in range(self.depth):
            x = Block(self.d)(x)
        return x


def model_and_data(seed: int = 0):
    """The model, its heavy-tailed variables, and a batch of inputs."""
    model = Stack()
    x = jax.random.normal(jax.random.key(seed), (64, model.d))
    v = model.init(jax.random.key(seed + 1), x)
    rng = np.random.default_rng(seed)

    def heavy(path, a):
        if path[-1].key != "kernel":
            return a
        fan_in = a.shape[0]
        return jnp.asarray(rng.standard_t(3, size=a.shape) / np.sqrt(3 * fan_in), a.dtype)

    return model, jax.tree_util.tree_map_with_path(heavy, v), x


def rows() -> list[dict]:
    """Cosine to float per (bits, configuration), with extra non-zeros (% of parameters)."""
    model, v, x = model_and_data()
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(v["params"]))
    out = []
    for bits, budget in ((6, 0.02), (4, 0.05)):
        spec = js.QuantSpec(bits=bits)
        configs = {
            "balance Relative(0.5)": dict(threshold=js.Relative(0.5)),
            f"auto Auto(max_extra={budget:.0%})": dict(
                threshold=js.Auto(spec, max_extra=budget), method="auto"
            ),
        }
        for label, kwargs in configs.items():
            v2 = js.split_params(v, js.SplitConfig(layers=["re:.*Dense.*"], **kwargs))
            r = evaluate_outputs(model, v, v2, x, spec)
            out.append(
                {
                    "bits": bits,
                    "config": label,
                    "cos_unsplit": r.before.cosine,
                    "cos_split": r.after.cosine,
                    "extra_pct": 100.0 * r.extra_nonzero / n_params,
                }
            )
    return out


def markdown() -> str:
    lines = [
        "| bits | split | cosine, no split | cosine, split | extra non-zeros |",
        "|---:|---|---:|---:|---:|",
    ]
    for r in rows():
        lines.append(
            f"| {r['bits']} | {r['config']} | {r['cos_unsplit']:.4f} | {r['cos_split']:.4f} | "
            f"{r['extra_pct']:.2f}% |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(markdown() + "\n")
