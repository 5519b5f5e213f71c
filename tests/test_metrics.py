"""Tests of core.metrics: each metric against its definition computed independently
(mostly from numpy's SVD of the matrix), the Marchenko-Pastur edges and density, status."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate

from core.fit import PowerLawFit, fit_power_law
from core.metrics import log_histogram, mp_bulk_edges, mp_density, no_fit_status, spectral_metrics, status

KEYS = {"alpha", "xmin", "D", "sigma", "n_tail", "alpha_hat", "log_norm", "log_spectral_norm",
        "log_alpha_norm", "stable_rank", "entropy", "lambda_plus", "num_spikes", "mp_softrank",
        "rank", "status"}


def gram_eigs(w: np.ndarray) -> np.ndarray:
    g = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T
    return np.linalg.eigvalsh(g)


def fit_of(alpha: float) -> PowerLawFit:
    return PowerLawFit(alpha=alpha, xmin=1.0, D=0.05, sigma=0.1, n_tail=50)


@pytest.fixture(scope="module")
def heavy():
    """A heavy-tailed 300 x 120 matrix, its eigenvalues, singular values and fit."""
    w = np.random.default_rng(0).standard_t(3.0, size=(300, 120)) * 0.02
    eigs = gram_eigs(w)
    return w, eigs, np.linalg.svd(w, compute_uv=False), fit_power_law(eigs, xmin="full")


def test_keys_and_types(heavy):
    w, eigs, _, fit = heavy
    m = spectral_metrics(eigs, fit, rows=300, cols=120, w_var=float(w.var()))
    assert set(m) == KEYS
    assert all(isinstance(m[k], int) for k in ("n_tail", "num_spikes", "rank"))
    assert isinstance(m["status"], str)
    assert all(isinstance(v, float) for k, v in m.items() if k not in ("n_tail", "num_spikes", "rank", "status"))


def test_norm_metrics_match_svd(heavy):
    w, eigs, s, fit = heavy
    m = spectral_metrics(eigs, fit, rows=300, cols=120, w_var=float(w.var()))
    fro2 = float(np.sum(w**2))            # squared Frobenius norm, entry by entry
    spec2 = float(s.max() ** 2)           # squared spectral norm from the SVD
    assert m["log_norm"] == pytest.approx(math.log10(fro2), rel=1e-12)
    assert m["log_spectral_norm"] == pytest.approx(math.log10(spec2), rel=1e-10)
    assert m["stable_rank"] == pytest.approx(fro2 / spec2, rel=1e-10)
    assert m["alpha"] == fit.alpha and m["xmin"] == fit.xmin and m["D"] == fit.D
    assert m["sigma"] == fit.sigma and m["n_tail"] == fit.n_tail
    assert m["alpha_hat"] == pytest.approx(fit.alpha * math.log10(spec2), rel=1e-10)
    direct = math.log10(np.sum(s.astype(np.longdouble) ** (2 * fit.alpha)))
    assert m["log_alpha_norm"] == pytest.approx(direct, rel=1e-10)
    p = s**2 / np.sum(s**2)
    assert m["entropy"] == pytest.approx(-np.sum(p * np.log(p)) / math.log(120), rel=1e-10)
    assert 0.0 < m["entropy"] < 1.0
    assert m["rank"] == int(np.sum(s > s.max() * 1e-12)) == 120


def test_log_alpha_norm_is_stable_for_large_alpha():
    eigs = np.geomspace(1.0, 1e6, 200)
    m = spectral_metrics(eigs, fit_of(500.0), rows=400, cols=200, w_var=1.0)
    # sum lambda^500 overflows float64; the largest term dominates: 3000 <= result <= 3000 + log10(n)
    assert math.isfinite(m["log_alpha_norm"])
    assert 3000.0 - 1e-9 <= m["log_alpha_norm"] <= 3000.0 + math.log10(200)


def test_entropy_extremes_and_rank_with_null_space():
    flat = spectral_metrics(np.full(50, 3.0), fit_of(3.0), rows=80, cols=50, w_var=1.0)
    assert flat["entropy"] == pytest.approx(1.0, rel=1e-12)
    assert flat["stable_rank"] == pytest.approx(50.0)
    eigs = np.r_[np.zeros(49), 7.0]
    one = spectral_metrics(eigs, fit_power_law(eigs), rows=80, cols=50, w_var=1.0)
    assert one["entropy"] == 0.0 and one["rank"] == 1 and one["stable_rank"] == 1.0
    half = np.r_[np.zeros(20), np.arange(1.0, 31.0)]
    assert spectral_metrics(half, fit_of(3.0), rows=50, cols=50, w_var=1.0)["rank"] == 30


def test_spikes_and_softrank_against_definition(heavy):
    w, eigs, s, fit = heavy
    w_var = float(w.var())
    m = spectral_metrics(eigs, fit, rows=300, cols=120, w_var=w_var)
    lp = w_var * (math.sqrt(300) + math.sqrt(120)) ** 2
    assert m["lambda_plus"] == pytest.approx(lp, rel=1e-12)
    assert m["num_spikes"] == int(np.sum(s**2 > lp)) > 0          # heavy tails leave the bulk
    assert m["mp_softrank"] == pytest.approx(lp / s.max() ** 2, rel=1e-10)


def test_without_fit_norms_remain():
    eigs = np.r_[np.zeros(10), 1.0, 2.0, 4.0]
    fit = fit_power_law(eigs)
    m = spectral_metrics(eigs, fit, rows=20, cols=13, w_var=0.1)
    for k in ("alpha", "xmin", "D", "sigma", "alpha_hat", "log_alpha_norm"):
        assert math.isnan(m[k]), k
    assert m["n_tail"] == 0
    assert m["log_norm"] == pytest.approx(math.log10(7.0))
    assert m["log_spectral_norm"] == pytest.approx(math.log10(4.0))
    assert m["status"] == "no fit: fewer than 10 positive eigenvalues"


def test_all_zero_matrix():
    eigs = gram_eigs(np.zeros((30, 20)))
    m = spectral_metrics(eigs, fit_power_law(eigs), rows=30, cols=20, w_var=0.0)
    assert m["status"] == "no fit: all eigenvalues are zero"
    assert m["rank"] == 0 and m["num_spikes"] == 0 and m["n_tail"] == 0
    for k in KEYS - {"status", "rank", "num_spikes", "n_tail", "lambda_plus"}:
        assert math.isnan(m[k]), k
    assert m["lambda_plus"] == 0.0


# --- Marchenko-Pastur ------------------------------------------------------------------------

@pytest.mark.parametrize("rows, cols, sd", [(2000, 500, 0.5), (400, 1200, 2.0)])
def test_iid_gaussian_esd_inside_mp_bulk(rows, cols, sd):
    w = np.random.default_rng(1).normal(0.0, sd, size=(rows, cols))
    eigs = gram_eigs(w)
    lo, hi = mp_bulk_edges(rows=rows, cols=cols, w_var=sd**2)
    assert lo * 0.9 <= eigs.min() and eigs.max() <= hi * 1.05
    assert eigs.min() <= lo * 1.1 and eigs.max() >= hi * 0.95       # and it fills the bulk
    # the ESD follows the density: empirical CDF vs integrated density at a few points
    for q in (0.1, 0.5, 0.9):
        v = np.quantile(eigs, q)
        cdf, _ = integrate.quad(lambda t: mp_density(t, rows=rows, cols=cols, w_var=sd**2)[()], lo, v, limit=200)
        assert cdf == pytest.approx(q, abs=0.02)


@pytest.mark.parametrize("rows, cols, w_var", [(300, 100, 1.0), (100, 300, 0.3), (256, 256, 2.0), (1000, 990, 1e-4)])
def test_mp_density_integrates_to_one(rows, cols, w_var):
    lo, hi = mp_bulk_edges(rows=rows, cols=cols, w_var=w_var)
    total, _ = integrate.quad(lambda t: mp_density(t, rows=rows, cols=cols, w_var=w_var)[()], lo, hi, limit=500)
    assert total == pytest.approx(1.0, abs=2e-3)
    assert mp_density([lo * 0.5, hi * 1.5, -1.0], rows=rows, cols=cols, w_var=w_var).tolist() == [0.0, 0.0, 0.0]


def test_mp_edges_are_n_times_the_normalised_edges():
    N, M, s2 = 900, 100, 0.7
    lo, hi = mp_bulk_edges(rows=M, cols=N, w_var=s2)
    Q = N / M
    assert lo == pytest.approx(N * s2 * (1 - 1 / math.sqrt(Q)) ** 2, rel=1e-12)
    assert hi == pytest.approx(N * s2 * (1 + 1 / math.sqrt(Q)) ** 2, rel=1e-12)


# --- status, histogram, validation -------------------------------------------------------------

@pytest.mark.parametrize("alpha, expected", [
    (1.5, "over-trained"), (1.999, "over-trained"), (2.0, "ok"), (4.0, "ok"), (6.0, "ok"),
    (6.001, "under-trained"), (12.0, "under-trained"),
])
def test_status_thresholds(alpha, expected):
    assert status(fit_of(alpha)) == expected


def test_status_without_fit():
    assert status(fit_power_law(np.zeros(30))) == "no fit: all eigenvalues are zero"
    assert status(fit_power_law(np.r_[np.ones(20), np.inf])) == "no fit: non-finite eigenvalues"
    inf = float("inf")
    assert status(PowerLawFit(alpha=inf, xmin=1.0, D=0.0, sigma=inf, n_tail=5)) == "no fit: alpha is not finite"
    assert no_fit_status("non-finite weights (NaN/Inf)") == "no fit: non-finite weights (NaN/Inf)"


def test_log_histogram():
    eigs = np.r_[np.zeros(5), np.random.default_rng(2).lognormal(0.0, 2.0, 1000)]
    edges, density = log_histogram(eigs, bins=40)
    assert edges.shape == (41,) and density.shape == (40,)
    ratios = edges[1:] / edges[:-1]
    np.testing.assert_allclose(ratios, ratios[0], rtol=1e-9)
    pos = eigs[eigs > 0]
    assert edges[0] == pos.min() and edges[-1] == pos.max()
    assert np.sum(density * np.diff(edges)) == pytest.approx(1.0, rel=1e-12)
    counts, _ = np.histogram(pos, bins=edges)
    np.testing.assert_allclose(density, counts / (pos.size * np.diff(edges)), rtol=1e-12)
    e0, d0 = log_histogram(np.zeros(10))
    assert e0.size == 0 and d0.size == 0


def test_bad_arguments_raise(heavy):
    _, eigs, _, fit = heavy
    with pytest.raises(ValueError, match="rows"):
        spectral_metrics(eigs, fit, rows=0, cols=120, w_var=1.0)
    with pytest.raises(ValueError, match="w_var"):
        spectral_metrics(eigs, fit, rows=300, cols=120, w_var=-1.0)
    with pytest.raises(ValueError, match="fit"):
        spectral_metrics(eigs, 2.5, rows=300, cols=120, w_var=1.0)
    with pytest.raises(ValueError, match="w_var"):
        mp_density(1.0, rows=10, cols=5, w_var=0.0)
    with pytest.raises(ValueError, match="bins"):
        log_histogram(eigs, bins=0)
