"""The runs registry, atomic saving and the recorded prune pipeline."""
from __future__ import annotations

import json
import multiprocessing as mp
import sqlite3
import threading

import pytest
import torch

from conftest import tiny_model
from core.evaluation import perplexity
from core.models import load_model, wrap_model
from core.progress import Cancelled
from core.runs import REPORT_NAME, SCHEMA_VERSION, Registry, prune_and_eval, save_model


def _ids(n=3, seqlen=32, seed=0):
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def test_schema_is_versioned_and_wal(tmp_path):
    reg = Registry(tmp_path / "runs.sqlite")
    con = sqlite3.connect(reg.path)
    assert con.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()
    Registry(reg.path)  # opening again keeps one version row
    con = sqlite3.connect(reg.path)
    assert con.execute("SELECT count(*) FROM schema_version").fetchone()[0] == 1
    con.execute("UPDATE schema_version SET version = 99")
    con.commit()
    con.close()
    with pytest.raises(ValueError, match="schema version 99"):
        Registry(reg.path)


def test_record_statuses(tmp_path):
    reg = Registry(tmp_path / "runs.sqlite")
    with reg.record("eval", model="m", method="dense") as ok:
        reg.update(ok, perplexity=12.5)
    with pytest.raises(RuntimeError):
        with reg.record("prune", model="m", method="wanda") as bad:
            raise RuntimeError("boom")
    with pytest.raises(Cancelled):
        with reg.record("prune", model="m", method="wanda") as stopped:
            raise Cancelled("cancelled before block 1")
    runs = reg.query().set_index("id")
    assert runs.loc[ok, "status"] == "done" and runs.loc[ok, "perplexity"] == 12.5
    assert runs.loc[bad, "status"] == "failed" and "RuntimeError: boom" in runs.loc[bad, "error"]
    assert runs.loc[stopped, "status"] == "cancelled"
    assert "torch" in runs.loc[ok, "versions"]
    assert list(reg.compare()["id"]) == [ok]
    with pytest.raises(ValueError, match="fields"):
        reg.start("prune", colour="red")


def _writer(path, n):
    reg = Registry(path)
    for i in range(n):
        with reg.record("eval", model=f"w{i}") as rid:
            reg.update(rid, perplexity=float(i))


def test_two_processes_write_at_once(tmp_path):
    path = tmp_path / "runs.sqlite"
    Registry(path)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, 15)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert all(p.exitcode == 0 for p in procs)
    runs = Registry(path).query()
    assert len(runs) == 30 and (runs["status"] == "done").all()


def test_pruned_model_saves_reloads_with_same_perplexity(tmp_path):
    loaded = wrap_model(tiny_model("llama"))
    reg = Registry(tmp_path / "runs.sqlite")
    dest = tmp_path / "pruned"
    run = prune_and_eval(loaded, method="sparsegpt", allocation="uniform", sparsity=0.6, calibration=_ids(),
                         save=dest, device="cpu", registry=reg)
    assert run.output_dir == dest.resolve()
    report = json.loads((dest / REPORT_NAME).read_text())
    assert {"name", "ratio", "achieved"} <= set(report["matrices"][0])
    assert report["achieved_sparsity"] == pytest.approx(0.6, abs=0.01)
    again = load_model(dest, device="cpu", tokenizer=False)
    ids = torch.randint(0, 256, (640,), generator=torch.Generator().manual_seed(3))
    # the original is still dense; the reloaded copy has the recorded sparsity
    assert all((loaded.weight(m.name) != 0).all() for m in loaded.matrices)
    reloaded_sparsity = sum(float((again.weight(m.name) == 0).sum()) for m in again.matrices) / sum(
        m.params for m in again.matrices)
    assert reloaded_sparsity == pytest.approx(run.achieved)
    row = reg.get(run.run_id)
    assert row["status"] == "done" and row["output_dir"] == str(dest)
    assert reg.matrices(run.run_id)["achieved"].tolist() == pytest.approx(run.matrices["achieved"].tolist())
    # same perplexity as the pruned model in memory: prune again (deterministic) and compare
    again_run = prune_and_eval(loaded, method="sparsegpt", allocation="uniform", sparsity=0.6, calibration=_ids(),
                               device="cpu", registry=reg)
    from core.pruning import prune
    mem = prune(loaded, 0.6, method="sparsegpt", calibration=_ids(), device="cpu", copy=True).model
    p_mem = perplexity(mem, ids=ids, seqlen=64, device="cpu").perplexity
    p_disk = perplexity(again, ids=ids, seqlen=64, device="cpu").perplexity
    assert p_disk == pytest.approx(p_mem, rel=1e-6)
    assert again_run.achieved == pytest.approx(run.achieved)
    with pytest.raises(ValueError, match="already exists"):
        save_model(again, dest, {})


def test_failed_and_cancelled_runs_are_recorded_and_leave_no_folder(tmp_path, monkeypatch):
    loaded = wrap_model(tiny_model("llama"))
    reg = Registry(tmp_path / "runs.sqlite")
    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled):
        prune_and_eval(loaded, method="wanda", sparsity=0.5, calibration=_ids(), save=tmp_path / "a",
                       device="cpu", registry=reg, cancel=stop)
    model_cls = type(loaded.model)

    def broken_save(self, folder, **kw):
        (folder / "model.safetensors").write_bytes(b"half")   # a half-written file, then a crash
        raise OSError("disk full")

    monkeypatch.setattr(model_cls, "save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        prune_and_eval(loaded, method="magnitude", sparsity=0.5, save=tmp_path / "b", device="cpu", registry=reg)
    runs = reg.query()
    assert runs["status"].tolist() == ["cancelled", "failed"]
    assert "disk full" in runs["error"].iloc[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs.sqlite", "runs.sqlite-shm", "runs.sqlite-wal"] \
        or sorted(p.name for p in tmp_path.iterdir()) == ["runs.sqlite"]


def test_cli_prune_and_eval_on_a_saved_folder(tmp_path, capsys, monkeypatch):
    """The prune and eval sub-commands end to end (magnitude needs no tokenizer or text)."""
    from core.cli import main

    monkeypatch.setenv("SPECTRASCOPE_HOME", str(tmp_path / "home"))
    src = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(src)
    before = sorted(p.name for p in src.iterdir())
    rc = main(["prune", "--model", str(src), "--method", "magnitude", "--sparsity", "0.6", "--device", "cpu",
               "--save", str(tmp_path / "out"), "--json", "--quiet"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["achieved_sparsity"] == pytest.approx(0.6, abs=1e-3)
    assert {"ratio", "achieved"} <= set(out["matrices"][0])
    report = json.loads((tmp_path / "out" / REPORT_NAME).read_text())
    assert report["matrices"][0]["ratio"] == 0.6
    assert sorted(p.name for p in src.iterdir()) == before            # the source is never touched
    assert main(["prune", "--model", str(src), "--method", "magnitude", "--save", str(tmp_path / "out"),
                 "--quiet"]) == 2                                        # refuses to overwrite
    assert "already exists" in capsys.readouterr().err
    runs = Registry(tmp_path / "home" / "runs.sqlite").query()
    assert runs["status"].tolist() == ["done"]                         # refused before any work


def test_alpha_allocation_prunes_to_the_target_mean(tmp_path):
    loaded = wrap_model(tiny_model("llama"))
    reg = Registry(tmp_path / "runs.sqlite")
    run = prune_and_eval(loaded, method="wanda", allocation="alpha", sparsity=0.6, epsilon=0.3,
                         calibration=_ids(), device="cpu", registry=reg)
    m = run.matrices
    assert m["ratio"].max() - m["ratio"].min() > 0.1                      # not uniform
    assert (m["ratio"] * m["params"]).sum() / m["params"].sum() == pytest.approx(0.6)
    assert run.achieved == pytest.approx(0.6, abs=0.01)
    row = reg.get(run.run_id)
    assert row["allocation"] == "alpha" and row["epsilon"] == 0.3
    assert row["allocation_params"]["mapping"] == "block"


def test_cli_prune_takes_the_ratios_of_an_allocation_file(tmp_path, capsys, monkeypatch):
    """`analyze --out` -> `allocate --out` -> `prune --ratios`: the pruned model follows the file exactly."""
    import pandas as pd

    from core.cli import main

    monkeypatch.setenv("SPECTRASCOPE_HOME", str(tmp_path / "home"))
    src = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(src)
    assert main(["analyze", "--model", str(src), "--device", "cpu", "--out", str(tmp_path / "m.csv"), "--quiet"]) == 0
    assert main(["allocate", "--metrics", str(tmp_path / "m.csv"), "--sparsity", "0.5", "--epsilon", "0.4",
                 "--dense-kinds", "k,v", "--out", str(tmp_path / "r.csv"), "--quiet"]) == 0
    wanted = pd.read_csv(tmp_path / "r.csv").set_index("name")["ratio"]
    assert (wanted[wanted.index.str.contains("k_proj|v_proj")] == 0).all()
    rc = main(["prune", "--model", str(src), "--method", "magnitude", "--allocation", "alpha", "--ratios",
               str(tmp_path / "r.csv"), "--device", "cpu", "--json", "--quiet"])
    assert rc == 0
    got = pd.DataFrame(json.loads(capsys.readouterr().out)["matrices"]).set_index("name")
    pd.testing.assert_series_equal(got["ratio"], wanted.loc[got.index], check_names=False)
    assert (got["achieved"] - got["ratio"]).abs().max() < 1 / 64          # one weight per row of 64 inputs
    # a file for another model is refused with the reason
    pd.DataFrame({"name": ["x"], "ratio": [0.5]}).to_csv(tmp_path / "bad.csv", index=False)
    assert main(["prune", "--model", str(src), "--method", "magnitude", "--ratios", str(tmp_path / "bad.csv"),
                 "--quiet"]) == 2
    assert "no ratio for 14 of the model's matrices" in capsys.readouterr().err


def test_sweep_gives_each_method_its_own_epsilon(demo, tmp_path):
    """`sweep` on the embedded text (a tiny random llama with the demo tokenizer, so it is
    quick): dense first, one alpha row per (method, epsilon) with each method's own
    epsilons, every run recorded with the perplexity the table shows."""
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config
    from core.cli import _epsilons
    from core.runs import pivot, sweep

    cfg = tiny_config("llama")
    cfg.vocab_size = len(demo.tokenizer)
    torch.manual_seed(0)
    loaded = wrap_model(AutoModelForCausalLM.from_config(cfg).eval(), demo.tokenizer)
    reg = Registry(tmp_path / "runs.sqlite")
    methods = ["magnitude", "wanda"]
    eps = _epsilons("magnitude=0.1,magnitude=0.2,wanda=0.3", methods)
    assert eps == {"magnitude": [0.1, 0.2], "wanda": [0.3]}
    calib = demo.tokenizer("The river flows north through the valley. " * 40, return_tensors="pt").input_ids
    table = sweep(loaded, methods=methods, allocations=["uniform", "alpha"], sparsities=[0.5], epsilons=eps,
                  calibration=calib[:, :64], eval_seqlen=64, max_windows=3, device="cpu", registry=reg)
    assert table.iloc[0]["method"] == "dense" and len(table) == 1 + 2 + 3
    alpha = table[table.allocation == "alpha"]
    assert sorted(alpha[alpha.method == "magnitude"]["epsilon"]) == [0.1, 0.2]
    assert alpha[alpha.method == "wanda"]["epsilon"].tolist() == [0.3]
    assert (table["achieved"].iloc[1:] - 0.5).abs().max() < 0.01
    for row in table.itertuples():
        run = reg.get(int(row.run_id))
        assert run["status"] == "done" and run["perplexity"] == pytest.approx(row.perplexity)
    assert "magnitude alpha (eps 0.2)" in pivot(table)["setting"].tolist()
