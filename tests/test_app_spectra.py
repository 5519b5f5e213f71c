"""Spectra page: selection in the user's order, log/linear toggle, fit and MP overlays coloured per
matrix, readable log axes, diagnostics, table."""
from test_app_common import arr, figures, new_app, texts


def trace_names(at) -> list[str]:
    return [t.get("name", "") for t in figures(at)[0]["data"]]


def legend_entries(fig) -> list[str]:
    return [t["name"] for t in fig["data"] if t.get("showlegend", True)]


def test_selection_and_toggles_change_the_figure(demo_analysis_full):
    at = new_app("spectra", analysis=demo_analysis_full)
    assert not at.exception, at.exception
    names = trace_names(at)
    assert any("0.q ESD" in n for n in names)
    assert any("power law" in n for n in names) and any("MP" in n for n in names)
    assert figures(at)[0]["layout"]["xaxis"]["type"] == "log"
    assert len(at.dataframe[0].value) == 1

    at.multiselect(key="sp_blocks").set_value([29, 0])
    at.multiselect(key="sp_kinds").set_value(["down", "q"]).run()
    assert len(at.dataframe[0].value) == 4
    fig = figures(at)[0]
    entries = legend_entries(fig)           # one legend entry per matrix, in the order picked
    assert [e.split(" ")[0] for e in entries] == ["29.down", "29.q", "0.down", "0.q"]

    at.toggle(key="sp_linear").set_value(True).run()
    assert figures(at)[0]["layout"]["xaxis"]["type"] == "linear"
    at.toggle(key="sp_fit").set_value(False)
    at.toggle(key="sp_mp").set_value(False).run()
    names = trace_names(at)
    assert not any("power law" in n or "MP" in n for n in names)


def test_each_matrix_has_one_colour_and_one_legend_group(demo_analysis_full):
    at = new_app("spectra", analysis=demo_analysis_full, sp_blocks=[0, 1], sp_kinds=["q"])
    fig = figures(at)[0]
    for label in ("0.q", "1.q"):
        lines = [t for t in fig["data"] if t.get("legendgroup") == label]
        assert len(lines) == 5                       # ESD, fit, xmin, MP, lambda+
        assert len({t["line"]["color"] for t in lines}) == 1
        assert sum(t.get("showlegend", True) for t in lines) == 1
    colours = {t["legendgroup"]: t["line"]["color"] for t in fig["data"]}
    assert colours["0.q"] != colours["1.q"]


def test_log_axes_use_powers_of_ten(demo_analysis_full):
    at = new_app("spectra", analysis=demo_analysis_full)
    layout = figures(at)[0]["layout"]
    for axis in ("xaxis", "yaxis"):
        ax = layout[axis]
        assert ax["type"] == "log"
        assert ax.get("exponentformat") == "power" or all("×10" in t or "10" in t or t.replace(".", "").isdigit()
                                                          for t in ax["ticktext"]), ax


def test_more_than_eight_matrices_keep_the_users_order_and_name_the_rest(demo_analysis_full):
    at = new_app("spectra", analysis=demo_analysis_full, sp_blocks=[29, 3, 0], sp_kinds=["v", "q", "k"])
    assert not at.exception, at.exception
    entries = legend_entries(figures(at)[0])
    assert [e.split(" ")[0] for e in entries] == ["29.v", "29.q", "29.k", "3.v", "3.q", "3.k", "0.v", "0.q"]
    assert "not drawn: `0.k`" in texts(at)
    assert len(at.dataframe[0].value) == 9           # the table keeps every pick
    at.toggle(key="sp_scan").set_value(True).run()
    scan = figures(at)[1]
    assert [t["name"] for t in scan["data"] if t["name"].endswith(" D")] == ["29.v D", "29.q D", "29.k D", "3.v D"]
    assert "The diagnostic shows the first 4 of 9" in texts(at) and "`3.q`" in texts(at)


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


def test_chart_download_names_the_model_and_settings(demo_analysis_full):
    from dashboard.state import PAGES

    at = new_app("spectra", analysis=demo_analysis_full)
    chart = at.get("plotly_chart")[0].proto
    import json

    options = json.loads(chart.config)["toImageButtonOptions"]
    assert options["format"] == "png" and options["filename"].startswith("SmolLM2")
    assert "esd" in options["filename"] and "xmin-full" in options["filename"]
    at.session_state["fig_format"] = "svg"
    at.switch_page(PAGES["spectra"][0]).run()
    assert json.loads(at.get("plotly_chart")[0].proto.config)["toImageButtonOptions"]["format"] == "svg"


def test_empty_selection_asks_for_one(demo_analysis_full):
    at = new_app("spectra", analysis=demo_analysis_full)
    at.multiselect(key="sp_kinds").set_value([]).run()
    assert not at.exception
    assert "Pick at least one block and one kind" in at.info[0].value
