"""Learn HT-SR page: one lesson at a time, each reacting to its own controls and agreeing with theory
in the app's one convention: eigenvalues of WᵀW (no 1/N, as Spectra and the reference tools), named
on every axis."""
import re

import numpy as np
import pytest
from test_app_common import arr, figures, new_app, texts

LESSONS = ["1 · Random matrix", "2 · Heavy tails", "3 · Spikes", "4 · Phases of training", "5 · alpha → sparsity",
           "6 · Watch a network learn"]
EIG_AXIS = "eigenvalue λ of WᵀW"


def metric(at, label):
    return next(m.value for m in at.metric if m.label == label)


def lesson(n: int, **kwargs):
    """The Learn page showing lesson ``n`` (1-6)."""
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
    lam_plus = var * (np.sqrt(N) + np.sqrt(M)) ** 2             # 2331 for the defaults (WᵀW, no 1/N)
    assert abs(arr(fig["data"][1]["x"]).max() / lam_plus - 1) < 0.01
    assert abs(arr(fig["data"][2]["x"])[0] - lam_plus) < 1e-6     # the λ+ marker
    assert f"{lam_plus:.4g}" in texts(at)
    assert fig["layout"]["xaxis"]["title"]["text"] == EIG_AXIS


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
    assert abs(edge / (np.sqrt(800) + np.sqrt(400)) ** 2 - 1) < 1e-3   # WᵀW units, sigma² = 1
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
    assert len([t for t in phases["data"] if t.get("legendgroup") != "edge"]) == 6 and len(figures(at)) == 1
    at.toggle(key="l_phase_real").set_value(True).run()
    layers = figures(at)[1]
    legend = [t["name"] for t in layers["data"] if t.get("showlegend", True)]
    assert len(legend) == 3 and legend[0].startswith("most random-like") and "SmolLM2" in layers["layout"]["title"]["text"]
    assert all(name.count("α=") == 1 for name in legend), legend          # not "α=18.31 (α=18.31)"
    # step 2 is in the units of step 1: both name WᵀW, and the real layers' eigenvalues are not divided
    assert layers["layout"]["xaxis"]["title"]["text"] == EIG_AXIS
    assert EIG_AXIS in {a["layout"][k]["title"]["text"] for a in [phases] for k in a["layout"]
                        if k.startswith("xaxis") and "title" in a["layout"][k]}
    top = np.nanmax(arr(layers["data"][0]["x"]))
    name = next(r["name"] for _, r in demo_analysis_full.table.iterrows() if legend[0].endswith(
        f"{r['block']}.{r['kind']} (α={r['alpha']:.2f})"))
    assert abs(top / demo_analysis_full.eigs[name].max() - 1) < 1e-9


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


def test_every_spectrum_axis_names_eigenvalues_of_wtw():
    at = lesson(1)
    for n in (1, 2, 3):
        at.button_group(key="l_lesson").set_value(LESSONS[n - 1]).run()
        assert not at.exception, at.exception
        assert figures(at)[0]["layout"]["xaxis"]["title"]["text"] == EIG_AXIS, n
    shown = texts(at) + " ".join(x.value for x in at.latex)
    assert "WᵀW/N" not in shown and "W^\\top W / N" not in shown and "X = W" not in shown


def test_phase_plots_draw_the_mp_edge_and_bleeding_out_crosses_it():
    at = lesson(4)
    fig = figures(at)[0]
    esds = [t for t in fig["data"] if t.get("legendgroup") != "edge"]
    edges = [t for t in fig["data"] if t.get("legendgroup") == "edge"]
    assert len(edges) == 6                                       # one λ+ line per phase
    by_axis = {t.get("xaxis", "x"): t for t in esds}
    lam = {t.get("xaxis", "x"): arr(t["x"])[0] for t in edges}
    random_like, bleeding = by_axis["x"], by_axis["x2"]
    assert arr(random_like["x"]).max() < 1.05 * lam["x"]         # MP: nothing past the edge
    past = arr(bleeding["x"])[arr(bleeding["x"]) > 1.05 * lam["x2"]]
    assert 1 <= past.size and past.max() < 3 * lam["x2"]         # a few, just past λ+


@pytest.mark.parametrize("mus", [(0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0)])
def test_heavy_tails_alpha_grows_with_mu_through_the_three_regimes(mus):
    at = lesson(2)
    alphas = []
    for mu in mus:
        at.slider(key="l_mu").set_value(mu).run()
        assert not at.exception, at.exception
        alphas.append(float(metric(at, "fitted alpha")))
    assert all(b >= a - 0.05 for a, b in zip(alphas, alphas[1:])), alphas    # smaller μ, smaller alpha
    assert alphas[-1] - alphas[-3] < 0.5                          # μ > 4: MP, alpha no longer follows μ
    assert "xmin" in texts(at) and "regime" in texts(at)


def glyphs(tex: str) -> int:
    """About how many glyphs a line of TeX renders to: a fraction counts its longer part, a command
    one glyph (min, max... their letters), an operator two (its spacing), braces, script markers
    and thin spaces nothing."""
    tex = re.sub(r"\\text\{([^{}]*)\}", r"\1", tex)
    while "\\frac" in tex:
        i = tex.rindex("\\frac")
        parts, j = [], i + 5
        for _ in range(2):                       # two balanced groups
            depth, k = 0, j
            while True:
                depth += {"{": 1, "}": -1}.get(tex[k], 0)
                k += 1
                if depth == 0:
                    break
            parts.append(tex[j + 1:k - 1])
            j = k
        tex = tex[:i] + max(parts, key=lambda p: glyphs(p)) + tex[j:]
    tex = re.sub(r"\\(qquad|quad)", "    ", tex)
    tex = re.sub(r"\\(min|max|log|exp)\b", lambda m: m.group(1), tex)
    tex = re.sub(r"=|<|>|\+|-|\\pm|\\approx|\\le|\\ge", lambda m: m.group(0) + " o", tex)   # spaced operators
    tex = re.sub(r"\\[,!; ]|\\(left|right|Big|big)", "", tex)
    tex = re.sub(r"\\[A-Za-z]+", "x", tex)
    return len(re.sub(r"[{}^_$\s]", "", tex))


def test_formulas_are_written_in_short_lines_for_narrow_screens():
    """At 800 px (sidebar open) about 500 px are left: no displayed formula line may be wider than
    that (KaTeX does not wrap): at most about 42 glyphs per line."""
    at = lesson(1)
    for n in range(1, 7):
        at.button_group(key="l_lesson").set_value(LESSONS[n - 1]).run()
        for block in at.latex:
            for line in re.sub(r"\\(begin|end)\{gathered\}", "", block.value).split("\\\\"):
                assert glyphs(line) <= 42, (n, line, glyphs(line))


def train_fast(at, **knobs):
    for key, value in {"l_steps": 300, **knobs}.items():
        at.select_slider(key=key).set_value(value).run()
    at.button(key="l_train").click().run()
    assert not at.exception, at.exception
    return at


def test_watch_a_network_learn_trains_and_shows_alpha_fall_beside_accuracy():
    at = lesson(6, timeout=120)
    assert not at.exception, at.exception
    assert not figures(at)                                       # nothing trained yet
    train_fast(at)
    esd, curves = figures(at)
    assert esd["layout"]["xaxis"]["title"]["text"] == EIG_AXIS and esd["layout"]["xaxis"]["type"] == "log"
    names = [t["name"] for t in esd["data"]]
    assert names[0].startswith("step 0 (α=") and any("λ+ of the initial matrix" in n for n in names)
    alpha, acc = arr(curves["data"][0]["y"]), arr(curves["data"][1]["y"])
    assert alpha[0] > 5 and alpha[-1] < alpha[0] - 2              # from the MP bulk toward a heavy tail
    assert acc[-1] > acc[0] + 0.3
    assert "alpha" in texts(at) and len(at.session_state["l_runs"]) == 1


def test_a_second_setting_is_overlaid_and_the_knob_shows():
    at = train_fast(lesson(6, timeout=120))
    train_fast(at, l_lr=0.5)
    curves = figures(at)[1]
    runs = {t["name"] for t in curves["data"] if t.get("showlegend", True) and "lr" in t["name"]}
    assert runs == {"lr 0.5 · batch 16 · noise 0% · 300 steps", "lr 0.1 · batch 16 · noise 0% · 300 steps"}
    hot, good = (arr(t["y"]) for t in curves["data"][:3:2])       # alpha traces, newest first
    assert hot[-1] < good[-1]
    train_fast(at, l_lr=0.1)                                      # the same setting again: no new run
    assert len(at.session_state["l_runs"]) == 2
