"""``spectrascope sensitivity`` and the ``sensitivity`` allocation (issue 20, item 1).

Planted models: tiny LLaMAs whose blocks differ in two planted ways, the heavy tail of their
spectra (alpha) and how much they matter (the scale of their weights, so that pruning a block
changes the outputs in proportion). The text is sampled from the dense model itself, so any
change of the model raises the expected loss (a KL divergence) and a block that matters more
raises it more. ``follows``: the heavy-tailed (low-alpha) blocks are the ones that matter,
AlphaPruning's premise (negative rho); otherwise the high-alpha blocks matter (positive rho)."""
from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import refused, tiny_config
from core.cli import main as cli

N_BLOCKS, SEQLEN, SEQS = 8, 64, 80    # 80 sampled sequences of 64 tokens: the held-out tenth is 8 whole ones
KINDS = ["q", "k", "v", "o", "gate", "up", "down"]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(256)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0")


def _planted(follows: bool):
    """Block b: every matrix U diag(s) V^T with singular values s_i ~ i^-p (p large: heavy tail,
    low alpha), times a scale that falls with b (block 0 matters most)."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("llama")
    cfg.num_hidden_layers = N_BLOCKS
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(1)
    for b, blk in enumerate(model.model.layers):
        t = b / (N_BLOCKS - 1)
        heavy = 1 - t if follows else t
        scale = 0.15 ** t
        for mod in blk.modules():
            if isinstance(mod, torch.nn.Linear):
                out, inp = mod.weight.shape
                k = min(out, inp)
                U = torch.linalg.qr(torch.randn(out, k, generator=gen))[0]
                V = torch.linalg.qr(torch.randn(inp, k, generator=gen))[0]
                s = torch.arange(1, k + 1, dtype=torch.float32) ** -(0.1 + 0.9 * heavy)
                mod.weight.data = 2 * scale * (U * (s / s.pow(2).mean().sqrt())) @ V.T / inp ** 0.5
    model.lm_head.weight.data *= 25       # a peaked next-token distribution: the text carries information
    return model


_MADE: dict[bool, tuple] = {}


def _made(follows: bool, tmp_path_factory) -> tuple:
    """(follows, folder, text file) of a planted model and a text sampled from it, made once."""
    if follows not in _MADE:
        _MADE[follows] = _make(follows, tmp_path_factory)
    return _MADE[follows]


@pytest.fixture(scope="module", params=[True, False], ids=["follows", "against"])
def planted(request, tmp_path_factory):
    return _made(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def follows(tmp_path_factory):
    return _made(True, tmp_path_factory)


def _make(follows: bool, tmp_path_factory) -> tuple:
    model = _planted(follows)
    torch.manual_seed(2)
    with torch.no_grad():
        ids = model.generate(torch.randint(0, 256, (SEQS, 1)), do_sample=True, top_k=0, max_length=SEQLEN,
                             pad_token_id=0, use_cache=False)
    folder = tmp_path_factory.mktemp("planted")
    model.save_pretrained(folder / "model")
    _tokenizer().save_pretrained(folder / "model")
    (folder / "text.txt").write_text(" ".join(f"w{i}" for i in ids.reshape(-1).tolist()))
    return follows, folder / "model", folder / "text.txt"


def _args(model, text, *more):
    return ["sensitivity", str(model), "--calib", str(text), "--nsamples", "8", "--seqlen", str(SEQLEN),
            "--holdout-windows", "8", "--device", "cpu", "--quiet", *more]


def test_the_sign_of_the_correlation_follows_the_planted_model(planted, tmp_path, capsys):
    follows, model, text = planted
    out = tmp_path / "sens.csv"
    assert cli(_args(model, text, "--method", "magnitude", "--out", str(out), "--json")) == 0
    result = json.loads(capsys.readouterr().out)
    overall = result["overall"]
    table = pd.read_csv(out)
    assert list(table.columns) == ["block", "kind", "alpha", "delta_loss"]
    assert table["block"].tolist() == list(range(N_BLOCKS)) and set(table["kind"]) == {"all"}
    assert overall["n"] == N_BLOCKS and overall["p"] < 0.05
    if follows:     # low alpha and important: AlphaPruning's premise holds
        assert overall["rho"] < -0.7 and overall["high"] < 0 and overall["verdict"] == "supports"
    else:
        assert overall["rho"] > 0.7 and overall["low"] > 0 and overall["verdict"] == "contradicts"
    assert overall["low"] <= overall["rho"] <= overall["high"]
    assert "negative rho" in result["premise"] and result["metric"] == "alpha"
    assert table["delta_loss"].iloc[0] > 10 * abs(table["delta_loss"].iloc[-1])    # block 0 matters most


def test_per_matrix_with_wanda_restores_the_model(follows, tmp_path, capsys):
    from core.models import load_model
    from core.sensitivity import SensitivitySettings, measure

    _, model, text = follows
    out = tmp_path / "m.csv"
    assert cli(_args(model, text, "--method", "wanda", "--per", "matrix", "--metric", "log_norm", "--out",
                     str(out), "--json")) == 0
    result = json.loads(capsys.readouterr().out)
    table = pd.read_csv(out)
    assert list(table.columns) == ["block", "kind", "log_norm", "delta_loss"]
    assert len(table) == N_BLOCKS * len(KINDS) and sorted(set(table["kind"])) == sorted(KINDS)
    assert result["overall"]["n"] == len(table)
    assert [c["group"] for c in result["per_kind"]] == KINDS and all(c["n"] == N_BLOCKS for c in result["per_kind"])
    # every part was pruned and restored: the model is as it was, and SparseGPT's reused Hessians work too
    loaded = load_model(str(model), device="cpu")
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    sens = measure(loaded, SensitivitySettings(method="sparsegpt", per="matrix", dataset=str(text), nsamples=4,
                                               seqlen=SEQLEN, holdout_windows=2), device="cpu")
    assert all(torch.equal(before[k], v) for k, v in loaded.model.state_dict().items())
    assert len(sens.table) == N_BLOCKS * len(KINDS) and np.isfinite(sens.table["delta_loss"]).all()


def test_refusals_are_one_line_before_the_work(follows, tmp_path, capsys):
    _, model, text = follows
    for bad in ("0", "1", "1.2"):
        refused(capsys, _args(model, text, "--sparsity", bad), "--sparsity", bad, within=5)
    taken = tmp_path / "taken.csv"
    taken.write_text("mine")
    refused(capsys, _args(model, text, "--out", str(taken)), "--out", str(taken), within=5)
    assert taken.read_text() == "mine"
    out = tmp_path / "never.csv"
    for metric in ("kind", "no_such_column"):
        start = time.perf_counter()
        refused(capsys, _args(model, text, "--metric", metric, "--out", str(out), "--no-cache"), "--metric", metric)
        assert time.perf_counter() - start < 20 and not out.exists()


def test_the_sensitivity_allocation_keeps_the_mean_and_spares_the_sensitive(follows, tmp_path, capsys):
    from core.prepare import choose_allocation, load_for
    from core.spec import CalibrationSpec, PruneSpec

    _, model, text = follows
    # measured once by the command with the allocation's settings (the defaults but the text and windows' seqlen)
    spec = PruneSpec(model=str(model), method="magnitude", allocation="sensitivity", sparsity=0.6, epsilon=0.2,
                     device="cpu", calibration=CalibrationSpec(str(text), 16, 256))
    loaded = load_for(spec)
    start = time.perf_counter()
    alloc = choose_allocation(spec, loaded)
    measured = time.perf_counter() - start
    r = alloc.ratios
    n = r["params"].to_numpy(float)
    assert float(n @ r["ratio"].to_numpy()) / n.sum() == pytest.approx(0.6, abs=1e-12)
    by_block = r.groupby("block")["ratio"].mean()
    delta = r.groupby("block")["metric"].mean()
    assert alloc.method == "sensitivity" and alloc.metric == "delta_loss"
    assert by_block.idxmin() == delta.idxmax() and by_block.idxmax() == delta.idxmin()
    assert np.all(np.diff(by_block.to_numpy()[np.argsort(delta.to_numpy())]) <= 1e-12)   # more sensitive, lower
    assert by_block.max() / by_block.min() == pytest.approx(1.2 / 0.8)          # epsilon 0.2 is the range
    assert alloc.params()["sensitivity"]["cache"]
    start = time.perf_counter()
    again = choose_allocation(spec, loaded)        # read from the cache
    assert time.perf_counter() - start < measured / 2 and again.ratio_by_name() == alloc.ratio_by_name()
    # through the command line: prune with it (epsilon allowed), and a sweep with it beside uniform
    base = ["--model", str(model), "--method", "magnitude", "--calib", str(text), "--nsamples", "16", "--seqlen",
            "256", "--device", "cpu", "--quiet"]
    assert cli(["prune", *base, "--allocation", "sensitivity", "--sparsity", "0.6", "--epsilon", "0.2",
                "--json"]) == 0
    run = json.loads(capsys.readouterr().out)
    assert run["allocation"] == "sensitivity" and run["achieved_sparsity"] == pytest.approx(0.6, abs=0.01)
    stem = tmp_path / "sweep"
    assert cli(["sweep", *base[:2], "--methods", "magnitude", "--allocations", "uniform,sensitivity",
                "--sparsities", "0.6", *base[4:], "--max-windows", "2", "--out", str(stem)]) == 0
    table = pd.read_csv(stem.with_suffix(".csv"))
    assert table["allocation"].tolist()[1:] == ["uniform", "sensitivity"] and table["perplexity"].notna().all()


def test_allocate_refuses_sensitivity_without_measurements():
    from core.allocation import allocate

    table = pd.DataFrame({"name": ["a", "b"], "block": [0, 1], "kind": ["q", "q"], "params": [10, 10]})
    with pytest.raises(ValueError, match="sensitivity.*delta_loss.*spectrascope sensitivity"):
        allocate(table, sparsity=0.5, method="sensitivity")
    alloc = allocate(table.assign(delta_loss=[2.0, 1.0]), sparsity=0.5, method="sensitivity", epsilon=0.2)
    assert alloc.ratios["ratio"].tolist() == pytest.approx([0.4, 0.6])


@pytest.mark.slow
def test_demo_runs_in_one_pass(demo, tmp_path, capsys):
    out = tmp_path / "demo.csv"
    assert cli(["sensitivity", "demo", "--method", "magnitude", "--nsamples", "2", "--seqlen", "64",
                "--holdout-windows", "1", "--device", "cpu", "--quiet", "--json", "--out", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    table = pd.read_csv(out)
    assert len(table) == 30 and table["block"].tolist() == list(range(30))
    assert np.isfinite(table["delta_loss"]).all() and result["overall"]["n"] == 30
