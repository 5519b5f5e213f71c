"""The dashboard's helpers (the pages themselves live in ``pages/``): session state and the page
list (``state``), cached loaders (``loaders``), Plotly figures (``figures``) and background CLI
jobs (``jobs``). Streamlit code only; every number comes from ``core``."""
