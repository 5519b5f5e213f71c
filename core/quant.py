"""Quantization types of GGUF sources: which ggml type (Q4_K, Q6_K, Q8_0, F32, ...) each
prunable matrix was stored in, and whether alpha differs systematically between types within one
matrix kind (``quant_differences``).

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

#: within one kind, a type needs this many matrices in the shared block range, the medians must
#: differ by ``MEDIAN_GAP`` or more and the Mann-Whitney p, times the number of kinds compared
#: (Bonferroni), must be below ``P_VALUE`` for a message
MIN_PER_TYPE = 6
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


def quant_differences(table: pd.DataFrame, metric: str = "alpha") -> pd.DataFrame:
    """Where ``metric`` differs systematically between quantization types of the SAME matrix kind.

    A converter stores some kinds at a higher precision (GGUF's Q4_K_M keeps ``v`` and ``down``
    at Q6_K in some blocks), and kinds differ in alpha by nature, so types are compared only
    within a kind, and only over the blocks where both types occur (the converter favours the
    first and last blocks, and alpha changes with depth). One row per kind whose two most common
    types differ: ``kind``, ``blocks`` ("first-last" of the shared range), ``high``/``low`` (the
    types), ``median_high``/``median_low``, ``n_high``/``n_low``, ``p`` (Mann-Whitney,
    Bonferroni-corrected over the kinds compared); largest gap first. Empty when nothing differs."""
    columns = ["kind", "blocks", "high", "low", "median_high", "median_low", "n_high", "n_low", "p"]
    if not {"quant", "kind", "block", metric} <= set(table.columns):
        return pd.DataFrame(columns=columns)
    t = table[table["quant"].notna() & (table["quant"].astype(str) != "") & np.isfinite(table[metric])]
    tests = []
    for kind, g in t.groupby("kind", sort=False):
        common = g["quant"].value_counts().index[:2]
        if len(common) < 2:
            continue
        a, b = (g[g["quant"] == q] for q in common)
        lo, hi = max(a["block"].min(), b["block"].min()), min(a["block"].max(), b["block"].max())
        a, b = (x[x["block"].between(lo, hi)][metric].to_numpy(float) for x in (a, b))
        if min(len(a), len(b)) < MIN_PER_TYPE:
            continue
        (qa, va), (qb, vb) = sorted(zip(common, (a, b)), key=lambda x: -float(np.median(x[1])))
        tests.append({"kind": kind, "blocks": f"{lo}-{hi}", "high": qa, "low": qb,
                      "median_high": float(np.median(va)), "median_low": float(np.median(vb)),
                      "n_high": len(va), "n_low": len(vb), "p": float(mannwhitneyu(va, vb).pvalue)})
    found = [dict(r, p=min(1.0, r["p"] * len(tests))) for r in tests]
    found = [r for r in found if r["median_high"] - r["median_low"] >= MEDIAN_GAP and r["p"] < P_VALUE]
    found.sort(key=lambda r: r["median_low"] - r["median_high"])
    return pd.DataFrame(found, columns=columns)


def quant_alpha_message(table: pd.DataFrame, metric: str = "alpha") -> str | None:
    """One line when ``metric`` goes with the quantization type within a matrix kind
    (``quant_differences``), else None (also for a source that is not quantized)."""
    found = quant_differences(table, metric)
    if found.empty:
        return None
    r = found.iloc[0]
    more = "" if len(found) == 1 else f" (and in {len(found) - 1} other kind{'s' * (len(found) > 2)}: " \
        f"{', '.join(found['kind'].iloc[1:])})"
    return (f"{metric} goes with the storage precision: {r['kind']} matrices of blocks {r['blocks']} stored as "
            f"{r['high']} have median {metric} {r['median_high']:.2f} ({r['n_high']}) against "
            f"{r['median_low']:.2f} for {r['low']} ({r['n_low']}), Mann-Whitney p={r['p']:.1e}{more}. The "
            f"converter chose those types, so ratios from {metric} partly follow how the model was quantized, "
            "not only how it was trained; an unquantized checkpoint of the model tells them apart.")
