"""Spectrascope's engine: spectra of LLM weight matrices (HT-SR) and AlphaPruning.

Pipeline, one module per stage: ``models`` (load and name matrices) -> ``spectra``
(eigenvalues) -> ``fit`` (power laws) -> ``metrics`` (shape metrics) -> ``analysis``
(the whole table, cached) -> ``allocation`` (layer-wise sparsity). Nothing here imports
Streamlit.
"""
__version__ = "0.1.0"
