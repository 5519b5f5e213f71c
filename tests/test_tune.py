"""``tune``: the epsilon x xmin x metric grid scored on held-out calibration text, the eigenvalues
computed once for every xmin method, and the ``tune`` / ``tune-epsilon`` commands."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM

import core.analysis
import core.tuning
from conftest import tiny_config, tiny_model
from core.analysis import analyze
from core.calibration import tokenize
from core.cli import COMMANDS, main
from core.spec import CalibrationSpec, EvaluationSpec, PruneSpec
from core.models import wrap_model
from core.tuning import TUNE_COLUMNS, refit, tune
from core.texts import load_text
from test_bos import make_tokenizer, text_file  # noqa: F401  (text_file: the shared text fixture)


@pytest.fixture
def counted(monkeypatch, tmp_path):
    """A fresh analysis cache and a count of eigenvalue computations (the real function runs)."""
    monkeypatch.setenv("SPECTRASCOPE_HOME", str(tmp_path / "home"))
    calls = []
    real = core.analysis.compute_spectra

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(core.analysis, "compute_spectra", counting)
    return calls


def test_refit_equals_a_fresh_analysis_with_that_xmin(counted):
    loaded = wrap_model(tiny_model("llama", seed=4))
    peak = analyze(loaded, xmin="peak", device="cpu", use_cache=False)
    for xmin in ("full", "mid"):
        fresh = analyze(loaded, xmin=xmin, device="cpu", use_cache=False).table
        pd.testing.assert_frame_equal(refit(peak, xmin, device="cpu"), fresh)
    assert len(counted) == 3
    assert refit(peak, "peak") is peak.table


def test_tune_grid_on_held_out_calibration_text(demo, counted, monkeypatch):
    cfg = tiny_config("llama")
    cfg.vocab_size = len(demo.tokenizer)
    torch.manual_seed(0)
    loaded = wrap_model(AutoModelForCausalLM.from_config(cfg).eval(), demo.tokenizer)
    scored = []
    real = core.tuning.perplexity

    def spy(model, **kwargs):                    # records what is scored, then scores it for real
        scored.append(kwargs)
        return real(model, **kwargs)

    monkeypatch.setattr(core.tuning, "perplexity", spy)
    base = PruneSpec(method="wanda", sparsity=0.6, mapping="matrix", device="cpu",   # matrix: every cell differs
                     calibration=CalibrationSpec(nsamples=2, seqlen=64))
    result = tune(base, epsilons=[0.0, 0.2, 0.4], xmins=["peak", "mid"], metric_columns=["alpha", "alpha_hat"],
                  holdout_windows=2, loaded=loaded)
    t = result.table
    assert list(t.columns) == TUNE_COLUMNS and len(t) == 3 * 2 * 2
    assert set(zip(t.epsilon, t.xmin, t.metric)) == {(e, x, m) for e in (0.0, 0.2, 0.4) for x in ("peak", "mid")
                                                      for m in ("alpha", "alpha_hat")}
    assert len(counted) == 1                                     # one eigenvalue computation for both xmins
    assert len(scored) == 1 + 2 * 2 * 2                          # epsilon 0 is uniform: pruned and scored once
    assert t[t.epsilon == 0.0]["perplexity"].nunique() == 1
    assert t[t.epsilon > 0]["perplexity"].nunique() == 8
    best = t.loc[t["perplexity"].idxmin()]
    assert result.best["perplexity"] == t["perplexity"].min()
    assert (result.best["epsilon"], result.best["xmin"], result.best["metric"]) == (best.epsilon, best.xmin,
                                                                                  best.metric)
    assert (t["achieved"] - 0.6).abs().max() < 0.01
    # what was scored is the tail of the calibration text, none of it evaluation text
    calib_ids = tokenize(demo.tokenizer, load_text("wiki", split="calib"))
    eval_ids = tokenize(demo.tokenizer, load_text("wiki", split="eval"))
    held = scored[0]["ids"]
    assert all("dataset" not in s and torch.equal(s["ids"], held) for s in scored)
    assert torch.equal(held, calib_ids[-held.numel():]) and held.numel() == calib_ids.numel() - int(
        calib_ids.numel() * 0.9)
    probe = held[:32].numpy()                                    # a 32-token passage of the held-out text
    windows = np.lib.stride_tricks.sliding_window_view(eval_ids.numpy(), 32)
    assert not (windows == probe).all(axis=1).any()
    assert result.holdout_tokens == 2 * 64 and result.calibration["seqlen"] == 64
    assert "held-out" in result.key.settings and "calib wiki 2×64 seed 0" in result.key.settings
    winner = result.spec(base)
    assert (winner.allocation, winner.epsilon, winner.xmin, winner.metric) == (
        "alpha", result.best["epsilon"], result.best["xmin"], result.best["metric"])


def test_tune_refuses_bad_grids(tmp_path, text_file):
    loaded = wrap_model(tiny_model("llama"), make_tokenizer(False))
    base = PruneSpec(method="magnitude", device="cpu", calibration=CalibrationSpec(nsamples=2, seqlen=64))
    with pytest.raises(ValueError, match="xmins: 'max' is unknown"):
        tune(base, xmins=["max"], loaded=loaded)
    with pytest.raises(ValueError, match="metric_columns: 'kind' is not a numeric column"):
        tune(base, xmins=["peak"], metric_columns=["kind"], loaded=loaded)
    with pytest.raises(ValueError, match="holdout=0.7"):
        tune(base, holdout=0.7, loaded=loaded)
    path = text_file[0]
    same = replace(base, calibration=CalibrationSpec(path, 2, 32), evaluation=EvaluationSpec(dataset=path))
    with pytest.raises(ValueError, match="held-out text would be evaluation text"):
        tune(same, xmins=["peak"], loaded=loaded)


def test_tune_command_and_its_alias_with_a_bos_tokenizer(tmp_path, text_file, monkeypatch, capsys):
    monkeypatch.setenv("SPECTRASCOPE_HOME", str(tmp_path / "home"))
    src = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(src)
    make_tokenizer(True).save_pretrained(src)
    assert COMMANDS["tune-epsilon"].run is COMMANDS["tune"].run
    argv = ["--model", str(src), "--method", "wanda", "--sparsity", "0.5", "--epsilons", "0,0.3", "--xmins",
            "peak,full", "--metrics-cols", "alpha,log_norm", "--calib", text_file[0], "--nsamples", "2", "--seqlen",
            "32", "--holdout-windows", "2", "--device", "cpu", "--json", "--quiet"]
    assert main(["tune", *argv, "--out", str(tmp_path / "grid.csv")]) == 0
    out = json.loads(capsys.readouterr().out)
    grid = pd.read_csv(tmp_path / "grid.csv")
    assert len(grid) == len(out["rows"]) == 2 * 2 * 2 and list(grid.columns) == TUNE_COLUMNS
    assert out["best"]["perplexity"] == pytest.approx(grid["perplexity"].min())
    assert out["calibration"]["bos"] == "auto" and out["calibration"]["bos_prepended"] is True
    assert "bos=auto" in out["eval_key"] and "calib_bos=auto" in out["key"]
    assert main(["tune-epsilon", *argv, "--bos", "none"]) == 0
    alias = json.loads(capsys.readouterr().out)
    assert alias["calibration"]["bos_prepended"] is False and alias["key"] != out["key"]
    assert len(alias["rows"]) == 8
