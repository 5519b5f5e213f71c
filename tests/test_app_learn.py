"""Learn HT-SR page: every lesson reacts to its sliders and agrees with theory."""
from test_app_common import arr, figures, new_app


def metric(at, label):
    return next(m.value for m in at.metric if m.label == label)


def test_lessons_without_a_model():
    at = new_app("learn")
    assert not at.exception, at.exception
    assert any("Load a model" in i.value for i in at.info)
    assert len(at.latex) >= 4


def test_variance_moves_the_marchenko_pastur_edge():
    at = new_app("learn")
    x_before = arr(figures(at)[0]["data"][1]["x"]).max()      # MP curve
    at.slider(key="l_var").set_value(2.0).run()
    x_after = arr(figures(at)[0]["data"][1]["x"]).max()
    assert abs(x_after / x_before - 2.0) < 0.05


def test_heavy_tails_fit_alpha_near_theory():
    at = new_app("learn")
    at.slider(key="l_mu").set_value(1.0).run()
    fitted, theory = float(metric(at, "fitted alpha")), float(metric(at, "theory 1 + μ/2"))
    assert theory == 1.5 and abs(fitted - theory) < 0.5
    at.slider(key="l_mu").set_value(1.8).run()
    assert float(metric(at, "fitted alpha")) > fitted


def test_spike_separates_above_threshold():
    at = new_app("learn")
    at.slider(key="l_spike").set_value(0.5).run()
    edge = float(metric(at, "bulk edge λ+"))
    assert float(metric(at, "largest eigenvalue")) < 1.1 * edge
    at.slider(key="l_spike").set_value(2.5).run()
    top, predicted = float(metric(at, "largest eigenvalue")), float(metric(at, "prediction"))
    assert top > 1.3 * edge and abs(top / predicted - 1) < 0.1


def test_phases_use_the_loaded_models_layers(demo_analysis_full):
    at = new_app("learn", analysis=demo_analysis_full)
    assert not at.exception, at.exception
    titles = [f["layout"]["title"]["text"] for f in figures(at)]
    assert any(t.startswith("most heavy-tailed") for t in titles)
    assert any("SmolLM2" in t for t in titles)
