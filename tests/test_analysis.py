"""The whole analysis: demo model against powerlaw, cache, CLI outputs, bad matrices."""
from __future__ import annotations

import math
import time
import warnings
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import tiny_model
from core.analysis import analyze
from core.cli import main as cli
from core.models import wrap_model

REQUIRED = ["name", "block", "kind", "rows", "cols", "params", "n_evals", "alpha", "xmin", "D", "sigma",
            "n_tail", "alpha_hat", "log_norm", "log_spectral_norm", "log_alpha_norm", "stable_rank",
            "entropy", "lambda_plus", "num_spikes", "mp_softrank", "status"]


def _powerlaw_fit(eigs: np.ndarray) -> tuple[float, float, float]:
    import powerlaw

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = powerlaw.Fit(eigs, parameter_ranges={"alpha": [1, 1000]}, verbose=False)
    return float(fit.alpha), float(fit.xmin), float(fit.D)


@pytest.mark.slow
def test_full_xmin_equals_powerlaw_on_every_demo_matrix(demo_analysis_full, tmp_path):
    res = demo_analysis_full
    assert len(res.table) == 210 and list(res.table.columns[: len(REQUIRED) - 1]) == REQUIRED[:-1]
    path = res.save_eigs(tmp_path / "eigs.npz")
    with np.load(path) as z:
        names = list(res.table["name"])
        assert sorted(z.files) == sorted(names)
        spectra = [z[n] for n in names]
    assert all(e.dtype == np.float64 and np.all(np.diff(e) >= 0) for e in spectra)
    with ProcessPoolExecutor(2) as pool:
        ref = list(pool.map(_powerlaw_fit, spectra, chunksize=8))
    differing_xmin = 0
    for (alpha, xmin, D), row in zip(ref, res.table.itertuples()):
        if xmin != row.xmin:          # allowed only where two candidates' D tie
            differing_xmin += 1
            assert row.D == pytest.approx(D, rel=1e-9), row.name
            continue
        assert row.alpha == pytest.approx(alpha, rel=1e-6), row.name
        assert row.D == pytest.approx(D, rel=1e-6), row.name
    assert differing_xmin <= 2


@pytest.mark.slow
def test_second_analysis_comes_from_the_cache(demo):
    first = analyze(demo, xmin="peak", device="cpu")
    start = time.perf_counter()
    again = analyze(demo, xmin="peak", device="cpu")
    assert again.cached and time.perf_counter() - start < 5
    pd.testing.assert_frame_equal(first.table, again.table)
    assert all(np.array_equal(first.eigs[k], again.eigs[k]) for k in first.eigs)
    # 4-bit SmolLM2: every matrix fitted, with a valid exponent (powerlaw's range check)
    t = first.table
    assert t["alpha"].notna().all() and t["alpha"].between(1.01, 999.99).all()
    assert set(t["status"]) <= {"ok", "over-trained", "under-trained"}


def test_cli_writes_table_and_eigenvalues(tmp_path, capsys):
    tiny_model("llama").save_pretrained(tmp_path / "model")
    code = cli(["analyze", "--model", str(tmp_path / "model"), "--device", "cpu", "--xmin", "full",
                "--out", str(tmp_path / "t.csv"), "--eigs", str(tmp_path / "e.npz")])
    assert code == 0
    assert "14 matrices in 2 blocks" in capsys.readouterr().out
    table = pd.read_csv(tmp_path / "t.csv")
    assert [c for c in REQUIRED if c not in table.columns] == []
    with np.load(tmp_path / "e.npz") as z:
        assert sorted(z.files) == sorted(table["name"])
        for name, n in zip(table["name"], table["n_evals"]):
            assert z[name].shape == (n,) and z[name].dtype == np.float64
    assert cli(["analyze", "--model", str(tmp_path / "model"), "--xmin", "full", "--out", str(tmp_path / "t.parquet"),
                "--quiet"]) == 0
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "t.parquet"), table, check_dtype=False)
    # bad input: one clear line, exit code 2
    assert cli(["analyze", "--model", str(tmp_path / "missing"), "--quiet"]) == 2
    assert "model path not found" in capsys.readouterr().err


def test_streaming_analysis_equals_loaded_analysis(tmp_path):
    tiny_model("qwen2").save_pretrained(tmp_path / "m", max_shard_size="30KB")
    a = analyze(tmp_path / "m", device="cpu", use_cache=False)
    b = analyze(tmp_path / "m", device="cpu", use_cache=False, streaming=True)
    pd.testing.assert_frame_equal(a.table, b.table)


def test_bad_matrices_get_a_status_with_the_reason():
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    model = tiny_model("llama")
    q0 = "model.layers.0.self_attn.q_proj"
    with torch.no_grad():
        model.get_submodule(q0).weight[1, 2] = float("inf")
        model.get_submodule("model.layers.0.self_attn.o_proj").weight.zero_()
        low = torch.randn(96, 3) @ torch.randn(3, 64)               # rank 3 < 10 positive eigenvalues
        model.get_submodule("model.layers.1.mlp.up_proj").weight.copy_(low)
    t = analyze(wrap_model(model), device="cpu", use_cache=False).table.set_index("name")
    assert t.loc[q0, "status"] == "no fit: non-finite weights (NaN/Inf)" and math.isnan(t.loc[q0, "alpha"])
    assert t.loc["model.layers.0.self_attn.o_proj", "status"].startswith("no fit: all")
    up = t.loc["model.layers.1.mlp.up_proj"]
    assert up["status"].startswith("no fit: fewer than 10") and up["rank"] == 3
    assert t.drop(index=[q0, "model.layers.0.self_attn.o_proj", "model.layers.1.mlp.up_proj"])["alpha"].notna().all()

    small = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16,
                                                         num_hidden_layers=1, num_attention_heads=2,
                                                         num_key_value_heads=2))
    ts = analyze(wrap_model(small), device="cpu", use_cache=False).table
    assert ts["status"].str.startswith("no fit: fewer than 10").all() and ts["alpha"].isna().all()
