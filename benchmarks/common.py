"""Shared by the benchmark scripts (run them as ``python benchmarks/<name>.py``)."""
from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def best_time(fn: Callable[[], T], repeat: int = 1) -> tuple[float, T]:
    """The best wall time of ``repeat`` calls of ``fn`` (the least disturbed run) and its result."""
    best, out = float("inf"), None
    for _ in range(max(1, repeat)):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def random_llama(s: dict, blocks: int, device: str, dtype, positions: int):
    """A random LLaMA of the shapes in ``s`` (hidden, inter, heads, vocab) with ``blocks`` blocks,
    built on ``device`` as a ``LoadedModel`` (its identity is its shape: hashing a 7B model's
    weights would take longer than what the benchmarks time)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from core.models import LoadedModel, family_of, prunable_matrices

    cfg = LlamaConfig(hidden_size=s["hidden"], intermediate_size=s["inter"], num_hidden_layers=blocks,
                      num_attention_heads=s["heads"], num_key_value_heads=s["heads"], vocab_size=s["vocab"],
                      max_position_embeddings=positions)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    family = family_of(model)
    label = f"random llama {s['hidden']}x{blocks}"
    return LoadedModel(model, None, family, label, "mem:" + label, prunable_matrices(model, family))
