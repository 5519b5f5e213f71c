"""Spectrascope dashboard: `streamlit run app.py` (binds to localhost, see .streamlit/config.toml)."""
import sys
from pathlib import Path

import streamlit as st

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `pages.common` importable from any cwd

from pages.common import ASSETS, PAGES, setup  # noqa: E402

st.set_page_config(page_title="Spectrascope", page_icon=str(ASSETS / "logo.svg"), layout="wide")
st.logo(str(ASSETS / "logo.svg"))
st.markdown(f"<style>{(ASSETS / 'style.css').read_text()}</style>", unsafe_allow_html=True)
setup()
nav = st.navigation([st.Page(path, title=title, icon=icon, default=key == "home", url_path=key)
                     for key, (path, title, icon) in PAGES.items()])
nav.run()
