"""Spectrascope's engine: spectra of LLM weight matrices (HT-SR) and AlphaPruning.

Pipeline, one module per stage: ``models`` (load and name matrices; ``checkpoints`` for
the bounded-memory path) -> ``spectra`` (eigenvalues) -> ``fit`` (power laws) ->
``metrics`` (shape metrics) -> ``analysis`` (the whole table, cached) -> ``allocation``
(layer-wise sparsity) -> ``pruning`` -> ``evaluation`` (perplexity) -> ``runs`` (registry).
Nothing here imports Streamlit.
"""
import os as _os

# Idle OpenMP threads that spin make small torch/BLAS kernels 5-10x slower on a busy
# machine with few cores (measured here); let them sleep unless the user chose otherwise.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
