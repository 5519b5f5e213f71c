"""Spectra page: selection, log/linear toggle, fit and MP overlays, diagnostics, table."""
from test_app_common import arr, figures, new_app


def trace_names(at) -> list[str]:
    return [t.get("name", "") for t in figures(at)[0]["data"]]


def test_selection_and_toggles_change_the_figure(demo_analysis_full):
    at = new_app("spectra", analysis=demo_analysis_full)
    assert not at.exception, at.exception
    names = trace_names(at)
    assert any("0.q ESD" in n for n in names)
    assert any("power law" in n for n in names) and any("MP" in n for n in names)
    assert figures(at)[0]["layout"]["xaxis"]["type"] == "log"
    assert len(at.dataframe[0].value) == 1

    at.multiselect(key="sp_blocks").set_value([0, 29])
    at.multiselect(key="sp_kinds").set_value(["q", "down"]).run()
    assert len(at.dataframe[0].value) == 4
    assert sum("ESD" in n for n in trace_names(at)) == 4

    at.toggle(key="sp_linear").set_value(True).run()
    assert figures(at)[0]["layout"]["xaxis"]["type"] == "linear"
    at.toggle(key="sp_fit").set_value(False)
    at.toggle(key="sp_mp").set_value(False).run()
    names = trace_names(at)
    assert not any("power law" in n or "MP" in n for n in names)


def test_fit_diagnostics_plot_d_and_alpha_against_xmin(demo_analysis_full):
    at = new_app("spectra", analysis=demo_analysis_full)
    assert len(figures(at)) == 1
    at.toggle(key="sp_scan").set_value(True).run()
    scan = figures(at)[1]
    names = [t["name"] for t in scan["data"]]
    xmin = float(demo_analysis_full.table.set_index("name").loc["model.layers.0.self_attn.q_proj", "xmin"])
    assert names == ["0.q D", "0.q alpha", f"0.q chosen xmin {xmin:.3g}", f"0.q chosen xmin {xmin:.3g}"]
    assert len(arr(scan["data"][0]["x"])) > 10
    # the chosen-xmin marker stands at the fitted xmin, in data units (log axis or not)
    assert list(arr(scan["data"][2]["x"])) == [xmin, xmin]


def test_empty_selection_asks_for_one(demo_analysis_full):
    at = new_app("spectra", analysis=demo_analysis_full)
    at.multiselect(key="sp_kinds").set_value([]).run()
    assert not at.exception
    assert "Pick at least one block and one kind" in at.info[0].value
