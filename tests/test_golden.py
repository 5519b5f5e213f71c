"""Behaviour kept through the restructure (issue 9): the files under tests/golden/data were
written by tests/golden/record.py on the code *before* the move (commit de991f7); the
code of today must give the same analysis tables, allocations, OWL scores and masks."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

DATA = Path(__file__).parent / "golden" / "data"
sys.path.insert(0, str(DATA.parent))
import record  # noqa: E402  (the recorder's settings: one definition)


@pytest.mark.slow
@pytest.mark.parametrize("xmin", ["peak", "full"])
def test_demo_analysis_table_is_unchanged(demo, xmin):
    from core.analysis import analyze

    before = pd.read_parquet(DATA / f"demo-analysis-{xmin}.parquet")
    now = analyze(demo, xmin=xmin, device="cpu", use_cache=False).table
    # the recorded columns, in order; columns added since (n_zero, quant, ...) are allowed
    assert [c for c in now.columns if c in set(before.columns)] == list(before.columns)
    for col in before.columns:
        if pd.api.types.is_float_dtype(before[col]):
            np.testing.assert_allclose(now[col].to_numpy(float), before[col].to_numpy(float), rtol=1e-9,
                                       atol=1e-12, equal_nan=True, err_msg=col)
        else:
            assert now[col].tolist() == before[col].tolist(), col


@pytest.mark.slow
def test_allocations_are_unchanged(demo):
    from core.allocation import allocate
    from core.profiles import load_profile

    saved = json.loads((DATA / "allocations.json").read_text())
    table = pd.read_parquet(DATA / "demo-analysis-peak.parquet")   # the input, fixed
    for source, t in (("demo", table), ("llama-7b-hf", load_profile("llama-7b-hf"))):
        for i, kw in enumerate(saved["settings"]):
            key = f"{source}/{i}"
            if key not in saved["ratios"]:
                continue
            now = allocate(t, **kw).ratio_by_name()
            before = saved["ratios"][key]
            assert now.keys() == before.keys(), key
            np.testing.assert_allclose([now[k] for k in before], list(before.values()), rtol=0, atol=1e-15,
                                       err_msg=key)


def test_masks_of_pruned_tiny_models_are_unchanged():
    from conftest import tiny_model
    from core import pruning
    from core.models import wrap_model

    masks = np.load(DATA / "masks.npz")
    sums = json.loads((DATA / "pruning.json").read_text())["weight_abs_sums"]
    for family, method, kind, nm in record.PRUNES:
        loaded = wrap_model(tiny_model(family))
        names = [m.name for m in loaded.matrices]
        r = None if nm else (0.5 if kind == "uniform" else record.mixed_ratios(names))
        res = pruning.prune(loaded, r, method=method, calibration=record.calib_ids(), nm=nm, device="cpu",
                            copy=True)
        for name in names:
            key = f"{family}/{method}/{kind}/{name}"
            W = res.model.weight(name).detach()
            assert np.array_equal(np.packbits((W != 0).numpy().astype(bool)), masks[key]), key
            assert float(W.double().abs().sum()) == pytest.approx(sums[key], rel=1e-6), key


def test_owl_scores_are_unchanged():
    from conftest import tiny_model
    from core import pruning
    from core.models import wrap_model

    owl = json.loads((DATA / "pruning.json").read_text())["owl"]
    for family in ("llama", "opt"):
        loaded = wrap_model(tiny_model(family))
        scores = pruning.owl_scores(loaded, record.calib_ids(), device="cpu")
        assert {str(k): v for k, v in scores.items()} == pytest.approx(owl[family], rel=1e-9)


def test_owl_ratios_are_unchanged():
    """OWL through ``allocation.allocate`` with the recorded block scores gives the recorded ratios."""
    from conftest import tiny_model
    from core.allocation import allocate, matrix_table
    from core.models import wrap_model

    owl = json.loads((DATA / "pruning.json").read_text())["owl"]
    for family in ("llama", "opt"):
        table = matrix_table(wrap_model(tiny_model(family)).matrices)
        scores = {int(k): v for k, v in owl[family].items()}
        now = allocate(table, sparsity=0.6, method="owl", owl_scores=scores).ratio_by_name()
        before = owl[family + "/ratios"]
        assert now.keys() == before.keys(), family
        np.testing.assert_allclose([now[k] for k in before], list(before.values()), rtol=0, atol=1e-12,
                                   err_msg=family)
