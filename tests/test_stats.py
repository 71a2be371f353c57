"""jaxsplit.stats: exact statistics, per-branch rows, outlier ranking."""

import numpy as np
import pytest

from jaxsplit.stats import LayerStats, layer_stats, rank_by_outliers, weight_stats


def test_weight_stats_exact():
    x = np.array([4.0, -4.0, 0, 0, 0, 0, 0, 0], np.float32)
    max_abs, std, ratio, kurt, bad = weight_stats(x)
    # mean 0, var 32/8 = 4, fourth moment 512/8 = 64 -> kurtosis 64/16 - 3 = 1
    assert (max_abs, std, ratio, kurt, bad) == (4.0, 2.0, 2.0, 1.0, 0)


def test_weight_stats_matches_numpy_on_random_bf16():
    w = np.random.default_rng(0).standard_t(3, (64, 32)).astype("bfloat16")
    x = w.astype(np.float64)
    max_abs, std, ratio, kurt, _ = weight_stats(w)
    assert max_abs == np.abs(x).max()
    assert std == pytest.approx(x.std(), rel=1e-12)
    m = x - x.mean()
    assert kurt == pytest.approx((m**4).mean() / x.var() ** 2 - 3, rel=1e-10)
    assert ratio == pytest.approx(max_abs / std, rel=1e-12)


@pytest.mark.parametrize(
    ("w", "expected"),
    [
        (np.ones(3, np.int8), (None, None, None, None, 0)),
        (np.full(3, np.nan, np.float32), (None, None, None, None, 3)),
        (np.full(3, 2.0, np.float16), (2.0, 0.0, None, None, 0)),
        (np.array([np.inf, 1.0, -1.0]), (1.0, 1.0, 1.0, -2.0, 1)),
    ],
    ids=["int", "all-nan", "constant", "with-inf"],
)
def test_weight_stats_undefined_cases(w, expected):
    assert weight_stats(w) == expected


def test_layer_stats_kinds_order_and_branches():
    tree = {
        "params": {
            "Dense_0": {
                "branch_0": {"kernel": np.array([[1.0, -1.0]]), "bias": np.zeros(2)},
                "branch_1": {"kernel": np.array([[0.0, -3.0]])},
            },
            "Conv_0": {"kernel": np.ones((3, 3, 1, 2), np.float16)},
            "Embed_0": {"embedding": np.ones((4, 2), np.float32)},
            "DenseGeneral_0": {"kernel": np.ones((2, 3, 4), np.float32)},
        },
        "batch_stats": {"bn": {"kernel": np.ones((2, 2))}},  # not params: ignored
    }
    rows = layer_stats(tree)
    assert [(r.path, r.kind) for r in rows] == [
        ("Dense_0/branch_0", "dense branch 0/2"),
        ("Dense_0/branch_1", "dense branch 1/2"),
        ("Conv_0", "conv"),
        ("Embed_0", "embed"),
        ("DenseGeneral_0", "kernel-3d"),
    ]
    assert rows[1].max_abs == 3.0 and rows[2].dtype == "float16" and rows[2].shape == (3, 3, 1, 2)
    assert rows[0].to_dict()["shape"] == [1, 2]


def test_rank_by_outliers_puts_undefined_last():
    base = LayerStats("a", "dense", (2,), "float32", 1.0, 1.0, 1.0, 0.0, 0)
    rows = [
        base,
        base._replace(path="none", max_over_std=None),
        base._replace(path="big", max_over_std=7.0),
        base._replace(path="mid", max_over_std=3.0),
    ]
    assert [r.path for r in rank_by_outliers(rows)] == ["big", "mid", "a", "none"]
