"""Spectrascope dashboard: `streamlit run app.py` (binds to localhost, see .streamlit/config.toml)."""
import streamlit as st

from dashboard.state import ASSETS, PAGES, setup

st.set_page_config(page_title="Spectrascope", page_icon=str(ASSETS / "logo.svg"), layout="wide",
                   initial_sidebar_state="auto")   # collapsed at <= 768 px; assets/sidebar.js: <= 900 px
st.logo(str(ASSETS / "logo.svg"))
st.markdown(f"<style>{(ASSETS / 'style.css').read_text()}</style>", unsafe_allow_html=True)
st.sidebar.html(f"<script>{(ASSETS / 'sidebar.js').read_text()}</script>",   # <= 900 px: starts collapsed
                unsafe_allow_javascript=True)
nav = st.navigation([st.Page(path, title=title, icon=icon, default=key == "home", url_path=key)
                     for key, (path, title, icon) in PAGES.items()])
setup()   # after st.navigation: the run knows its page
nav.run()
