"""Layer-wise sparsity allocation (core.allocation): the published formula, its bounds, the CLI.

The expected ratios are computed here from the formula in docs/htsr-primer.md section 4,
independently of the module: block means by reshape, q by the min-max map, r by the
parameter-weighted rescale, parameter counts from the published shape table.
"""
from __future__ import annotations

import logging
import warnings

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from core import cli
from core.allocation import CSV_COLUMNS, DEFAULT_EPSILON, Allocation, allocate, matrix_table, ratios_from_file
from core.profiles import list_profiles, load_profile

KINDS = ("q", "k", "v", "o", "gate", "up", "down")
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- helpers ---------------------------------------------------------------------------

def published_ratios(alpha: np.ndarray, params: np.ndarray, *, sparsity: float, epsilon: float,
                     blocks: int, mapping: str = "block") -> tuple[np.ndarray, np.ndarray]:
    """(q, r) of the published AlphaPruning formula, no clipping."""
    m = alpha.reshape(blocks, 7).mean(axis=1).repeat(7) if mapping == "block" else alpha
    q = (1 - epsilon) + 2 * epsilon * (m - m.min()) / (m.max() - m.min())
    return q, q * sparsity * params.sum() / (params * q).sum()


def llama7b_params() -> np.ndarray:
    """Parameter counts of LLaMA-7B's 224 matrices from the README's shape table."""
    hidden, inter = 4096, 11008
    per_block = [hidden * hidden] * 4 + [inter * hidden] * 3
    return np.tile(np.array(per_block, dtype=np.float64), 32)


def weighted_mean(alloc: Allocation) -> float:
    r = alloc.ratios
    return float((r["params"] * r["ratio"]).sum() / r["params"].sum())


def make_table(metric: list[float], blocks: list[int], params: list[int], kinds: list[str] | None = None,
               column: str = "alpha") -> pd.DataFrame:
    kinds = kinds or [KINDS[i % 7] for i in range(len(metric))]
    return pd.DataFrame({"name": [f"m{i}" for i in range(len(metric))], "block": np.asarray(blocks, dtype=np.int64),
                         "kind": kinds, "params": np.asarray(params, dtype=np.int64), column: metric})


def analysis_table() -> pd.DataFrame:
    """A small table shaped like `spectrascope analyze` output: 3 blocks x q,k,v,o,gate,up,down."""
    rng = np.random.default_rng(7)
    rows = []
    for b in range(3):
        for kind in KINDS:
            r, c = (64, 64) if kind in ("q", "k", "v", "o") else ((172, 64) if kind != "down" else (64, 172))
            section = "self_attn" if kind in ("q", "k", "v", "o") else "mlp"
            rows.append({"name": f"model.layers.{b}.{section}.{kind}_proj", "block": b, "kind": kind, "rows": r,
                         "cols": c, "params": r * c, "alpha": rng.uniform(2, 6), "alpha_hat": rng.uniform(1, 9),
                         "log_norm": rng.uniform(0, 2), "stable_rank": rng.uniform(1, 30),
                         "entropy": rng.uniform(0.5, 1), "status": "ok"})
    return pd.DataFrame(rows)


def implied_q(table: pd.DataFrame, *, metric: str = "alpha", mapping: str = "block", epsilon: float,
              reverse: bool = False) -> np.ndarray:
    m = table[metric].to_numpy(dtype=float)
    if mapping == "block":
        m = table.groupby("block")[metric].transform("mean").to_numpy(dtype=float)
    if np.ptp(m) == 0:
        return np.ones(len(m))
    t = (m.max() - m) if reverse else (m - m.min())
    return (1 - epsilon) + 2 * epsilon * t / np.ptp(m)


def assert_water_filled(ratio: np.ndarray, q: np.ndarray, r_max: float) -> None:
    """ratio = min(c q, r_max) for a single c: the defining property of the clipped rescale."""
    free = ratio < r_max
    if free.any():
        c = ratio[free] / q[free]
        np.testing.assert_allclose(c, c[0], rtol=1e-12)
        np.testing.assert_allclose(ratio, np.minimum(c[0] * q, r_max), rtol=1e-12, atol=1e-15)
        # the clipped ones are exactly those whose unclipped share would exceed r_max
        assert np.all(c[0] * q[~free] >= r_max * (1 - 1e-12))


# --- published profiles ----------------------------------------------------------------

def test_profiles_listed_and_shaped():
    names = list_profiles()
    assert names == sorted(["llama-7b-hf", "llama-13b-hf", "llama-30b-hf", "llama-65b-hf",
                            "llama2-7b-hf", "llama2-13b-hf", "llama2-70b-hf"])
    sizes = {"llama-7b-hf": 224, "llama-13b-hf": 280, "llama-30b-hf": 420, "llama-65b-hf": 560,
             "llama2-7b-hf": 224, "llama2-13b-hf": 280, "llama2-70b-hf": 560}
    for name in names:
        t = load_profile(name)
        assert list(t.columns) == ["name", "block", "kind", "rows", "cols", "params", "alpha"]
        assert len(t) == sizes[name]
        assert t["kind"].tolist() == list(KINDS) * (sizes[name] // 7)
        assert t["block"].tolist() == list(np.repeat(np.arange(sizes[name] // 7), 7))
        assert (t["params"] == t["rows"] * t["cols"]).all()
        assert t["alpha"].notna().all() and t["alpha"].between(1, 12).all()
        assert t["name"].is_unique


def test_profile_names_shapes_and_values():
    t = load_profile("llama-7b-hf")
    assert t["name"].iloc[0] == "model.layers.0.self_attn.q_proj"
    assert t["name"].iloc[6] == "model.layers.0.mlp.down_proj"
    assert t["name"].iloc[-3] == "model.layers.31.mlp.gate_proj"
    assert t.iloc[6][["rows", "cols"]].tolist() == [4096, 11008]
    assert t.iloc[4][["rows", "cols"]].tolist() == [11008, 4096]
    assert t["alpha"].iloc[0] == pytest.approx(1.3288276195526123, abs=1e-15)
    np.testing.assert_array_equal(t["params"].to_numpy(dtype=float), llama7b_params())
    gqa = load_profile("llama2-70b-hf")
    assert gqa.loc[gqa["kind"].isin(["k", "v"]), "rows"].eq(1024).all()
    assert gqa.loc[gqa["kind"] == "down", ["rows", "cols"]].iloc[0].tolist() == [8192, 28672]


def test_load_profile_returns_a_fresh_copy_and_refuses_unknown_names():
    t = load_profile("llama-7b-hf")
    t.loc[0, "alpha"] = 99.0
    assert load_profile("llama-7b-hf")["alpha"].iloc[0] != 99.0
    with pytest.raises(ValueError, match=r"profile='llama-8b'.*llama-7b-hf"):
        load_profile("llama-8b")


# --- exactness against the published formula -----------------------------------------

@pytest.mark.parametrize("epsilon", [0.2, 0.3])
@pytest.mark.parametrize("mapping", ["block", "matrix"])
def test_llama7b_matches_published_formula(epsilon, mapping):
    table = load_profile("llama-7b-hf")
    alloc = allocate(table, sparsity=0.7, epsilon=epsilon, mapping=mapping)
    _, expected = published_ratios(table["alpha"].to_numpy(), llama7b_params(), sparsity=0.7,
                                   epsilon=epsilon, blocks=32, mapping=mapping)
    assert expected.max() < 0.99  # no bound is hit here, so the formula holds unchanged
    assert alloc.ratios["name"].tolist() == table["name"].tolist()  # published order
    np.testing.assert_allclose(alloc.ratios["ratio"].to_numpy(), expected, rtol=0, atol=1e-12)
    assert alloc.n_clipped == 0 and not alloc.ratios["clipped"].any()
    assert abs(weighted_mean(alloc) - 0.7) < 1e-9
    assert abs(alloc.weighted_mean - 0.7) < 1e-9


def test_llama7b_at_80_percent_stays_in_bounds_where_the_published_code_exceeds_one():
    table = load_profile("llama-7b-hf")
    q, published = published_ratios(table["alpha"].to_numpy(), llama7b_params(), sparsity=0.8,
                                     epsilon=0.3, blocks=32)
    assert published.max() > 1.0  # the premise: the published ratios leave [0, 1]
    alloc = allocate(table, sparsity=0.8, epsilon=0.3)
    ratio = alloc.ratios["ratio"].to_numpy()
    assert ratio.min() >= 0.0 and ratio.max() <= 0.99
    assert abs(weighted_mean(alloc) - 0.8) < 1e-9
    assert alloc.n_clipped == int(alloc.ratios["clipped"].sum()) > 0
    assert (ratio[alloc.ratios["clipped"].to_numpy()] == 0.99).all()
    assert_water_filled(ratio, q, 0.99)
    # clipping keeps the order of the published allocation
    assert np.all(np.diff(ratio[np.argsort(published, kind="stable")]) >= -1e-15)


def test_default_epsilon_is_documented_value():
    assert DEFAULT_EPSILON == 0.3
    table = load_profile("llama-7b-hf")
    assert allocate(table, sparsity=0.7).epsilon == 0.3


def test_rows_keep_input_order_and_depend_only_on_content():
    table = load_profile("llama-13b-hf")
    shuffled = table.sample(frac=1.0, random_state=3)
    a = allocate(table, sparsity=0.7)
    b = allocate(shuffled, sparsity=0.7)
    assert b.ratios["name"].tolist() == shuffled["name"].tolist()
    merged = a.ratios.merge(b.ratios, on="name")
    np.testing.assert_allclose(merged["ratio_x"], merged["ratio_y"], rtol=0, atol=1e-12)


def test_input_table_is_not_modified():
    table = analysis_table()
    table.loc[3, "alpha"] = np.nan
    before = table.copy()
    alloc = allocate(table, sparsity=0.6)
    alloc.ratios.loc[0, "params"] = 1
    pd.testing.assert_frame_equal(table, before)


# --- properties on random tables ------------------------------------------------------

@st.composite
def tables(draw, grid: bool = False):
    """Random metric tables: 1-10 blocks of 1-7 matrices, params 1..2e6."""
    n_blocks = draw(st.integers(1, 10))
    per_block = draw(st.integers(1, 7))
    n = n_blocks * per_block
    if grid:  # multiples of 1/8: ties are exact, distinct values are well apart
        metric = [v / 8 for v in draw(st.lists(st.integers(4, 64), min_size=n, max_size=n))]
    else:
        metric = draw(st.lists(st.floats(0.5, 8.0), min_size=n, max_size=n))
    params = draw(st.lists(st.integers(1, 2_000_000), min_size=n, max_size=n))
    blocks = list(np.repeat(np.arange(n_blocks), per_block))
    kinds = [KINDS[i % per_block] for i in range(n)]
    return make_table(metric, blocks, params, kinds)


@st.composite
def options(draw):
    r_max = draw(st.floats(0.5, 0.999))
    return {"sparsity": draw(st.floats(0.0, r_max, allow_subnormal=False)), "epsilon": draw(st.floats(0.0, 0.99)),
            "r_max": r_max, "mapping": draw(st.sampled_from(["block", "matrix"])), "reverse": draw(st.booleans())}


@PROPERTY
@given(table=tables(), opts=options())
def test_mean_bounds_and_water_filling(table, opts):
    alloc = allocate(table, **opts)
    ratio = alloc.ratios["ratio"].to_numpy()
    assert abs(weighted_mean(alloc) - opts["sparsity"]) < 1e-9
    assert abs(alloc.weighted_mean - opts["sparsity"]) < 1e-9
    assert ratio.min() >= 0.0 and ratio.max() <= opts["r_max"]
    assert alloc.n_clipped == int(alloc.ratios["clipped"].sum())
    if opts["sparsity"] > 0:
        q = implied_q(table, mapping=opts["mapping"], epsilon=opts["epsilon"], reverse=opts["reverse"])
        assume(np.ptp(q) == 0 or np.ptp(table["alpha"]) > 1e-6)  # well-conditioned min-max map
        assert_water_filled(ratio, q, opts["r_max"])


@PROPERTY
@given(table=tables(), opts=options())
def test_monotone_in_the_metric(table, opts):
    alloc = allocate(table, **opts)
    score = (table.groupby("block")["alpha"].transform("mean") if opts["mapping"] == "block"
             else table["alpha"]).to_numpy()
    ratio = alloc.ratios["ratio"].to_numpy()
    i, j = np.nonzero(score[:, None] < score[None, :] - 1e-9)  # pairs where i scores clearly below j
    if opts["reverse"]:
        assert np.all(ratio[i] >= ratio[j] - 1e-12)
    else:
        assert np.all(ratio[i] <= ratio[j] + 1e-12)


@PROPERTY
@given(table=tables(grid=True), opts=options(), shift=st.floats(-50, 50), scale=st.floats(0.01, 100))
def test_invariant_to_shift_and_positive_scale(table, opts, shift, scale):
    base = allocate(table, **opts)
    moved = table.assign(alpha=table["alpha"] * scale + shift)
    other = allocate(moved, **opts)
    np.testing.assert_allclose(other.ratios["ratio"], base.ratios["ratio"], rtol=0, atol=1e-9)


@PROPERTY
@given(table=tables(), opts=options())
def test_epsilon_zero_is_uniform(table, opts):
    opts = {**opts, "epsilon": 0.0}
    alpha = allocate(table, **opts)
    uniform = allocate(table, method="uniform", sparsity=opts["sparsity"], r_max=opts["r_max"])
    np.testing.assert_allclose(alpha.ratios["ratio"], uniform.ratios["ratio"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(uniform.ratios["ratio"], opts["sparsity"], rtol=0, atol=1e-12)


# --- edge cases ------------------------------------------------------------------------

def test_equal_metrics_give_uniform_ratios_without_division_by_zero():
    table = make_table([2.5] * 6, [0, 0, 1, 1, 2, 2], [10, 20, 30, 40, 50, 60])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a 0/0 would raise a RuntimeWarning
        for mapping in ("block", "matrix"):
            alloc = allocate(table, sparsity=0.5, epsilon=0.4, mapping=mapping)
            np.testing.assert_array_equal(alloc.ratios["ratio"], 0.5)


def test_uniform_method_needs_no_metric_column():
    table = make_table([1.0, 2.0, 3.0], [0, 1, 2], [5, 5, 10]).drop(columns="alpha")
    alloc = allocate(table, sparsity=0.4, method="uniform")
    np.testing.assert_array_equal(alloc.ratios["ratio"], 0.4)
    assert alloc.ratios["metric"].isna().all() and alloc.epsilon == 0.0


def test_zero_sparsity_gives_zero_ratios():
    alloc = allocate(load_profile("llama-7b-hf"), sparsity=0.0)
    assert (alloc.ratios["ratio"] == 0.0).all() and alloc.weighted_mean == 0.0


def test_sparsity_equal_to_r_max_pins_everything():
    alloc = allocate(make_table([1.0, 2.0, 4.0], [0, 1, 2], [3, 4, 5]), sparsity=0.9, r_max=0.9, mapping="matrix")
    np.testing.assert_allclose(alloc.ratios["ratio"], 0.9, rtol=0, atol=1e-15)
    assert abs(alloc.weighted_mean - 0.9) < 1e-12


def test_clipping_cascades_over_several_rounds():
    # one huge-alpha matrix clips first; the rescale then pushes the next ones over r_max too
    table = make_table([1.0, 2.0, 2.9, 3.0], [0, 1, 2, 3], [1000, 10, 10, 10])
    alloc = allocate(table, sparsity=0.3, epsilon=0.95, r_max=0.6, mapping="matrix")
    ratio = alloc.ratios["ratio"].to_numpy()
    assert alloc.n_clipped == 3 and ratio[0] < 0.6
    assert abs(weighted_mean(alloc) - 0.3) < 1e-12
    assert ratio[0] == pytest.approx((0.3 * 1030 - 0.6 * 30) / 1000, abs=1e-15)


def test_reverse_prunes_low_metric_more():
    table = make_table([1.0, 3.0, 5.0], [0, 1, 2], [100, 100, 100])
    fwd = allocate(table, sparsity=0.5, epsilon=0.2, mapping="matrix").ratios["ratio"].to_numpy()
    rev = allocate(table, sparsity=0.5, epsilon=0.2, mapping="matrix", reverse=True).ratios["ratio"].to_numpy()
    np.testing.assert_allclose(fwd, [0.4, 0.5, 0.6], atol=1e-15)
    np.testing.assert_allclose(rev, [0.6, 0.5, 0.4], atol=1e-15)


def test_other_metric_columns_of_an_analysis_table():
    table = analysis_table()
    for metric in ("alpha", "alpha_hat", "log_norm", "stable_rank", "entropy"):
        alloc = allocate(table, sparsity=0.6, metric=metric, mapping="matrix")
        np.testing.assert_array_equal(alloc.ratios["metric"], table[metric])
        _, expected = published_ratios(table[metric].to_numpy(), table["params"].to_numpy(dtype=float),
                                       sparsity=0.6, epsilon=DEFAULT_EPSILON, blocks=3, mapping="matrix")
        np.testing.assert_allclose(alloc.ratios["ratio"], expected, rtol=0, atol=1e-12)


# --- NaN metrics -----------------------------------------------------------------------

def test_nan_metric_takes_block_mean_and_is_reported(caplog):
    table = analysis_table()
    table.loc[[2, 9], "alpha"] = np.nan
    table.loc[[2, 9], "status"] = "fit failed"
    with caplog.at_level(logging.WARNING, logger="core.allocation"):
        alloc = allocate(table, sparsity=0.7, mapping="matrix")
    r = alloc.ratios
    assert r["filled"].tolist() == [i in (2, 9) for i in range(len(table))] and alloc.n_filled == 2
    for i in (2, 9):
        block = table.loc[i, "block"]
        expected = table.loc[(table["block"] == block) & table["alpha"].notna(), "alpha"].mean()
        assert r.loc[i, "metric"] == pytest.approx(expected, rel=1e-14)
    assert len(alloc.warnings) == 1
    assert "model.layers.0.self_attn.v_proj" in alloc.warnings[0]
    assert "model.layers.1.self_attn.v_proj" in alloc.warnings[0]
    assert "model.layers.0.self_attn.v_proj" in caplog.text
    assert "warning: 2 matrices have no alpha (NaN) and took their block's mean" in alloc.summary()
    # the same as giving the block means explicitly
    explicit = allocate(table.assign(alpha=r["metric"]), sparsity=0.7, mapping="matrix")
    np.testing.assert_allclose(explicit.ratios["ratio"], r["ratio"], rtol=0, atol=1e-12)
    assert abs(alloc.weighted_mean - 0.7) < 1e-9


def test_block_without_any_fit_is_an_error_naming_it():
    table = analysis_table()
    table.loc[table["block"] == 1, "alpha"] = np.nan
    with pytest.raises(ValueError, match=r"block\(s\) 1 have no alpha"):
        allocate(table, sparsity=0.7)
    # uniform needs no metric, so the same table is fine there
    assert allocate(table, sparsity=0.7, method="uniform").ratios["ratio"].eq(0.7).all()


# --- dense kinds -----------------------------------------------------------------------

@pytest.mark.parametrize("dense", ["k,v", ("k", "v"), ["v", "k", "k"]])
def test_dense_kinds_stay_at_zero_and_the_global_mean_is_still_s(dense):
    table = load_profile("llama-7b-hf")
    alloc = allocate(table, sparsity=0.6, epsilon=0.3, dense_kinds=dense)
    r = alloc.ratios
    kv = r["kind"].isin(["k", "v"])
    assert (r.loc[kv, "ratio"] == 0.0).all() and (r.loc[~kv, "ratio"] > 0).all()
    assert abs(weighted_mean(alloc) - 0.6) < 1e-9
    assert sorted(alloc.dense_kinds) == ["k", "v"]
    assert "dense kinds" in alloc.summary()
    # the others keep the published proportions (block means over all 7 matrices)
    q, _ = published_ratios(table["alpha"].to_numpy(), llama7b_params(), sparsity=0.6, epsilon=0.3, blocks=32)
    assert_water_filled(r.loc[~kv, "ratio"].to_numpy(), q[~kv.to_numpy()], 0.99)


def test_dense_kinds_leave_the_prunable_matrices_the_full_tau_range():
    # per-matrix mapping: min and max of the map come from the prunable matrices only
    table = analysis_table()
    table.loc[table["kind"] == "k", "alpha"] = 100.0  # would squash the others' range if counted
    r = allocate(table, sparsity=0.5, epsilon=0.3, mapping="matrix", dense_kinds="k,v").ratios
    live = r.loc[~r["kind"].isin(["k", "v"]), "ratio"]
    assert live.max() / live.min() == pytest.approx(1.3 / 0.7, rel=1e-12)


def test_dense_kinds_push_others_to_the_bound_with_water_filling():
    table = load_profile("llama-7b-hf")
    alloc = allocate(table, sparsity=0.75, dense_kinds="k,v")
    r = alloc.ratios
    assert alloc.n_clipped > 0 and r["ratio"].max() <= 0.99
    assert abs(weighted_mean(alloc) - 0.75) < 1e-9


def test_dense_kind_refusals():
    table = load_profile("llama-7b-hf")
    with pytest.raises(ValueError, match=r"dense_kinds names kv.*its kinds are"):
        allocate(table, sparsity=0.5, dense_kinds="kv")
    with pytest.raises(ValueError, match=r"dense_kinds=.*leaves nothing to prune"):
        allocate(table, sparsity=0.5, dense_kinds=KINDS)
    with pytest.raises(ValueError, match=r"sparsity=0.9 cannot be reached.*at most 0\.3"):
        allocate(table, sparsity=0.9, dense_kinds="gate,up,down")


# --- refusals --------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, pattern", [
    ({"sparsity": 1.0}, r"sparsity=1\.0 is outside \[0, 1\)"),
    ({"sparsity": -0.1}, r"sparsity=-0\.1 is outside"),
    ({"sparsity": float("nan")}, r"sparsity=nan is outside"),
    ({"sparsity": True}, r"sparsity=True must be a number"),
    ({"sparsity": "0.5"}, r"sparsity='0\.5' must be a number"),
    ({"sparsity": 0.995}, r"sparsity=0\.995 is above r_max=0\.99.*lower sparsity or raise r_max"),
    ({"sparsity": 0.5, "r_max": 0.4}, r"sparsity=0\.5 is above r_max=0\.4"),
    ({"sparsity": 0.5, "epsilon": -0.1}, r"epsilon=-0\.1 is outside \[0, 1\)"),
    ({"sparsity": 0.5, "epsilon": 1.0}, r"epsilon=1\.0 is outside"),
    ({"sparsity": 0.5, "r_max": 1.0}, r"r_max=1\.0 is outside \(0, 1\)"),
    ({"sparsity": 0.0, "r_max": 0.0}, r"r_max=0\.0 is outside"),
    ({"sparsity": 0.5, "method": "wanda"}, r"method='wanda' is unknown; use one of uniform, alpha, owl"),
    ({"sparsity": 0.5, "method": "owl"}, r"method='owl' needs owl_scores"),
    ({"sparsity": 0.5, "method": "owl", "owl_scores": {0: 0.1, 1: 0.2}}, r"owl_scores has no score for block\(s\) 2"),
    ({"sparsity": 0.5, "method": "owl", "owl_scores": {0: 0.1, 1: 0.2, 2: np.nan}}, r"not finite for block\(s\) 2"),
    ({"sparsity": 0.5, "method": "owl", "owl_scores": {0: 0.1, 1: 0.2, 2: "x"}}, r"owl_scores must map block"),
    ({"sparsity": 0.5, "method": "owl", "owl_scores": {0: 0.1, 1: 0.2, 2: 0.3}, "owl_lambda": 1.0},
     r"owl_lambda=1\.0 is outside \[0, 1\)"),
    ({"sparsity": 0.5, "mapping": "layer"}, r"mapping='layer' is unknown; use one of block, matrix"),
    ({"sparsity": 0.5, "reverse": "yes"}, r"reverse='yes' must be True or False"),
    ({"sparsity": 0.5, "metric": "alpha_weighted"}, r"lacks column\(s\) alpha_weighted"),
])
def test_refusals_name_the_argument(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        allocate(analysis_table(), **kwargs)


def test_options_are_keyword_only():
    with pytest.raises(TypeError):
        allocate(analysis_table(), 0.5)  # type: ignore[misc]


@pytest.mark.parametrize("mutate, pattern", [
    (lambda t: t.drop(columns="params"), r"lacks column\(s\) params"),
    (lambda t: t.iloc[:0], r"no rows"),
    (lambda t: t.assign(block=t["block"].astype(float)), r"'block' must hold integers"),
    (lambda t: t.assign(params=t["params"].astype(float)), r"'params' must hold integers"),
    (lambda t: t.assign(params=t["params"].where(t.index != 4, 0)), r"'params' must be positive; check "
                                                                     r"model\.layers\.0\.mlp\.gate_proj"),
    (lambda t: t.assign(name=["same"] * len(t)), r"'name' must be unique; repeated: same"),
    (lambda t: t.assign(kind=t["kind"].where(t.index != 0, None)), r"must not have missing values"),
    (lambda t: t.assign(alpha=t["alpha"].where(t.index != 5, np.inf)), r"metric='alpha' is infinite for "
                                                                       r"model\.layers\.0\.mlp\.up_proj"),
    (lambda t: t.assign(alpha=t["status"]), r"column 'alpha' is not numeric"),
    (lambda t: t.to_dict(), r"table must be a pandas DataFrame"),
])
def test_bad_tables_are_refused(mutate, pattern):
    with pytest.raises(ValueError, match=pattern):
        allocate(mutate(analysis_table()), sparsity=0.5)


# --- result object ---------------------------------------------------------------------

def test_result_fields_summary_and_mapping():
    alloc = allocate(load_profile("llama-7b-hf"), sparsity=0.8, epsilon=0.3)
    assert isinstance(alloc, Allocation)
    with pytest.raises(AttributeError):
        alloc.sparsity = 0.1  # type: ignore[misc]
    assert list(alloc.ratios.columns) == ["name", "block", "kind", "params", "metric", "ratio", "clipped", "filled"]
    assert (alloc.method, alloc.metric, alloc.mapping, alloc.r_max, alloc.reverse) == \
        ("alpha", "alpha", "block", 0.99, False)
    text = alloc.summary()
    assert "224 matrices" in text and "weighted mean 0.800000" in text
    assert f"r_max=0.99: {alloc.n_clipped} matrices" in text
    by_name = alloc.ratio_by_name()
    assert len(by_name) == 224 and by_name["model.layers.0.self_attn.q_proj"] == alloc.ratios["ratio"].iloc[0]


def test_to_csv_is_atomic_and_round_trips(tmp_path):
    alloc = allocate(load_profile("llama-7b-hf"), sparsity=0.7)
    path = tmp_path / "ratios.csv"
    path.write_text("old content")
    with pytest.raises(ValueError, match="already exists"):     # an existing file is replaced only when asked
        alloc.to_csv(path)
    assert path.read_text() == "old content"
    assert alloc.to_csv(path, overwrite=True) == path
    assert [p.name for p in tmp_path.iterdir()] == ["ratios.csv"]  # no temporary file left
    back = pd.read_csv(path)
    assert list(back.columns) == list(CSV_COLUMNS)
    np.testing.assert_array_equal(back["ratio"], alloc.ratios["ratio"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        alloc.to_csv(tmp_path / "missing" / "ratios.csv")


# --- command line ----------------------------------------------------------------------

def test_cli_profile_writes_csv_and_prints_summary(tmp_path, capsys):
    out = tmp_path / "ratios.csv"
    rc = cli.main(["allocate", "--profile", "llama-7b-hf", "--sparsity", "0.7", "--epsilon", "0.2", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "224 matrices" in text and "weighted mean 0.700000" in text and "clipped at r_max=0.99: 0" in text
    back = pd.read_csv(out)
    assert list(back.columns) == list(CSV_COLUMNS) and len(back) == 224
    expected = allocate(load_profile("llama-7b-hf"), sparsity=0.7, epsilon=0.2).ratios["ratio"]
    np.testing.assert_array_equal(back["ratio"], expected)


def test_cli_metrics_csv_shaped_like_analysis_output(tmp_path, capsys):
    table = analysis_table()
    table.loc[4, "log_norm"] = np.nan
    metrics = tmp_path / "metrics.csv"
    table.to_csv(metrics, index=False)
    out = tmp_path / "ratios.csv"
    rc = cli.main(["allocate", "--metrics", str(metrics), "--metric", "log_norm", "--mapping", "matrix",
                   "--sparsity", "0.5", "--epsilon", "0.4", "--r-max", "0.95", "--dense-kinds", "k,v",
                   "--reverse", "--out", str(out)])
    assert rc == 0
    assert "warning: 1 matrices have no log_norm" in capsys.readouterr().out
    back = pd.read_csv(out)
    expected = allocate(table, sparsity=0.5, metric="log_norm", mapping="matrix", epsilon=0.4, r_max=0.95,
                        dense_kinds=("k", "v"), reverse=True)
    np.testing.assert_array_equal(back["ratio"], expected.ratios["ratio"])
    assert (back.loc[back["kind"].isin(["k", "v"]), "ratio"] == 0).all()
    assert abs((back["ratio"] * back["params"]).sum() / back["params"].sum() - 0.5) < 1e-9


def test_cli_uniform_and_quiet(tmp_path, capsys):
    out = tmp_path / "u.csv"
    assert cli.main(["allocate", "--profile", "llama2-70b-hf", "--method", "uniform", "--sparsity", "0.5",
                     "--quiet", "--out", str(out)]) == 0
    assert capsys.readouterr().out == ""
    assert pd.read_csv(out)["ratio"].eq(0.5).all()


@pytest.mark.parametrize("argv, message", [
    (["--profile", "llama-7b-hf", "--sparsity", "0.995"], "sparsity=0.995 is above r_max=0.99"),
    (["--profile", "llama-1b", "--sparsity", "0.5"], "is not a published profile"),
    (["--metrics", "/nonexistent/metrics.csv", "--sparsity", "0.5"], "no such file"),
    (["--profile", "llama-7b-hf", "--sparsity", "0.5", "--dense-kinds", "q,k,v,o,gate,up,down"],
     "leaves nothing to prune"),
])
def test_cli_errors_are_one_line_exit_2(argv, message, capsys):
    assert cli.main(["allocate", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spectrascope allocate: error:") and message in err and err.count("\n") == 1


def test_cli_needs_exactly_one_source():
    with pytest.raises(SystemExit):
        cli.main(["allocate", "--sparsity", "0.5"])
    with pytest.raises(SystemExit):
        cli.main(["allocate", "--profile", "llama-7b-hf", "--metrics", "x.csv", "--sparsity", "0.5"])


# --- OWL and uniform share the bounds ----------------------------------------------------

OWL_SCORES = {0: 0.010, 1: 0.030, 2: 0.022}   # outlier share per block of analysis_table()


def owl_formula(table: pd.DataFrame, scores: dict[int, float], sparsity: float, lam: float = 0.08) -> np.ndarray:
    """OWL's published block sparsity S - (d_l - mean d), d_l = 2 lam (D_l - min D) / (max D - min D)."""
    D = table["block"].map(scores).to_numpy(dtype=float)
    n = table["params"].to_numpy(dtype=float)
    d = 2 * lam * (D - D.min()) / (D.max() - D.min())
    return sparsity - (d - (n * d).sum() / n.sum())


def test_owl_without_bounds_is_the_published_formula():
    table = analysis_table()
    alloc = allocate(table, sparsity=0.6, method="owl", owl_scores=OWL_SCORES)
    np.testing.assert_allclose(alloc.ratios["ratio"], owl_formula(table, OWL_SCORES, 0.6), rtol=0, atol=1e-12)
    by_block = alloc.ratios.groupby("block")["ratio"].agg(["min", "max"])
    assert (by_block["min"] == by_block["max"]).all()          # one ratio per block
    assert by_block["max"].idxmin() == 1 and by_block["max"].idxmax() == 0   # most outliers: least pruned
    np.testing.assert_allclose(alloc.ratios["metric"], table["block"].map(OWL_SCORES))
    assert alloc.weighted_mean == 0.6 and alloc.method == "owl" and alloc.epsilon == 0.0
    assert "OWL allocation (lambda 0.08)" in alloc.summary()


def test_owl_scores_may_have_string_keys_as_in_json():
    table = analysis_table()
    a = allocate(table, sparsity=0.6, method="owl", owl_scores={str(k): v for k, v in OWL_SCORES.items()})
    b = allocate(table, sparsity=0.6, method="owl", owl_scores=OWL_SCORES)
    np.testing.assert_array_equal(a.ratios["ratio"], b.ratios["ratio"])


@pytest.mark.parametrize("method", ["owl", "uniform"])
@pytest.mark.parametrize("dense, r_max, sparsity", [(("k", "v"), 0.99, 0.6), ((), 0.62, 0.6),
                                                    (("q", "k", "v", "o"), 0.8, 0.5)])
def test_owl_and_uniform_honour_dense_kinds_and_r_max(method, dense, r_max, sparsity):
    table = analysis_table()
    alloc = allocate(table, sparsity=sparsity, method=method, owl_scores=OWL_SCORES, dense_kinds=dense,
                     r_max=r_max)
    r = alloc.ratios
    assert abs(weighted_mean(alloc) - sparsity) < 1e-12 and alloc.weighted_mean == sparsity
    assert (r.loc[r["kind"].isin(dense), "ratio"] == 0).all()
    live = ~r["kind"].isin(dense)
    assert r.loc[live, "ratio"].max() <= r_max and (r.loc[live, "ratio"] > 0).all()
    assert alloc.n_clipped == int((r["ratio"] == r_max).sum()) and alloc.dense_kinds == tuple(dense)
    assert alloc.n_clipped > 0 if method == "owl" and r_max < 0.9 else alloc.n_clipped == 0
    q = owl_formula(table, OWL_SCORES, sparsity) if method == "owl" else np.ones(len(r))
    if method == "owl" and dense:   # d is centred over the prunable matrices
        n, D = table["params"].to_numpy(float), table["block"].map(OWL_SCORES).to_numpy(float)
        d = 2 * 0.08 * (D - D.min()) / (D.max() - D.min())
        q = sparsity - (d - (n * d)[live].sum() / n[live].sum())
    assert_water_filled(r.loc[live, "ratio"].to_numpy(), q[live.to_numpy()], r_max)


def test_uniform_with_dense_kinds_raises_the_others_equally():
    table = analysis_table()
    alloc = allocate(table, sparsity=0.5, method="uniform", dense_kinds="k,v")
    r = alloc.ratios
    n = r["params"].to_numpy(float)
    live = ~r["kind"].isin(["k", "v"]).to_numpy()
    np.testing.assert_allclose(r.loc[live, "ratio"], 0.5 * n.sum() / n[live].sum(), rtol=1e-14)


def test_owl_at_low_sparsity_keeps_ratios_at_least_zero_and_the_exact_mean():
    table = analysis_table()
    alloc = allocate(table, sparsity=0.05, method="owl", owl_scores=OWL_SCORES)
    r = alloc.ratios["ratio"]
    assert (r >= 0).all() and (r == 0).any()    # the formula gives a negative share to block 1
    assert abs(weighted_mean(alloc) - 0.05) < 1e-12


@pytest.mark.parametrize("method", ["uniform", "owl", "alpha"])
def test_unknown_dense_kind_is_refused_listing_the_kinds(method):
    with pytest.raises(ValueError, match=r"dense_kinds names zz, which the table does not have; its kinds are "
                                         r"down, gate, k, o, q, up, v"):
        allocate(analysis_table(), sparsity=0.5, method=method, owl_scores=OWL_SCORES, dense_kinds="k,zz")


def test_owl_impossible_request_is_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"sparsity=0\.9 cannot be reached.*at most 0\.3"):
        allocate(load_profile("llama-7b-hf"), sparsity=0.9, method="owl", owl_scores=dict.fromkeys(range(32), 0.1),
                 dense_kinds="gate,up,down")


def test_params_record_the_settings_of_each_method():
    table = analysis_table()
    assert allocate(table, sparsity=0.5, epsilon=0.2, dense_kinds="k", reverse=True).params() == {
        "epsilon": 0.2, "mapping": "block", "metric": "alpha", "r_max": 0.99, "dense_kinds": ["k"], "reverse": True}
    assert allocate(table, sparsity=0.5, method="uniform", r_max=0.9).params() == {"r_max": 0.9, "dense_kinds": []}
    owl = allocate(table, sparsity=0.5, method="owl", owl_scores=OWL_SCORES, owl_lambda=0.1).params()
    assert owl == {"lambda": 0.1, "scores": {"0": 0.010, "1": 0.030, "2": 0.022}, "r_max": 0.99, "dense_kinds": []}
    import json
    json.dumps(owl)


def test_weighted_mean_is_clean_without_changing_the_ratios():
    table = load_profile("llama-7b-hf")
    for kw in ({"sparsity": 0.7}, {"sparsity": 0.33, "dense_kinds": "k,v"}, {"sparsity": 0.7, "method": "uniform"}):
        alloc = allocate(table, **kw)
        assert alloc.weighted_mean == kw["sparsity"]
        assert abs(weighted_mean(alloc) - kw["sparsity"]) < 1e-12
    _, expected = published_ratios(table["alpha"].to_numpy(), llama7b_params(), sparsity=0.7, epsilon=0.3, blocks=32)
    np.testing.assert_allclose(allocate(table, sparsity=0.7).ratios["ratio"], expected, rtol=1e-13)


def test_matrix_table_from_matrix_infos():
    from core.models import MatrixInfo

    t = matrix_table([MatrixInfo("a.q", 0, "q", 4, 8), MatrixInfo("a.k", 1, "k", 2, 8)])
    assert t.to_dict("list") == {"name": ["a.q", "a.k"], "block": [0, 1], "kind": ["q", "k"], "params": [32, 16]}
    assert t["block"].dtype == np.int64 and t["params"].dtype == np.int64


# --- ratios files ----------------------------------------------------------------------

def write_ratios(path, rows: list[tuple[str, object]], header: str = "name,ratio") -> str:
    path.write_text("\n".join([header, *(f"{n},{r}" for n, r in rows)]) + "\n")
    return str(path)


def test_ratios_file_round_trip_gives_the_allocation_back(tmp_path):
    import hashlib

    table = analysis_table()
    alloc = allocate(table, sparsity=0.55, epsilon=0.3, dense_kinds="k")
    path = alloc.to_csv(tmp_path / "a.csv")
    back = ratios_from_file(path, table.iloc[::-1])
    assert back.method == "file" and back.ratios["name"].tolist() == table["name"].tolist()[::-1]
    np.testing.assert_array_equal(back.ratios["ratio"].to_numpy()[::-1], alloc.ratios["ratio"].to_numpy())
    assert abs(back.sparsity - 0.55) < 1e-15 and back.weighted_mean == back.sparsity
    assert back.params() == {"path": str(path.resolve()),
                             "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    assert f"ratios from {path.resolve()}" in back.summary()


def test_ratios_file_weighted_mean_is_the_files_own(tmp_path):
    table = make_table([1.0, 2.0], [0, 1], [100, 300])
    back = ratios_from_file(write_ratios(tmp_path / "r.csv", [("m0", 0.2), ("m1", 0.6)]), table)
    assert back.sparsity == pytest.approx((100 * 0.2 + 300 * 0.6) / 400, abs=1e-15)
    assert back.weighted_mean == back.sparsity


@pytest.mark.parametrize("content, pattern", [
    (None, r"ratios file .*missing\.csv does not exist; write one with `spectrascope allocate --out`"),
    (b"", r"ratios file .*r\.csv is empty"),
    (b"\n\n", r"ratios file .*r\.csv is empty"),
    (b"name,ratio\n", r"ratios file .*r\.csv has a header but no rows"),
    (b"PK\x03\x04\x00\x00binary", r"ratios file .*r\.csv is binary, not a CSV"),
    (b"\xff\xfe\xfa", r"ratios file .*r\.csv is binary"),
    (b"name,share\nm0,0.1\n", r"r\.csv needs the columns name and ratio \(it has name, share\)"),
    (b"name,ratio\nm0,0.1\nm1,half\nm2,0.3\n", r"r\.csv, line 3: ratio 'half' is not a number"),
    (b"name,ratio\nm0,0.1\nm1\n", r"r\.csv, line 3: ratio '' is not a number"),
    (b"name,ratio\nm0,0.1\nm1,1.0\nm2,-0.1\nm3,nan\n", r"ratios outside \[0, 1\) for m1 \(line 3\), m2 \(line 4\), "
                                                      r"m3 \(line 5\); give fractions in \[0, 1\)"),
    (b"name,ratio\nm0,0.1\nm1,0.2\n", r"has no ratio for the model's matrices m2, m3; allocate for the same model"),
    (b"name,ratio\nm0,0.1\nm1,0.2\nm2,0.1\nm3,0.1\nx,0.1\ny,0.2\n", r"names the model does not have: x, y"),
    (b"name,ratio\nm0,0.1\nm1,0.2\nm2,0.1\nm3,0.1\nm1,0.3\nm0,0.4\n", r"repeated names: m0, m1; keep one row"),
])
def test_ratios_file_refusals(tmp_path, content, pattern):
    table = make_table([1.0, 2.0, 3.0, 4.0], [0, 0, 1, 1], [10, 10, 10, 10])
    path = tmp_path / ("missing.csv" if content is None else "r.csv")
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=pattern) as info:
        ratios_from_file(path, table)
    assert "\n" not in str(info.value) and str(path.resolve()) in str(info.value)


def test_ratios_file_lists_a_few_of_many(tmp_path):
    table = make_table([1.0] * 9, list(range(9)), [10] * 9)
    with pytest.raises(ValueError, match=r"matrices m0, m1, m2, m3, m4 and 4 more; "):
        ratios_from_file(write_ratios(tmp_path / "r.csv", [("z", 0.1)]), table)
