import streamlit as st

from pages.common import setup

setup()
st.title("Prune")
st.info("Coming soon.")
