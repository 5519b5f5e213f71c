import streamlit as st

from pages.common import setup

setup()
st.title("Learn")
st.info("Coming soon.")
