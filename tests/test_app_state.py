"""Session state of the dashboard (issue 21): the work is kept in the page's address, so that a
reload (a new session) or a shared link restores the model from the disk caches and every page's
settings; a page that needs a model and has none says so; one state mechanism (every session key
declared in ``dashboard.state.State``)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import saved_tiny
from test_app_common import ROOT, new_app, texts


def reload(at, page: str | None = None):
    """What F5 (or opening a shared link) does: a new session with the page's query string."""
    from streamlit.testing.v1 import AppTest

    from dashboard.state import PAGES

    fresh = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    fresh.query_params = dict(at.query_params)
    if page is not None and page != "home":
        fresh.switch_page(PAGES[page][0])
    return fresh.run()


@pytest.fixture(scope="module")
def analysed_folder():
    """A tiny model saved in a folder, its analysis (xmin full) in the disk cache."""
    from core.analysis import analyze

    folder = saved_tiny("llama")
    analyze(str(folder), xmin="full", device="cpu")
    return folder


def load_on_home(folder: Path, xmin: str = "full"):
    at = new_app("home")
    at.text_input(key="source").set_value(str(folder))
    at.selectbox(key="xmin").set_value(xmin)
    at.button[0].click().run()
    assert not at.exception, at.exception
    assert at.session_state["analysis"] is not None, texts(at)
    return at


def test_a_reload_keeps_the_model_and_the_allocation_settings(analysed_folder):
    at = load_on_home(analysed_folder)
    identity = at.session_state["analysis"].identity
    at.switch_page("pages/allocation.py").run()
    at.slider(key="a_sparsity").set_value(0.55).run()
    at.slider(key="a_epsilon").set_value(0.2).run()
    at.radio(key="a_mapping").set_value("matrix").run()
    assert not at.exception, at.exception
    again = reload(at, "allocation")
    assert not again.exception, again.exception
    analysis = again.session_state["analysis"]
    assert analysis is not None and analysis.identity == identity and analysis.xmin == "full"
    assert again.session_state["loaded"] is not None
    assert again.selectbox(key="a_source").value == "loaded model"
    assert again.slider(key="a_sparsity").value == pytest.approx(0.55)
    assert again.slider(key="a_epsilon").value == pytest.approx(0.2)
    assert again.radio(key="a_mapping").value == "matrix"


def test_settings_of_every_page_reach_the_address_and_survive_page_switches(analysed_folder):
    at = load_on_home(analysed_folder)
    at.switch_page("pages/spectra.py").run()
    at.multiselect(key="sp_blocks").set_value([1, 0]).run()
    at.multiselect(key="sp_kinds").set_value(["k", "q"]).run()
    at.switch_page("pages/quality.py").run()
    at.selectbox(key="q_metric").set_value("log_spectral_norm").run()
    at.switch_page("pages/prune.py").run()
    at.radio(key="p_method").set_value("magnitude").run()
    at.switch_page("pages/allocation.py").run()
    at.toggle(key="a_auto").set_value(False).run()
    at.radio(key="a_method").set_value("uniform").run()
    assert not at.exception, at.exception
    params = at.query_params
    assert params["model"] == str(analysed_folder) and params["xmin"] == "full"
    again = reload(at, "spectra")
    assert again.multiselect(key="sp_blocks").value == [1, 0]
    assert again.multiselect(key="sp_kinds").value == ["k", "q"]
    assert again.session_state["q_metric"] == "log_spectral_norm"
    assert again.session_state["p_method"] == "magnitude"
    assert again.session_state["a_method"] == "uniform" and again.session_state["a_auto"] is False


def test_a_link_to_a_model_without_a_cached_analysis_says_it_must_be_analysed():
    folder = saved_tiny("llama")                       # never analysed
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.query_params = {"model": str(folder), "xmin": "peak", "a_sparsity": "0.6"}
    at.switch_page("pages/allocation.py")
    at.run()
    assert not at.exception, at.exception
    assert at.session_state["analysis"] is None
    assert at.selectbox(key="a_source").value == "loaded model"      # no silent switch to a profile
    shown = texts(at)
    assert "must be analysed" in shown and str(folder) in shown, shown
    assert at.session_state["source"] == str(folder)               # Home's box holds it: one click away
    assert at.session_state["a_sparsity"] == pytest.approx(0.6)


def test_allocation_without_a_model_says_so_instead_of_falling_back_to_a_profile():
    at = new_app("allocation")
    assert not at.exception, at.exception
    assert "No model analysed yet" in texts(at)
    assert "profile" not in str(at.session_state["a_source"])


def test_bad_values_in_the_address_are_named_and_left_out():
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.query_params = {"a_sparsity": "5", "a_method": "bogus", "a_epsilon": "0.25"}
    at.switch_page("pages/allocation.py")
    at.run()
    assert not at.exception, at.exception
    assert at.session_state["a_sparsity"] == pytest.approx(0.7) and at.session_state["a_method"] == "alpha"
    assert at.session_state["a_epsilon"] == pytest.approx(0.25)
    shown = texts(at)
    assert "a_sparsity" in shown and "a_method" in shown, shown


# --- one state mechanism --------------------------------------------------------------------

SESSION_USE = re.compile(r"(?:\bss|st\.session_state)(?:\[|\.get\(|\.pop\(|\.setdefault\()\s*(f?[\"'][^\"']*[\"']|[A-Z_]+\b)")
VALUE_WIDGETS = ("slider", "select_slider", "selectbox", "multiselect", "radio", "toggle", "checkbox", "text_input",
                 "number_input", "segmented_control", "pills", "text_area")


def _sources():
    return [p for p in [*ROOT.glob("pages/*.py"), *ROOT.glob("dashboard/*.py"), ROOT / "app.py"]
            if p.name != "state.py"]


def _call(text: str, start: int) -> str:
    """The arguments of the call whose "(" ends at ``start`` (to its matching ")")."""
    depth = 1
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i]
    return text[start:]


def test_every_session_key_is_declared_in_state():
    """No page keeps a session key of its own: each key it reads or writes, and each value
    widget's key, is an attribute of ``State`` (one rule: defaults, kept across pages, the address)."""
    from dashboard.state import State

    declared = {v for k, v in vars(State).items() if not k.startswith("_") and isinstance(v, str)}
    strays = []
    for path in _sources():
        text = path.read_text()
        constants = dict(re.findall(r"^([A-Z_]+)\s*=\s*[\"']([^\"']+)[\"']", text, re.M))
        for m in SESSION_USE.finditer(text):
            used = m.group(1)
            constant = used[0] not in "f\"'"
            name = constants.get(used) if constant else used
            if constant and name is None:
                continue                     # a constant imported from State or elsewhere
            if used.startswith(("f'", 'f"')) or name.strip("\"'") not in declared:
                strays.append(f"{path.name}: {m.group(0)}")
        for m in re.finditer(r"\.(%s)\(" % "|".join(VALUE_WIDGETS), text):
            key = re.search(r"\bkey=([^,)\s]+)", _call(text, m.end()))
            if key and not key.group(1).startswith("State.") and not key.group(1).startswith("key"):
                k = key.group(1)
                if k[0].isupper() and k not in constants:
                    continue                 # a constant imported from State or elsewhere
                if constants.get(k) not in declared:
                    strays.append(f"{path.name}: {m.group(1)}(key={k})")
        if "persist_state" in text:
            strays.append(f"{path.name}: persist_state")
    assert not strays, strays
