"""Issue 21, the views: Spectra with many matrices (log densities without empty bins, a linear scale
over the bulk, legends below the axis titles, exports at a fixed size and in a system font, the
fit-diagnostics caption naming the xmin of the fit shown), one eigenvalue convention named on every
Spectra/Layer-quality axis, and the first load's phases with an honest estimate (the GGUF
conversion reports progress through core's callback, so the CLI shows it too)."""
from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_model
from test_app_common import arr, figures, new_app, texts

CONVENTION = "eigenvalue λ of WᵀW"


@pytest.fixture(scope="module")
def heavy():
    """A tiny llama whose q/k matrices have heavy-tailed (Student-t, 1.5 degrees of freedom)
    elements, so their ESDs have long tails, analysed with ``peak`` and ``full``."""
    from core.analysis import analyze
    from core.models import wrap_model

    model = tiny_model("llama", seed=3)
    gen = torch.Generator().manual_seed(0)
    for layer in model.model.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
            t = torch.distributions.StudentT(1.5).sample(proj.weight.shape)
            proj.weight.data = (t * 0.02).to(torch.float32)
        layer.mlp.up_proj.weight.data = torch.randn(layer.mlp.up_proj.weight.shape, generator=gen) * 0.05
    loaded = wrap_model(model, label="heavy tiny llama")
    return {x: analyze(loaded, xmin=x, device="cpu") for x in ("peak", "full")}


def esd_traces(fig: dict) -> list[dict]:
    return [t for t in fig["data"] if t.get("line", {}).get("shape") == "hv"]


def values(trace: dict, axis: str) -> list:
    v = trace[axis]
    return [x for x in (arr(v).tolist() if isinstance(v, dict) else v)]


def test_log_scale_draws_no_empty_bins(heavy):
    at = new_app("spectra", analysis=heavy["peak"], sp_blocks=[0, 1], sp_kinds=["q", "k", "up"])
    assert not at.exception, at.exception
    traces = esd_traces(figures(at)[0])
    assert len(traces) == 6
    for t in traces:
        ys = [y for y in values(t, "y") if y is not None]
        assert ys and min(ys) > 0, (t["name"], min(ys))          # no line down to the axis (log 0)


def test_linear_scale_spans_the_bulk_and_says_what_is_beyond(heavy):
    analysis = heavy["peak"]
    at = new_app("spectra", analysis=analysis, sp_blocks=[0], sp_kinds=["q", "k"], sp_linear=True)
    assert not at.exception, at.exception
    fig = figures(at)[0]
    axis = fig["layout"]["xaxis"]
    eigs = [np.asarray(analysis.eigs[f"model.layers.0.self_attn.{k}_proj"]) for k in ("q", "k")]
    eigs = [e[e > 0] for e in eigs]
    top = max(e.max() for e in eigs)
    lo, hi = axis["range"]
    assert lo == 0 and hi < top / 3                   # not squeezed by the tail
    assert max(np.median(e) for e in eigs) / hi > 0.05   # the bulk fills more than the first few percent
    beyond = sum(int((e > hi).sum()) for e in eigs)
    assert beyond > 0 and f"{beyond} larger eigenvalues beyond the axis" in axis["title"]["text"]
    assert CONVENTION in axis["title"]["text"]
    assert "quantile" in texts(at)                    # and the caption says so


def test_fit_diagnostics_caption_states_the_xmin_of_the_fit_shown(heavy):
    analysis = heavy["peak"]
    at = new_app("spectra", analysis=analysis, sp_blocks=[0, 1], sp_kinds=["q"], sp_scan=True)
    assert not at.exception, at.exception
    table = analysis.table.set_index("name")
    caption = next(c.value for c in at.caption if "Dashed" in c.value)
    scan = figures(at)[1]
    for b in (0, 1):
        xmin = float(table.loc[f"model.layers.{b}.self_attn.q_proj", "xmin"])
        assert f"{b}.q **{xmin:.3g}**" in caption, caption
        marker = next(t for t in scan["data"] if t["name"].startswith(f"{b}.q chosen xmin"))
        assert values(marker, "x") == [xmin, xmin]
    assert "`peak`" in caption and "window" in caption
    assert "keeps the xmin with the smallest KS distance" not in caption     # not peak's rule


def test_xmin_axes_name_the_eigenvalues_and_legends_sit_below_the_axis_titles(heavy):
    at = new_app("spectra", analysis=heavy["full"], sp_blocks=[0, 1, 0], sp_kinds=["q", "k"], sp_scan=True)
    assert not at.exception, at.exception
    esd, scan = figures(at)
    for axis in ("xaxis", "xaxis2"):
        assert CONVENTION in scan["layout"][axis]["title"]["text"], scan["layout"][axis]
    for fig in (esd, scan):      # anchored to the figure's bottom edge: Plotly keeps room for it there
        legend = fig["layout"]["legend"]
        assert legend["yref"] == "container" and legend["yanchor"] == "bottom" and legend["y"] == 0


def test_chart_exports_have_a_fixed_size_and_a_font_the_export_has(heavy):
    at = new_app("spectra", analysis=heavy["peak"], sp_blocks=[0], sp_kinds=["q"])
    chart = at.get("plotly_chart")[0].proto
    options = json.loads(chart.config)["toImageButtonOptions"]
    assert options["width"] >= 1000 and options["height"] == figures(at)[0]["layout"]["height"]
    family = figures(at)[0]["layout"]["font"]["family"]
    assert "Arial" in family and "Source Sans" not in family   # the page's web font is not in the export


def test_quality_axes_name_the_eigenvalue_convention(heavy):
    at = new_app("quality", analysis=heavy["peak"], q_metric="log_spectral_norm")
    assert not at.exception, at.exception
    figs = {f["layout"]["title"]["text"]: f for f in figures(at)}
    depth = figs["log_spectral_norm against depth"]["layout"]["yaxis"]["title"]["text"]
    dist = figs["distribution of log_spectral_norm"]["layout"]["xaxis"]["title"]["text"]
    for title in (depth, dist):
        assert "eigenvalue of WᵀW" in title and "log10 λmax" in title, title


def test_home_box_names_the_phases_with_the_conversion_estimate(tmp_path, monkeypatch):
    from core.models import demo_gguf

    monkeypatch.setenv("SPECTRASCOPE_HOME", str(tmp_path))      # an empty home: nothing converted
    at = new_app()
    assert not at.exception, at.exception
    box = at.info[0].value
    assert "about 10 s on a laptop" not in box          # the old claim, 5 times too short on an empty home
    for phase in ("convert", "load", "spectra", "fits"):
        assert phase in box, box
    seconds = int(re.search(r"convert the GGUF\*\*: about (\d+) s", box).group(1))
    size_mb = demo_gguf().stat().st_size / 1e6
    assert 10 < seconds and f"{size_mb:.0f} MB" in box            # from the GGUF's size, not a constant


@pytest.mark.slow
def test_home_box_says_what_is_cached(demo, demo_analysis_full):
    at = new_app(xmin="full")
    box = at.info[0].value
    assert re.search(r"convert the GGUF\*\*: done before", box), box
    assert re.search(r"spectra[^:]*\*\*: from the disk cache", box), box


@pytest.mark.slow
def test_conversion_reports_its_phases_and_estimate_through_the_cli(tmp_path, monkeypatch, capsys):
    """`spectrascope --progress-json analyze demo` on an empty home: the conversion's steps arrive
    from the start, about every second, against an estimate from the GGUF's size; the rate it
    measured makes the next estimate."""
    from core.cli import main as cli
    from core.models import conversion_seconds, demo_gguf

    monkeypatch.setenv("SPECTRASCOPE_HOME", str(tmp_path))
    capsys.readouterr()
    start = time.perf_counter()
    assert cli(["--progress-json", "analyze", "--model", "demo", "--xmin", "mid", "--device", "cpu"]) == 0
    took = time.perf_counter() - start
    events = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    progress = [e for e in events if e["event"] == "progress"]
    convert = [e for e in progress if e["message"].startswith("convert")]
    assert progress[0] is convert[0]                       # the first report is the conversion's
    steps = {re.sub(r" \(.*", "", e["message"]) for e in convert}
    assert {"convert: reading the GGUF", "convert: reading its tokenizer", "convert: saving as safetensors"} <= steps
    ticks = [e["done"] for e in convert]
    assert len(convert) >= 0.5 * max(ticks) and ticks == sorted(ticks)    # about once a second, in order
    assert convert[-1]["message"].startswith("convert: done in") and convert[-1]["done"] == convert[-1]["total"]
    later = progress[progress.index(convert[-1]) + 1:]
    assert any(e["message"] == "eigenvalues" for e in later)           # then the analysis
    measured = convert[-1]["total"]
    assert measured <= took
    converted = next((Path(tmp_path) / "models").glob("SmolLM2*"))
    shutil.rmtree(converted)
    assert conversion_seconds(demo_gguf()) == pytest.approx(measured, abs=1.5)   # the next estimate: this rate


def test_long_chart_titles_wrap_at_words_for_narrow_windows():
    """Plotly never wraps a title: the Prune page's "perplexity against sparsity · <settings>"
    was cut at 800 px. Every chart goes through ``exports.show``, which wraps it."""
    import plotly.graph_objects as go

    from dashboard.figures import LAYOUT, TITLE_CHARS, wrap_title

    text = "perplexity against sparsity · wikitext-2 · 8×128 · BOS none · calibration c4 128×2048 seed 0"
    fig = go.Figure()
    fig.update_layout(**LAYOUT, title=text)
    lines = wrap_title(fig).layout.title.text.split("<br>")
    assert len(lines) >= 2 and all(len(line) <= TITLE_CHARS for line in lines), lines
    assert " ".join(lines).split() == text.split()                         # every word kept, in order
    assert not any(line.startswith("·") for line in lines)
    assert fig.layout.margin.t == LAYOUT["margin"]["t"] + 20 * (len(lines) - 1)   # room above the plot
    short = go.Figure().update_layout(**LAYOUT, title="alpha against depth")
    assert wrap_title(short).layout.title.text == "alpha against depth"
