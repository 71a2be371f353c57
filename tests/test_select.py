"""Finding layers in every supported tree; exact/glob/regex/callable selection."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.core import FrozenDict

from jaxsplit import SplitConfig, find_layers, match_layers
from jaxsplit.select import compile_patterns, select_layers
from jaxsplit.tree import params_root


def tree():
    k = np.ones
    return {
        "Dense_0": {"kernel": k((4, 8)), "bias": np.zeros(8)},
        "block_1": {"Dense_0": {"kernel": k((8, 8))}, "Conv_0": {"kernel": k((3, 3, 2, 4))}},
        "block_2": {"Dense_0": {"kernel": k((8, 8))}, "sub": {"Conv_0": {"kernel": k((3, 2, 2))}}},
        "Embed_0": {"embedding": k((10, 4))},
        "BatchNorm_0": {"scale": k(4), "bias": k(4)},
    }


PATHS = [
    "Dense_0",
    "block_1/Dense_0",
    "block_1/Conv_0",
    "block_2/Dense_0",
    "block_2/sub/Conv_0",
    "Embed_0",
]


def test_find_layers_in_bare_linen_frozen_trees():
    for t in (
        tree(),
        {"params": tree(), "batch_stats": {"x": {"mean": np.zeros(3)}}},
        FrozenDict(tree()),
        FrozenDict({"params": tree()}),
    ):
        layers = find_layers(t)
        assert list(layers) == PATHS
    assert find_layers(tree())["Embed_0"].weight == "embedding"
    assert find_layers(tree())["block_2/sub/Conv_0"].keys == ("block_2", "sub", "Conv_0")


def test_find_layers_in_nnx_state_and_pure_dict():
    class Block(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(3, 4, rngs=rngs)

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([Block(rngs), Block(rngs)])
            self.conv = nnx.Conv(2, 3, (3, 3), rngs=rngs)
            self.emb = nnx.Embed(5, 3, rngs=rngs)
            self.bn = nnx.BatchNorm(3, rngs=rngs)

    state = nnx.state(Model(nnx.Rngs(0)))
    want = ["layers/0/linear", "layers/1/linear", "conv", "emb"]
    assert sorted(find_layers(state)) == sorted(want)
    assert sorted(find_layers(nnx.to_pure_dict(state))) == sorted(want)
    assert find_layers(state)["layers/1/linear"].keys == ("layers", 1, "linear")
    assert find_layers(state)["conv"].array.shape == (3, 3, 2, 3)


def test_linen_model_paths():
    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(4)(nn.Dense(4)(x))

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return Block()(Block()(x))

    v = Net().init(jax.random.key(0), jnp.ones((1, 4)))
    assert sorted(find_layers(v)) == [
        "Block_0/Dense_0",
        "Block_0/Dense_1",
        "Block_1/Dense_0",
        "Block_1/Dense_1",
    ]


@pytest.mark.parametrize(
    "patterns, selected",
    [
        (["Dense_0"], ["Dense_0"]),
        (["block_*/Dense_0"], ["block_1/Dense_0", "block_2/Dense_0"]),
        (["*/Conv_0"], ["block_1/Conv_0"]),  # * does not cross /
        (["**/Conv_0"], ["block_1/Conv_0", "block_2/sub/Conv_0"]),
        (["block_?/Conv_0"], ["block_1/Conv_0"]),
        (["block_[2]/*"], ["block_2/Dense_0"]),
        (["re:.*Conv_0"], ["block_1/Conv_0", "block_2/sub/Conv_0"]),
        (["re:block_1"], []),  # fullmatch, not search
        (["Dense_0", "re:Dense_0"], ["Dense_0"]),  # a layer matched twice is selected once
    ],
)
def test_pattern_styles(patterns, selected):
    got, matches = select_layers(tree(), tuple(patterns))
    assert [lay.path for lay in got] == selected
    assert set(matches) == set(patterns)


def test_callable_predicate_sees_path_and_layer():
    def big(path, layer):
        return "kernel" in layer and layer["kernel"].ndim == 2 and layer["kernel"].size >= 64

    got, matches = select_layers(tree(), big)
    assert [lay.path for lay in got] == ["block_1/Dense_0", "block_2/Dense_0"]
    assert matches == {"big": ("block_1/Dense_0", "block_2/Dense_0")}


def test_none_and_empty_select_nothing(caplog):
    assert compile_patterns(None) == [] and compile_patterns(()) == []
    for layers in (None, []):
        with caplog.at_level("WARNING", logger="jaxsplit"):
            rep = match_layers(tree(), SplitConfig(layers=layers))
        assert rep.layers == () and "nothing is split" in caplog.text


def test_strict_unmatched_pattern_lists_available_paths(caplog):
    with pytest.raises(ValueError) as e:
        match_layers(tree(), SplitConfig(layers=["Dense_0", "Dense_9"]))
    msg = str(e.value)
    assert "'Dense_9'" in msg and "block_2/sub/Conv_0" in msg and "Embed_0" in msg
    with caplog.at_level("WARNING", logger="jaxsplit"):
        rep = match_layers(tree(), SplitConfig(layers=["Dense_0", "Dense_9"], strict=False))
    assert rep.unmatched == ("Dense_9",) and "Dense_9" in caplog.text


def test_params_root_rejects_non_mappings():
    with pytest.raises(TypeError, match="params must be a mapping"):
        params_root([1, 2])


def test_malformed_branches_name_the_path():
    t = {"a": {"branch_0": {"kernel": np.ones(2)}, "branch_2": {"kernel": np.ones(2)}}}
    with pytest.raises(ValueError, match="^a: split layer has branches"):
        find_layers(t)
