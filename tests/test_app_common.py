"""Dashboard plumbing: the router, the page list, the localhost binding; helpers for the page tests."""
from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def new_app(page: str | None = None, *, analysis=None, loaded=None, timeout: float = 60, **state):
    """An AppTest of ``app.py`` with real core objects in session state, switched to ``page``
    (a key of ``dashboard.state.PAGES``) and run once."""
    from streamlit.testing.v1 import AppTest

    from dashboard.state import PAGES

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=timeout)
    if analysis is not None:
        at.session_state["analysis"] = analysis
    if loaded is not None:
        at.session_state["loaded"] = loaded
    for key, value in state.items():
        at.session_state[key] = value
    if page is not None and page != "home":
        at.switch_page(PAGES[page][0])
    return at.run()


def texts(at) -> str:
    """Every markdown, caption, info, error and metric text of the last run, joined."""
    parts = [e.value for kind in ("markdown", "caption", "info", "warning", "error", "success", "title")
             for e in getattr(at, kind)]
    parts += [f"{m.label}={m.value}" for m in at.metric]
    return "\n".join(str(p) for p in parts)


def figures(at) -> list[dict]:
    """The Plotly figures of the last run, as dicts."""
    import json

    return [json.loads(e.proto.spec) for e in at.get("plotly_chart")]


def arr(value):
    """A Plotly figure array as numpy (figures encode numeric arrays as typed base64)."""
    import base64

    import numpy as np

    if isinstance(value, dict) and "bdata" in value:
        out = np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
        shape = value.get("shape")
        return out.reshape([int(s) for s in str(shape).split(",")]) if shape else out
    if isinstance(value, list) and any(v is None for v in value):     # gaps between drawn runs
        return np.asarray([np.nan if v is None else v for v in value], dtype=float)
    return np.asarray(value)


def test_router_lists_every_page_file():
    from dashboard.state import PAGES

    for path, title, _ in PAGES.values():
        assert (ROOT / path).is_file(), path
    assert "st.navigation" in (ROOT / "app.py").read_text()


def test_server_binds_to_localhost_by_default():
    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert config["server"]["address"] == "localhost"
    assert config["server"]["headless"] is True


@pytest.mark.parametrize("page", ["spectra", "quality"])
def test_pages_without_analysis_show_a_hint_not_a_traceback(page):
    at = new_app(page)
    assert not at.exception
    assert "No model analysed yet" in texts(at)
