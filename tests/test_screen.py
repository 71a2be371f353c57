"""jaxsplit.screen: sampled candidate scores, exact confirmation, same choice as exhaustive."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsplit as js
from jaxsplit import blocks, kernels, screen
from jaxsplit import search as auto
from jaxsplit.quant import QuantSpec

SHAPE = (512, 512)  # screen.MIN_SIZE values: the smallest kernel the screen handles


def _student_t(shape, seed=0, df=3):
    rng = np.random.default_rng(seed)
    return jnp.asarray((rng.standard_t(df, size=shape) * 0.02).astype(np.float32))


@pytest.mark.parametrize(
    "method,bits,budget,seed,candidates",
    [
        ("clip", 4, 0.02, 0, 64),
        ("clip", 8, 0.02, 1, 64),
        ("clip", 4, None, 2, 64),
        pytest.param("auto", 4, 0.02, 3, 64, marks=pytest.mark.optimized),
        # int8 compensate's scan is the suite's slowest measurement: 16 candidates (the
        # exhaustive side measures them all) keep the same check in a third of the time (53 -> 18 s)
        pytest.param("auto", 8, 0.005, 4, 16, marks=pytest.mark.optimized),
        ("balance", 4, 0.05, 5, 64),
    ],
)
def test_screened_choice_matches_exhaustive_within_two_percent(
    method, bits, budget, seed, candidates
):
    w = _student_t(SHAPE, seed)
    a = js.Auto(QuantSpec(bits=bits), candidates=candidates, max_extra=budget)
    assert screen.applies(w.shape, a.spec, auto.search_methods(method, a.spec))
    ws, info = auto.search(w, None, auto=a, method=method)
    _, ex = auto.search(w, None, auto=a, method=method, exhaustive=True)
    assert float(info["mse_unsplit"]) == float(ex["mse_unsplit"])
    assert float(info["mse"]) <= float(ex["mse"]) * 1.02
    # never worse than not splitting; the reported figures are the measured ones
    assert float(info["mse"]) <= float(info["mse_unsplit"])
    m = js.measure.measure(w, ws, a.spec)
    assert float(m.mse) == pytest.approx(float(info["mse"]), rel=1e-6)
    assert int(m.extra_nonzero) == int(info["extra_nonzero"])
    if budget is not None:
        assert int(info["extra_nonzero"]) <= budget * w.size
    assert np.array_equal(kernels.branch_sum(ws), w)


def test_screen_measures_only_top_candidates_and_they_are_exact():
    w = _student_t(SHAPE, 7)
    spec = QuantSpec(bits=4)
    thr = auto.candidate_thresholds(w, spec, 16)
    mse, extra = screen.screen(w, thr, ("clip", "balance"), spec, jnp.inf, top=3)
    assert mse.shape == (2, 16) and int(jnp.sum(jnp.isfinite(mse))) == 3
    full = jnp.stack([auto.evaluate(w, thr, m, spec)[0] for m in ("clip", "balance")])
    full_x = jnp.stack([auto.evaluate(w, thr, m, spec)[1] for m in ("clip", "balance")])
    done = np.isfinite(np.asarray(mse))
    np.testing.assert_array_equal(np.asarray(mse)[done], np.asarray(full)[done])
    np.testing.assert_array_equal(np.asarray(extra)[done], np.asarray(full_x)[done])


def test_sample_tail_is_exact_and_order_stats_follow_the_sort():
    w = _student_t((300, 1000), 8)
    s = screen.sample(w)
    desc = np.sort(np.abs(np.asarray(w)).ravel())[::-1]
    np.testing.assert_array_equal(np.asarray(s.tail_abs), desc[: screen.TAIL])
    assert float(jnp.sum(s.weights)) == pytest.approx(w.size, rel=1e-5)
    ks = [0, 1, 10, screen.TAIL - 1]
    np.testing.assert_array_equal(np.asarray(screen.order_stats(s, ks)), desc[ks])
    # beyond the tail: about k values above the threshold
    for k in (2000, 30000, 150000):
        t = float(screen.order_stats(s, [k])[0])
        assert abs(int((desc > t).sum()) - k) <= 0.1 * k


def test_candidates_are_exact_on_small_kernels():
    w = _student_t((100, 100), 9)
    thr = np.asarray(auto.candidate_thresholds(w, QuantSpec(bits=8), 8))
    desc = np.sort(np.abs(np.asarray(w)).ravel())[::-1]
    assert set(thr[4:]).issubset(set(desc))


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(bits=4, granularity="per_channel"),
        QuantSpec(bits=4, granularity="per_group", group_size=128),
    ],
)
def test_per_channel_and_per_group_fall_back_to_exhaustive(spec):
    w = _student_t(SHAPE, 10)
    assert not screen.applies(w.shape, spec, ("clip",))
    a = js.Auto(spec, candidates=8, max_extra=0.02)
    _, info = auto.search(w, None, auto=a, method="clip")
    _, ex = auto.search(w, None, auto=a, method="clip", exhaustive=True)
    for k in ("mse", "extra_nonzero", "split"):
        assert np.array_equal(np.asarray(info[k]), np.asarray(ex[k]))


def test_screened_search_runs_inside_a_user_jit_with_a_traced_budget():
    w = _student_t(SHAPE, 11)
    a = js.Auto(QuantSpec(bits=4))

    @jax.jit
    def f(w, budget):
        return auto.search(w, None, auto=a, method="clip", budget=budget)

    for budget in (0.001, 0.01):
        ws, info = f(w, budget)
        assert int(info["extra_nonzero"]) <= budget * w.size
        assert np.array_equal(kernels.branch_sum(ws), w)


def _tree_totals(curves, picks):
    """(total score, total extra) of one pick per layer (``-1``: not split)."""
    pairs = list(zip(curves, picks, strict=True))
    score = sum(c.score0 if i < 0 else float(c.score.reshape(-1)[i]) for c, i in pairs)
    extra = sum(0 if i < 0 else int(c.m.extra_nonzero.reshape(-1)[i]) for c, i in pairs)
    return score, extra


@pytest.mark.parametrize(
    ("method", "calibrated", "candidates"),
    [
        ("clip", False, 32),
        pytest.param("auto", False, 16, marks=pytest.mark.optimized),
        ("clip", True, 32),
    ],
)
def test_tree_scope_screen_within_two_percent_of_exhaustive(method, calibrated, candidates):
    """Screened tree-scope curves (a few candidates measured per layer): the allocation
    stays within 2% of the one over exhaustive curves, never exceeds the budget, and is
    never worse than scope='layer' at the same total budget."""
    from jaxsplit import split
    from jaxsplit.tree import find_layers

    tree = {f"l{i}": {"kernel": _student_t(SHAPE, 20 + i, df)} for i, df in enumerate((3, 5, 8))}
    rng = np.random.default_rng(3)
    calib = (
        {p: rng.uniform(0.2, 4.0, SHAPE[0]).astype(np.float32) for p in tree} if calibrated else {}
    )
    a = js.Auto(QuantSpec(bits=4), candidates=candidates, max_extra=0.01, scope="tree")
    cfg = js.SplitConfig(layers=["*"], threshold=a, method=method)
    lays = list(find_layers(tree).values())
    assert all(auto.screens(lay.array.shape, a, method) for lay in lays)
    scr = split.tree_curves(lays, cfg, calibration=calib)
    n_measured = [int(np.isfinite(c.score).sum()) for c in scr]
    assert max(n_measured) <= 4 + len(screen.TREE_LEVELS), n_measured
    exh = []
    for lay in lays:
        c = auto.curve(lay.array, None, calib.get(lay.path), spec=a.spec,
                       candidates=candidates, method=method)  # fmt: skip
        c = jax.device_get(c)
        thr, score = np.asarray(c["thresholds"]), np.asarray(c["score"])
        exh.append(
            split.LayerCurve(thr, c["m"], c["base"], score, float(c["score0"]), lay.array.size)
        )
    budget = a.max_extra * sum(lay.array.size for lay in lays)
    s_score, s_extra = _tree_totals(scr, split.tree_picks(scr, cfg))
    e_score, e_extra = _tree_totals(exh, split.tree_picks(exh, cfg))
    assert s_extra <= budget and e_extra <= budget
    assert s_score <= e_score * 1.02, (s_score, e_score)
    # the screened tree choice is never worse than the (screened) per-layer choice
    layer_cfg = dataclasses.replace(cfg, threshold=dataclasses.replace(a, scope="layer"))
    _, rep = js.split_with_report(tree, layer_cfg, calibration=calib or None)
    fig = (lambda c: c.output_error) if calibrated else (lambda c: c.mse)
    per_layer = sum(fig(p.auto) * (1 if calibrated else p.n_total) for p in rep.layers)
    assert s_score <= per_layer * (1 + 1e-6), (s_score, per_layer)
    # and split_params applies exactly these picks
    p2, rep_tree = js.split_with_report(tree, cfg, calibration=calib or None)
    assert sum(p.auto.extra_nonzero for p in rep_tree.layers) == s_extra
    for lay in lays:
        assert np.array_equal(js.merge_params(p2)[lay.path]["kernel"], tree[lay.path]["kernel"])


@pytest.mark.parametrize("calibrated", [False, True])
@pytest.mark.parametrize("nonfinite", [False, True])
def test_screened_search_reuses_the_measured_branches_bit_for_bit(calibrated, nonfinite):
    # the screen keeps the best pick's branches; the applied split must equal a fresh one
    w = np.asarray(_student_t(SHAPE, seed=5))
    if nonfinite:  # the measured split zeroes these: the search must split ``w`` again
        w = w.copy()
        w[0, :3] = [np.nan, np.inf, -np.inf]
    w = jnp.asarray(w)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, SHAPE[0])).astype("f4")
    cal = jnp.asarray(x.T @ x / 64) if calibrated else None
    spec = QuantSpec(bits=4)
    a = js.Auto(spec, max_extra=0.02)
    assert auto.screens(SHAPE, a, "auto")
    ws, info = auto.search(w, None, auto=a, method="auto", calibration=cal)
    assert bool(info["split"])
    name = auto.search_methods("auto", spec)[int(info["method"])]
    fresh = kernels.split(name, w, info["threshold"], spec=spec, calibration=cal)
    for got, want in zip(ws, fresh, strict=True):
        assert np.array_equal(np.asarray(got).view(np.uint32), np.asarray(want).view(np.uint32))


def test_measure_picks_rank_keeps_the_best_stored_picks_branches():
    w = _student_t(SHAPE, seed=6)
    spec = QuantSpec(bits=4)
    thr = jnp.array([0.02, 0.04, 0.08])
    methods = ("clip", "compensate")  # clip measured in blocks unstored, compensate stored
    chosen = jnp.array([4, 0, 4, 2, 5])  # a repeat, measured once
    m = screen.measure_picks(w, thr, chosen, methods, spec)
    m2, (flat, bs) = screen.measure_picks(w, thr, chosen, methods, spec, rank=lambda m: m.mse)
    assert all(np.array_equal(a, b, equal_nan=True) for a, b in zip(m, m2, strict=True))
    stored = (3, 4, 5) if blocks.blocked(SHAPE) else tuple(range(6))
    flat_mse = np.asarray(m.mse).reshape(-1)
    best = min(stored, key=lambda i: (flat_mse[i], i))
    assert int(flat) == best
    want = kernels.split(methods[best // 3], w, thr[best % 3], spec=spec)
    assert all(np.array_equal(a, b) for a, b in zip(bs, want, strict=True))
    _, (flat, bs) = screen.measure_picks(
        w, thr, chosen, methods, spec, rank=lambda m: jnp.inf * m.mse
    )
    assert int(flat) == 6 and not any(bool(jnp.any(b)) for b in bs)  # nothing ranked
    # no pick stores its branches (methods recomputed in blocks): nothing is kept
    _, kept = screen.measure_picks(w, thr, chosen[:4], ("clip", "snap"), spec, rank=lambda m: m.mse)
    assert (kept is None) == blocks.blocked(SHAPE)
