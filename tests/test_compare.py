"""Compare: matching across sources, missing matrices, a checkpoint series with a known change,
a LoRA adapter, the GGUF quantization column, zero eigenvalues, and the CLI end to end."""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_model
from safetensors.torch import save_file

from core.compare import BOTH, REFERENCE_ONLY, SOURCE_ONLY, Entry, compare, match_keys


def _table(names_kinds, alpha):
    rows = [{"name": n, "block": b, "kind": k, "alpha": a, "log_norm": 1.0, "status": "ok"}
            for (n, b, k), a in zip(names_kinds, alpha)]
    return pd.DataFrame(rows)


L = "model.layers.{}.self_attn.{}_proj"


def test_matching_by_name_lists_a_missing_matrix_and_an_extra_one():
    ref = _table([(L.format(0, "q"), 0, "q"), (L.format(0, "k"), 0, "k"), (L.format(1, "q"), 1, "q")], [3.0, 4.0, 5.0])
    # other: same matrices in another order, block 0 k missing, one extra (block 2 q)
    other = _table([(L.format(1, "q"), 1, "q"), (L.format(0, "q"), 0, "q"), (L.format(2, "q"), 2, "q")],
                   [5.5, 2.0, 7.0])
    res = compare([Entry("a", ref), Entry("b", other)])
    d = res.deltas.set_index("key")
    assert d.loc[L.format(0, "q"), "delta_alpha"] == pytest.approx(-1.0)
    assert d.loc[L.format(1, "q"), "delta_alpha"] == pytest.approx(0.5)
    assert d.loc[L.format(0, "k"), "present"] == REFERENCE_ONLY and math.isnan(d.loc[L.format(0, "k"), "alpha"])
    assert d.loc[L.format(2, "q"), "present"] == SOURCE_ONLY
    assert sorted(res.missing["key"]) == [L.format(0, "k"), L.format(2, "q")]
    assert len(res.long) == 6
    k = res.by_kind("alpha").set_index(["source", "kind"])
    assert k.loc[("b", "q"), "mean"] == pytest.approx((5.5 + 2.0 + 7.0) / 3)
    assert k.loc[("b", "q"), "change"] == pytest.approx((5.5 + 2.0 + 7.0) / 3 - 4.0)
    assert "only in the reference" in res.summary()


def test_two_families_are_matched_by_block_and_kind():
    ref = _table([(L.format(0, "q"), 0, "q"), (L.format(0, "k"), 0, "k")], [3.0, 4.0])
    opt = _table([("model.decoder.layers.0.self_attn.k_proj", 0, "k"),
                  ("model.decoder.layers.0.self_attn.q_proj", 0, "q")], [4.5, 3.25])
    assert list(match_keys(ref, opt)) == [L.format(0, "k"), L.format(0, "q")]
    res = compare([Entry("llama", ref), Entry("opt", opt)])
    assert (res.deltas["present"] == BOTH).all()
    assert res.deltas.set_index("key").loc[L.format(0, "q"), "delta_alpha"] == pytest.approx(0.25)


def test_compare_refuses_one_source_and_duplicate_labels():
    t = _table([(L.format(0, "q"), 0, "q")], [3.0])
    with pytest.raises(ValueError, match="two or more"):
        compare([Entry("a", t)])
    with pytest.raises(ValueError, match="LABEL=SOURCE"):
        compare([Entry("a", t), Entry("a", t)])


def test_zero_eigenvalues_are_counted_and_left_out_of_the_fit():
    from core.analysis import build_table
    from core.models import MatrixInfo
    from core.spectra import compute_spectra

    g = torch.Generator().manual_seed(0)
    low = torch.randn(200, 20, generator=g) @ torch.randn(20, 100, generator=g)   # rank 20 of 100
    full = torch.randn(200, 100, generator=g)
    infos = [MatrixInfo("low", 0, "q", 200, 100), MatrixInfo("full", 0, "k", 200, 100)]
    table = build_table(compute_spectra(list(zip(infos, (low, full))), device="cpu", workers=1)).set_index("name")
    assert table.loc["low", "n_zero"] == 80 and table.loc["low", "rank"] == 20
    assert table.loc["full", "n_zero"] == 0 and table.loc["full", "rank"] == 100
    assert table.loc["low", "n_tail"] <= 20


def _save(model, folder):
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def test_checkpoint_series_shows_a_known_change_in_exactly_that_place(tmp_path):
    from core.compare_sources import entries_for

    run = tmp_path / "run"
    model = tiny_model("llama", seed=1)
    _save(model, run / "checkpoint-100")
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.weight.mul_(3.0)
    _save(model, run / "checkpoint-200")
    entries = entries_for([str(run)], device="cpu")
    assert [(e.label, e.step) for e in entries] == [("step 100", 100), ("step 200", 200)]
    res = compare(entries)
    d = res.deltas.set_index("key")
    changed = "model.layers.1.self_attn.q_proj"
    # eigenvalues scale by 9: log10 lambda_max by log10(9), alpha (scale-free) not at all
    assert d.loc[changed, "delta_log_spectral_norm"] == pytest.approx(math.log10(9.0), abs=1e-6)  # float32 weights
    assert d.drop(changed)["delta_log_spectral_norm"].abs().max() < 1e-9
    assert d["delta_alpha"].abs().max() < 1e-6
    assert set(res.long["step"].dropna()) == {100, 200}
    # a labelled source is a step too; its analysis comes from the cache
    again = entries_for(["100=" + str(run / "checkpoint-100")], device="cpu")[0]
    assert again.step == 100 and again.label == "100"
    pd.testing.assert_frame_equal(again.table, entries[0].table)


def test_lora_adapter_update_and_merged_spectra(tmp_path):
    from core.compare_sources import entries_for

    base = _save(tiny_model("llama", seed=2), tmp_path / "base")
    g = torch.Generator().manual_seed(3)
    r, lora_alpha = 16, 32
    tensors, updates = {}, {}
    for b in (0, 1):
        for proj, out in (("q", 64), ("v", 32)):
            name = f"model.layers.{b}.self_attn.{proj}_proj"
            a, bb = torch.randn(r, 64, generator=g) * 0.1, torch.randn(out, r, generator=g) * 0.1
            tensors[f"base_model.model.{name}.lora_A.weight"] = a
            tensors[f"base_model.model.{name}.lora_B.weight"] = bb
            updates[name] = (bb @ a) * (lora_alpha / r)
    ad = tmp_path / "adapter"
    ad.mkdir()
    save_file(tensors, str(ad / "adapter_model.safetensors"))
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": lora_alpha,
                                                        "base_model_name_or_path": str(base),
                                                        "target_modules": ["q_proj", "v_proj"]}))
    entries = entries_for([str(ad)], device="cpu")     # base from the config
    assert [e.label for e in entries] == ["base", "adapter merged", "adapter update"]
    base_e, merged, update = entries
    up = update.table.set_index("name")
    assert set(up.index) == set(updates)
    name = "model.layers.1.self_attn.q_proj"
    sv = np.linalg.svd(updates[name].double().numpy(), compute_uv=False)
    assert up.loc[name, "log_spectral_norm"] == pytest.approx(math.log10(sv[0] ** 2), rel=1e-9)
    assert up.loc[name, "rank"] == r and up.loc[name, "n_zero"] == 64 - r
    assert up.loc["model.layers.0.self_attn.v_proj", "n_zero"] == 32 - r
    w = tiny_model("llama", seed=2).model.layers[1].self_attn.q_proj.weight.detach()
    sv = np.linalg.svd((w + updates[name]).double().numpy(), compute_uv=False)
    assert merged.table.set_index("name").loc[name, "log_spectral_norm"] == pytest.approx(math.log10(sv[0] ** 2),
                                                                                          rel=1e-6)
    d = compare(entries[:2]).deltas.set_index("key")
    assert d.loc["model.layers.0.mlp.up_proj", "delta_alpha"] == 0          # not adapted: unchanged
    assert d.loc[name, "delta_log_spectral_norm"] != 0


def test_quant_column_on_the_demo_model(demo_analysis_full, demo, tmp_path):
    from core.quant import quant_types

    table = demo_analysis_full.table
    assert "quant" in table.columns and set(table["quant"]) == {"Q4_1"}   # the demo GGUF is Q4_1 throughout
    # an older conversion without quant_types.json reads the types lazily from its GGUF
    old = tmp_path / "old"
    old.mkdir()
    (old / "spectrascope_source.json").write_text((demo.path / "spectrascope_source.json").read_text())
    types = quant_types(old)
    assert len(types) == 210 and types["model.layers.0.self_attn.q_proj"] == "Q4_1"
    assert quant_types(tmp_path) == {}          # not a GGUF conversion


def _quant_table(rng, alpha_of) -> pd.DataFrame:
    """30 blocks x 7 LLaMA kinds; v and down at Q6_K in GGUF Q4_K_M's blocks (the first and last
    eighth and every third between), everything else Q4_K; alpha from ``alpha_of(kind, quant)``."""
    def more_bits(b: int, n: int = 30) -> bool:
        return b < n // 8 or b >= 7 * n // 8 or (b - n // 8) % 3 == 2

    rows = [{"block": b, "kind": k, "quant": "Q6_K" if k in ("v", "down") and more_bits(b) else "Q4_K"}
            for b in range(30) for k in ("q", "k", "v", "o", "gate", "up", "down")]
    t = pd.DataFrame(rows)
    t["alpha"] = [alpha_of(k, q) + rng.normal(0, 0.2) for k, q in zip(t["kind"], t["quant"])]
    return t


def test_quant_message_compares_types_within_a_kind():
    from core.quant import quant_alpha_message, quant_differences

    rng = np.random.default_rng(0)
    # v is heavier-tailed by nature (alpha 5) and down lighter (3): the types differ only because
    # the kinds do; within v and within down both types have the same alpha -> no message
    by_kind = {"v": 5.0, "down": 3.0}
    kinds_only = _quant_table(rng, lambda k, q: by_kind.get(k, 3.5))
    assert quant_alpha_message(kinds_only) is None
    # within down, the Q6_K blocks have alpha 0.8 higher -> the message names down and both types
    within = _quant_table(rng, lambda k, q: 3.0 + 0.8 * (k == "down" and q == "Q6_K"))
    msg = quant_alpha_message(within)
    assert msg and "down matrices" in msg and "Q6_K" in msg and "Q4_K" in msg and "\n" not in msg
    found = quant_differences(within)
    assert list(found["kind"]) == ["down"] and found["p"].iloc[0] < 0.01
    # only the blocks where both types occur (3-25): the first and last ones are all Q6_K or all Q4_K
    assert found["blocks"].iloc[0] == "3-25" and (found["n_high"].iloc[0], found["n_low"].iloc[0]) == (7, 16)
    assert quant_alpha_message(within[within["block"] < 6]) is None     # too few of each type
    assert quant_alpha_message(within.assign(quant=None)) is None        # not quantized
    assert quant_alpha_message(within.drop(columns="kind")) is None      # a table without kinds


def test_analyze_summary_carries_the_quantization_note():
    from core.analysis import Analysis

    rng = np.random.default_rng(1)
    table = _quant_table(rng, lambda k, q: 3.0 + 0.8 * (k == "down" and q == "Q6_K")).assign(status="ok")
    text = Analysis(table, {}, "m", "id", "peak", "cpu", 1.0).summary()
    assert "note: alpha goes with the storage precision: down matrices" in text
    plain = Analysis(table.assign(alpha=3.0 + rng.normal(0, 0.2, len(table))), {}, "m", "id", "peak", "cpu", 1.0)
    assert "note:" not in plain.summary()


def test_prune_spec_analyze_output_round_trip():
    from core.cli import build_parser
    from core.spec import PruneSpec

    spec = PruneSpec(method="magnitude", analyze_output=True)
    argv = spec.to_argv()
    assert argv[-1] == "--analyze-output"
    assert PruneSpec.from_args(build_parser().parse_args(argv)) == spec
    assert PruneSpec.from_args(build_parser().parse_args(PruneSpec().to_argv())).analyze_output is False


@pytest.mark.slow
def test_cli_compare_demo_with_its_pruned_output(tmp_path, capsys, home):
    from core.cli import main
    from core.compare_sources import analysed_runs

    out = tmp_path / "pruned50"
    assert main(["prune", "--method", "magnitude", "--sparsity", "0.5", "--save", str(out), "--analyze-output",
                 "--device", "cpu", "--quiet", "--json"]) == 0
    run_id = json.loads(capsys.readouterr().out)["run_id"]
    assert run_id in set(analysed_runs()["id"])
    stem = tmp_path / "cmp"
    assert main(["compare", "demo", str(out), "--device", "cpu", "--quiet", "--out", str(stem),
                 "--format", "csv,parquet", "--html", str(tmp_path / "r.html")]) == 0
    deltas = pd.read_parquet(f"{stem}-deltas.parquet")
    assert len(deltas) == 210 and (deltas["present"] == BOTH).all()
    assert pd.read_csv(f"{stem}-long.csv")["source"].nunique() == 2
    page = (tmp_path / "r.html").read_text()
    # offline: no script is fetched from anywhere, plotly.js (megabytes) is inline
    assert re.findall(r"<script[^>]*\bsrc=", page) == [] and "Plotly.newPlot" in page and len(page) > 3_000_000
    capsys.readouterr()
    assert main(["compare", "demo", f"pruned=run:{run_id}", "--device", "cpu", "--quiet"]) == 0
    assert main(["compare", "demo", f"run:{run_id}", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "mean alpha per kind" in text and f"run {run_id}: magnitude uniform S=0.50" in text
