"""split_params / merge_params on realistic linen and NNX trees."""

import copy
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.core import FrozenDict

import jaxsplit as js


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(8, (3, 3), feature_group_count=2)(x)  # grouped conv
        return nn.BatchNorm(use_running_average=False)(x)


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3))(x)
        x = Block()(x)
        x = nn.ConvTranspose(4, (2, 2), strides=(2, 2))(x)
        x = x.reshape(x.shape[0], -1, 4)
        x = nn.DenseGeneral((2, 3), axis=-1)(x)
        x = nn.Einsum((3, 5), "btj,jk->btk")(x.reshape(x.shape[0], -1, 3))
        x = nn.Dense(16)(x.mean(1))
        return nn.Dense(3)(x)


@pytest.fixture(scope="module")
def variables():
    v = Net().init(jax.random.key(0), jnp.ones((2, 8, 8, 4)))
    # heavy tails so every layer has values above its threshold
    return jax.tree.map(lambda a: np.asarray(a * 3.0), v)


ALL = [
    "Conv_0",
    "Block_0/Conv_0",
    "ConvTranspose_0",
    "DenseGeneral_0",
    "Einsum_0",
    "Dense_0",
    "Dense_1",
]


def leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(la, lb, strict=True)
    )


def test_layer_kinds_found(variables):
    assert sorted(js.find_layers(variables)) == sorted(ALL)


@pytest.mark.parametrize(
    "method, threshold",
    [("balance", t) for t in (0.0, 0.2, js.Relative(0.5), js.Sigma(2), js.Percentile(90))]
    + [("random", 0.2), ("random", js.Percentile(90))],  # random compiles slowly: two cases
)
def test_round_trip_is_bit_exact(variables, method, threshold):
    cfg = js.SplitConfig(layers=["**"], threshold=threshold, method=method, seed=3)
    v2 = js.split_params(variables, cfg)
    assert leaves_equal(js.merge_params(v2), variables)


def test_split_layer_structure(variables):
    cfg = js.SplitConfig(layers=["Dense_0", "Block_0/Conv_0"], threshold=js.Relative(0.5))
    v2 = js.split_params(variables, cfg)
    d = v2["params"]["Dense_0"]
    assert sorted(d) == ["branch_0", "branch_1"]
    assert sorted(d["branch_0"]) == ["bias", "kernel"] and list(d["branch_1"]) == ["kernel"]
    assert d["branch_0"]["bias"] is variables["params"]["Dense_0"]["bias"]
    w = variables["params"]["Dense_0"]["kernel"]
    w1, w2 = np.asarray(d["branch_0"]["kernel"]), np.asarray(d["branch_1"]["kernel"])
    m = np.abs(w) > np.float32(0.5 * np.abs(w).max())
    assert m.any() and np.array_equal(w2[m], w[m] / 2) and np.array_equal(w1[m], w[m] / 2)
    assert np.array_equal(w1[~m], w[~m]) and not w2[~m].any()
    # max-abs halves (threshold at max/2)
    assert np.abs(w1).max() <= np.abs(w).max() / 2 + 1e-7


def test_untouched_subtrees_are_the_same_objects_and_nothing_is_mutated(variables):
    before = copy.deepcopy(variables)
    cfg = js.SplitConfig(layers=["Block_0/Conv_0", "Dense_1"], threshold=1e9, strict=True)
    assert js.split_params(variables, cfg) is variables  # nothing above threshold anywhere
    cfg = js.SplitConfig(layers=["Block_0/Conv_0"], threshold=0.1)
    v2 = js.split_params(variables, cfg)
    p, p2 = variables["params"], v2["params"]
    assert v2["batch_stats"] is variables["batch_stats"]
    for name in ("Conv_0", "Dense_0", "Dense_1", "Einsum_0"):
        assert p2[name] is p[name]
    assert p2["Block_0"]["BatchNorm_0"] is p["Block_0"]["BatchNorm_0"]
    assert leaves_equal(variables, before)


def test_random_split_does_not_depend_on_other_layers_or_order(variables):
    def split(layers):
        cfg = js.SplitConfig(layers=layers, threshold=0.1, method="random", seed=11)
        return js.split_params(variables, cfg)["params"]["Dense_0"]

    a, b, c = split(["Dense_0"]), split(["Dense_1", "Dense_0"]), split(["**"])
    assert leaves_equal(a, b) and leaves_equal(a, c)
    other = js.split_params(
        variables, js.SplitConfig(layers=["Dense_0"], threshold=0.1, method="random", seed=12)
    )
    assert not leaves_equal(a, other["params"]["Dense_0"])


def test_frozen_dict_and_bare_params_keep_their_container(variables):
    cfg = js.SplitConfig(layers=["Dense_1"], threshold=0.0)
    fz = FrozenDict(variables["params"])
    out = js.split_params(fz, cfg)
    assert isinstance(out, FrozenDict) and isinstance(out["Dense_1"]["branch_1"], FrozenDict)
    assert leaves_equal(js.merge_params(out), fz)
    bare = js.split_params(variables["params"], cfg)
    assert type(bare) is dict and "batch_stats" not in bare


class NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.blocks = nnx.List([nnx.Linear(4, 4, rngs=rngs), nnx.Linear(4, 4, rngs=rngs)])
        self.conv = nnx.Conv(2, 4, (3, 3), rngs=rngs)
        self.emb = nnx.Embed(10, 4, rngs=rngs)


def test_nnx_state_split_and_merge():
    model = NnxNet(nnx.Rngs(0))
    state = nnx.state(model)
    cfg = js.SplitConfig(layers=["blocks/*", "emb"], threshold=js.Relative(0.5))
    s2 = js.split_params(state, cfg)
    assert isinstance(s2, nnx.State)
    b = s2["blocks"][1]
    assert isinstance(b["branch_1"]["kernel"], nnx.Param) and "bias" in b["branch_0"]
    assert isinstance(s2["emb"]["branch_1"]["embedding"], nnx.Param)
    assert s2["conv"]["kernel"] is state["conv"]["kernel"]  # State re-wraps nested dicts
    merged = js.merge_params(s2)
    assert leaves_equal(nnx.to_pure_dict(merged), nnx.to_pure_dict(state))
    # nested nodes stay plain dicts, as in nnx.state: same pytree structure after a round trip
    assert jax.tree.structure(merged) == jax.tree.structure(state)
    assert s2["conv"]["kernel"] is state["conv"]["kernel"]
    # the pure dict gives the same values
    pure2 = js.split_params(nnx.to_pure_dict(state), cfg)
    assert leaves_equal(pure2, nnx.to_pure_dict(s2))


def test_already_split_layer_is_rejected(variables):
    cfg = js.SplitConfig(layers=["Dense_0"], threshold=0.1)
    v2 = js.split_params(variables, cfg)
    with pytest.raises(
        ValueError, match="'Dense_0' is already split into 2 branches.*merge_params"
    ):
        js.split_params(v2, cfg)
    # selection paths still refer to the logical layer
    assert "Dense_0" in js.find_layers(v2) and js.find_layers(v2)["Dense_0"].branches == 2


@pytest.mark.parametrize("method, layers", [("balance", ["**"]), ("random", ["Dense_*"])])
def test_traced_split_has_static_structure_and_agrees_with_eager(variables, method, layers):
    cfg = js.SplitConfig(layers=layers, threshold=0.5, method=method)
    eager = js.split_params(variables, cfg)
    traced = jax.jit(lambda v: js.split_params(v, cfg))(variables)
    # under a trace every selected layer is split (branch_1 zero where nothing exceeds)
    for path in [p for p in ALL if p.startswith("Dense_") or layers == ["**"]]:
        node = js.find_layers(traced)[path]
        assert node.branches == 2
        e = js.find_layers(eager)[path]
        if e.branches:
            assert leaves_equal(e.node, node.node)
        else:
            assert np.array_equal(node.node["branch_0"]["kernel"], e.node["kernel"])
            assert not np.asarray(node.node["branch_1"]["kernel"]).any()
    assert leaves_equal(js.merge_params(traced), variables)
    assert leaves_equal(jax.jit(js.merge_params)(traced), variables)


def test_nonfinite_weights(variables):
    p = copy.deepcopy(variables["params"])
    p["Dense_1"]["kernel"][0, 0] = np.nan
    p["Dense_1"]["kernel"][1, 1] = -np.inf
    cfg = js.SplitConfig(layers=["Dense_1"], threshold=0.1)
    with pytest.raises(ValueError, match="'Dense_1'.*2 non-finite.*allow_nonfinite=True"):
        js.split_params(p, cfg)
    with pytest.raises(ValueError, match="'Dense_1'"):
        js.match_layers(p, cfg)
    ok = js.split_params(p, js.SplitConfig(layers=["Dense_1"], threshold=0.1, allow_nonfinite=True))
    w1 = np.asarray(ok["Dense_1"]["branch_0"]["kernel"])
    w2 = np.asarray(ok["Dense_1"]["branch_1"]["kernel"])
    assert np.isnan(w1[0, 0]) and w1[1, 1] == -np.inf and w2[0, 0] == 0 and w2[1, 1] == 0
    merged = js.merge_params(ok)["Dense_1"]["kernel"]
    np.testing.assert_array_equal(merged, p["Dense_1"]["kernel"])  # NaN-aware, exact


def test_integer_kernel_is_a_type_error():
    p = {"q": {"kernel": np.ones((2, 2), np.int8)}, "b": {"kernel": np.ones(2, bool)}}
    for name, dtype in (("q", "int8"), ("b", "bool")):
        with pytest.raises(TypeError, match=f"layer '{name}'.*dtype {dtype}.*floating"):
            js.split_params(p, js.SplitConfig(layers=[name]))


def test_zero_size_kernel_is_skipped():
    p = {
        "e": {"kernel": np.zeros((0, 4), np.float32)},
        "d": {"kernel": np.ones((2, 2), np.float32)},
    }
    out, rep = js.split_with_report(p, js.SplitConfig(layers=["*"], threshold=0.5))
    assert out["e"] is p["e"] and "branch_0" in out["d"]
    assert [(q.path, q.action, q.reason) for q in rep.layers] == [
        ("e", "skip", "empty kernel"),
        ("d", "split", None),
    ]


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64])
def test_float_dtypes_stay_in_their_dtype(dtype):
    with jax.enable_x64(True):
        w = np.asarray(jax.random.normal(jax.random.key(1), (32, 16), jnp.float32) * 2).astype(
            dtype
        )
    p = {"d": {"kernel": w, "bias": np.zeros(16, dtype)}}
    out = js.split_params(p, js.SplitConfig(layers=["d"], threshold=1.0))
    for b in ("branch_0", "branch_1"):
        assert out["d"][b]["kernel"].dtype == w.dtype
    merged = js.merge_params(out)["d"]["kernel"]
    assert merged.dtype == w.dtype and np.array_equal(np.asarray(merged), w)


def test_subnormal_weights_survive_the_round_trip():
    w = np.array([1e-45, -3e-44, 1e-40, 2.0, 5e-39], np.float32)
    p = {"d": {"kernel": w}}
    out = js.split_params(p, js.SplitConfig(layers=["d"], threshold=0.0))
    assert np.array_equal(
        np.asarray(js.merge_params(out)["d"]["kernel"]).view(np.uint32), w.view(np.uint32)
    )


def test_verbose_logs_one_line_per_selected_layer(variables, caplog):
    cfg = js.SplitConfig(layers=["Dense_0", "Dense_1"], threshold=js.Relative(0.5), verbose=True)
    with caplog.at_level(logging.INFO, logger="jaxsplit"):
        _, rep = js.split_with_report(variables, cfg)
    lines = [r.getMessage() for r in caplog.records if r.name == "jaxsplit"]
    assert len(lines) == 2
    n = rep.layers[0].n_split
    assert lines[0].startswith(f"Dense_0: split {n}/{5 * 16} values (threshold ")
    caplog.clear()
    cfg = js.SplitConfig(layers=["Dense_0"], threshold=100.0, verbose=True)
    with caplog.at_level(logging.INFO, logger="jaxsplit"):
        js.split_params(variables, cfg)
    assert "Dense_0: skipped, no value above threshold (threshold 100)" in caplog.text


def test_report_and_dry_run_agree(variables):
    cfg = js.SplitConfig(layers=["re:Dense_.*", "Conv_0"], threshold=js.Sigma(2))
    _, rep = js.split_with_report(variables, cfg)
    dry = js.match_layers(variables, cfg)
    assert rep.layers == dry.layers
    assert dry.patterns == {"re:Dense_.*": ("Dense_0", "Dense_1"), "Conv_0": ("Conv_0",)}
    d = dry.to_dict()
    assert d["layers"][0]["path"] == "Conv_0" and isinstance(d["layers"][0]["n_split"], int)
    for plan in dry.layers:
        w = js.find_layers(variables)[plan.path].array
        assert plan.n_split == int((np.abs(w) > np.float32(plan.threshold)).sum())
        assert plan.threshold == pytest.approx(2 * w.std(), rel=1e-5)


def test_merge_refuses_to_drop_leaves():
    p2 = {
        "d": {
            "branch_0": {"kernel": np.ones(2)},
            "branch_1": {"kernel": np.ones(2), "bias": np.ones(2)},
        }
    }
    with pytest.raises(ValueError, match="'d': branch_1 holds \\['bias'\\]"):
        js.merge_params(p2)
    p3 = {"d": {"branch_0": {"kernel": np.ones(2)}, "branch_1": {"kernel": np.ones(3)}}}
    with pytest.raises(ValueError, match="'d': branch kernels disagree"):
        js.merge_params(p3)


def test_bad_cfg_type():
    with pytest.raises(TypeError, match="cfg must be a jaxsplit.SplitConfig"):
        js.split_params({}, {"layers": ["a"]})
