"""Quantization types of GGUF sources: which ggml type (Q4_K, Q6_K, Q8_0, F32, ...) each
prunable matrix was stored in, and whether alpha differs systematically between types.

``write_quant_types`` records the types beside a converted GGUF folder
(``quant_types.json``); ``quant_types(folder)`` reads them back, or lazily from the GGUF
named in the folder's ``spectrascope_source.json`` when an older conversion lacks the file.
Matrices are named like ``core.models`` names them (``model.layers.3.self_attn.q_proj``).
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import mannwhitneyu

log = logging.getLogger(__name__)

QUANT_FILE = "quant_types.json"

# GGUF tensor role -> module path inside a block, per GGUF architecture (llama-like by default)
_LLAMA_ROLES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj"}
_ROLES = {
    "gpt2": ("transformer.h", {"attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj", "ffn_up": "mlp.c_fc",
                               "ffn_down": "mlp.c_proj"}),
    "gptneox": ("gpt_neox.layers", {"attn_qkv": "attention.query_key_value", "attn_output": "attention.dense",
                                    "ffn_up": "mlp.dense_h_to_4h", "ffn_down": "mlp.dense_4h_to_h"}),
}
_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.weight$")

#: a type needs this many matrices, and the medians must differ by this much, for a message
MIN_PER_TYPE = 8
MEDIAN_GAP = 0.25
P_VALUE = 0.01


def read_gguf_quant_types(gguf: str | Path) -> dict[str, str]:
    """{matrix name: ggml type} of the block matrices of a GGUF file (the weights are not read)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf))
    field = reader.fields.get("general.architecture")
    arch = bytes(field.parts[field.data[0]]).decode() if field is not None else "llama"
    blocks, roles = _ROLES.get(arch, ("model.layers", _LLAMA_ROLES))
    out = {}
    for t in reader.tensors:
        m = _TENSOR.match(t.name)
        if m and m.group(2) in roles:
            out[f"{blocks}.{m.group(1)}.{roles[m.group(2)]}"] = t.tensor_type.name
    return out


def write_quant_types(gguf: str | Path, folder: Path) -> None:
    """Write ``quant_types.json`` into ``folder`` (a conversion being written)."""
    (Path(folder) / QUANT_FILE).write_text(json.dumps(read_gguf_quant_types(gguf), indent=1, sort_keys=True))


def quant_types(folder: str | Path | None) -> dict[str, str]:
    """{matrix name: ggml type} of a converted GGUF folder; {} for any other source."""
    if folder is None:
        return {}
    folder = Path(folder)
    if folder.is_file():
        return read_gguf_quant_types(folder) if folder.suffix == ".gguf" else {}
    saved = folder / QUANT_FILE
    if saved.is_file():
        return json.loads(saved.read_text())
    origin = folder / "spectrascope_source.json"
    if not origin.is_file():
        return {}
    gguf = Path(json.loads(origin.read_text()).get("gguf", ""))
    if not gguf.is_file():
        log.warning("%s was converted from %s, which is gone: no quantization types", folder, gguf)
        return {}
    types = read_gguf_quant_types(gguf)
    try:   # an older conversion: remember the types beside it
        saved.write_text(json.dumps(types, indent=1, sort_keys=True))
    except OSError:
        pass
    return types


def quant_alpha_message(table: pd.DataFrame, metric: str = "alpha") -> str | None:
    """A one-line warning when ``metric`` differs systematically between quantization types of
    one model (medians apart by ``MEDIAN_GAP`` or more and a Mann-Whitney p below ``P_VALUE``,
    each type with ``MIN_PER_TYPE`` matrices or more), else None."""
    if "quant" not in table.columns or metric not in table.columns:
        return None
    t = table[table["quant"].notna() & (table["quant"].astype(str) != "") & np.isfinite(table[metric])]
    groups = {q: g[metric].to_numpy(float) for q, g in t.groupby("quant") if len(g) >= MIN_PER_TYPE}
    if len(groups) < 2:
        return None
    medians = {q: float(np.median(v)) for q, v in groups.items()}
    lo, hi = min(medians, key=medians.get), max(medians, key=medians.get)
    gap = medians[hi] - medians[lo]
    p = float(mannwhitneyu(groups[hi], groups[lo]).pvalue)
    if gap < MEDIAN_GAP or p >= P_VALUE:
        return None
    return (f"{metric} differs between quantization types: median {medians[hi]:.2f} for {hi} "
            f"({len(groups[hi])} matrices) vs {medians[lo]:.2f} for {lo} ({len(groups[lo])}), Mann-Whitney "
            f"p={p:.1e}. The ratios partly follow the quantization, not the training.")
