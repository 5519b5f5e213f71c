"""Record the behaviour that the restructure of issue 9 must keep (run once, on the code
before the move; the files it writes are compared by tests/test_golden.py).

    python tests/golden/record.py OUTDIR

What it records: the demo model's analysis table (xmin peak and full), allocations of the
demo table and a published profile at several settings, OWL block scores of a tiny model,
and the masks (plus a weight checksum) of a tiny LLaMA and a tiny OPT pruned by every
method with uniform, mixed and N:M ratios.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))          # conftest's tiny models

SETTINGS = [  # allocation keywords, each recorded on the demo table and on llama-7b-hf
    dict(sparsity=0.5, method="alpha", epsilon=0.3),
    dict(sparsity=0.7, method="alpha", epsilon=0.3),
    dict(sparsity=0.7, method="alpha", epsilon=0.1, mapping="matrix"),
    dict(sparsity=0.8, method="alpha", epsilon=0.5, r_max=0.95),
    dict(sparsity=0.6, method="alpha", epsilon=0.3, dense_kinds="k,v"),
    dict(sparsity=0.6, method="alpha", epsilon=0.3, metric="alpha_hat", reverse=True),
    dict(sparsity=0.5, method="uniform"),
]
PRUNES = [  # (family, method, ratios kind, nm)
    (family, method, kind, nm)
    for family in ("llama", "opt")
    for method in ("magnitude", "wanda", "sparsegpt")
    for kind, nm in (("uniform", None), ("mixed", None), ("nm", "2:4"))
]


def mixed_ratios(names: list[str]) -> dict[str, float]:
    return {n: [0.0, 0.3, 0.5, 0.7, 0.9, 0.45, 0.61][i % 7] for i, n in enumerate(names)}


def calib_ids():
    import torch
    return torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))


def main(out: Path) -> None:
    os.environ.setdefault("SPECTRASCOPE_HOME", tempfile.mkdtemp(prefix="golden-home-"))
    import torch
    from conftest import tiny_model
    from core.allocation import allocate, load_profile
    from core.analysis import analyze
    from core.models import load_model, wrap_model

    out.mkdir(parents=True, exist_ok=True)
    demo = load_model("demo", device="cpu")
    tables = {}
    for xmin in ("peak", "full"):
        tables[xmin] = analyze(demo, xmin=xmin, device="cpu", use_cache=False).table
        tables[xmin].to_parquet(out / f"demo-analysis-{xmin}.parquet")
    ratios = {}
    for source, table in (("demo", tables["peak"]), ("llama-7b-hf", load_profile("llama-7b-hf"))):
        for i, kw in enumerate(SETTINGS):
            if kw.get("metric", "alpha") not in table.columns:
                continue
            alloc = allocate(table, **kw)
            ratios[f"{source}/{i}"] = alloc.ratio_by_name()
    (out / "allocations.json").write_text(json.dumps({"settings": SETTINGS, "ratios": ratios}))

    from core import pruning
    masks, sums = {}, {}
    for family, method, kind, nm in PRUNES:
        loaded = wrap_model(tiny_model(family))
        names = [m.name for m in loaded.matrices]
        r = None if nm else (0.5 if kind == "uniform" else mixed_ratios(names))
        res = pruning.prune(loaded, r, method=method, calibration=calib_ids(), nm=nm, device="cpu", copy=True)
        for name in names:
            W = res.model.weight(name).detach()
            key = f"{family}/{method}/{kind}/{name}"
            masks[key] = np.packbits((W != 0).numpy().astype(bool))
            sums[key] = float(W.double().abs().sum())
    np.savez_compressed(out / "masks.npz", **masks)
    owl = {}
    for family in ("llama", "opt"):
        loaded = wrap_model(tiny_model(family))
        scores = pruning.owl_scores(loaded, calib_ids(), device="cpu")
        owl[family] = {str(k): float(v) for k, v in scores.items()}
        owl[family + "/ratios"] = dict(zip(*[pruning.owl_ratios(loaded, scores, sparsity=0.6)[c]
                                             for c in ("name", "ratio")]))
    (out / "pruning.json").write_text(json.dumps({"prunes": PRUNES, "weight_abs_sums": sums, "owl": owl}))
    print(f"recorded into {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
