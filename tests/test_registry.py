"""The runs registry: versioned schema, statuses, two writers at once, the comparison query."""
from __future__ import annotations

import multiprocessing as mp
import sqlite3

import pytest

from core.progress import Cancelled
from core.registry import COMPARE_COLUMNS, SCHEMA_VERSION, Registry


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
    with pytest.raises(ValueError, match="fields"):
        reg.start("prune", colour="red")


def test_compare_is_the_finished_runs_with_a_perplexity_of_one_model(tmp_path):
    reg = Registry(tmp_path / "runs.sqlite")
    with reg.record("eval", model="a", model_identity="A", method="dense") as dense:
        reg.update(dense, perplexity=10.0, eval_windows=4)
    with reg.record("prune", model="a", model_identity="A", method="wanda", sparsity=0.5) as no_ppl:
        pass
    with reg.record("prune", model="a", model_identity="A", method="wanda", sparsity=0.6,
                    output_dir="/x/pruned") as pruned:
        reg.update(pruned, perplexity=20.0)
    with reg.record("prune", model="b", model_identity="B", method="wanda") as other:
        reg.update(other, perplexity=30.0)
    with pytest.raises(RuntimeError):
        with reg.record("prune", model="a", model_identity="A", method="magnitude") as failed:
            reg.update(failed, perplexity=40.0)
            raise RuntimeError("late")
    table = reg.compare(model_identity="A")
    assert table["id"].tolist() == [dense, pruned]
    assert tuple(table.columns) == COMPARE_COLUMNS
    assert table["perplexity"].tolist() == [10.0, 20.0] and table["eval_windows"].iloc[0] == 4
    assert table["output_dir"].iloc[1] == "/x/pruned" and table["kind"].tolist() == ["eval", "prune"]
    assert reg.compare()["id"].tolist() == [dense, pruned, other]
    assert no_ppl not in reg.compare()["id"].tolist()


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
