"""Learn HT-SR page: one lesson at a time, each reacting to its own controls and agreeing with theory
in the units its formula states (X = WᵀW/N)."""
import numpy as np
from test_app_common import arr, figures, new_app, texts

LESSONS = ["1 · Random matrix", "2 · Heavy tails", "3 · Spikes", "4 · Phases of training", "5 · alpha → sparsity"]


def metric(at, label):
    return next(m.value for m in at.metric if m.label == label)


def lesson(n: int, **kwargs):
    """The Learn page showing lesson ``n`` (1-5)."""
    return new_app("learn", l_lesson=LESSONS[n - 1], **kwargs)


def test_only_the_chosen_lesson_is_drawn():
    at = new_app("learn")
    assert not at.exception, at.exception
    assert len(figures(at)) == 1 and figures(at)[0]["layout"]["title"]["text"] == "Empirical spectral density"
    assert len(at.latex) == 1
    at.button_group(key="l_lesson").set_value(LESSONS[2]).run()
    assert not at.exception, at.exception
    assert [s.key for s in at.slider] == ["l_n", "l_m", "l_spike_var", "l_spike"]


def test_lesson_one_plots_in_the_units_of_its_formula():
    at = lesson(1)
    fig = figures(at)[0]
    names = [t["name"] for t in fig["data"]]
    assert names[1] == "gaussian W MP law" and not any("shuffled" in n for n in names)
    N, M, var = 800, 400, 1.0
    lam_plus = var * (1 + 1 / np.sqrt(N / M)) ** 2              # 2.914 for the defaults
    assert abs(arr(fig["data"][1]["x"]).max() / lam_plus - 1) < 0.01
    assert abs(arr(fig["data"][2]["x"])[0] - lam_plus) < 1e-9     # the λ+ marker
    assert f"{lam_plus:.4g}" in texts(at)
    assert fig["layout"]["xaxis"]["title"]["text"] == "eigenvalue λ of X = WᵀW/N"


def test_variance_moves_the_marchenko_pastur_edge():
    at = lesson(1)
    x_before = arr(figures(at)[0]["data"][1]["x"]).max()      # MP curve
    at.slider(key="l_var").set_value(2.0).run()
    x_after = arr(figures(at)[0]["data"][1]["x"]).max()
    assert abs(x_after / x_before - 2.0) < 0.05


def test_heavy_tails_fit_alpha_near_theory():
    at = lesson(2)
    at.slider(key="l_mu").set_value(1.0).run()
    fitted, theory = float(metric(at, "fitted alpha")), float(metric(at, "theory 1 + μ/2"))
    assert theory == 1.5 and abs(fitted - theory) < 0.5
    at.slider(key="l_mu").set_value(1.8).run()
    assert float(metric(at, "fitted alpha")) > fitted
    assert not any("means little" in i.value for i in at.info)
    at.slider(key="l_mu").set_value(4.4).run()
    assert any("means little" in i.value for i in at.info)


def test_spike_separates_above_threshold_with_its_own_variance():
    at = lesson(3)
    at.slider(key="l_spike").set_value(0.5).run()
    edge = float(metric(at, "bulk edge λ+"))
    assert abs(edge - (1 + 1 / np.sqrt(2)) ** 2) < 1e-3          # X units, sigma² = 1
    assert float(metric(at, "largest eigenvalue")) < 1.1 * edge
    at.slider(key="l_spike").set_value(2.5).run()
    top, predicted = float(metric(at, "largest eigenvalue")), float(metric(at, "prediction"))
    assert top > 1.3 * edge and abs(top / predicted - 1) < 0.1
    at.slider(key="l_spike_var").set_value(2.0).run()
    assert abs(float(metric(at, "bulk edge λ+")) / edge - 2.0) < 1e-3
    top, predicted = float(metric(at, "largest eigenvalue")), float(metric(at, "prediction"))
    assert abs(top / predicted - 1) < 0.1                       # the spike formula at sigma² = 2
    assert at.session_state["l_var"] == 1.0                     # lesson 1's slider is another one


def test_phases_show_six_named_synthetic_examples_then_real_layers(demo_analysis_full):
    at = lesson(4, analysis=demo_analysis_full)
    assert not at.exception, at.exception
    phases = figures(at)[0]
    titles = [a["text"] for a in phases["layout"]["annotations"]]
    for name in ("random-like", "bleeding-out", "bulk + spikes", "bulk-decay", "heavy-tailed", "rank-collapse"):
        assert sum(name in t for t in titles) == 1, name
    assert len(phases["data"]) == 6 and len(figures(at)) == 1
    at.toggle(key="l_phase_real").set_value(True).run()
    layers = figures(at)[1]
    legend = [t["name"] for t in layers["data"] if t.get("showlegend", True)]
    assert len(legend) == 3 and legend[0].startswith("most random-like") and "SmolLM2" in layers["layout"]["title"]["text"]


def test_allocation_lesson_names_the_cap_and_draws_no_block_labels():
    at = lesson(5)
    assert not at.exception, at.exception
    assert "r_max = 0.99" in texts(at)
    fig = figures(at)[0]
    assert fig["data"][0]["mode"] == "markers"
    at.slider(key="l_S").set_value(0.8).run()
    assert not at.exception
    ratios = arr(figures(at)[0]["data"][0]["y"])
    assert ratios.max() <= 0.99 + 1e-9


def test_lesson_and_sliders_survive_a_page_switch():
    at = lesson(2)
    at.slider(key="l_mu").set_value(3.0).run()
    at.switch_page("pages/home.py").run()
    at.switch_page("pages/learn.py").run()
    assert not at.exception, at.exception
    assert at.button_group(key="l_lesson").value == LESSONS[1]
    assert at.slider(key="l_mu").value == 3.0
    at.button_group(key="l_lesson").set_value(LESSONS[4]).run()
    at.slider(key="l_eps").set_value(0.5).run()
    at.switch_page("pages/spectra.py").run()
    at.switch_page("pages/learn.py").run()
    assert at.slider(key="l_eps").value == 0.5



def test_only_the_shown_lesson_decomposes_and_variance_needs_no_new_spectrum(monkeypatch):
    """Counts the engine's eigendecompositions (the real function, wrapped): hidden lessons compute
    nothing, and a noise variance rescales the cached spectrum of the unit-variance matrix."""
    import core.spectra
    import streamlit as st

    shapes = []
    real = core.spectra.eigenvalues

    def counted(w, **kwargs):
        shapes.append(tuple(np.shape(w)))
        return real(w, **kwargs)

    monkeypatch.setattr(core.spectra, "eigenvalues", counted)
    st.cache_data.clear()
    at = lesson(5)                                              # alpha -> sparsity: no synthetic matrix
    assert not at.exception and shapes == []
    at.button_group(key="l_lesson").set_value(LESSONS[0]).run()
    assert shapes == [(800, 400)]
    at.slider(key="l_var").set_value(2.0).run()
    assert shapes == [(800, 400)]
    at.button_group(key="l_lesson").set_value(LESSONS[2]).run()   # the spike matrix, lesson 1's not again
    at.slider(key="l_spike_var").set_value(2.0).run()
    assert shapes == [(800, 400)] * 2
    at.slider(key="l_spike").set_value(2.5).run()
    assert shapes == [(800, 400)] * 3
    at.button_group(key="l_lesson").set_value(LESSONS[3]).run()   # six 500 x 250 phase examples
    at.button_group(key="l_lesson").set_value(LESSONS[4]).run()
    assert not at.exception and shapes == [(800, 400)] * 3 + [(500, 250)] * 6
