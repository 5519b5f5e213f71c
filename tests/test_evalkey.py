"""Comparison keys and BOS modes end to end: the registry's schema migration, ``run_key``,
``Registry.compare``/``baseline``, and the BOS mode recorded by prune/eval runs of tiny
models whose tokenizer adds BOS and one that does not."""
from __future__ import annotations

import json
import sqlite3

import pandas as pd
import pytest

from conftest import tiny_model
from core.cli import main
from core.experiments import eval_run, prune_and_eval
from core.spec import CalibrationSpec, EvaluationSpec, PruneSpec
from core.models import REPORT_NAME, wrap_model
from core.registry import SCHEMA_VERSION, Registry
from core.runkey import run_key
from test_bos import make_tokenizer, text_file  # noqa: F401  (text_file: the shared text fixture)

# the schema of version 1, written out: a database made by Spectrascope before BOS modes
V1_SCHEMA = """
CREATE TABLE schema_version (version INTEGER NOT NULL);
CREATE TABLE runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, status TEXT NOT NULL, error TEXT,
    model TEXT, model_identity TEXT, method TEXT, allocation TEXT, sparsity REAL, epsilon REAL, mapping TEXT,
    nm TEXT, allocation_params TEXT, calibration TEXT, achieved_sparsity REAL,
    eval_dataset TEXT, eval_seqlen INTEGER, eval_windows INTEGER, perplexity REAL, tokens_per_second REAL,
    prune_seconds REAL, eval_seconds REAL, device TEXT, dtype TEXT, output_dir TEXT, versions TEXT,
    started_at REAL NOT NULL, finished_at REAL
);
CREATE TABLE matrices (
    run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    name TEXT NOT NULL, block INTEGER, kind TEXT, params INTEGER, ratio REAL, achieved REAL,
    PRIMARY KEY (run_id, name)
);
CREATE INDEX runs_model ON runs(model_identity, kind, status);
INSERT INTO schema_version VALUES (1);
INSERT INTO runs (kind, status, model_identity, method, eval_dataset, eval_seqlen, eval_windows, perplexity,
                  started_at) VALUES ('eval', 'done', 'M', 'dense', 'wiki', 256, 24, 10.0, 1.0);
INSERT INTO runs (kind, status, model_identity, method, allocation, sparsity, calibration, eval_dataset,
                  eval_seqlen, eval_windows, perplexity, started_at)
    VALUES ('prune', 'done', 'M', 'wanda', 'uniform', 0.5,
            '{"dataset": "wiki", "nsamples": 16, "seqlen": 256, "seed": 0}', 'wiki', 256, 24, 20.0, 2.0);
"""


def test_a_version_1_database_is_migrated_in_place(tmp_path):
    path = tmp_path / "runs.sqlite"
    con = sqlite3.connect(path)
    con.executescript(V1_SCHEMA)
    con.close()
    reg = Registry(path)
    con = sqlite3.connect(path)
    assert con.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)] == [(2,)]
    columns = {r[1] for r in con.execute("PRAGMA table_info(runs)")}
    con.close()
    assert {"eval_bos", "eval_bos_prepended", "calib_bos", "calib_bos_prepended"} <= columns
    old = reg.query().set_index("id")
    # version 1 never prepended BOS: the old rows say so
    assert old["eval_bos"].tolist() == ["none", "none"] and old["eval_bos_prepended"].tolist() == [False, False]
    assert pd.isna(old.loc[1, "calib_bos"]) and old.loc[2, "calib_bos"] == "none"
    table = reg.compare()
    assert table["settings"].tolist() == ["wiki · 24×256 · BOS none",
                                          "wiki · 24×256 · BOS none · calib wiki 16×256 seed 0"]
    assert reg.baseline(table.iloc[1], "dense")["id"] == 1
    with reg.record("eval", model_identity="M", method="dense") as new:   # new rows write the new columns
        reg.update(new, eval_bos="auto", eval_bos_prepended=True, perplexity=9.0)
    assert reg.get(new)["eval_bos_prepended"] is True
    Registry(path)                                                       # opening again changes nothing
    assert len(reg.query()) == 3


def _row(**fields):
    base = {"kind": "prune", "model_identity": "M", "eval_dataset": "wiki", "eval_seqlen": 256, "eval_windows": 24,
            "eval_bos": "auto", "eval_bos_prepended": False,
            "calibration": {"dataset": "wiki", "nsamples": 16, "seqlen": 256, "seed": 0},
            "calib_bos": "none", "calib_bos_prepended": False}
    return {**base, **fields}


def test_run_key_names_every_setting_that_changes_a_perplexity():
    dense = run_key(_row(kind="eval", calibration=None))
    assert dense.key == dense.eval_key and dense.settings == "wiki · 24×256 · BOS none"
    pruned = run_key(_row())
    assert pruned.eval_key == dense.eval_key and pruned.key != dense.key
    assert pruned.settings == "wiki · 24×256 · BOS none · calib wiki 16×256 seed 0"
    # auto that prepended nothing is the none protocol; a prepended BOS is a different key
    assert run_key(_row(eval_bos="none")).key == pruned.key
    assert run_key(_row(eval_bos_prepended=True)).eval_key != pruned.eval_key
    assert "BOS auto" in run_key(_row(eval_bos_prepended=True)).settings
    for change in ({"model_identity": "N"}, {"eval_dataset": "c4"}, {"eval_seqlen": 128}, {"eval_windows": 8}):
        assert run_key(_row(**change)).eval_key != pruned.eval_key, change
    for change in ({"dataset": "c4"}, {"nsamples": 128}, {"seqlen": 2048}, {"seed": 1}):
        other = run_key(_row(calibration={**_row()["calibration"], **change}))
        assert other.eval_key == pruned.eval_key and other.key != pruned.key, change
    calib_bos = run_key(_row(calib_bos="auto", calib_bos_prepended=True))
    assert calib_bos.key != pruned.key and calib_bos.settings.endswith("seed 0 BOS auto")
    no_calib = run_key(_row(calibration=None))
    assert no_calib.settings.endswith("no calibration") and no_calib.key != pruned.key


def _record(reg, kind, ppl, **fields):
    with reg.record(kind, model_identity="M", **fields) as run_id:
        reg.update(run_id, perplexity=ppl)
    return run_id


def test_baseline_is_the_run_of_the_same_key(tmp_path):
    reg = Registry(tmp_path / "runs.sqlite")
    ev = dict(eval_dataset="wiki", eval_seqlen=256, eval_bos="none", eval_bos_prepended=False)
    calib = {"calibration": {"dataset": "wiki", "nsamples": 16, "seqlen": 256, "seed": 0}}
    dense8 = _record(reg, "eval", 10.0, method="dense", eval_windows=8, **ev)
    _record(reg, "eval", 11.0, method="dense", eval_windows=1, **ev)              # newer, other windows
    uni = _record(reg, "prune", 20.0, method="wanda", allocation="uniform", sparsity=0.5, eval_windows=8, **ev,
                  **calib)
    _record(reg, "prune", 21.0, method="wanda", allocation="uniform", sparsity=0.6, eval_windows=8, **ev, **calib)
    _record(reg, "prune", 22.0, method="magnitude", allocation="uniform", sparsity=0.5, eval_windows=8, **ev,
            **calib)
    _record(reg, "prune", 23.0, method="wanda", allocation="uniform", sparsity=0.5, eval_windows=8, **ev,
            calibration={"dataset": "wiki", "nsamples": 128, "seqlen": 256, "seed": 0})   # other calibration
    alpha = _record(reg, "prune", 18.0, method="wanda", allocation="alpha", sparsity=0.5, eval_windows=8, **ev,
                    **calib)
    table = reg.compare(model_identity="M")
    row = table.set_index("id").loc[alpha].to_dict() | {"id": alpha}
    assert reg.baseline(row, "dense")["id"] == dense8
    assert reg.baseline(row, "uniform")["id"] == uni
    assert reg.baseline(row["key"], "uniform", method="wanda", sparsity=0.5)["id"] == uni
    assert reg.baseline(row["eval_key"], "dense")["id"] == dense8
    assert reg.baseline(row, "uniform", sparsity=0.7) is None
    assert reg.baseline(row["eval_key"].replace("windows=8", "windows=4"), "dense") is None   # none of that key
    with pytest.raises(ValueError, match="kind='owl': use one of dense, uniform"):
        reg.baseline(row, "owl")


# --- BOS end to end ------------------------------------------------------------------------

@pytest.mark.parametrize("adds_bos", [True, False])
def test_prune_and_eval_record_the_bos_mode(tmp_path, text_file, adds_bos):
    loaded = wrap_model(tiny_model("llama"), make_tokenizer(adds_bos))
    reg = Registry(tmp_path / "runs.sqlite")
    ev = EvaluationSpec(True, text_file[0], 32, 4)            # the default mode: auto
    runs = {}
    for bos in ("auto", "none"):
        spec = PruneSpec(method="wanda", sparsity=0.5, device="cpu", calibration=CalibrationSpec(
            text_file[0], 4, 32, 0, bos), evaluation=EvaluationSpec(True, text_file[0], 32, 4, bos),
            save=tmp_path / f"out-{bos}")
        runs[bos] = prune_and_eval(spec, loaded, registry=reg)
        row = reg.get(runs[bos].run_id)
        prepended = adds_bos and bos == "auto"
        assert (row["calib_bos"], row["calib_bos_prepended"]) == (bos, prepended)
        assert (row["eval_bos"], row["eval_bos_prepended"]) == (bos, prepended)
        assert row["calibration"]["bos"] == bos and row["calibration"]["bos_prepended"] is prepended
        report = json.loads((tmp_path / f"out-{bos}" / REPORT_NAME).read_text())
        assert report["perplexity"]["bos"] == bos and report["perplexity"]["bos_prepended"] is prepended
        assert report["calibration"]["bos_prepended"] is prepended and report["key"] == runs[bos].key.key
        assert ["--bos", bos] == report["spec"][report["spec"].index("--bos"):][:2]
    dense_id, dense = eval_run(PruneSpec(device="cpu", evaluation=ev), loaded, registry=reg)
    assert reg.get(dense_id)["eval_bos_prepended"] is adds_bos and dense.bos_prepended is adds_bos
    table = reg.compare()
    auto, none = runs["auto"].key, runs["none"].key
    assert table["key"].tolist()[:2] == [auto.key, none.key] and table["kind"].tolist() == ["prune"] * 2 + ["eval"]
    # the BOS tokenizer: auto and none are different protocols; the plain one: the same
    assert (auto.key != none.key) is adds_bos
    assert reg.baseline(table.iloc[0], "dense")["id"] == dense_id
    if adds_bos:
        assert reg.baseline(table.iloc[1], "dense") is None and "BOS auto" in auto.settings
    else:
        assert reg.baseline(table.iloc[1], "dense")["id"] == dense_id and "BOS none" in auto.settings


def test_cli_bos_option_reaches_the_registry(tmp_path, text_file, monkeypatch, capsys):
    monkeypatch.setenv("SPECTRASCOPE_HOME", str(tmp_path / "home"))
    src = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(src)
    make_tokenizer(True).save_pretrained(src)
    out = {}
    for bos in ("auto", "paper", "none"):
        assert main(["eval", "--model", str(src), "--dataset", text_file[0], "--seqlen", "32", "--max-windows", "2",
                     "--device", "cpu", "--bos", bos, "--json", "--quiet"]) == 0
        out[bos] = json.loads(capsys.readouterr().out)
    assert [out[b]["bos_prepended"] for b in ("auto", "paper", "none")] == [True, True, False]
    assert len({out[b]["key"] for b in out}) == 3 and out["none"]["settings"].endswith("BOS none")
    rows = Registry(tmp_path / "home" / "runs.sqlite").query()
    assert rows["eval_bos"].tolist() == ["auto", "paper", "none"]
    assert main(["prune", "--model", str(src), "--method", "wanda", "--calib", text_file[0], "--nsamples", "2",
                 "--seqlen", "32", "--bos", "none", "--eval-bos", "auto", "--eval", "--dataset", text_file[0],
                 "--max-windows", "2", "--device", "cpu", "--json", "--quiet"]) == 0
    run = json.loads(capsys.readouterr().out)
    assert run["calibration"]["bos"] == "none" and run["perplexity"]["bos"] == "auto"
    assert run["key"].startswith(out["auto"]["eval_key"] + "|calib=")
