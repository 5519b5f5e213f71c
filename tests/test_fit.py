"""Tests of core.fit: parity with powerlaw, the xmin rules against loop-based references
written here, statistical recovery of a known exponent, input problems, batching."""
from __future__ import annotations

import functools
import logging
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from core.fit import XMIN_METHODS, PowerLawFit, fit_power_law, fit_power_laws, xmin_scan

powerlaw = pytest.importorskip("powerlaw")


# --- spectra ------------------------------------------------------------------------------

def pareto(alpha: float, n: int, seed: int) -> np.ndarray:
    """Classical Pareto samples with density ~ x**-alpha for x >= 1."""
    return np.sort(np.random.default_rng(seed).pareto(alpha - 1.0, size=n) + 1.0)


def gram_eigs(w: np.ndarray) -> np.ndarray:
    """Eigenvalues of the smaller Gram matrix of w (no normalisation), ascending."""
    g = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T
    return np.linalg.eigvalsh(g)


def mp_spectrum(seed: int = 1) -> np.ndarray:
    return gram_eigs(np.random.default_rng(seed).standard_normal((400, 200)))


def student_spectrum(seed: int = 2, df: float = 3.0, shape=(400, 200)) -> np.ndarray:
    return gram_eigs(np.random.default_rng(seed).standard_t(df, size=shape))


SPECTRA = {
    "pareto": lambda: pareto(2.5, 300, seed=0),
    "marchenko-pastur": mp_spectrum,
    "student-t": student_spectrum,
    "ties": lambda: np.round(pareto(3.0, 300, seed=3), 2),
    "null-space": lambda: np.concatenate([np.zeros(25), pareto(2.0, 200, seed=4)]),
    "no-valid-alpha": lambda: np.sort(1.0 + 1e-5 * np.random.default_rng(5).random(40)),
}


def powerlaw_fit(x: np.ndarray):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return powerlaw.Fit(x, parameter_ranges={"alpha": [1, 1000]}, verbose=False)


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


# --- loop-based references of the rules ---------------------------------------------------

def ref_at(x: np.ndarray, xmin: float) -> tuple[float, float, int]:
    """powerlaw-style (alpha, D, n_tail) for one xmin: Hill MLE and the KS distance over the
    tail's unique values, empirical CDF of all data re-normalised to the tail."""
    n = x.size
    i = int(np.searchsorted(x, xmin, side="left"))
    tail = x[i:]
    alpha = 1.0 + tail.size / np.sum(np.log(tail / xmin))
    D = 0.0
    for v in np.unique(tail):
        k = int(np.searchsorted(x, v, side="left"))
        C = (k / n - i / n) / (1.0 - i / n)
        T = 1.0 - (v / xmin) ** (1.0 - alpha)
        D = max(D, abs(T - C))
    return alpha, D, tail.size


def ref_peak_value(x: np.ndarray) -> float:
    counts, edges = np.histogram(np.log10(x), bins=100)
    return 10.0 ** edges[np.argmax(counts)]


def ref_candidates(x: np.ndarray) -> np.ndarray:
    # what powerlaw.Fit scans (checked against xmin_fitting_results below)
    return np.unique(x[x < x.max()])[:-1]


def ref_select(x: np.ndarray, xmins) -> tuple[float, float, float]:
    best = None
    for xmin in xmins:
        alpha, D, _ = ref_at(x, xmin)
        if 1.01 <= alpha <= 999.99 and (best is None or D < best[2]):
            best = (alpha, xmin, D)
    return best


def ref_peak(x: np.ndarray) -> tuple[float, float, float]:
    p = ref_peak_value(x)
    return ref_select(x, [c for c in ref_candidates(x) if 0.95 * p <= c <= 1.5 * p])


def ref_peak_compat(x: np.ndarray) -> tuple[float, float, float]:
    """The published AlphaPruning loop, written out: positions, duplicates kept, the lower
    bound of the window in log units."""
    p = ref_peak_value(x)
    lo, hi = math.log10(0.95 * p), 1.5 * p
    n = x.size
    best = None
    for i in range(n - 1):
        if not (lo <= x[i] <= hi):
            continue
        m = n - i
        alpha = 1.0 + m / (np.sum(np.log(x[i:])) - m * np.log(x[i]))
        D = 1.0
        if alpha > 1:
            k = np.arange(m)
            D = np.max(np.abs(1.0 - (x[i:] / x[i]) ** (1.0 - alpha) - k / m))
        if best is None or D < best[2]:
            best = (alpha, x[i], D)
    return best


def ref_mid(x: np.ndarray) -> tuple[float, float, float]:
    xmin = x[x.size // 2]
    alpha, D, _ = ref_at(x, xmin)
    return alpha, xmin, D


def positive(eigs: np.ndarray) -> np.ndarray:
    return np.sort(eigs[eigs > 0])


# --- full == powerlaw ----------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SPECTRA))
def test_full_matches_powerlaw(name):
    eigs = SPECTRA[name]()
    ref = powerlaw_fit(positive(eigs))
    fit = fit_power_law(eigs, xmin="full")
    assert fit.ok, fit
    assert rel(fit.alpha, ref.alpha) < 1e-6
    assert rel(fit.xmin, ref.xmin) < 1e-12
    assert rel(fit.D, ref.D) < 1e-6
    assert fit.n_tail == int(ref.n_tail)
    assert fit.sigma == pytest.approx((fit.alpha - 1) / math.sqrt(fit.n_tail), rel=1e-12)


def test_xmin_scan_matches_powerlaw_scan():
    eigs = SPECTRA["ties"]()
    res = powerlaw_fit(eigs).xmin_fitting_results
    scan = xmin_scan(eigs)
    assert list(scan.columns) == ["xmin", "alpha", "D", "valid"]
    np.testing.assert_array_equal(scan["xmin"].to_numpy(), res["xmins"])
    np.testing.assert_allclose(scan["alpha"].to_numpy(), res["alphas"], rtol=1e-10)
    np.testing.assert_allclose(scan["D"].to_numpy(), res["distances"], rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(scan["valid"].to_numpy(), res["valid_fits"])


def test_candidates_are_what_powerlaw_scans():
    x = positive(student_spectrum(seed=7, shape=(120, 60)))
    res = powerlaw_fit(x).xmin_fitting_results
    np.testing.assert_array_equal(ref_candidates(x), res["xmins"])
    np.testing.assert_array_equal(xmin_scan(x)["xmin"].to_numpy(), res["xmins"])


def test_xmin_scan_empty_without_fit():
    scan = xmin_scan(np.zeros(20))
    assert scan.empty and list(scan.columns) == ["xmin", "alpha", "D", "valid"]


def test_alpha_exact_against_direct_sum():
    # five decades, a tight cluster of 3000 near-ties and far outliers on top: the suffix
    # sums must not lose digits (a plain cumulative sum of ln(x) is off by ~3e-12 here)
    rng = np.random.default_rng(11)
    x = np.sort(np.concatenate([10 ** rng.uniform(-3, 2, 300), 1e3 * (1 + 1e-6 * rng.random(3000)),
                                [1e6, 2e6, 3e6]]))
    scan = xmin_scan(x)
    direct = np.array([1 + np.sum(x >= v) / np.sum(np.log(x[x >= v] / v)) for v in scan["xmin"]])
    direct = np.minimum(direct, 1000.0)   # powerlaw's optimiser stops at its upper bound
    np.testing.assert_allclose(scan["alpha"].to_numpy(), direct, rtol=1e-12)


# --- pruned scan == exhaustive scan ----------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(10, 400),
       alpha=st.floats(1.3, 8.0), decimals=st.sampled_from([None, 1, 2]))
def test_full_equals_exhaustive_scan(seed, n, alpha, decimals):
    x = pareto(alpha, n, seed)
    if decimals is not None:
        x = np.round(x, decimals)
    fit = fit_power_law(x, xmin="full")
    scan = xmin_scan(x)
    if len(scan) < 2:
        assert not fit.ok and fit.reason == "no candidate xmin"
        return
    pool = scan[scan["valid"]] if scan["valid"].any() else scan
    best = pool.loc[pool["D"].idxmin()]
    assert fit.xmin == best["xmin"]
    assert fit.alpha == pytest.approx(best["alpha"], rel=1e-12)
    assert fit.D == pytest.approx(best["D"], rel=1e-12, abs=1e-15)


# --- the other rules against the references --------------------------------------------------

def three_way_spectrum() -> np.ndarray:
    # an MP bulk between ~40 and ~1500: log10(0.95 p) ~ 3 lets peak-compat scan the whole
    # bulk below the peak p, where it finds a smaller D than inside [0.95 p, 1.5 p]
    return gram_eigs(np.random.default_rng(0).standard_normal((500, 250)))


def test_methods_differ_and_follow_their_rules():
    eigs = three_way_spectrum()
    x = positive(eigs)
    fits = {m: fit_power_law(eigs, xmin=m) for m in ("peak", "peak-compat", "mid")}
    refs = {"peak": ref_peak(x), "peak-compat": ref_peak_compat(x), "mid": ref_mid(x)}
    p = ref_peak_value(x)
    assert math.log10(0.95 * p) < x.min() < 0.95 * p        # the compat window is wider here
    for m, fit in fits.items():
        alpha, xmin, D = refs[m]
        assert fit.ok, (m, fit)
        assert fit.xmin == xmin, m
        assert fit.alpha == pytest.approx(alpha, rel=1e-10), m
        assert fit.D == pytest.approx(D, rel=1e-9), m
    assert len({f.xmin for f in fits.values()}) == 3
    assert fits["peak-compat"].xmin < 0.95 * p <= fits["peak"].xmin <= 1.5 * p


def test_peak_compat_keeps_duplicates_and_peak_falls_back_to_full(caplog):
    # the fullest bin holds only the top values, which are no powerlaw candidates
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0] + [1e10] * 8 + [2e10])
    with caplog.at_level(logging.INFO, logger="core.fit"):
        peak = fit_power_law(x, xmin="peak")
    assert "falling back to 'full'" in caplog.text
    full = fit_power_law(x, xmin="full")
    assert peak == full
    alpha, xmin, D = ref_select(x, ref_candidates(x))
    assert full.xmin == xmin and full.alpha == pytest.approx(alpha, rel=1e-12)
    compat = fit_power_law(x, xmin="peak-compat")
    alpha, xmin, D = ref_peak_compat(x)
    assert compat.xmin == xmin == 1e10
    assert compat.alpha == pytest.approx(alpha, rel=1e-12)
    assert compat.D == pytest.approx(D, rel=1e-12)


def test_peak_matches_reference_on_student_spectra():
    for seed in (21, 22):
        eigs = student_spectrum(seed=seed, df=3.5, shape=(576, 192))
        alpha, xmin, D = ref_peak(positive(eigs))
        fit = fit_power_law(eigs)   # the default is peak
        assert fit.xmin == xmin and fit.alpha == pytest.approx(alpha, rel=1e-10)
        assert fit.D == pytest.approx(D, rel=1e-9)


# --- statistics ---------------------------------------------------------------------------

@pytest.mark.parametrize("true_alpha", [2.0, 3.5])
def test_alpha_recovered_for_pareto(true_alpha):
    for seed in range(2):
        x = pareto(true_alpha, 2000, seed=100 + seed)
        for method in ("full", "mid"):
            fit = fit_power_law(x, xmin=method)
            assert abs(fit.alpha - true_alpha) < 4 * fit.sigma + 0.02, (method, seed, fit)
            if method == "mid":
                assert fit.n_tail == x.size - x.size // 2      # continuous data: no ties
            else:
                assert fit.n_tail >= 100


# --- input problems -------------------------------------------------------------------------

@pytest.mark.parametrize("eigs, reason", [
    (np.r_[np.ones(20), np.nan], "non-finite eigenvalues"),
    (np.r_[np.arange(1.0, 21.0), np.inf], "non-finite eigenvalues"),
    (np.zeros(50), "all eigenvalues are zero"),
    (np.r_[np.zeros(40), np.arange(1.0, 10.0)], "fewer than 10 positive eigenvalues"),
    (np.full(30, 2.0), "no candidate xmin"),
    (np.r_[np.ones(20), np.full(10, 2.0), 3.0], "no candidate xmin"),
])
@pytest.mark.parametrize("method", XMIN_METHODS)
def test_input_problems_give_reasons(eigs, reason, method):
    fit = fit_power_law(eigs, xmin=method)
    assert isinstance(fit, PowerLawFit)
    assert not fit.ok and fit.reason == reason
    assert math.isnan(fit.alpha) and math.isnan(fit.D) and fit.n_tail == 0


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="xmin"):
        fit_power_law(np.arange(1.0, 30.0), xmin="median")
    with pytest.raises(ValueError, match="eigs"):
        fit_power_law(np.ones((5, 5)))
    with pytest.raises(ValueError, match="spectra"):
        fit_power_laws(np.arange(1.0, 30.0))


def test_order_and_tensor_input_do_not_matter():
    eigs = student_spectrum(seed=30, shape=(300, 150))
    shuffled = np.random.default_rng(0).permutation(eigs)
    a = fit_power_law(eigs, xmin="full")
    assert fit_power_law(shuffled, xmin="full") == a
    assert fit_power_law(torch.from_numpy(eigs), xmin="full") == a


# --- batching -------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def mixed_spectra() -> tuple[np.ndarray, ...]:
    out = [student_spectrum(seed=s, shape=(400, 200)) for s in range(40, 44)]
    out += [gram_eigs(np.random.default_rng(s).standard_normal((300, 120))) for s in range(3)]
    out += [np.r_[np.zeros(80), student_spectrum(seed=50, shape=(240, 120))]]   # 120 positive
    out += [np.zeros(10), np.r_[np.ones(5), np.nan], three_way_spectrum()]
    return tuple(out)


@pytest.mark.parametrize("method", XMIN_METHODS)
def test_batched_equals_one_by_one(method):
    spectra = mixed_spectra()
    batched = fit_power_laws(spectra, xmin=method)
    assert len(batched) == len(spectra)
    for eigs, got in zip(spectra, batched):
        one = fit_power_law(eigs, xmin=method)
        assert got.reason == one.reason
        if one.ok:
            assert got.xmin == one.xmin and got.n_tail == one.n_tail
            assert got.alpha == pytest.approx(one.alpha, rel=1e-12)
            assert got.D == pytest.approx(one.D, rel=1e-12)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", XMIN_METHODS)
def test_cuda_equals_cpu(method):
    spectra = mixed_spectra()
    for a, b in zip(fit_power_laws(spectra, xmin=method, device="cuda"),
                    fit_power_laws(spectra, xmin=method, device="cpu")):
        assert a.reason == b.reason
        if a.ok:
            assert a.xmin == b.xmin
            assert a.alpha == pytest.approx(b.alpha, rel=1e-12)
            assert a.D == pytest.approx(b.D, rel=1e-10)


@pytest.mark.parametrize("method", ["full", "peak-compat"])
def test_chunking_does_not_change_results(method, monkeypatch):
    import core.fit_kernels

    spectra = mixed_spectra()
    reference = fit_power_laws(spectra, xmin=method)
    monkeypatch.setattr(core.fit_kernels, "CPU_CHUNK_BYTES", 8 * 700)   # a row or two per chunk
    for a, b in zip(fit_power_laws(spectra, xmin=method), reference):
        assert a.reason == b.reason
        if a.ok:
            assert a.xmin == b.xmin
            assert a.alpha == pytest.approx(b.alpha, rel=1e-12)
            assert a.D == pytest.approx(b.D, rel=1e-12)
