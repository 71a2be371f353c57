"""SplitConfig and threshold specs: errors name the field, show the value, say what is valid."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsplit import Percentile, Relative, Sigma, SplitConfig
from jaxsplit.thresholds import as_threshold


def test_defaults_and_normalisation():
    cfg = SplitConfig(layers=["a", "b/*"])
    assert cfg.layers == ("a", "b/*") and cfg.threshold == 0.0 and cfg.method == "balance"
    assert cfg.strict and not cfg.verbose and not cfg.allow_nonfinite and cfg.seed == 0
    assert SplitConfig(layers="a").layers == ("a",)
    assert SplitConfig(layers=None).layers is None
    assert isinstance(SplitConfig(layers=["a"], threshold=1).threshold, float)


def test_frozen_keyword_only_and_hashable():
    cfg = SplitConfig(layers=["a"], threshold=Relative(0.5))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.threshold = 1.0
    with pytest.raises(TypeError):
        SplitConfig(["a"])  # keyword-only
    assert hash(cfg) == hash(SplitConfig(layers=("a",), threshold=Relative(0.5)))
    jax.jit(lambda x, c: x, static_argnums=1)(1.0, cfg)  # usable as a static arg


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(threshold=-1.0), ValueError, ["SplitConfig.threshold", "-1.0", "[0, inf)"]),
        (dict(threshold=math.nan), ValueError, ["SplitConfig.threshold", "nan"]),
        (dict(threshold=math.inf), ValueError, ["SplitConfig.threshold", "inf"]),
        (dict(threshold="0.5"), TypeError, ["SplitConfig.threshold", "'0.5'", "Relative(f)"]),
        (dict(threshold=True), TypeError, ["SplitConfig.threshold", "True"]),
        (
            dict(method="halves"),
            ValueError,
            ["SplitConfig.method", "'halves'", "balance", "random"],
        ),
        (dict(method=None), ValueError, ["SplitConfig.method", "None"]),
        (dict(seed=1.5), TypeError, ["SplitConfig.seed", "1.5"]),
        (dict(seed=-1), ValueError, ["SplitConfig.seed", "-1"]),
        (dict(strict="yes"), TypeError, ["SplitConfig.strict", "'yes'"]),
        (dict(verbose=1), TypeError, ["SplitConfig.verbose", "1"]),
        (dict(allow_nonfinite=None), TypeError, ["SplitConfig.allow_nonfinite"]),
        (dict(layers=3), TypeError, ["SplitConfig.layers", "3", "callable"]),
        (dict(layers=["a", ""]), TypeError, ["SplitConfig.layers[1]", "''"]),
        (dict(layers=["a", 7]), TypeError, ["SplitConfig.layers[1]", "7"]),
        (dict(layers=["re:(unclosed"]), ValueError, ["SplitConfig.layers[0]", "re:(unclosed"]),
    ],
)
def test_bad_config_values(kwargs, exc, words):
    kwargs = {"layers": ["a"], **kwargs}
    with pytest.raises(exc) as e:
        SplitConfig(**kwargs)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


@pytest.mark.parametrize(
    "make, field, value",
    [
        (lambda: Relative(-0.1), "Relative.fraction", "-0.1"),
        (lambda: Relative(1.5), "Relative.fraction", "1.5"),
        (lambda: Sigma(math.nan), "Sigma.k", "nan"),
        (lambda: Sigma(-2), "Sigma.k", "-2"),
        (lambda: Percentile(100.5), "Percentile.p", "100.5"),
        (lambda: Percentile(-1), "Percentile.p", "-1"),
    ],
)
def test_bad_threshold_specs(make, field, value):
    with pytest.raises(ValueError) as e:
        make()
    assert field in str(e.value) and value in str(e.value)


def test_resolve_threshold_values():
    w = jnp.array([1.0, -4.0, 2.0, jnp.nan, jnp.inf], jnp.float32)  # stats over finite values
    assert float(as_threshold(Relative(0.5)).resolve(w)) == 2.0
    finite = np.array([1.0, -4.0, 2.0])
    assert float(as_threshold(Sigma(2)).resolve(w)) == pytest.approx(2 * finite.std(), rel=1e-6)
    assert float(as_threshold(Percentile(50)).resolve(w)) == pytest.approx(2.0)
    assert float(as_threshold(0.25).resolve(w)) == 0.25
    bf = jnp.array([1.0, -3.0], jnp.bfloat16)
    assert float(as_threshold(Relative(1.0)).resolve(bf)) == 3.0
